import pytest
import torch

from gaze_ext import ops, reference
from helpers import (DEVICES, DTYPES, cpu_threads, generator, q_positions,
                     random_batch_layout, random_tensor)


def small_integers(gen, shape, dtype, device, strided=False):
    """Integer-valued inputs: every dot product is exact in float32 whatever the summation
    order, and ties are frequent, so the order and tie rule can be compared exactly."""
    t = random_tensor(gen, shape, torch.float32, "cpu", strided)
    return t.mul(1.5).round().clamp(-3, 3).to(device=device, dtype=dtype)


def run_both(q, desc, layout, k, share_kv, q_pos=None):
    region_pos = layout.region_pos if q_pos is not None else None
    dev = q.device
    got = ops.region_topk(q, desc, layout.region_ptr.to(dev), k, share_kv,
                          None if q_pos is None else q_pos.to(dev),
                          None if region_pos is None else region_pos.to(dev))
    want = reference.region_topk(q.cpu(), desc.cpu(), layout.region_ptr, k, share_kv, q_pos,
                                 region_pos)
    return [t.cpu() for t in got], want


@pytest.mark.parametrize("device", DEVICES)
@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("share_kv", [True, False])
@pytest.mark.parametrize("seed", range(3))
def test_exact_order_and_ties(device, dtype, share_kv, seed):
    gen = generator(100 + seed)
    B, Hkv, G, Lq, D = 2, 2, [1, 3, 4][seed], 5, [16, 24, 64][seed]
    N = 80
    layout = random_batch_layout(gen, B, N, shared=seed == 1, max_regions=24, max_region_size=5)
    R = layout.num_regions
    q = small_integers(gen, (B, Hkv * G, Lq, D), dtype, device, strided=seed == 2)
    desc = small_integers(gen, (B, Hkv, R, D), dtype, device)
    for k in (1, 3, max(R, 1), R + 5):
        (idx, score), (want_idx, want_score) = run_both(q, desc, layout, k, share_kv)
        assert idx.dtype == torch.int32 and score.dtype == torch.float32
        assert idx.shape == (B, Hkv if share_kv else Hkv * G, Lq, k)
        assert torch.equal(idx, want_idx), f"k={k}"
        torch.testing.assert_close(score, want_score, atol=1e-6, rtol=0)


@pytest.mark.parametrize("device", DEVICES)
@pytest.mark.parametrize("share_kv", [True, False])
@pytest.mark.parametrize("Lq", [7, 37])  # 37: more query rows than one CPU chunk of 16
def test_causal_selection(device, share_kv, Lq):
    gen = generator(5)
    B, Hkv, G, D, N = 3, 2, 2, 32, 64
    layout = random_batch_layout(gen, B, N, max_regions=16, max_region_size=6)
    q = small_integers(gen, (B, Hkv * G, Lq, D), torch.float32, device)
    desc = small_integers(gen, (B, Hkv, layout.num_regions, D), torch.float32, device)
    q_pos = q_positions(gen, B, Lq, N)
    for k in (2, layout.num_regions + 1):
        if Lq > 16:  # the chunks without causality too
            (idx, _), (want_idx, _) = run_both(q, desc, layout, k, share_kv)
            assert torch.equal(idx, want_idx)
        (idx, score), (want_idx, want_score) = run_both(q, desc, layout, k, share_kv, q_pos)
        assert torch.equal(idx, want_idx)
        torch.testing.assert_close(score, want_score, atol=1e-6, rtol=0)
        # every selected region ends at or before its query
        pos = layout.region_pos.long().gather(1, idx.clamp(min=0).flatten(1)).view(idx.shape)
        assert ((idx < 0) | (pos <= q_pos[:, None, :, None])).all()


@pytest.mark.parametrize("share_kv", [True, False])
@pytest.mark.parametrize("threads", [1, 2, 3, 5])
def test_cpu_row_pieces_match_reference(share_kv, threads):
    """The CPU op scores a (batch, KV head)'s rows (all G heads at each position) together and
    cuts them into pieces for idle threads: one or two KV heads on 1-5 threads, with runs of
    rows shorter and longer than a chunk of 16, and rows of a piece at different causal limits."""
    gen = generator(21 + threads)
    N, D = 90, 16
    layout = random_batch_layout(gen, 1, N, max_regions=20, max_region_size=6)
    R = layout.num_regions
    for Hkv, G, Lq in ((1, 4, 1), (1, 3, 2), (2, 1, 5), (1, 4, 5), (2, 3, 13), (1, 2, 37)):
        q = small_integers(gen, (1, Hkv * G, Lq, D), torch.float32, "cpu", strided=Lq == 5)
        desc = small_integers(gen, (1, Hkv, R, D), torch.float32, "cpu")
        q_pos = q_positions(gen, 1, Lq, N)
        for k, pos in ((3, None), (R + 2, None), (4, q_pos)):
            with cpu_threads(threads):
                (idx, score), (want_idx, want_score) = run_both(q, desc, layout, k, share_kv, pos)
            assert torch.equal(idx, want_idx), (Hkv, G, Lq, k)
            torch.testing.assert_close(score, want_score, atol=1e-6, rtol=0)


@pytest.mark.parametrize("device", DEVICES)
@pytest.mark.parametrize("dtype", DTYPES)
def test_random_scores_agree_with_reference(device, dtype):
    """Random floats: the summation order may differ, so compare scores, not indices."""
    gen = generator(11)
    B, Hkv, G, Lq, D, N = 2, 2, 4, 6, 128, 400
    layout = random_batch_layout(gen, B, N, max_regions=60, max_region_size=6)
    q = random_tensor(gen, (B, Hkv * G, Lq, D), dtype, device)
    desc = random_tensor(gen, (B, Hkv, layout.num_regions, D), dtype, device)
    for share_kv in (True, False):
        (idx, score), (_, want_score) = run_both(q, desc, layout, 9, share_kv)
        torch.testing.assert_close(score, want_score, atol=2e-4, rtol=2e-4)
        all_scores = reference.region_scores(q.cpu(), desc.cpu(), share_kv)
        picked = all_scores.gather(-1, idx.clamp(min=0).long())
        torch.testing.assert_close(torch.where(idx >= 0, picked, float("-inf")), score,
                                   atol=2e-4, rtol=2e-4)


@pytest.mark.parametrize("device", DEVICES)
def test_many_regions_and_large_k(device):
    gen = generator(12)
    B, H, D, R = 1, 2, 8, 65536
    ptr = torch.arange(R + 1, dtype=torch.int32)
    ptr[1000:2000] = 1000  # a run of empty regions
    ptr[2000:] -= 1000
    layout_ptr = ptr
    q = small_integers(gen, (B, H, 2, D), torch.float32, device)
    desc = small_integers(gen, (B, H, R, D), torch.float32, device)
    for k in (256, 1024):
        idx, score = [t.cpu() for t in ops.region_topk(q, desc, layout_ptr.to(device), k, False)]
        want_idx, want_score = reference.region_topk(q.cpu(), desc.cpu(), layout_ptr, k, False)
        assert torch.equal(idx, want_idx)
        assert torch.equal(score, want_score)


@pytest.mark.parametrize("device", DEVICES)
def test_nan_scores_rank_last_and_unselectable_are_padding(device):
    q = torch.ones(1, 1, 1, 2, device=device)
    desc = torch.tensor([[[[1.0, 0.0], [float("nan"), 0.0], [-float("inf"), 0.0], [2.0, 0.0],
                           [5.0, 0.0]]]], device=device)
    ptr = torch.tensor([0, 1, 2, 3, 4, 4], dtype=torch.int32, device=device)  # region 4 empty
    idx, score = ops.region_topk(q, desc, ptr, 6, True)
    assert idx.cpu().flatten().tolist() == [3, 0, 2, 1, -1, -1]
    s = score.cpu().flatten()
    assert s[:3].tolist() == [2.0, 1.0, float("-inf")] and s[3].isnan()
    assert s[4:].tolist() == [float("-inf")] * 2


@pytest.mark.parametrize("device", DEVICES)
def test_no_selectable_region(device):
    q = torch.randn(2, 4, 3, 8, device=device)
    desc = torch.randn(2, 2, 3, 8, device=device)
    ptr = torch.zeros(4, dtype=torch.int32, device=device)
    idx, score = ops.region_topk(q, desc, ptr, 2, True)
    assert (idx == -1).all() and (score == float("-inf")).all()
    zero_regions = ops.region_topk(q, desc[:, :, :0], ptr[:1], 2, False)
    assert zero_regions[0].shape == (2, 4, 3, 2) and (zero_regions[0] == -1).all()


def test_float64_scores_rounded_to_float32():
    gen = generator(2)
    layout = random_batch_layout(gen, 1, 30, max_regions=8)
    q = small_integers(gen, (1, 2, 3, 8), torch.float64, "cpu")
    desc = small_integers(gen, (1, 2, layout.num_regions, 8), torch.float64, "cpu")
    (idx, score), (want_idx, want_score) = run_both(q, desc, layout, 4, True)
    assert torch.equal(idx, want_idx) and score.dtype == torch.float32
    torch.testing.assert_close(score, want_score)


def test_reference_ranks_nan_after_minus_inf():
    """The oracle follows the same rule as the kernels: NaN after every number, -inf included."""
    q = torch.ones(1, 1, 1, 2)
    desc = torch.tensor([[[[float("nan"), 0.0], [-float("inf"), 0.0], [1.0, 0.0],
                           [float("nan"), 0.0], [-float("inf"), 0.0]]]])
    ptr = torch.arange(6, dtype=torch.int32)
    want = [2, 1, 4, 0, 3]
    for topk in (ops.region_topk, reference.region_topk):
        idx, score = topk(q, desc, ptr, 5, True)
        assert idx.flatten().tolist() == want, topk
        assert score.flatten()[:3].tolist() == [1.0, float("-inf"), float("-inf")]
        assert score.flatten()[3:].isnan().all()
