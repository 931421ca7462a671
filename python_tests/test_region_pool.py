import pytest
import torch

from gaze_ext import build_layout, ops, reference
from gaze_ext.layout import GazeLayout
from helpers import (DEVICES, DTYPES, generator, random_batch_layout, random_tensor,
                     high_precision)

TOL = {torch.float32: 1e-5, torch.float16: 2e-3, torch.bfloat16: 1.6e-2, torch.float64: 1e-12}


def on(layout: GazeLayout, device):
    return layout.to(device)


@pytest.mark.parametrize("device", DEVICES)
@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("seed", range(4))
def test_pool_matches_reference(device, dtype, seed):
    gen = generator(seed)
    B, H, N, D = 3, 2, int(torch.randint(1, 60, (1,), generator=gen)), [8, 13, 64, 80][seed]
    layout = random_batch_layout(gen, B, N, shared=seed % 2 == 1, max_regions=10)
    keys = random_tensor(gen, (B, H, N, D), dtype, device, strided=[False, True, "last", True][seed])
    desc = ops.region_pool(keys, *on(layout, device)[:2])
    want = reference.region_pool(keys.cpu(), layout.region_ptr, layout.region_tokens)
    assert desc.dtype == dtype and desc.shape == (B, H, layout.num_regions, D)
    torch.testing.assert_close(desc.cpu().float(), want.float(), atol=TOL[dtype], rtol=TOL[dtype])


@pytest.mark.parametrize("dtype", [torch.float16, torch.bfloat16])
def test_cpu_pool_rounds_16_bit_means_to_nearest_even(dtype):
    """Keys in [1, 2] sum exactly in float32 over a few tokens, so the CPU kernel's means must
    equal the reference's bit for bit: float32 sum times 1 / n, then one rounding to nearest
    even (as `.to` does); a kernel that truncates fails. D = 16 and 40 take the vector stores,
    D = 19 a scalar tail too. (CPU only: the CUDA build's fast-math 1 / n may differ by an ulp.)"""
    device = "cpu"
    gen = generator(77)
    for D in (16, 19, 40):
        layout = random_batch_layout(gen, 2, 50, max_regions=12, max_region_size=9)
        keys = (1 + torch.rand(2, 3, 50, D, generator=gen)).to(dtype)
        desc = ops.region_pool(keys.to(device), *on(layout, device)[:2]).cpu()
        means = reference.region_pool(keys.float(), layout.region_ptr, layout.region_tokens)
        assert torch.equal(desc, means.to(dtype)), f"D={D}"
        # witness: some means round up, so truncating kernels would differ
        assert (means.to(dtype).float() > means).any()


@pytest.mark.parametrize("device", DEVICES)
def test_empty_regions_give_zeros_and_edge_regions_are_means(device):
    layout = build_layout([(0, 1, 7, 8)], 56)  # 6x6, 6x2, 1x6, 1x2 regions
    keys = torch.randn(1, 1, 56, 4, device=device)
    desc = ops.region_pool(keys, *on(layout, device)[:2])
    grid = keys[0, 0].view(7, 8, 4)
    expected = torch.stack([grid[:6, :6].mean((0, 1)), grid[:6, 6:].mean((0, 1)),
                            grid[6:, :6].mean((0, 1)), grid[6:, 6:].mean((0, 1))])
    torch.testing.assert_close(desc[0, 0], expected)
    # two empty regions in front (padding of a ragged batch)
    ptr = torch.cat([torch.zeros(2, dtype=torch.int32), layout.region_ptr])
    desc2 = ops.region_pool(keys, ptr.to(device), layout.region_tokens.to(device))
    assert torch.count_nonzero(desc2[0, 0, :2]) == 0
    torch.testing.assert_close(desc2[0, 0, 2:], expected)


@pytest.mark.parametrize("device", DEVICES)
@pytest.mark.parametrize("dtype", DTYPES)
def test_pool_backward_matches_reference(device, dtype):
    gen = generator(7)
    B, H, N, D = 2, 3, 40, 24
    layout = random_batch_layout(gen, B, N, max_regions=9)
    # a token listed in two regions receives both gradients
    ptr = layout.region_ptr.clone()
    tokens = torch.cat([layout.region_tokens, layout.region_tokens[:, :5]], dim=1)
    ptr = torch.cat([ptr, ptr[:, -1:] + 5], dim=1)
    keys = random_tensor(gen, (B, H, N, D), dtype, device).requires_grad_()
    grad = random_tensor(gen, (B, H, ptr.shape[1] - 1, D), dtype, device)
    ops.region_pool(keys, ptr.to(device), tokens.to(device)).backward(grad)
    keys_ref = keys.detach().cpu().to(high_precision(dtype)).requires_grad_()
    reference.region_pool(keys_ref, ptr, tokens).backward(grad.cpu().to(keys_ref.dtype))
    torch.testing.assert_close(keys.grad.cpu().double(), keys_ref.grad.double(),
                               atol=TOL[dtype], rtol=TOL[dtype])


def test_pool_gradcheck_float64():
    gen = generator(3)
    layout = random_batch_layout(gen, 2, 12, max_regions=5)
    keys = torch.randn(2, 2, 12, 3, dtype=torch.float64, requires_grad=True)
    assert torch.autograd.gradcheck(
        lambda k: ops.region_pool(k, layout.region_ptr, layout.region_tokens), (keys,))
