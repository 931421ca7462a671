"""The ops inside torch.autocast: floating operands are cast to the region's dtype, as
F.scaled_dot_product_attention's are, so float32 and 16-bit operands mix there."""
import pytest
import torch

import gaze_ext
from gaze_ext import ops
from helpers import (DEVICES, generator, q_positions, qkv_shapes, random_batch_layout,
                     random_selection)


def mixed_case(device):
    """A ragged layout on `device`, float32 q/k/v, a selection and query positions."""
    gen = generator(3)
    B, Hq, Hkv, Lq, N, D = 2, 4, 2, 3, 50, 16
    layout = random_batch_layout(gen, B, N, max_regions=6)
    layout = gaze_ext.GazeLayout(*(t.to(device) for t in layout[:4]), N)
    q, k, v = (torch.randn(s, generator=gen).to(device) for s in qkv_shapes(B, Hq, Hkv, Lq, N, D))
    idx = random_selection(gen, (B, Hkv, Lq, 3), layout.num_regions).to(device)
    return layout, q, k, v, idx, q_positions(gen, B, Lq, N).to(device)


@pytest.mark.parametrize("device", DEVICES)
@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float16])
def test_ops_cast_their_operands_to_the_autocast_dtype(device, dtype):
    """Each op with float32 and `dtype` operands inside autocast equals the op on operands
    cast beforehand (bitwise: the same kernel runs, the backward in its deterministic mode),
    and float32 leaves get float32 gradients through the casts."""
    layout, q, k, v, idx, q_pos = mixed_case(device)
    k16 = k.to(dtype)
    with torch.autocast(device, dtype=dtype):
        desc = ops.region_pool(k, layout.region_ptr, layout.region_tokens)
        sel, score = ops.region_topk(q, desc, layout.region_ptr, 3, True, q_pos, layout.region_pos)
    want_desc = ops.region_pool(k16, layout.region_ptr, layout.region_tokens)
    want_sel, want_score = ops.region_topk(q.to(dtype), want_desc, layout.region_ptr, 3, True,
                                           q_pos, layout.region_pos)
    assert desc.dtype == dtype and torch.equal(desc, want_desc)
    assert torch.equal(sel, want_sel) and torch.equal(score, want_score)

    args = (layout.region_ptr, layout.region_tokens, layout.fixed_tokens, idx, q_pos)
    q_leaf, v_leaf = q.clone().requires_grad_(), v.clone().requires_grad_()
    with torch.autocast(device, dtype=dtype):
        out, lse = ops.gaze_attention(q_leaf, k16, v_leaf, *args)
    assert out.dtype == dtype and lse.dtype == torch.float32
    q_cast = q.to(dtype).requires_grad_()
    v_cast = v.to(dtype).requires_grad_()
    want_out, want_lse = ops.gaze_attention(q_cast, k16, v_cast, *args)
    assert torch.equal(out, want_out) and torch.equal(lse, want_lse)
    grad = torch.randn(out.shape, generator=generator(4)).to(device, dtype)
    torch.use_deterministic_algorithms(True)  # the CUDA backward's dK/dV atomics, in order
    try:
        out.backward(grad)
        want_out.backward(grad)
    finally:
        torch.use_deterministic_algorithms(False)
    assert q_leaf.grad.dtype == torch.float32 and v_leaf.grad.dtype == torch.float32
    assert torch.equal(q_leaf.grad, q_cast.grad.float())
    assert torch.equal(v_leaf.grad, v_cast.grad.float())


@pytest.mark.parametrize("device", DEVICES)
def test_mixed_operands_outside_autocast_are_refused(device):
    layout, q, k, v, idx, q_pos = mixed_case(device)
    with pytest.raises(RuntimeError, match="k has dtype BFloat16 but q has dtype Float"):
        ops.gaze_attention(q, k.bfloat16(), v, layout.region_ptr, layout.region_tokens,
                           layout.fixed_tokens, idx, q_pos)


def test_float64_is_not_cast():
    """As torch's own autocast leaves float64 alone, so do the ops (CPU gradcheck inputs)."""
    layout, q, k, v, idx, q_pos = mixed_case("cpu")
    with torch.autocast("cpu", dtype=torch.bfloat16):
        out, _ = ops.gaze_attention(q.double(), k.double(), v.double(), layout.region_ptr,
                                    layout.region_tokens, layout.fixed_tokens, idx, q_pos)
    assert out.dtype == torch.float64


def test_compiled_functional_api_under_autocast():
    """torch.compile(fullgraph=True) of the functional API inside autocast, K in bfloat16
    and q, V in float32: the casts trace, and the compiled result equals eager."""
    layout, q, k, v, _, _ = mixed_case("cpu")
    k = k.bfloat16()

    def attention(q, k, v):
        with torch.autocast("cpu", dtype=torch.bfloat16):
            return gaze_ext.gaze_attention(q, k, v, layout, topk=2)

    compiled = torch.compile(attention, fullgraph=True, backend="aot_eager")
    eager = attention(q, k, v)
    assert eager.dtype == torch.bfloat16
    result = compiled(q, k, v)
    assert result.dtype == torch.bfloat16 and torch.equal(result, eager)
