"""CUDA-only properties: graph capture of a decode step, index checking under
GAZE_CHECK_INDICES, the deterministic backward, head dims, the kernels' scratch
paths and split-K merging at sizes the generic tests do not reach. The generic
op tests run on CUDA too (their `device` parameter)."""
import os
import subprocess
import sys

import pytest
import torch

import gaze_ext
from gaze_ext import ops, reference
from helpers import (DTYPES, SPLIT_CASES, TILED_CASES, atol_for, cuda_ready,
                     error_bound_check, generator, high_precision, mixed_layouts_case,
                     q_positions, qkv_shapes, random_batch_layout, random_selection, split_case,
                     tiled_case, topk_many_regions)

pytestmark = pytest.mark.skipif(not cuda_ready(), reason="needs a GPU and the CUDA kernels")


def decode_inputs(seed, B=2, Hq=8, Hkv=2, D=128, frames=4, hw=(12, 12), text=64,
                  dtype=torch.bfloat16):
    gen = generator(seed)
    N = frames * hw[0] * hw[1] + text
    layout = gaze_ext.build_layout([(0, frames, *hw)], N).to("cuda")
    t = lambda *s: torch.randn(*s, generator=gen).to("cuda", dtype)  # noqa: E731
    return layout, t(B, Hq, 1, D), t(B, Hkv, N, D), t(B, Hkv, N, D)


@pytest.mark.parametrize("share_kv", [True, False])
def test_decode_step_in_a_cuda_graph(share_kv):
    layout, q, k, v = decode_inputs(0)
    desc = ops.region_pool(k, layout.region_ptr, layout.region_tokens)
    K = max(1, layout.num_regions // 10)
    q_static = q.clone()

    def step():
        idx, _ = ops.region_topk(q_static, desc, layout.region_ptr, K, share_kv)
        return ops.gaze_attention(q_static, k, v, layout.region_ptr, layout.region_tokens,
                                  layout.fixed_tokens, idx)[0]

    side = torch.cuda.Stream()
    side.wait_stream(torch.cuda.current_stream())
    with torch.cuda.stream(side):
        for _ in range(3):
            step()
    torch.cuda.current_stream().wait_stream(side)
    graph = torch.cuda.CUDAGraph()
    with torch.cuda.graph(graph):
        out_static = step()
    for trial in range(3):
        q_static.copy_(torch.randn_like(q))
        graph.replay()
        torch.testing.assert_close(out_static, step(), atol=0, rtol=0)


def test_index_contents_checked_only_when_asked():
    code = """
import torch, gaze_ext
from gaze_ext import ops
layout = gaze_ext.build_layout([(0, 1, 6, 6)], 40).to('cuda')
q = torch.randn(1, 2, 1, 16, device='cuda')
k = torch.randn(1, 1, 40, 16, device='cuda'); v = torch.randn_like(k)
idx = torch.tensor([[[[0, 7]]]], dtype=torch.int32, device='cuda')  # region 7 does not exist
try:
    out, lse = ops.gaze_attention(q, k, v, layout.region_ptr, layout.region_tokens,
                                  layout.fixed_tokens, idx)
    torch.cuda.synchronize()
    print('ran', bool(torch.isfinite(out).all()))
except RuntimeError as e:
    print('raised', 'idx' in str(e))
"""
    run = lambda env: subprocess.run([sys.executable, "-c", code], capture_output=True,  # noqa: E731
                                     text=True, env=dict(os.environ, **env)).stdout.strip()
    assert run({"GAZE_CHECK_INDICES": "1"}) == "raised True"
    assert run({"GAZE_CHECK_INDICES": "0"}) == "ran True"


def test_skipped_invalid_entries_match_their_removal():
    """Unchecked on CUDA, out-of-range slots and positions are skipped."""
    layout, q, k, v = decode_inputs(1, dtype=torch.float32)
    R, N = layout.num_regions, layout.num_keys
    idx = torch.tensor([0, R + 3, 2, -7, 5], dtype=torch.int32, device="cuda")
    idx = idx.expand(2, 2, 1, 5).contiguous()
    fixed = torch.cat([layout.fixed_tokens, torch.tensor([N + 9, -5], dtype=torch.int32,
                                                         device="cuda")])
    out, lse = ops.gaze_attention(q, k, v, layout.region_ptr, layout.region_tokens, fixed, idx)
    clean = torch.tensor([0, 2, 5], dtype=torch.int32, device="cuda").expand(2, 2, 1, 3).contiguous()
    want, want_lse = ops.gaze_attention(q, k, v, layout.region_ptr, layout.region_tokens,
                                        layout.fixed_tokens, clean)
    torch.testing.assert_close(out, want)
    torch.testing.assert_close(lse, want_lse)


@pytest.mark.parametrize("share_kv", [True, False])
@pytest.mark.parametrize("slots,repeats", [(6, False), (6, True), (300, True)])
def test_deterministic_backward_repeats_bitwise(share_kv, slots, repeats):
    """Repeated regions put one key twice in a batch; 300 slots need two splits, which the
    deterministic kernel runs in order."""
    layout, q, k, v = decode_inputs(2, dtype=torch.float32)
    q = q.expand(-1, -1, 5, -1).contiguous()
    Hs = 2 if share_kv else 8
    idx = random_selection(generator(3), (2, Hs, 5, slots), layout.num_regions,
                           repeats=repeats).cuda()

    def grads():
        leaves = [t.detach().clone().requires_grad_() for t in (q, k, v)]
        out, _ = ops.gaze_attention(*leaves, layout.region_ptr, layout.region_tokens,
                                    layout.fixed_tokens, idx)
        out.square().sum().backward()
        return [t.grad for t in leaves]

    fast = grads()
    torch.use_deterministic_algorithms(True)
    try:
        first, second = grads(), grads()
    finally:
        torch.use_deterministic_algorithms(False)
    for a, b, c in zip(first, second, fast):
        assert torch.equal(a, b)
        torch.testing.assert_close(a, c, atol=1e-5, rtol=1e-5)


@pytest.mark.parametrize("dtype", [torch.float32, torch.float16, torch.bfloat16])
@pytest.mark.parametrize("head_dim", [64, 80, 96, 128, 256])
def test_head_dims(dtype, head_dim):
    gen = generator(head_dim)
    B, Hq, Hkv, Lq, N = 2, 8, 2, 3, 300
    layout = random_batch_layout(gen, B, N, max_regions=30, max_region_size=12)
    idx = random_selection(gen, (B, Hkv, Lq, 8), layout.num_regions)
    q_pos = torch.randint(N // 2, N, (B, Lq), generator=gen, dtype=torch.int32)
    leaves = [torch.randn(s, generator=gen).to("cuda", dtype).requires_grad_()
              for s in ((B, Hq, Lq, head_dim), (B, Hkv, N, head_dim), (B, Hkv, N, head_dim))]
    dev = layout.to("cuda")
    out, _ = ops.gaze_attention(*leaves, dev.region_ptr, dev.region_tokens, dev.fixed_tokens,
                                idx.cuda(), q_pos.cuda())
    grad = torch.randn(out.shape, generator=gen)
    (out.float() * grad.cuda()).sum().backward()
    args = (layout.region_ptr, layout.region_tokens, layout.fixed_tokens, idx, q_pos)
    hp = high_precision(dtype)
    ref = [t.detach().cpu().to(hp).requires_grad_() for t in leaves]
    same = [t.detach().cpu().requires_grad_() for t in leaves]
    ref_out, _ = reference.gaze_attention(*ref, *args)
    same_out, _ = reference.gaze_attention(*same, *args, compute_dtype=dtype)
    error_bound_check("out", out.detach().cpu(), ref_out.detach(), same_out.detach(), 2.0,
                      atol_for(dtype))
    (ref_out * grad.to(hp)).sum().backward()
    (same_out.float() * grad).sum().backward()
    for name, got, r, s in zip("qkv", leaves, ref, same):
        error_bound_check(f"d{name}", got.grad.cpu(), r.grad, s.grad, 3.0, atol_for(dtype))


@pytest.mark.parametrize("scoring_blocks", ["1", "0"])
def test_topk_scratch_paths_match_cpu(monkeypatch, scoring_blocks):
    """Keys and sort buffer past shared memory go to global scratch; the 4 rows scored by one
    block each, and by the plan's several (scoring_kernel)."""
    monkeypatch.setenv("GAZE_TOPK_SCORING_BLOCKS", scoring_blocks)
    q, desc, ptr = topk_many_regions(4, 30000, q_heads=2, q_len=2)
    for k in (300, 16000):
        got = ops.region_topk(q.cuda(), desc.cuda(), ptr.cuda(), k, False)
        want = ops.region_topk(q, desc, ptr, k, False)
        assert torch.equal(got[0].cpu(), want[0]) and torch.equal(got[1].cpu(), want[1])


def test_topk_rows_past_one_launch_match_cpu():
    """65,536 regions with k = 65,536 take 768 KB of scratch a row: 512 MB holds 682 rows,
    so the 700 rows (two runs of 350 positions, scored in tiles) take two launches of one
    run each (test_cuda_sim reaches several launches with a smaller budget)."""
    q, desc, ptr = topk_many_regions(5, 65536, q_heads=2, q_len=350)
    got = ops.region_topk(q.cuda(), desc.cuda(), ptr.cuda(), 65536, False)
    want = ops.region_topk(q, desc, ptr, 65536, False)
    assert torch.equal(got[0].cpu(), want[0]) and torch.equal(got[1].cpu(), want[1])


@pytest.mark.parametrize("scoring_blocks", ["1", "0", "5"])
@pytest.mark.parametrize("share_kv", [True, False])
def test_decode_topk_with_each_scoring_plan_matches_cpu(monkeypatch, scoring_blocks, share_kv):
    """A decode step's selection (B x Hkv rows, bf16 descriptors): scored by the selecting
    block itself, by the plan's scoring blocks per row, and by 5. Small integers: exact
    scores whatever the summation order, many ties for the tie rule."""
    monkeypatch.setenv("GAZE_TOPK_SCORING_BLOCKS", scoring_blocks)
    gen = generator(41)
    B, Hq, Hkv, D, K = 2, 8, 2, 128, 20
    layout = gaze_ext.build_layout([(0, 4, 12, 12)], 700, region_shape=(1, 3, 3))
    q = torch.randint(-3, 4, (B, Hq, 1, D), generator=gen).bfloat16()
    desc = torch.randint(-3, 4, (B, Hkv, layout.num_regions, D), generator=gen).bfloat16()
    want = ops.region_topk(q, desc, layout.region_ptr, K, share_kv)
    got = ops.region_topk(q.cuda(), desc.cuda(), layout.region_ptr.cuda(), K, share_kv)
    assert torch.equal(got[0].cpu(), want[0]) and torch.equal(got[1].cpu(), want[1])


@pytest.mark.parametrize("scoring_blocks", ["0", "1"])
@pytest.mark.parametrize("share_kv", [True, False])
def test_prefill_topk_scored_in_tiles_matches_cpu(monkeypatch, scoring_blocks, share_kv):
    """Many causal rows (prefill): scored in tiles by scoring_tile_kernel (the plan), and by
    the selecting blocks themselves (forced). Small integers in bf16: exact scores."""
    monkeypatch.setenv("GAZE_TOPK_SCORING_BLOCKS", scoring_blocks)
    gen = generator(42)
    B, Hq, Hkv, Lq, D, K = 2, 8, 2, 150, 128, 30
    layout = gaze_ext.build_layout([(0, 4, 12, 12)], 900, region_shape=(1, 3, 3))
    q = torch.randint(-3, 4, (B, Hq, Lq, D), generator=gen).bfloat16()
    desc = torch.randint(-3, 4, (B, Hkv, layout.num_regions, D), generator=gen).bfloat16()
    q_pos = q_positions(gen, B, Lq, layout.num_keys)
    args = (layout.region_ptr, K, share_kv, q_pos, layout.region_pos)
    want = ops.region_topk(q, desc, *args)
    got = ops.region_topk(q.cuda(), desc.cuda(), *(a.cuda() if torch.is_tensor(a) else a
                                                  for a in args))
    assert torch.equal(got[0].cpu(), want[0]) and torch.equal(got[1].cpu(), want[1])


@pytest.mark.parametrize("share_kv", [True, False])
def test_many_splits_and_slots_match_cpu(share_kv):
    """B = 1, one KV head, more slots than one split holds: the split-K merge."""
    gen = generator(5)
    N, D = 6000, 64
    layout = gaze_ext.build_layout([(0, 40, 12, 12)], N, region_shape=(1, 2, 3))
    q = torch.randn(1, 4, 1, D, generator=gen)
    k = torch.randn(1, 1, N, D, generator=gen)
    v = torch.randn(1, 1, N, D, generator=gen)
    desc = ops.region_pool(k, layout.region_ptr, layout.region_tokens)
    idx, _ = ops.region_topk(q, desc, layout.region_ptr, 700, share_kv)
    want = ops.gaze_attention(q, k, v, *layout[:2], layout.fixed_tokens, idx)
    dev = layout.to("cuda")
    got = ops.gaze_attention(q.cuda(), k.cuda(), v.cuda(), dev.region_ptr, dev.region_tokens,
                             dev.fixed_tokens, idx.cuda())
    torch.testing.assert_close(got[0].cpu(), want[0], atol=2e-5, rtol=2e-5)
    torch.testing.assert_close(got[1].cpu(), want[1], atol=2e-5, rtol=2e-5)


def split_forward_against_cpu(dtype, qkv, args):
    """gaze_attention on CUDA (q, k, v there) and on the CPU, compared: (out, lse) of each."""
    cuda_args = [a.cuda() if isinstance(a, torch.Tensor) else a for a in args]
    out, lse = ops.gaze_attention(*qkv, *cuda_args)
    want_out, want_lse = ops.gaze_attention(*[t.cpu() for t in qkv], *args)
    tol = dict(atol=atol_for(dtype), rtol=1e-2 if dtype != torch.float32 else 1e-5)
    torch.testing.assert_close(out.cpu(), want_out, **tol)
    torch.testing.assert_close(lse.cpu(), want_lse, atol=1e-4, rtol=1e-5)
    return out, lse, want_out, want_lse


@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("case", range(len(SPLIT_CASES)))
@pytest.mark.parametrize("deterministic", [False, True])
def test_split_kernels_match_cpu(monkeypatch, dtype, case, deterministic):
    """The split-K forward (the streamed kernel where it applies) and backward (atomic, or
    ordered when deterministic) on the shapes test_cuda_sim runs on the emulator: GQA groups
    past 8 heads, per-head selection over several KV heads, head dim 256, many slots, rows
    without unit stride."""
    monkeypatch.setenv("GAZE_ATTENTION_KERNEL", "split")
    gen, qkv, args = split_case(case, dtype, "cuda")
    cpu_qkv = [t.cpu() for t in qkv]
    cuda_args = [a.cuda() if isinstance(a, torch.Tensor) else a for a in args]
    out, lse, want_out, want_lse = split_forward_against_cpu(dtype, qkv, args)

    grad = torch.randn(want_out.shape, generator=gen).to(dtype)
    torch.use_deterministic_algorithms(deterministic)
    try:
        got = torch.ops.gaze.gaze_attention_backward(grad.cuda(), None, *qkv, out, lse,
                                                      *cuda_args)
        if deterministic:
            again = torch.ops.gaze.gaze_attention_backward(grad.cuda(), None, *qkv, out, lse,
                                                            *cuda_args)
            assert all(torch.equal(a, b) for a, b in zip(got, again))
    finally:
        torch.use_deterministic_algorithms(False)
    want = torch.ops.gaze.gaze_attention_backward(grad, None, *cpu_qkv, want_out, want_lse,
                                                  *args)
    for name, g, w in zip(("dq", "dk", "dv"), got, want):
        scale = w.float().abs().max().item() + 1.0
        torch.testing.assert_close(g.cpu().float(), w.float(), atol=atol_for(dtype) * scale,
                                   rtol=1e-2 if dtype != torch.float32 else 1e-4, msg=name)


@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("case", range(len(SPLIT_CASES)))
def test_block_synchronous_forward_matches_cpu(monkeypatch, dtype, case):
    """GAZE_ATTENTION_KERNEL=split_block: the block-synchronous split-K forward on every
    case, also where `split` runs the streamed one."""
    monkeypatch.setenv("GAZE_ATTENTION_KERNEL", "split_block")
    split_forward_against_cpu(dtype, *split_case(case, dtype, "cuda")[1:])


def test_k_and_v_in_different_layouts(monkeypatch):
    """K contiguous, q and V padded [B, L, H, D + 8] views (rows still 16-byte aligned):
    each operand read with its own strides. Split-K against the CPU kernels, the
    tensor-core kernels against split-K, forward and backward."""
    gen, layout, idx, q_pos, qkv = mixed_layouts_case("cuda")
    args = (layout.region_ptr, layout.region_tokens, layout.fixed_tokens, idx, q_pos, 0.125)
    dev_args = [a.cuda() if isinstance(a, torch.Tensor) else a for a in args]
    grad = torch.randn(qkv[0].shape, generator=gen).bfloat16()

    def run(kernel, tensors, arguments):
        monkeypatch.setenv("GAZE_ATTENTION_KERNEL", kernel)
        out, lse = ops.gaze_attention(*tensors, *arguments)
        grads = torch.ops.gaze.gaze_attention_backward(grad.to(out.device), None, *tensors, out,
                                                       lse, *arguments)
        return [t.float().cpu() for t in (out, lse, *grads)]

    want = run("split", [t.cpu() for t in qkv], args)
    split = run("split", qkv, dev_args)
    tensor_core = run("tensor_core", qkv, dev_args)
    for name, w, s, t in zip(("out", "lse", "dq", "dk", "dv"), want, split, tensor_core):
        scale = w.abs().max().item() + 1.0
        torch.testing.assert_close(s, w, atol=atol_for(torch.bfloat16) * scale, rtol=1e-2, msg=name)
        torch.testing.assert_close(t, s, atol=3e-2 * scale, rtol=3e-2, msg=name)


def cuda_kernel_names(fn):
    """Names of the CUDA kernels that fn() launches."""
    from torch.profiler import ProfilerActivity, profile
    with profile(activities=[ProfilerActivity.CUDA]) as prof:
        fn()
        torch.cuda.synchronize()
    return {event.key for event in prof.key_averages()}


@pytest.mark.parametrize("dtype", [torch.float16, torch.bfloat16])
@pytest.mark.parametrize("case", range(len(TILED_CASES)))
def test_tensor_core_forward_matches_reference(monkeypatch, dtype, case):
    """The tensor-core kernels (forced) and the split-K forward against the reference, on
    ragged tiles, repeats and -1 slots, empty regions, padded fixed tokens, queries that
    see nothing; the profiler confirms which kernels ran."""
    gen, layout, idx, q_pos, qkv = tiled_case(case, dtype, "cuda")
    K = idx.shape[-1]
    leaves = [t.requires_grad_() for t in qkv]
    dev = layout.to("cuda")
    args = (dev.region_ptr, dev.region_tokens, dev.fixed_tokens, idx.cuda(),
            None if q_pos is None else q_pos.cuda(), 0.2)
    results = {}
    for kernel in ("tensor_core", "split"):
        monkeypatch.setenv("GAZE_ATTENTION_KERNEL", kernel)
        names = cuda_kernel_names(lambda: results.setdefault(kernel, ops.gaze_attention(*leaves, *args)))
        assert any("tiled" in n for n in names) == (kernel == "tensor_core"), names
    out, lse = results["tensor_core"]
    monkeypatch.setenv("GAZE_ATTENTION_KERNEL", "tensor_core")
    assert torch.equal(out, ops.gaze_attention(*leaves, *args)[0])  # no atomics: repeats bitwise

    cpu_args = (layout.region_ptr, layout.region_tokens, layout.fixed_tokens, idx, q_pos, 0.2)
    hp = high_precision(dtype)
    ref = [t.detach().cpu().to(hp).requires_grad_() for t in leaves]
    same = [t.detach().cpu().requires_grad_() for t in leaves]
    ref_out, ref_lse = reference.gaze_attention(*ref, *cpu_args)
    same_out, _ = reference.gaze_attention(*same, *cpu_args, compute_dtype=dtype)
    for name, (o, l) in results.items():
        error_bound_check(f"out ({name})", o.detach().cpu(), ref_out.detach(), same_out.detach(),
                          2.0, atol_for(dtype))
        torch.testing.assert_close(l.cpu(), ref_lse.detach().float(), atol=1e-3, rtol=1e-4)

    grad = torch.randn(out.shape, generator=gen)
    names = cuda_kernel_names(lambda: (out.float() * grad.cuda()).sum().backward())
    assert any("backward_tiled" in n for n in names), names
    assert any("region_keys_backward" in n for n in names) == (K > 0), names  # the key-major pass
    (ref_out * grad.to(hp)).sum().backward()
    (same_out.float() * grad).sum().backward()
    for name, got, r, s in zip("qkv", leaves, ref, same):
        error_bound_check(f"d{name}", got.grad.cpu(), r.grad, s.grad, 3.0, atol_for(dtype))


def test_tensor_core_kernels_with_large_regions(monkeypatch):
    """Regions of up to 200 tokens, each selected by many rows: the key-major pass walks a
    region in several 64-key steps, each over several chunks of rows (as test_cuda_sim
    checks on the emulator); forward and gradients against the split-K kernels."""
    gen = generator(13)
    B, Hq, Hkv, Lq, N, D = 2, 8, 2, 60, 900, 64
    layout = random_batch_layout(gen, B, N, max_regions=6, max_region_size=200)
    assert int((layout.region_ptr[..., 1:] - layout.region_ptr[..., :-1]).max()) > 64  # two steps
    idx = random_selection(gen, (B, Hkv, Lq, 3), layout.num_regions).cuda()
    q_pos = q_positions(gen, B, Lq, N).cuda()
    dev = layout.to("cuda")
    qkv = [torch.randn(s, generator=gen).to("cuda", torch.bfloat16)
           for s in qkv_shapes(B, Hq, Hkv, Lq, N, D)]
    grad = torch.randn(B, Hq, Lq, D, generator=gen).to("cuda", torch.bfloat16)
    results = {}
    for kernel in ("tensor_core", "split"):
        monkeypatch.setenv("GAZE_ATTENTION_KERNEL", kernel)
        leaves = [t.clone().requires_grad_() for t in qkv]
        out, lse = ops.gaze_attention(*leaves, dev.region_ptr, dev.region_tokens, dev.fixed_tokens,
                                      idx, q_pos, 0.125)
        out.backward(grad)
        results[kernel] = [out, lse] + [t.grad for t in leaves]
    for got, want in zip(results["tensor_core"], results["split"]):
        torch.testing.assert_close(got.float(), want.float(), atol=3e-2, rtol=3e-2)


def test_tensor_core_forward_is_chosen_for_prefill_and_repeats_bitwise(monkeypatch):
    """By default (auto) a prefill shape runs the tensor-core forward: its result differs
    from the split-K kernel's in rounding (P is rounded to bf16) but repeats bitwise."""
    layout, q, k, v = decode_inputs(6)
    q = torch.randn(2, 8, 64, 128, device="cuda", dtype=torch.bfloat16)
    N = layout.num_keys
    q_pos = (N - 64 + torch.arange(64, device="cuda", dtype=torch.int32)).expand(2, 64)
    desc = ops.region_pool(k, layout.region_ptr, layout.region_tokens)
    idx, _ = ops.region_topk(q, desc, layout.region_ptr, 10, True, q_pos, layout.region_pos)
    run = lambda: ops.gaze_attention(q, k, v, layout.region_ptr, layout.region_tokens,  # noqa: E731
                                     layout.fixed_tokens, idx, q_pos)[0]
    monkeypatch.delenv("GAZE_ATTENTION_KERNEL", raising=False)
    assert any("tiled" in n for n in cuda_kernel_names(run))
    auto, auto_again = run(), run()
    monkeypatch.setenv("GAZE_ATTENTION_KERNEL", "tensor_core")
    forced = run()
    monkeypatch.setenv("GAZE_ATTENTION_KERNEL", "split")
    split = run()
    assert torch.equal(auto, auto_again) and torch.equal(auto, forced)
    torch.testing.assert_close(auto.float(), split.float(), atol=2e-2, rtol=2e-2)
    monkeypatch.setenv("GAZE_ATTENTION_KERNEL", "fastest")
    with pytest.raises(RuntimeError, match="GAZE_ATTENTION_KERNEL"):
        run()
