"""The CUDA kernels, run on the CPU by gaze_sim (python_tests/cuda_sim.py), against the
CPU kernels and the reference. On a machine without a GPU this is what checks the CUDA
code's indexing, its barriers and warp collectives, its split-K merge, its key-stream
scan and the tensor-core kernels' tiles, unions and mma.sync fragments. (What it cannot
check: speed, races between blocks, and rounding inside the real mma units.)"""
import os
import subprocess
import sys

import pytest
import torch

import cuda_sim
from sanitizer import assert_clean, sanitized_env, sanitizer_library
import gaze_ext
from benchmarks.sanitize_case import corrupted
from gaze_ext import ops, reference
from helpers import (DTYPES, SPLIT_CASES, TILED_CASES, ZERO_SIZE_CASES, ZERO_SIZE_IDS,
                     atol_for, error_bound_check, generator, high_precision,
                     mixed_layouts_case, q_positions, qkv_shapes, random_batch_layout,
                     random_selection, random_tensor, split_case, tiled_case,
                     topk_many_regions, zero_size_case)

pytestmark = pytest.mark.skipif(not cuda_sim.available(), reason="needs the CUDA headers")


SANITIZED = os.environ.get("GAZE_SIM_SANITIZE") == "1"  # set by test_under_sanitizers


@pytest.fixture(scope="module")
def built():
    cuda_sim.build(sanitize=SANITIZED)


@pytest.fixture
def sim(built):
    torch.ops.gaze_sim.take_launched_kernels()  # forget earlier tests' launches
    torch.ops.gaze_sim.take_ldmatrix_wavefronts()
    return torch.ops.gaze_sim


def launched(sim):
    """The kernels run since the last call, by function name."""
    names = [s.split("(")[0].split()[-1].split("::")[-1] for s in sim.take_launched_kernels()]
    return {n.split("<")[0] for n in names}


def assert_ldmatrix_conflict_free(sim):
    """Each ldmatrix phase since the last call (8 rows of 16 bytes) took one shared-memory
    wavefront on a GPU: the padded tile layouts keep its rows in different banks."""
    phases, wavefronts = sim.take_ldmatrix_wavefronts()
    assert phases > 0 and wavefronts == phases, f"{wavefronts} wavefronts for {phases} phases"


def assert_scores_equal(got, want):
    torch.testing.assert_close(got, want, atol=1e-5, rtol=1e-5, equal_nan=True)


# ------------------------------------------------------------- the emulator itself

@pytest.mark.parametrize("transposed", [False, True], ids=["a_rows_b_k_major", "a_transposed_b_n_major"])
@pytest.mark.parametrize("dtype", [torch.float16, torch.bfloat16])
def test_emulated_mma_is_a_matmul(sim, dtype, transposed):
    """mma.sync with fragments loaded by mma.cuh's ldmatrix helpers, from the four shared
    layouts the tensor-core kernels use (csrc/cuda_sim/selftest.cu)."""
    gen = generator(10)
    a = torch.randn(16, 16, generator=gen).to(dtype)
    b = torch.randn(16, 16, generator=gen).to(dtype)
    got = sim.selftest_mma(a, b, transposed)
    torch.testing.assert_close(got, a.float() @ b.float(), atol=1e-5, rtol=1e-5)


@pytest.mark.parametrize("stride,wavefronts", [(64, 32), (32, 16), (16, 8), (72, 4), (8, 4)])
def test_emulated_ldmatrix_counts_bank_conflicts(sim, stride, wavefronts):
    """ldmatrix.x4 over rows `stride` 16-bit elements apart: 8 rows of 16 bytes per matrix,
    one wavefront when they fall in 8 different groups of 4 banks (128-byte lines)."""
    sim.selftest_strided_ldmatrix(stride)
    assert sim.take_ldmatrix_wavefronts() == [4, wavefronts]


def test_emulated_warp_collectives(sim):
    x = torch.randn(64, generator=generator(11))
    x[40] = 200.0
    sums, scans, ballots, any_large = sim.selftest_warp_ops(x)
    warps = x.view(2, 32)
    torch.testing.assert_close(sums, warps.sum(1).repeat_interleave(32))
    torch.testing.assert_close(scans, warps.cumsum(1).flatten())
    bits = (warps > 0).int() << torch.arange(32)
    assert ballots.tolist() == (bits[:, :16].sum(1).float().repeat_interleave(32)).tolist()
    assert any_large.tolist() == [1.0] * 64


def test_emulator_shows_a_missing_barrier(sim):
    """Threads run in a random order between barriers and shared memory starts poisoned,
    so a read of another thread's write without a barrier between goes wrong."""
    want = ((torch.arange(64) + 1) % 64).float()
    assert torch.equal(sim.selftest_neighbours(True), want)
    assert not torch.equal(sim.selftest_neighbours(False), want)


def test_emulator_shows_a_missing_barrier_between_warps(sim):
    """In half the blocks the warps run one at a time from barrier to barrier, so a warp
    that overwrites what another still has to read, with no barrier between, shows."""
    i = torch.arange(64)
    want = ((i ^ 1) + 32) % 64
    assert torch.equal(sim.selftest_overwrites(True), want.float().expand(16, 64))
    assert (sim.selftest_overwrites(False) == -1).any()


def test_emulated_async_copies_land_at_the_wait(sim):
    """cp.async data reaches shared memory only when copy_async_wait lets its group complete
    (then a barrier shares it): a kernel that reads before the wait sees the poison."""
    src = torch.randn(64, 8, generator=generator(12))
    want = src.roll(-1, 0)
    poisoned = lambda got, want: not torch.isclose(got, want).any()  # noqa: E731 (NaN or 0)
    assert torch.equal(sim.selftest_async_copies(src, 2), want)
    assert poisoned(sim.selftest_async_copies(src, 0), want)
    first_group_only = sim.selftest_async_copies(src, 1)
    assert torch.equal(first_group_only[:, :4], want[:, :4])
    assert poisoned(first_group_only[:, 4:], want[:, 4:])


def test_emulator_reports_deadlocks_traps_and_bad_launches(sim):
    with pytest.raises(RuntimeError, match="deadlock"):
        sim.selftest_divergent()
    with pytest.raises(RuntimeError, match="__trap"):
        sim.selftest_trap(torch.zeros(1))
    with pytest.raises(RuntimeError, match="empty grid"):
        sim.selftest_empty_grid(torch.zeros(1))
    with pytest.raises(RuntimeError, match="not 16-byte aligned"):
        sim.selftest_misaligned_ldmatrix()


# ---------------------------------------------------------------------------- region_pool

def overlapping_layout():
    """Regions that share tokens, an empty region and a one-token region."""
    ptr = torch.tensor([0, 4, 4, 9, 10], dtype=torch.int32)
    tokens = torch.tensor([0, 1, 2, 3, 2, 3, 4, 5, 6, 11], dtype=torch.int32)
    return gaze_ext.layout.GazeLayout(ptr, tokens, torch.tensor([3, 0, 6, 11], dtype=torch.int32),
                                      torch.tensor([7, 8, -1], dtype=torch.int32), 12)


@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("head_dim,strided", [(64, False), (128, True), (8, "last"), (7, False)])
@pytest.mark.parametrize("seed", [0, 1])
def test_region_pool_and_its_backward_match_cpu(sim, dtype, head_dim, strided, seed):
    gen = generator(100 + seed)
    B, H, N = 2, 3, 90
    layout = overlapping_layout() if seed == 1 else random_batch_layout(gen, B, N, max_regions=12)
    N = layout.num_keys
    keys = random_tensor(gen, (B, H, N, head_dim), dtype, "cpu", strided)
    lay = (layout.region_ptr, layout.region_tokens)
    got = sim.region_pool(keys, *lay)
    assert launched(sim) == {"pool_kernel"}
    torch.testing.assert_close(got, ops.region_pool(keys, *lay), atol=atol_for(dtype), rtol=1e-3)
    grad = random_tensor(gen, tuple(got.shape), dtype, "cpu", strided)
    got = sim.region_pool_backward(grad, *lay, N)
    assert launched(sim) == {"pool_backward_kernel"}
    want = torch.ops.gaze.region_pool_backward(grad, *lay, N)
    torch.testing.assert_close(got, want, atol=atol_for(dtype), rtol=1e-3)


@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("head_dim,strided", [(64, False), (128, True)])
def test_region_pool_backward_is_deterministic_when_asked(sim, dtype, head_dim, strided):
    """Tokens listed in several regions: the ordered kernel adds in one order whatever
    the threads' order. (128, strided: element loads, more chunks per row than lanes.)"""
    gen = generator(150)
    layout = overlapping_layout()
    grad = random_tensor(gen, (2, 3, layout.num_regions, head_dim), dtype, "cpu", strided)
    lay = (layout.region_ptr, layout.region_tokens, layout.num_keys)
    torch.use_deterministic_algorithms(True)
    try:
        first, second = sim.region_pool_backward(grad, *lay), sim.region_pool_backward(grad, *lay)
    finally:
        torch.use_deterministic_algorithms(False)
    assert launched(sim) == {"pool_backward_ordered_kernel"}
    assert torch.equal(first, second)
    torch.testing.assert_close(first, torch.ops.gaze.region_pool_backward(grad, *lay),
                               atol=atol_for(dtype), rtol=1e-3)


def test_region_pool_skips_tokens_out_of_range(sim):
    """sanitize_case.py's corrupted tokens (N + 11, N and -4, unchecked): the pool and both
    backward kernels skip them, as if they pointed at a zero key row whose gradient is
    dropped. (Written anyway, such a token's add lands in another head's rows.)"""
    gen = generator(170)
    N, B, H, D = 200, 2, 3, 64
    layout = gaze_ext.build_batch_layout([([(0, 1, 9, 9)], 120), ([(10, 2, 5, 7)], N)],
                                         region_shape=(1, 3, 3))
    ptr, tokens, _ = corrupted(layout, N, 0)
    clean = torch.where((tokens >= 0) & (tokens < N), tokens, N)  # row N: zeros
    keys = torch.randn(B, H, N, D, generator=gen)
    padded = torch.cat([keys, torch.zeros(B, H, 1, D)], 2)
    got = sim.region_pool(keys, ptr, tokens)
    torch.testing.assert_close(got, ops.region_pool(padded, ptr, clean), atol=1e-5, rtol=1e-5)
    grad = torch.randn(got.shape, generator=gen)
    want = torch.ops.gaze.region_pool_backward(grad, ptr, clean, N + 1)[:, :, :N]
    for deterministic in (False, True):
        torch.use_deterministic_algorithms(deterministic)
        try:
            got = sim.region_pool_backward(grad, ptr, tokens, N)
        finally:
            torch.use_deterministic_algorithms(False)
        torch.testing.assert_close(got, want, atol=1e-5, rtol=1e-5)


# ---------------------------------------------------------------------------- region_topk

@pytest.mark.parametrize("share_kv", [True, False])
@pytest.mark.parametrize("causal", [False, True])
@pytest.mark.parametrize("k", [1, 5, 40, 1000])
@pytest.mark.parametrize("scoring_blocks", ["0", "3"])
def test_region_topk_matches_cpu(sim, monkeypatch, share_kv, causal, k, scoring_blocks):
    """Small integer values, so many scores tie and the tie rule decides; k beyond R. With
    the plan (one block per row: the regions are few) and with 3 scoring blocks per row."""
    monkeypatch.setenv("GAZE_TOPK_SCORING_BLOCKS", scoring_blocks)
    gen = generator(200 + k)
    B, Hq, Hkv, Lq, N, D = 2, 8, 2, 3, 300, 16
    layout = random_batch_layout(gen, B, N, max_regions=40, max_region_size=10)
    q = torch.randint(-2, 3, (B, Hq, Lq, D), generator=gen).float()
    desc = torch.randint(-2, 3, (B, Hkv, layout.num_regions, D), generator=gen).float()
    pos = (q_positions(gen, B, Lq, N), layout.region_pos) if causal else (None, None)
    args = (q, desc, layout.region_ptr, k, share_kv, *pos)
    got, want = sim.region_topk(*args), ops.region_topk(*args)
    assert launched(sim) == ({"topk_kernel"} if scoring_blocks == "0"
                             else {"scoring_kernel", "topk_kernel"})
    assert torch.equal(got[0], want[0])
    assert_scores_equal(got[1], want[1])


@pytest.mark.parametrize("regions,q_heads,q_len,share_kv,ks,launches", [
    # keys (and, for k = 16000, the sort buffer) in global scratch: 8 rows, then 4, fit the
    # emulator build's 1 MiB a launch, so 6 rows take 1 launch, then 2 (rows 4-5 at first_row 4)
    (30000, 2, 3, False, (300, 16000), (1, 2)),
    (65536, 4, 1, True, (256, 65536), (1, 2)),   # the contract's bounds, shared over a GQA group
])
@pytest.mark.parametrize("scoring_blocks", ["1", "0"])
def test_region_topk_with_many_regions_matches_cpu(sim, monkeypatch, regions, q_heads, q_len,
                                                   share_kv, ks, launches, scoring_blocks):
    """Forced to one block per row, and with the plan, which takes several scoring blocks for
    these few rows (each launch of topk_kernel then follows one of scoring_kernel)."""
    monkeypatch.setenv("GAZE_TOPK_SCORING_BLOCKS", scoring_blocks)
    q, desc, ptr = topk_many_regions(4, regions, q_heads, q_len)
    for k, count in zip(ks, launches):
        got = sim.region_topk(q, desc, ptr, k, share_kv, None, None)
        assert len(sim.take_launched_kernels()) == count * (1 if scoring_blocks == "1" else 2)
        want = ops.region_topk(q, desc, ptr, k, share_kv)
        assert torch.equal(got[0], want[0])
        assert_scores_equal(got[1], want[1])


@pytest.mark.parametrize("share_kv", [True, False])
@pytest.mark.parametrize("causal", [False, True])
def test_region_topk_scored_in_tiles_matches_cpu(sim, share_kv, causal):
    """Runs of 70 positions (a ragged second tile of rows), more than 64 regions (a ragged
    second tile of regions), D = 40 (a ragged second slice of D): scoring_tile_kernel, exact
    with small integers (many ties)."""
    gen = generator(230)
    B, Hq, Hkv, Lq, N, D = 2, 6, 2, 70, 900, 40
    layout = random_batch_layout(gen, B, N, max_regions=100, max_region_size=8)
    assert layout.num_regions > 64
    q = torch.randint(-2, 3, (B, Hq, Lq, D), generator=gen).float()
    desc = torch.randint(-2, 3, (B, Hkv, layout.num_regions, D), generator=gen).float()
    pos = (q_positions(gen, B, Lq, N), layout.region_pos) if causal else (None, None)
    for k in (1, 7, layout.num_regions + 2):
        args = (q, desc, layout.region_ptr, k, share_kv, *pos)
        got, want = sim.region_topk(*args), ops.region_topk(*args)
        assert launched(sim) == {"scoring_tile_kernel", "topk_kernel"}
        assert torch.equal(got[0], want[0])
        assert_scores_equal(got[1], want[1])


def test_region_topk_tiles_in_launches_of_whole_runs(sim):
    """4,000 regions: the emulator build's 1 MiB of scratch holds 65 rows' keys, so the 80
    rows (4 runs of 20 positions) go in launches of 60 and 20 rows, whole runs each."""
    q, desc, ptr = topk_many_regions(6, 4000, q_heads=4, q_len=20)
    got = sim.region_topk(q, desc, ptr, 50, False, None, None)
    kernels = [s.split("(")[0].split()[-1].split("::")[-1].split("<")[0]
               for s in sim.take_launched_kernels()]
    assert kernels == ["scoring_tile_kernel", "topk_kernel"] * 2
    want = ops.region_topk(q, desc, ptr, 50, False)
    assert torch.equal(got[0], want[0])
    assert_scores_equal(got[1], want[1])


def test_region_topk_scored_in_tiles_of_exactly_64_positions(sim):
    """Runs of 64 positions (one whole tile of rows, none ragged) for 4 runs (b, hs):
    scoring_tile_kernel must decode its blocks with the host's count of row tiles."""
    gen = generator(231)
    B, Hq, Hkv, Lq, N, D = 2, 4, 2, 64, 300, 16
    layout = random_batch_layout(gen, B, N, max_regions=40, max_region_size=8)
    q = torch.randint(-2, 3, (B, Hq, Lq, D), generator=gen).float()
    desc = torch.randint(-2, 3, (B, Hkv, layout.num_regions, D), generator=gen).float()
    args = (q, desc, layout.region_ptr, 5, True, q_positions(gen, B, Lq, N), layout.region_pos)
    got, want = sim.region_topk(*args), ops.region_topk(*args)
    assert launched(sim) == {"scoring_tile_kernel", "topk_kernel"}
    assert torch.equal(got[0], want[0])
    assert_scores_equal(got[1], want[1])


def test_forced_scoring_block_count_must_be_a_number(sim, monkeypatch):
    monkeypatch.setenv("GAZE_TOPK_SCORING_BLOCKS", "-2")
    q, desc, ptr = topk_many_regions(1, 10, 2, 1)
    with pytest.raises(RuntimeError, match="GAZE_TOPK_SCORING_BLOCKS must be a number"):
        sim.region_topk(q, desc, ptr, 3, False, None, None)


# ---------------------------------------------------------- gaze_attention, split-K kernels

STREAMED, BLOCK = "attention_streamed_kernel", "attention_forward_kernel"  # the split-K forwards


def streamed_forward_applies(case, dtype):
    """attention_streamed.cu's conditions on SPLIT_CASES[case]: K/V rows read 16 bytes at a
    time (strided=True pads rows by 3 elements; "last" rows are copied to unit stride first)
    and at most 32 chunks of 16 bytes (with 8 heads per unit and 16-bit elements, 16: the
    case with 8 heads per unit has D = 64)."""
    D, strided = SPLIT_CASES[case][5], SPLIT_CASES[case][-1]
    row_bytes = D * dtype.itemsize
    return strided is not True and row_bytes % 16 == 0 and row_bytes <= 32 * 16


def assert_forward_matches_cpu(got, dtype, qkv, args):
    out, lse = ops.gaze_attention(*qkv, *args)
    tol = dict(atol=atol_for(dtype), rtol=1e-2 if dtype != torch.float32 else 1e-5)
    torch.testing.assert_close(got[0], out, **tol)
    torch.testing.assert_close(got[1], lse, atol=1e-4, rtol=1e-5)
    return out, lse


@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("case", range(len(SPLIT_CASES)))
@pytest.mark.parametrize("deterministic", [False, True])
def test_split_kernels_match_cpu(sim, monkeypatch, dtype, case, deterministic):
    """Forward (the streamed kernel where it applies, with the split merge) and backward
    (atomic, or ordered when deterministic)."""
    monkeypatch.setenv("GAZE_ATTENTION_KERNEL", "split")
    gen, qkv, args = split_case(case, dtype)
    got = sim.gaze_attention(*qkv, *args)
    forward_kernels = launched(sim)
    assert (STREAMED if streamed_forward_applies(case, dtype) else BLOCK) in forward_kernels
    if SPLIT_CASES[case][8] >= 256:  # more slots than one split holds: their merge runs
        assert "merge_splits_kernel" in forward_kernels
    out, lse = assert_forward_matches_cpu(got, dtype, qkv, args)

    grad = torch.randn(out.shape, generator=gen).to(dtype)
    backward_args = (grad, None, *qkv, out, lse, *args)
    torch.use_deterministic_algorithms(deterministic)
    try:
        got = sim.gaze_attention_backward(*backward_args)
        if deterministic:  # the threads run in another order, the result is the same
            again = sim.gaze_attention_backward(*backward_args)
            assert all(torch.equal(a, b) for a, b in zip(got, again))
    finally:
        torch.use_deterministic_algorithms(False)
    kernel = "attention_backward_ordered_kernel" if deterministic else "attention_backward_kernel"
    assert launched(sim) == {kernel}
    want = torch.ops.gaze.gaze_attention_backward(*backward_args)
    for name, g, w in zip(("dq", "dk", "dv"), got, want):
        scale = w.float().abs().max().item() + 1.0
        torch.testing.assert_close(g.float(), w.float(), atol=atol_for(dtype) * scale,
                                   rtol=1e-2 if dtype != torch.float32 else 1e-4, msg=name)


@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("case", range(len(SPLIT_CASES)))
def test_block_synchronous_forward_matches_cpu(sim, monkeypatch, dtype, case):
    """GAZE_ATTENTION_KERNEL=split_block: the block-synchronous forward on every case, also
    where `split` would run the streamed one."""
    monkeypatch.setenv("GAZE_ATTENTION_KERNEL", "split_block")
    _, qkv, args = split_case(case, dtype)
    got = sim.gaze_attention(*qkv, *args)
    assert BLOCK in launched(sim)
    assert_forward_matches_cpu(got, dtype, qkv, args)


@pytest.mark.parametrize("dtype", DTYPES)
def test_streamed_forward_over_several_position_batches(sim, monkeypatch, dtype):
    """One split of 700 slots' keys (3 splits, the fewest that hold them): each split's
    warps stream ~1,400 keys, past the 1,024 positions the block publishes at a
    time."""
    monkeypatch.setenv("GAZE_ATTENTION_KERNEL", "split")
    monkeypatch.setenv("GAZE_SPLITS", "1")
    _, qkv, args = split_case(3, dtype)
    got = sim.gaze_attention(*qkv, *args)
    assert launched(sim) == {STREAMED, "merge_splits_kernel"}
    assert_forward_matches_cpu(got, dtype, qkv, args)


def fixed_tokens_only_case(gen, N, F, dtype, Hq, Hkv, Lq, D):
    """F visible fixed tokens 0..F-1, one unused region, no slots (K = 0): every key of a
    unit is a fixed token, so the streamed kernel's batches hold exactly F keys in order."""
    fixed = torch.arange(F, dtype=torch.int32)
    layout = gaze_ext.layout.GazeLayout(torch.tensor([0, 4], dtype=torch.int32),
                                        torch.arange(F, F + 4, dtype=torch.int32),
                                        torch.tensor([F], dtype=torch.int32), fixed, N)
    q, k, v = (torch.randn(s, generator=gen).to(dtype) for s in qkv_shapes(1, Hq, Hkv, Lq, N, D))
    idx = torch.zeros(1, Hkv, Lq, 0, dtype=torch.int32)
    args = (layout.region_ptr, layout.region_tokens, layout.fixed_tokens, idx, None, 0.125)
    return (q, k, v), args


STREAMED_EDGE_CASES = {
    # 1,041 keys: a batch of 1,024 positions, then one of 17 whose last tile has one key;
    # the 15 entries after it must read -1, not what the first batch left (entry 32 would
    # count key 32 twice)
    "later_batch_with_a_one_key_tile": (40, 1100, 1041, torch.float32, 2, 1),
    # 8 query heads per unit in bf16 (two lane sets split the heads, so a lane reads V chunks
    # another lane copied), 300 keys: 19 tiles, each warp's stages refilled; the copies of a
    # warp's next-but-one tile must wait for every lane (the __syncwarp closing each tile)
    "two_head_groups_over_many_tiles": (41, 400, 300, torch.bfloat16, 8, 4),
}


@pytest.mark.parametrize("case", STREAMED_EDGE_CASES)
def test_streamed_forward_edge_cases_in_one_split(sim, monkeypatch, case):
    seed, N, F, dtype, Hq, Lq = STREAMED_EDGE_CASES[case]
    monkeypatch.setenv("GAZE_ATTENTION_KERNEL", "split")
    monkeypatch.setenv("GAZE_SPLITS", "1")
    qkv, args = fixed_tokens_only_case(generator(seed), N, F, dtype, Hq, 1, Lq, 64)
    got = sim.gaze_attention(*qkv, *args)
    assert launched(sim) == {STREAMED}
    assert_forward_matches_cpu(got, dtype, qkv, args)


@pytest.mark.parametrize("splits", ["1", "3"])
def test_streamed_forward_with_a_wide_range_of_scores(sim, monkeypatch, splits):
    """Keys 48-63 (warp 3's first tile of 16) with scores some 100 times larger than the
    rest: warp 3's running max must carry over to its later tiles, and the warps' merge must
    take the largest of their maxima, else 2^(difference of maxima) overflows (> 2^128)."""
    monkeypatch.setenv("GAZE_ATTENTION_KERNEL", "split")
    monkeypatch.setenv("GAZE_SPLITS", splits)  # 3: keys 0-99 in split 0, then their merge
    (q, k, v), args = fixed_tokens_only_case(generator(42), 400, 300, torch.float32, 2, 1, 1, 64)
    k[:, :, 48:64] *= 100
    got = sim.gaze_attention(q, k, v, *args)
    assert launched(sim) == ({STREAMED} if splits == "1" else {STREAMED, "merge_splits_kernel"})
    assert_forward_matches_cpu(got, torch.float32, (q, k, v), args)


@pytest.mark.parametrize("seed", range(32))
def test_split_forwards_on_random_shapes_match_cpu(sim, monkeypatch, seed):
    """Random shapes for both split-K forwards: head dims with and without 16-byte rows and
    past the streamed kernel's registers, GQA groups up to 12, either selection mode, slots
    (none, past R, repeated, -1), causal limits, shared or batched layouts, strided operands."""
    gen = generator(900 + seed)
    r = lambda lo, hi: int(torch.randint(lo, hi + 1, (1,), generator=gen))  # noqa: E731
    dtype = DTYPES[seed % 3]
    B, Hkv, G, Lq, N = r(1, 2), r(1, 3), [1, 2, 3, 4, 6, 8, 12][r(0, 6)], r(1, 3), r(1, 400)
    D = [8, 16, 24, 40, 64, 72, 96, 128, 200, 256][r(0, 9)]
    layout = random_batch_layout(gen, B, N, shared=bool(r(0, 1)), max_regions=30,
                                 max_region_size=12)
    Hq = Hkv * G
    K = r(0, layout.num_regions + 3)
    idx = random_selection(gen, (B, Hkv if r(0, 1) else Hq, Lq, K), layout.num_regions)
    q_pos = q_positions(gen, B, Lq, N) if r(0, 1) else None
    strided = [False, True, "last"][r(0, 2)]
    q, k, v = (random_tensor(gen, s, dtype, "cpu", strided) for s in qkv_shapes(B, Hq, Hkv, Lq, N, D))
    args = (layout.region_ptr, layout.region_tokens, layout.fixed_tokens, idx, q_pos, D ** -0.5)
    for kernel in ("split", "split_block"):
        monkeypatch.setenv("GAZE_ATTENTION_KERNEL", kernel)
        assert_forward_matches_cpu(sim.gaze_attention(q, k, v, *args), dtype, (q, k, v), args)


def test_split_forward_without_room_for_its_tiles(sim, monkeypatch):
    """On a GPU with 64 KB of shared memory per block (sm_75), float32 with D = 256 leaves
    no room for the split-K forward's K/V tiles: it loads elements instead, with the same
    results. Runs itself again in a process whose emulated GPU reports that limit."""
    if "GAZE_SIM_SHARED_OPTIN" not in os.environ:
        run = subprocess.run(
            [sys.executable, "-m", "pytest", __file__, "-x", "-q", "-p", "no:cacheprovider",
             "-k", "test_split_forward_without_room_for_its_tiles"],
            env=dict(os.environ, GAZE_SIM_SHARED_OPTIN=str(64 * 1024)), capture_output=True,
            text=True, cwd=cuda_sim.ROOT)
        assert run.returncode == 0, run.stdout[-3000:] + run.stderr[-3000:]
        return
    monkeypatch.setenv("GAZE_ATTENTION_KERNEL", "split")
    gen, qkv, args = split_case(4, torch.float32)  # D = 256
    got = sim.gaze_attention(*qkv, *args)
    assert any("attention_forward_kernel" in name and "kVec = false" in name
               for name in sim.take_launched_kernels())
    out, lse = ops.gaze_attention(*qkv, *args)
    torch.testing.assert_close(got[0], out, atol=atol_for(torch.float32), rtol=1e-5)
    torch.testing.assert_close(got[1], lse, atol=1e-4, rtol=1e-5)


@pytest.mark.parametrize("kernel", ["split", "split_block"])
def test_skipped_invalid_entries_match_their_removal(sim, monkeypatch, kernel):
    """Unchecked, out-of-range slots and fixed positions are skipped, never read; -1 padding
    too, here 1,500 entries between the fixed tokens (the streamed forward packs the visible
    keys of each 1,024 entries, so one of its batches has none)."""
    monkeypatch.setenv("GAZE_ATTENTION_KERNEL", kernel)
    gen = generator(7)
    B, Hq, Hkv, N, D = 2, 4, 2, 200, 64
    layout = gaze_ext.build_layout([(0, 1, 12, 12)], N)
    R = layout.num_regions
    q, k, v = (torch.randn(s, generator=gen) for s in qkv_shapes(B, Hq, Hkv, 1, N, D))
    idx = torch.tensor([0, R + 3, 2, -7, 3], dtype=torch.int32).expand(B, Hkv, 1, 5).contiguous()
    text = layout.fixed_tokens
    fixed = torch.cat([text[:20], torch.full((1500,), -1, dtype=torch.int32), text[20:],
                       torch.tensor([N + 9, -5], dtype=torch.int32)])
    got = sim.gaze_attention(q, k, v, layout.region_ptr, layout.region_tokens, fixed, idx, None, 0.125)
    assert (STREAMED if kernel == "split" else BLOCK) in launched(sim)
    clean = torch.tensor([0, 2, 3], dtype=torch.int32).expand(B, Hkv, 1, 3).contiguous()
    want = ops.gaze_attention(q, k, v, layout.region_ptr, layout.region_tokens,
                              layout.fixed_tokens, clean, None, 0.125)
    torch.testing.assert_close(got[0], want[0])
    torch.testing.assert_close(got[1], want[1])


def split_forward_against_cpu(sim, gen, layout, dims, K):
    """Normal q, k, v of dims (B, Hq, Hkv, Lq, N, D), a selection of K slots per KV head and
    query positions; the split-K forward on gaze_sim against the CPU op. Returns the kernels
    it launched, the backward's arguments and the CPU's (dq, dk, dv)."""
    B, Hq, Hkv, Lq, N, D = dims
    q, k, v = (torch.randn(s, generator=gen) for s in qkv_shapes(*dims))
    idx = random_selection(gen, (B, Hkv, Lq, K), layout.num_regions)
    args = (layout.region_ptr, layout.region_tokens, layout.fixed_tokens, idx,
            q_positions(gen, B, Lq, N), 0.3)
    got = sim.gaze_attention(q, k, v, *args)
    kernels = launched(sim)
    out, lse = ops.gaze_attention(q, k, v, *args)
    torch.testing.assert_close(got[0], out, atol=1e-5, rtol=1e-5)
    torch.testing.assert_close(got[1], lse, atol=1e-5, rtol=1e-5)
    grad = torch.randn(out.shape, generator=gen)
    backward_args = (grad, None, q, k, v, out, lse, *args)
    return kernels, backward_args, torch.ops.gaze.gaze_attention_backward(*backward_args)


@pytest.mark.parametrize("B, Lq, N, D, regions", ZERO_SIZE_CASES, ids=ZERO_SIZE_IDS)
@pytest.mark.parametrize("kernel", ["split", "tensor_core"])
def test_zero_size_operands_match_cpu(sim, monkeypatch, kernel, B, Lq, N, D, regions):
    """The CUDA host code with one axis empty: no launch of an empty grid (gaze_sim reports
    one as a bad configuration), the CPU ops' shapes and values."""
    monkeypatch.setenv("GAZE_ATTENTION_KERNEL", kernel)
    layout, qkv = zero_size_case(B, Lq, N, D, regions)
    ptr, tokens = layout.region_ptr, layout.region_tokens
    desc = sim.region_pool(qkv[1], ptr, tokens)
    grad_desc = torch.ones_like(desc)
    idx, score = sim.region_topk(qkv[0], desc, ptr, 2, True, None, None)
    args = (ptr, tokens, layout.fixed_tokens, idx, None, 1.0)
    out, lse = sim.gaze_attention(*qkv, *args)
    got = [desc, sim.region_pool_backward(grad_desc, ptr, tokens, N), idx, score, out, lse,
           *sim.gaze_attention_backward(torch.ones_like(out), None, *qkv, out, lse, *args)]
    want_out, want_lse = ops.gaze_attention(*qkv, *args)
    want = [torch.ops.gaze.region_pool(qkv[1], ptr, tokens),
            torch.ops.gaze.region_pool_backward(grad_desc, ptr, tokens, N),
            *ops.region_topk(qkv[0], desc, ptr, 2, True), want_out, want_lse,
            *torch.ops.gaze.gaze_attention_backward(torch.ones_like(out), None, *qkv, want_out,
                                                    want_lse, *args)]
    for g, w in zip(got, want):
        torch.testing.assert_close(g, w, atol=1e-5, rtol=1e-5)


def assert_nan_pattern(got, want, spread, name, group=1, atol=3e-2, rtol=3e-2):
    """got is NaN where want is, and elsewhere holds want's values. With spread, got may be
    NaN in more places, but only within the (batch, KV head) blocks (group: heads of one KV
    head) and the columns of the last axis where want has a NaN."""
    if spread:
        nan = want.isnan()
        B, H = want.shape[:2]
        blocks = nan.reshape(B, H // group, -1).any(-1).repeat_interleave(group, 1)  # [B, H]
        columns = nan.reshape(-1, want.shape[-1]).any(0)
        allowed = blocks[:, :, None, None] & columns
        assert (got.isnan() | ~nan).all() and not (got.isnan() & ~allowed).any(), name
    else:
        assert torch.equal(got.isnan(), want.isnan()), name
    finite = ~got.isnan()
    torch.testing.assert_close(got[finite].float(), want[finite].float(), atol=atol, rtol=rtol,
                               msg=name)


@pytest.mark.parametrize("source", ["q", "k", "v"])
@pytest.mark.parametrize("kernel", ["split", "split_block", "tensor_core"])
def test_non_finite_scores_give_nan_rows_as_on_cpu(sim, monkeypatch, kernel, source):
    """Rows whose scores hold a NaN or a +inf get out = NaN, lse = NaN, NaN dq, and NaN
    dk/dv on the keys they see, from each kernel family as from the CPU op, whose other rows
    and keys they leave as they were. source "q": a NaN and an inf element in two query rows;
    "k": a NaN in one region key's K row, seen by some rows of a tile and not by others;
    "v": the same in its V row, so the scores and lse stay finite and out is NaN on the rows
    that see the key (and dq, dk through delta = rowsum(dO * out); dv stays finite).

    The tensor-core kernels multiply whole tiles, so a NaN operand row reaches every product
    of its tile (0 * NaN), as in dense attention: with a NaN q row, dk is NaN on more keys
    than on the CPU; with a NaN k row, dq on more rows; with a NaN v row, out on more rows
    and through it dq and dk. Where the CPU's value is NaN the kernel's is too, and the rest
    match. The softmax's own factor dS = P (dP - delta) must not spread a NaN row's delta
    to keys the row does not see."""
    if kernel == "tensor_core":
        gen, layout, idx, q_pos, qkv = tiled_case(0, torch.bfloat16, "cpu")
        args = (layout.region_ptr, layout.region_tokens, layout.fixed_tokens, idx, q_pos, 0.2)
    else:
        gen, qkv, args = split_case(0, torch.bfloat16)
    q, k, v = qkv
    clean_out, _ = ops.gaze_attention(q, k, v, *args)
    if source == "q":
        q = q.clone()
        q[0, 1, 0, 5] = float("nan")
        q[1, 6, q.shape[2] - 1, 3] = float("inf")
    else:
        region_ptr, region_tokens, idx = args[0], args[1], args[3]
        region = int(idx[0, 0, 0, 0])
        poisoned = (k if source == "k" else v).clone()
        poisoned[0, 0, int(region_tokens[0, region_ptr[0, region]]), 2] = float("nan")
        k, v = (poisoned, v) if source == "k" else (k, poisoned)
    monkeypatch.setenv("GAZE_ATTENTION_KERNEL", kernel)
    out, lse = sim.gaze_attention(q, k, v, *args)
    want_out, want_lse = ops.gaze_attention(q, k, v, *args)
    nan_rows = want_out.isnan().any(-1)
    if source == "v":  # finite scores; out is NaN in the poisoned element's column only
        assert not want_lse.isnan().any() and (want_out.isnan().sum(-1) == nan_rows).all()
    else:
        assert torch.equal(want_lse.isnan(), nan_rows) and want_out[nan_rows].isnan().all()
    if source == "q":
        assert nan_rows.sum() == 2 and nan_rows[0, 1, 0] and nan_rows[1, 6, -1]
    assert 0 < nan_rows.sum() < nan_rows.numel()
    assert torch.equal(want_out[~nan_rows], clean_out[~nan_rows])
    tensor_core_spread = {"q": {"dk"}, "k": {"dq"}, "v": {"out", "dq", "dk"}}[source]
    spread = tensor_core_spread if kernel == "tensor_core" else set()
    G = q.shape[1] // k.shape[1]
    assert_nan_pattern(out, want_out, "out" in spread, "out", G, atol_for(torch.bfloat16), 1e-2)
    torch.testing.assert_close(lse, want_lse, atol=1e-3, rtol=1e-4, equal_nan=True)

    grad = torch.randn(out.shape, generator=gen).bfloat16()
    got = sim.gaze_attention_backward(grad, None, q, k, v, out, lse, *args)
    want = torch.ops.gaze.gaze_attention_backward(grad, None, q, k, v, want_out, want_lse, *args)
    for name, g, w in zip(("dq", "dk", "dv"), got, want):
        nan_vectors = w.isnan().all(-1)  # on the CPU a row or key is NaN whole, or not at all
        assert torch.equal(w.isnan(), nan_vectors[..., None].expand_as(w)), name
        if name == "dv" and source == "v":
            assert not nan_vectors.any()  # P and dO stay finite
        else:
            assert 0 < nan_vectors.sum() < nan_vectors.numel(), name
        assert_nan_pattern(g, w, name in spread, name, G if name == "dq" else 1)


def test_split_kernels_with_one_split_per_unit(sim, monkeypatch):
    """Few keys per unit (fixed tokens + 8 per slot < 128): one split, no merge, so the
    forward kernel writes out and lse itself, and the backward stores dq, for units of
    NH = 4 query heads at Lq = 3 (a unit's heads are rows Lq apart)."""
    monkeypatch.setenv("GAZE_ATTENTION_KERNEL", "split")
    gen = generator(16)
    B, Hq, Hkv, Lq, N, D, K = 2, 8, 2, 3, 100, 64, 4
    layout = random_batch_layout(gen, B, N, max_regions=30, max_region_size=8)
    assert layout.fixed_tokens.shape[-1] + 8 * K < 128  # plan_splits: one split's worth of work
    kernels, backward_args, want = split_forward_against_cpu(sim, gen, layout,
                                                             (B, Hq, Hkv, Lq, N, D), K)
    assert kernels == {STREAMED}
    for deterministic in (False, True):
        torch.use_deterministic_algorithms(deterministic)
        try:
            got = sim.gaze_attention_backward(*backward_args)
        finally:
            torch.use_deterministic_algorithms(False)
        for name, g, w in zip(("dq", "dk", "dv"), got, want):
            torch.testing.assert_close(g, w, atol=1e-5, rtol=1e-4, msg=name)


@pytest.mark.parametrize("splits", ["1", "3", "64"])
def test_forced_split_counts_match_cpu(sim, monkeypatch, splits):
    """GAZE_SPLITS overrides the plan's splits per unit (the decode benchmark sweeps it): one
    split (no merge), three, and more splits than a unit has keys (empty splits), forward
    and backward (at most 16 splits there)."""
    monkeypatch.setenv("GAZE_ATTENTION_KERNEL", "split")
    monkeypatch.setenv("GAZE_SPLITS", splits)
    gen = generator(21)
    B, Hq, Hkv, Lq, N, D, K = 2, 8, 2, 1, 300, 64, 5
    layout = random_batch_layout(gen, B, N, max_regions=30, max_region_size=12)
    kernels, backward_args, want = split_forward_against_cpu(sim, gen, layout,
                                                             (B, Hq, Hkv, Lq, N, D), K)
    assert kernels == ({STREAMED} if splits == "1" else {STREAMED, "merge_splits_kernel"})
    for name, g, w in zip(("dq", "dk", "dv"), sim.gaze_attention_backward(*backward_args), want):
        torch.testing.assert_close(g, w, atol=1e-5, rtol=1e-4, msg=name)


def test_forced_split_count_must_be_a_number(sim, monkeypatch):
    monkeypatch.setenv("GAZE_ATTENTION_KERNEL", "split")
    monkeypatch.setenv("GAZE_SPLITS", "eight")
    q, k = torch.randn(1, 2, 1, 16), torch.randn(1, 1, 40, 16)
    layout = gaze_ext.build_layout([(0, 1, 6, 6)], 40)
    idx = torch.zeros(1, 1, 1, 1, dtype=torch.int32)
    with pytest.raises(RuntimeError, match="GAZE_SPLITS must be a number"):
        sim.gaze_attention(q, k, k, layout.region_ptr, layout.region_tokens, layout.fixed_tokens,
                           idx, None, 0.25)


# ---------------------------------------------------------- gaze_attention, tensor cores

@pytest.mark.parametrize("dtype", [torch.float16, torch.bfloat16])
@pytest.mark.parametrize("case", range(len(TILED_CASES)))
def test_tensor_core_kernels_match_reference(sim, monkeypatch, dtype, case):
    """test_cuda's tensor-core cases: ragged tiles, G not dividing 64, per-head selection,
    k >= R, no slots, head dims 80/96, strided aligned inputs, queries that see nothing."""
    gen, layout, idx, q_pos, qkv = tiled_case(case, dtype, "cpu")
    K = idx.shape[-1]
    args = (layout.region_ptr, layout.region_tokens, layout.fixed_tokens, idx, q_pos, 0.2)
    monkeypatch.setenv("GAZE_ATTENTION_KERNEL", "tensor_core")
    out, lse = sim.gaze_attention(*qkv, *args)
    assert torch.equal(out, sim.gaze_attention(*qkv, *args)[0])  # whatever the thread order
    assert launched(sim) == {"attention_forward_tiled_kernel"}
    assert_ldmatrix_conflict_free(sim)

    hp = high_precision(dtype)
    ref = [t.to(hp).requires_grad_() for t in qkv]
    same = [t.clone().requires_grad_() for t in qkv]
    ref_out, ref_lse = reference.gaze_attention(*ref, *args)
    same_out, _ = reference.gaze_attention(*same, *args, compute_dtype=dtype)
    error_bound_check("out", out, ref_out.detach(), same_out.detach(), 2.0, atol_for(dtype))
    torch.testing.assert_close(lse, ref_lse.detach().float(), atol=1e-3, rtol=1e-4)

    grad = torch.randn(out.shape, generator=gen)
    grads = sim.gaze_attention_backward(grad.to(dtype), None, *qkv, out, lse, *args)
    key_major = {"selection_keys_kernel", "region_keys_backward_kernel"} if K > 0 else set()
    assert launched(sim) == {"attention_backward_tiled_kernel"} | key_major
    assert_ldmatrix_conflict_free(sim)
    (ref_out * grad.to(hp)).sum().backward()
    (same_out.float() * grad).sum().backward()
    for name, got, r, s in zip("qkv", grads, ref, same):
        error_bound_check(f"d{name}", got, r.grad, s.grad, 3.0, atol_for(dtype))


def bf16_qkv(gen, B, Hq, Hkv, Lq, N, D):
    """Normal q [B, Hq, Lq, D], k and v [B, Hkv, N, D] in bfloat16, drawn in that order."""
    return [torch.randn(s, generator=gen).bfloat16() for s in qkv_shapes(B, Hq, Hkv, Lq, N, D)]


def assert_tensor_core_matches_split(sim, monkeypatch, gen, layout, idx, q_pos, qkv):
    """The tensor-core forward and backward (with the key-major pass) against the split-K
    kernels, on bf16 qkv = [q, k, v]."""
    args = (layout.region_ptr, layout.region_tokens, layout.fixed_tokens, idx, q_pos, 0.125)
    monkeypatch.setenv("GAZE_ATTENTION_KERNEL", "tensor_core")
    out, lse = sim.gaze_attention(*qkv, *args)
    grad = torch.randn(out.shape, generator=gen).bfloat16()
    grads = sim.gaze_attention_backward(grad, None, *qkv, out, lse, *args)
    assert launched(sim) == {"attention_forward_tiled_kernel", "attention_backward_tiled_kernel",
                             "selection_keys_kernel", "region_keys_backward_kernel"}
    monkeypatch.setenv("GAZE_ATTENTION_KERNEL", "split")
    want_out, want_lse = sim.gaze_attention(*qkv, *args)
    want = sim.gaze_attention_backward(grad, None, *qkv, want_out, want_lse, *args)
    torch.testing.assert_close(out.float(), want_out.float(), atol=2e-2, rtol=2e-2)
    torch.testing.assert_close(lse, want_lse, atol=1e-3, rtol=1e-4)
    for g, w in zip(grads, want):
        torch.testing.assert_close(g.float(), w.float(), atol=3e-2, rtol=3e-2)


def test_tensor_core_kernels_with_many_slots_per_query_head(sim, monkeypatch):
    """Per-head selection with 120 slots: 2048 entries fit 17 positions, so tiles of 17 rows
    (a second warp with one row) and a ragged last tile: the per-head prefill configuration."""
    gen = generator(9)
    B, Hq, Hkv, Lq, N, D = 1, 2, 1, 40, 700, 64
    layout = random_batch_layout(gen, B, N, max_regions=160, max_region_size=4, empty_regions=False)
    idx = random_selection(gen, (B, Hq, Lq, 120), layout.num_regions)
    q_pos = q_positions(gen, B, Lq, N, low=N // 2)
    assert_tensor_core_matches_split(sim, monkeypatch, gen, layout, idx, q_pos,
                                     bf16_qkv(gen, B, Hq, Hkv, Lq, N, D))


def test_block_context_rows_with_no_fixed_tokens(sim, monkeypatch):
    """The attention block's call for context rows: one whole image/frame per row as its
    region (up to 150 tokens), no fixed tokens (an empty list), padding rows that see
    nothing; the split-K kernels against the CPU, the tensor-core ones against them."""
    from gaze_ext.multimodal import build_multimodal_layout
    gen = generator(17)
    mm = build_multimodal_layout([[("text", 3), ("visual", 1, 12, 12), ("text", 2),
                                   ("visual", 3, 4, 5)], [("visual", 2, 6, 6), ("text", 9)]],
                                 num_context=2)
    frames, rows = mm.frames, mm.context_rows
    B, Lc, N, Hq, Hkv, D = rows.shape[0], rows.shape[1], mm.seq_len, 4, 2, 64
    assert frames.fixed_tokens.shape[1] == 0
    idx, q_pos = mm.context_selection(Hkv), mm.row_positions(rows)  # as the block calls it
    qkv = bf16_qkv(gen, B, Hq, Hkv, Lc, N, D)
    args = (frames.region_ptr, frames.region_tokens, frames.fixed_tokens, idx, q_pos, 0.125)
    monkeypatch.setenv("GAZE_ATTENTION_KERNEL", "split")
    out, _ = assert_forward_matches_cpu(sim.gaze_attention(*qkv, *args), torch.bfloat16, qkv, args)
    assert STREAMED in launched(sim)
    padding = rows[1] == N
    assert padding.any() and (out[1, :, padding] == 0).all()  # padding rows see no key
    assert_tensor_core_matches_split(sim, monkeypatch, gen, frames, idx, q_pos, qkv)


def test_tensor_core_kernels_with_large_regions(sim, monkeypatch):
    """Regions of up to 200 tokens, each selected by many rows: the key-major pass walks a
    region in several 64-key steps, each over several chunks of rows."""
    gen = generator(13)
    B, Hq, Hkv, Lq, N, D = 2, 8, 2, 60, 900, 64
    layout = random_batch_layout(gen, B, N, max_regions=6, max_region_size=200)
    assert int((layout.region_ptr[..., 1:] - layout.region_ptr[..., :-1]).max()) > 64  # two steps
    idx = random_selection(gen, (B, Hkv, Lq, 3), layout.num_regions)
    q_pos = q_positions(gen, B, Lq, N)
    assert_tensor_core_matches_split(sim, monkeypatch, gen, layout, idx, q_pos,
                                     bf16_qkv(gen, B, Hq, Hkv, Lq, N, D))


def test_tensor_core_kernels_with_per_head_selection_over_kv_heads(sim, monkeypatch):
    """One selection per query head with Hkv = 2: query heads 2 and 3 read KV head 1."""
    gen = generator(14)
    B, Hq, Hkv, Lq, N, D = 1, 4, 2, 20, 300, 64
    layout = random_batch_layout(gen, B, N, max_regions=30, max_region_size=12)
    idx = random_selection(gen, (B, Hq, Lq, 6), layout.num_regions)
    q_pos = q_positions(gen, B, Lq, N)
    assert_tensor_core_matches_split(sim, monkeypatch, gen, layout, idx, q_pos,
                                     bf16_qkv(gen, B, Hq, Hkv, Lq, N, D))


def test_tensor_core_kernels_with_every_slot_taken(sim, monkeypatch):
    """positions * k = 16 * 8, a power of two, and no slot -1 or repeated: the sorted
    (position, region) entries fill their buffer, the last one a real entry."""
    gen = generator(15)
    B, Hq, Hkv, Lq, N, D, K = 1, 8, 2, 16, 300, 64, 8
    layout = random_batch_layout(gen, B, N, max_regions=30, max_region_size=12,
                                 empty_regions=False)
    R = layout.num_regions
    assert R >= K
    idx = torch.stack([torch.randperm(R, generator=gen)[:K] for _ in range(B * Hkv * Lq)])
    idx = idx.view(B, Hkv, Lq, K).int()
    assert_tensor_core_matches_split(sim, monkeypatch, gen, layout, idx, None,
                                     bf16_qkv(gen, B, Hq, Hkv, Lq, N, D))


def test_tensor_core_kernels_with_empty_regions_between_one_key_regions(sim, monkeypatch):
    """300 regions, every other one empty and the others one key each, all selected: a step
    of 64 keys (some fixed tokens first) would reach ~128 selected regions if the tile's
    union kept the empty ones, twice the runs a step holds multiplicities for."""
    gen = generator(16)
    B, Hq, Hkv, Lq, N, D, R = 1, 4, 1, 16, 200, 64, 300
    sizes = torch.arange(R) % 2
    ptr = torch.cat([torch.zeros(1, dtype=torch.int64), sizes.cumsum(0)]).int()
    tokens = torch.randperm(N - 40, generator=gen)[:R // 2].int() + 40
    fixed = torch.arange(0, 40, 3, dtype=torch.int32)
    layout = gaze_ext.layout.GazeLayout(ptr, tokens, torch.zeros(R, dtype=torch.int32), fixed, N)
    idx = torch.stack([torch.randperm(R, generator=gen) for _ in range(B * Hkv * Lq)])
    idx = idx.view(B, Hkv, Lq, R).int()
    q_pos = q_positions(gen, B, Lq, N, low=N // 2)
    assert_tensor_core_matches_split(sim, monkeypatch, gen, layout, idx, q_pos,
                                     bf16_qkv(gen, B, Hq, Hkv, Lq, N, D))


def test_tensor_core_backward_with_fixed_keys_seen_in_one_block_of_a_pair(sim, monkeypatch):
    """Fixed tokens ordered so that in every 16 keys of a step the first 8 are past every
    query's causal limit and the last 8 before it: dK/dV = P^T dO, dS^T Q of each warp's key
    pair must not skip a row warp that sees only the pair's second key block."""
    gen = generator(17)
    B, Hq, Hkv, Lq, N, D = 1, 4, 1, 32, 300, 64
    fixed = torch.cat([torch.cat([torch.arange(200 + 8 * i, 208 + 8 * i), torch.arange(8 * i, 8 * i + 8)])
                       for i in range(4)]).int()
    ptr = torch.arange(0, 101, 10, dtype=torch.int32)
    tokens = torch.arange(40, 140, dtype=torch.int32)
    layout = gaze_ext.layout.GazeLayout(ptr, tokens, tokens.view(10, 10)[:, -1].contiguous(), fixed, N)
    idx = random_selection(gen, (B, Hkv, Lq, 4), layout.num_regions)
    q_pos = torch.randint(32, 150, (B, Lq), generator=gen, dtype=torch.int32)  # sees keys 0-31, not 200+
    assert_tensor_core_matches_split(sim, monkeypatch, gen, layout, idx, q_pos,
                                     bf16_qkv(gen, B, Hq, Hkv, Lq, N, D))


def test_tensor_core_forward_ignores_keys_a_row_does_not_see(sim, monkeypatch):
    """Keys at positions 150 and later with scores some 100 times larger, which only the
    tile's rows with a later causal limit see: for the other rows they must not enter the
    running max (whose exp2 would underflow every key those rows see)."""
    gen = generator(18)
    B, Hq, Hkv, Lq, N, D = 1, 4, 1, 32, 300, 64
    layout = random_batch_layout(gen, B, N, max_regions=30, max_region_size=12)
    idx = random_selection(gen, (B, Hkv, Lq, 6), layout.num_regions)
    q_pos = torch.randint(0, N, (B, Lq), generator=gen, dtype=torch.int32)
    q, k, v = (torch.randn(s, generator=gen) for s in qkv_shapes(B, Hq, Hkv, Lq, N, D))
    k[:, :, 150:] *= 100
    q, k, v = (t.bfloat16() for t in (q, k, v))
    args = (layout.region_ptr, layout.region_tokens, layout.fixed_tokens, idx, q_pos, 0.125)
    monkeypatch.setenv("GAZE_ATTENTION_KERNEL", "tensor_core")
    out, lse = sim.gaze_attention(q, k, v, *args)
    assert launched(sim) == {"attention_forward_tiled_kernel"}
    monkeypatch.setenv("GAZE_ATTENTION_KERNEL", "split")
    want_out, want_lse = sim.gaze_attention(q, k, v, *args)
    torch.testing.assert_close(out.float(), want_out.float(), atol=2e-2, rtol=2e-2)
    torch.testing.assert_close(lse, want_lse, atol=1e-3, rtol=1e-4)


def test_kernels_with_k_and_v_in_different_layouts(sim, monkeypatch):
    """K contiguous, V (and q) padded [B, L, H, D + 8] views, rows still 16-byte aligned:
    each operand read with its own strides, by the split-K kernels (against the CPU) and
    the tensor-core kernels (against split-K). Every other case gives q, k, v one layout."""
    gen, layout, idx, q_pos, qkv = mixed_layouts_case("cpu")
    args = (layout.region_ptr, layout.region_tokens, layout.fixed_tokens, idx, q_pos, 0.125)
    monkeypatch.setenv("GAZE_ATTENTION_KERNEL", "split")
    out, lse = sim.gaze_attention(*qkv, *args)
    want_out, want_lse = ops.gaze_attention(*qkv, *args)
    torch.testing.assert_close(out.float(), want_out.float(), atol=atol_for(torch.bfloat16), rtol=1e-2)
    torch.testing.assert_close(lse, want_lse, atol=1e-4, rtol=1e-5)
    grad = torch.randn(out.shape, generator=gen).bfloat16()
    backward_args = (grad, None, *qkv, want_out, want_lse, *args)
    want = torch.ops.gaze.gaze_attention_backward(*backward_args)
    for name, g, w in zip(("dq", "dk", "dv"), sim.gaze_attention_backward(*backward_args), want):
        scale = w.float().abs().max().item() + 1.0
        torch.testing.assert_close(g.float(), w.float(), atol=atol_for(torch.bfloat16) * scale,
                                   rtol=1e-2, msg=name)
    assert {STREAMED, "attention_backward_kernel"} <= launched(sim)
    assert_tensor_core_matches_split(sim, monkeypatch, gen, layout, idx, q_pos, qkv)


def test_auto_choice_of_kernels(sim, monkeypatch):
    """By default a prefill tile of 64 rows runs on tensor cores, a decode step split-K."""
    monkeypatch.delenv("GAZE_ATTENTION_KERNEL", raising=False)
    gen = generator(8)
    B, Hq, Hkv, N, D = 1, 8, 2, 400, 128
    layout = random_batch_layout(gen, B, N, max_regions=30, max_region_size=12)
    kv = [torch.randn(B, Hkv, N, D, generator=gen).bfloat16() for _ in range(2)]
    lay = (layout.region_ptr, layout.region_tokens, layout.fixed_tokens)
    for Lq, kernel in ((64, "attention_forward_tiled_kernel"), (1, STREAMED)):
        q = torch.randn(B, Hq, Lq, D, generator=gen).bfloat16()
        idx = random_selection(gen, (B, Hkv, Lq, 6), layout.num_regions)
        sim.gaze_attention(q, *kv, *lay, idx, None, 0.1)
        assert kernel in launched(sim)


# ------------------------------------------------------------ corrupted index contents

@pytest.mark.parametrize("seed,dtype,D,strided", [(0, torch.float32, 40, True), (1, torch.bfloat16, 64, False),
                                                  (0, torch.float16, 128, False), (1, torch.float32, 7, False)])
def test_corrupted_indices_are_never_read_out_of_bounds(sim, monkeypatch, seed, dtype, D, strided):
    """sanitize_case.py's corruptions, on every kernel (the sanitized rerun is the check;
    here the outputs must stay finite where a query sees a key)."""
    gen = generator(500 + seed)
    N, B, Hq, Hkv, Lq = 200, 2, 8, 2, 20
    layout = gaze_ext.build_batch_layout([([(0, 1, 9, 9)], 120), ([(10, 2, 5, 7)], N)],
                                         region_shape=(1, 3, 3))
    ptr, tokens, fixed = corrupted(layout, N, seed)
    R = layout.num_regions
    q = random_tensor(gen, (B, Hq, Lq, D), dtype, "cpu", strided)
    k, v = (random_tensor(gen, (B, Hkv, N, D), dtype, "cpu", strided) for _ in range(2))
    desc = sim.region_pool(k, ptr, tokens)
    sim.region_pool_backward(torch.ones_like(desc), ptr, tokens, N)
    q_pos = torch.randint(-1, N + 1, (B, Lq), generator=gen, dtype=torch.int32)
    kernels = ["split", "split_block"]
    kernels += ["tensor_core"] if dtype != torch.float32 and D % 8 == 0 and not strided else []
    for share in (True, False):
        for topk in (3, R + 4):
            idx, _ = sim.region_topk(q, desc, ptr, topk, share, q_pos, layout.region_pos)
            idx = idx.clone()
            idx[..., 0] = R + 5
            idx[..., -1] = R  # the first id past the regions
            for kernel in kernels:
                monkeypatch.setenv("GAZE_ATTENTION_KERNEL", kernel)
                out, lse = sim.gaze_attention(q, k, v, ptr, tokens, fixed, idx, q_pos, 0.3)
                seen = torch.isfinite(lse)
                assert torch.isfinite(out.float()[seen]).all()
                for deterministic in (False, True):
                    torch.use_deterministic_algorithms(deterministic)
                    try:
                        grads = sim.gaze_attention_backward(torch.ones_like(out), None, q, k, v, out,
                                                            lse, ptr, tokens, fixed, idx, q_pos, 0.3)
                    finally:
                        torch.use_deterministic_algorithms(False)
                    assert all(torch.isfinite(g.float()).all() for g in grads)
    expected = {"pool_kernel", "pool_backward_kernel", "topk_kernel", BLOCK,
                "attention_backward_kernel", "attention_backward_ordered_kernel"}
    if not strided and D * dtype.itemsize % 16 == 0:
        expected.add(STREAMED)
    if "tensor_core" in kernels:
        expected |= {"attention_forward_tiled_kernel", "attention_backward_tiled_kernel",
                     "selection_keys_kernel", "region_keys_backward_kernel"}
    assert expected <= launched(sim)


# ---------------------------------------------------------------------------- memcheck

@pytest.mark.skipif(SANITIZED or sanitizer_library() is None,
                    reason="inside the sanitized run, or no AddressSanitizer runtime")
def test_under_sanitizers(built):
    """Every test above again, with gaze_sim built with AddressSanitizer: any read or
    write of a kernel outside a tensor, the dynamic shared memory or a __shared__ array
    fails the run (compute-sanitizer's memcheck, on the CPU); and with
    UndefinedBehaviorSanitizer: a misaligned access, a signed overflow or an oversized shift
    fails it too."""
    env = sanitized_env(GAZE_SIM_SANITIZE="1")
    run = subprocess.run(
        [sys.executable, "-m", "pytest", __file__, "-x", "-q", "-s", "-p", "no:cacheprovider",
         "-k", "not test_under_sanitizers"],
        env=env, capture_output=True, text=True, cwd=cuda_sim.ROOT)
    assert_clean(run)
