"""torch.library.opcheck on every op: schema, fake kernel, autograd registration, AOT."""
import pytest
import torch

from gaze_ext import build_layout
from helpers import DEVICES, generator, random_batch_layout, random_selection

B, Hq, Hkv, Lq, N, D = 2, 4, 2, 3, 30, 16


def inputs(device, dtype=torch.float32, requires_grad=True, batched=True):
    gen = generator(9)
    layout = (random_batch_layout(gen, B, N, max_regions=6) if batched
              else build_layout([(4, 1, 4, 5)], N, region_shape=(1, 2, 3)))
    t = lambda *s: torch.randn(*s, generator=gen).to(device, dtype).requires_grad_(requires_grad)  # noqa: E731
    q, k, v = t(B, Hq, Lq, D), t(B, Hkv, N, D), t(B, Hkv, N, D)
    idx = random_selection(gen, (B, Hkv, Lq, 3), layout.num_regions).to(device)
    q_pos = torch.randint(0, N, (B, Lq), generator=gen, dtype=torch.int32).to(device)
    return q, k, v, layout.to(device), idx, q_pos


@pytest.mark.parametrize("device", DEVICES)
@pytest.mark.parametrize("batched", [True, False])
def test_opcheck_region_pool(device, batched):
    q, k, v, layout, idx, q_pos = inputs(device, batched=batched)
    torch.library.opcheck(torch.ops.gaze.region_pool.default,
                          (k, layout.region_ptr, layout.region_tokens))
    grad = torch.randn(B, Hkv, layout.num_regions, D, device=device)
    torch.library.opcheck(torch.ops.gaze.region_pool_backward.default,
                          (grad, layout.region_ptr, layout.region_tokens, N))


@pytest.mark.parametrize("device", DEVICES)
@pytest.mark.parametrize("share_kv", [True, False])
def test_opcheck_region_topk(device, share_kv):
    q, k, v, layout, idx, q_pos = inputs(device)  # q requires grad: the op is not differentiable
    desc = torch.randn(B, Hkv, layout.num_regions, D, device=device)
    assert not torch.ops.gaze.region_topk(q, desc, layout.region_ptr, 2, share_kv, None,
                                          None)[1].requires_grad
    torch.library.opcheck(torch.ops.gaze.region_topk.default,
                          (q, desc, layout.region_ptr, 4, share_kv, q_pos, layout.region_pos))
    torch.library.opcheck(torch.ops.gaze.region_topk.default,
                          (q, desc, layout.region_ptr, 100, share_kv, None, None))


@pytest.mark.parametrize("device", DEVICES)
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
@pytest.mark.parametrize("causal", [False, True])
def test_opcheck_gaze_attention(device, dtype, causal):
    q, k, v, layout, idx, q_pos = inputs(device, dtype)
    args = (q, k, v, layout.region_ptr, layout.region_tokens, layout.fixed_tokens, idx,
            q_pos if causal else None, 0.25)
    # gradients are compared against finite differences only in float64 (test_gradcheck);
    # here opcheck checks the registrations.
    torch.library.opcheck(torch.ops.gaze.gaze_attention.default, args)
    out, lse = torch.ops.gaze.gaze_attention(*args)
    bwd_args = (torch.randn_like(out), torch.randn_like(lse), q.detach(), k.detach(),
                v.detach(), out.detach(), lse.detach(), *args[3:])
    torch.library.opcheck(torch.ops.gaze.gaze_attention_backward.default, bwd_args)


@pytest.mark.parametrize("dtype", [torch.float64, torch.bfloat16])
def test_opcheck_output_dtypes_of_the_fake_kernels(dtype):
    """lse is float64 for float64 inputs (float32 otherwise); scores are float32 whatever the
    dtype of q: the fake kernels must say the same as the real ones."""
    q, k, v, layout, idx, q_pos = inputs("cpu", dtype)
    args = (q, k, v, layout.region_ptr, layout.region_tokens, layout.fixed_tokens, idx, q_pos,
            0.25)
    torch.library.opcheck(torch.ops.gaze.gaze_attention.default, args)
    desc = torch.randn(B, Hkv, layout.num_regions, D).to(dtype)
    for share_kv in (True, False):
        torch.library.opcheck(torch.ops.gaze.region_topk.default,
                              (q, desc, layout.region_ptr, 4, share_kv, q_pos, layout.region_pos))
