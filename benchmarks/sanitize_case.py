"""A small run of every CUDA op, forward and backward, for compute-sanitizer: ragged and
shared layouts, -1 and out-of-range slots, out-of-range positions and region spans that run
backwards or past the token list (skipped when GAZE_CHECK_INDICES is unset), strided and
unaligned operands, every dtype; then the tensor-core attention kernels (forced) on ragged
tiles with the same corruptions. (python_tests/test_cuda_sim.py runs the same corruptions
on gaze_sim under AddressSanitizer.)

    compute-sanitizer --tool memcheck --error-exitcode 1 python3 -m benchmarks.sanitize_case

`--quick`: one element type and head dim per kernel family, for the slower tools
(racecheck, synccheck, initcheck).
"""
import argparse
import os

import torch

import gaze_ext
from gaze_ext import ops


def corrupted(layout, N, seed):
    """The layout's tensors with contents the ops check only under GAZE_CHECK_INDICES:
    tokens out of range (N itself, the first position past the keys, among them), fixed
    positions past N, and (seed 1) region spans that run backwards and past the token list."""
    ptr, tokens = layout.region_ptr.clone(), layout.region_tokens.clone()
    tokens[0, 3], tokens[-1, 1], tokens[-1, 2] = N + 11, -4, N
    past = torch.tensor([N + 3, N], dtype=torch.int32, device=ptr.device)
    fixed = torch.cat([layout.fixed_tokens, past.expand(ptr.shape[0], 2)], 1)
    if seed == 1:
        ptr[0, 2], ptr[-1, -1] = ptr[0, 1] - 2, tokens.shape[1] + 40
    return ptr, tokens, fixed


def main(quick=False):
    torch.manual_seed(0)
    dev = "cuda"
    for dtype in (torch.bfloat16,) if quick else (torch.float32, torch.float16, torch.bfloat16):
        for seed, (D, strided) in enumerate(((64, False),) if quick else ((64, False), (40, True), (7, False))):
            N, B, Hq, Hkv, Lq = 200, 2, 6, 2, 3
            layout = gaze_ext.build_batch_layout([([(0, 1, 9, 9)], 120), ([(10, 2, 5, 7)], N)],
                                                 region_shape=(1, 4, 4)).to(dev)
            ptr, tokens, fixed = corrupted(layout, N, seed % 2)
            base = torch.randn(B, Hq + 2, Lq, D + 8, device=dev, dtype=dtype)
            q = base[:, :Hq, :, 1:D + 1] if strided else base[:, :Hq, :, :D].contiguous()
            k = torch.randn(B, Hkv, N, D, device=dev, dtype=dtype, requires_grad=True)
            v = torch.randn(B, Hkv, N, D, device=dev, dtype=dtype, requires_grad=True)
            q = q.detach().requires_grad_()
            desc = ops.region_pool(k, ptr, tokens)
            desc.float().sum().backward()
            q_pos = torch.randint(-1, N + 1, (B, Lq), device=dev, dtype=torch.int32)
            for share in (True, False):
                for topk in (3, layout.num_regions + 4):
                    idx, _ = ops.region_topk(q.detach(), desc.detach(), ptr, topk, share, q_pos,
                                             layout.region_pos)
                    idx = idx.clone()
                    idx[..., 0] = layout.num_regions + 5
                    idx[..., -1] = layout.num_regions  # the first id past the regions
                    out, lse = ops.gaze_attention(q, k, v, ptr, tokens, fixed, idx, q_pos)
                    (out.float().sum() + torch.nan_to_num(lse, neginf=0).sum()).backward()
            torch.use_deterministic_algorithms(True)  # the ordered backward kernel too
            out, _ = ops.gaze_attention(q, k, v, ptr, tokens, fixed, idx, q_pos)
            out.float().sum().backward()
            torch.use_deterministic_algorithms(False)
    tensor_core_cases(quick)
    torch.cuda.synchronize()
    print("sanitize case finished")


def tensor_core_cases(quick):
    os.environ["GAZE_ATTENTION_KERNEL"] = "tensor_core"
    dev = "cuda"
    for dtype in (torch.bfloat16,) if quick else (torch.float16, torch.bfloat16):
        for seed, (D, Hq, share) in enumerate(((64, 8, True), (128, 4, False))):
            N, B, Hkv, Lq = 300, 2, 2, 20  # 16 positions per tile with G = 4: a ragged tile
            layout = gaze_ext.build_batch_layout([([(0, 2, 9, 9)], 200), ([(10, 3, 7, 7)], N)],
                                                 region_shape=(1, 3, 3)).to(dev)
            ptr, tokens, fixed = corrupted(layout, N, seed)
            q = torch.randn(B, Hq, Lq, D, device=dev, dtype=dtype, requires_grad=True)
            k = torch.randn(B, Hkv, N, D, device=dev, dtype=dtype, requires_grad=True)
            v = torch.randn(B, Hkv, N, D, device=dev, dtype=dtype, requires_grad=True)
            q_pos = torch.randint(-1, N + 1, (B, Lq), device=dev, dtype=torch.int32)
            Hs = Hkv if share else Hq
            idx = torch.randint(-1, layout.num_regions, (B, Hs, Lq, 7), device=dev,
                                dtype=torch.int32)
            idx[..., 3] = layout.num_regions + 2
            idx[..., 5] = layout.num_regions
            idx[..., 4] = idx[..., 1]  # repeats, counted by the selection rules
            out, lse = ops.gaze_attention(q, k, v, ptr, tokens, fixed, idx, q_pos)
            (out.float().sum() + torch.nan_to_num(lse, neginf=0).sum()).backward()
    del os.environ["GAZE_ATTENTION_KERNEL"]


if __name__ == "__main__":
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--quick", action="store_true", help="one dtype and head dim per family")
    main(parser.parse_args().quick)
