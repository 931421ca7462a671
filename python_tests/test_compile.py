"""torch.compile(fullgraph=True) of the functional path, forward and backward."""
import pytest
import torch

import gaze_ext
from helpers import DEVICES, generator, qkv_shapes, random_batch_layout


@pytest.mark.parametrize("device", DEVICES)
@pytest.mark.parametrize("share_kv", [True, False])
def test_compiled_functional_matches_eager(device, share_kv):
    torch._dynamo.reset()
    gen = generator(4)
    B, Hq, Hkv, Lq, N, D = 2, 4, 2, 5, 48, 32
    layout = random_batch_layout(gen, B, N, max_regions=8).to(device)
    q_pos = torch.randint(N // 2, N, (B, Lq), generator=gen, dtype=torch.int32).to(device)

    def attention(q, k, v, layout, q_pos):
        return gaze_ext.gaze_attention(q, k, v, layout, topk=3, share_kv=share_kv, q_pos=q_pos)

    compiled = torch.compile(attention, fullgraph=True, backend="aot_eager")
    tensors = [torch.randn(s, generator=gen).to(device) for s in qkv_shapes(B, Hq, Hkv, Lq, N, D)]
    eager_in = [t.clone().requires_grad_() for t in tensors]
    comp_in = [t.clone().requires_grad_() for t in tensors]
    out_eager = attention(*eager_in, layout, q_pos)
    out_comp = compiled(*comp_in, layout, q_pos)
    torch.testing.assert_close(out_comp, out_eager)
    out_eager.square().sum().backward()
    out_comp.square().sum().backward()
    for a, b in zip(comp_in, eager_in):
        torch.testing.assert_close(a.grad, b.grad)


def test_inductor_compiles_with_cached_descriptors():
    torch._dynamo.reset()
    gen = generator(5)
    layout = gaze_ext.build_layout([(2, 1, 6, 6), (40, 1, 4, 8)], 80)
    q = torch.randn(1, 4, 1, 16, generator=gen)
    k = torch.randn(1, 2, 80, 16, generator=gen)
    v = torch.randn(1, 2, 80, 16, generator=gen)
    desc = gaze_ext.ops.region_pool(k, layout.region_ptr, layout.region_tokens)

    @torch.compile(fullgraph=True)
    def step(q, k, v, desc):
        return gaze_ext.gaze_attention(q, k, v, layout, topk=2, desc=desc) * 2

    torch.testing.assert_close(step(q, k, v, desc),
                               gaze_ext.gaze_attention(q, k, v, layout, topk=2) * 2)
