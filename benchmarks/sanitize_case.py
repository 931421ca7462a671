"""A small run of every CUDA op, forward and backward, for compute-sanitizer: ragged and
shared layouts, -1 and out-of-range slots, out-of-range positions (skipped when
GAZE_CHECK_INDICES is unset), strided and unaligned operands, every dtype; then the
tensor-core attention kernels (forced) on ragged tiles with the same corruptions.

    compute-sanitizer --tool memcheck --error-exitcode 1 python3 -m benchmarks.sanitize_case
"""
import os

import torch

import gaze_ext
from gaze_ext import ops


def main():
    torch.manual_seed(0)
    dev = "cuda"
    for dtype in (torch.float32, torch.float16, torch.bfloat16):
        for D, strided in ((64, False), (40, True), (7, False)):
            N, B, Hq, Hkv, Lq = 200, 2, 6, 2, 3
            layout = gaze_ext.build_batch_layout([([(0, 1, 9, 9)], 120), ([(10, 2, 5, 7)], N)],
                                                 region_shape=(1, 4, 4)).to(dev)
            # corrupt a few contents: out-of-range token, fixed position and slots
            tokens = layout.region_tokens.clone()
            tokens[0, 3] = N + 11
            fixed = torch.cat([layout.fixed_tokens, torch.full((B, 1), N + 3, dtype=torch.int32,
                                                               device=dev)], 1)
            base = torch.randn(B, Hq + 2, Lq, D + 8, device=dev, dtype=dtype)
            q = base[:, :Hq, :, 1:D + 1] if strided else base[:, :Hq, :, :D].contiguous()
            k = torch.randn(B, Hkv, N, D, device=dev, dtype=dtype, requires_grad=True)
            v = torch.randn(B, Hkv, N, D, device=dev, dtype=dtype, requires_grad=True)
            q = q.detach().requires_grad_()
            desc = ops.region_pool(k, layout.region_ptr, tokens)
            desc.float().sum().backward()
            q_pos = torch.randint(-1, N + 1, (B, Lq), device=dev, dtype=torch.int32)
            for share in (True, False):
                for topk in (3, layout.num_regions + 4):
                    idx, _ = ops.region_topk(q.detach(), desc.detach(), layout.region_ptr, topk,
                                             share, q_pos, layout.region_pos)
                    idx = idx.clone()
                    idx[..., 0] = layout.num_regions + 5
                    out, lse = ops.gaze_attention(q, k, v, layout.region_ptr, tokens, fixed, idx,
                                                  q_pos)
                    (out.float().sum() + torch.nan_to_num(lse, neginf=0).sum()).backward()
            torch.use_deterministic_algorithms(True)  # the ordered backward kernel too
            out, _ = ops.gaze_attention(q, k, v, layout.region_ptr, tokens, fixed, idx, q_pos)
            out.float().sum().backward()
            torch.use_deterministic_algorithms(False)
    tensor_core_cases()
    torch.cuda.synchronize()
    print("sanitize case finished")


def tensor_core_cases():
    os.environ["GAZE_ATTENTION_KERNEL"] = "tensor_core"
    dev = "cuda"
    for dtype in (torch.float16, torch.bfloat16):
        for D, Hq, share in ((64, 8, True), (128, 4, False)):
            N, B, Hkv, Lq = 300, 2, 2, 20  # 16 positions per tile with G = 4: a ragged tile
            layout = gaze_ext.build_batch_layout([([(0, 2, 9, 9)], 200), ([(10, 3, 7, 7)], N)],
                                                 region_shape=(1, 3, 3)).to(dev)
            tokens = layout.region_tokens.clone()
            tokens[1, 2] = -4
            fixed = torch.cat([layout.fixed_tokens, torch.full((B, 1), N, dtype=torch.int32,
                                                               device=dev)], 1)
            q = torch.randn(B, Hq, Lq, D, device=dev, dtype=dtype, requires_grad=True)
            k = torch.randn(B, Hkv, N, D, device=dev, dtype=dtype, requires_grad=True)
            v = torch.randn(B, Hkv, N, D, device=dev, dtype=dtype, requires_grad=True)
            q_pos = torch.randint(-1, N + 1, (B, Lq), device=dev, dtype=torch.int32)
            Hs = Hkv if share else Hq
            idx = torch.randint(-1, layout.num_regions, (B, Hs, Lq, 7), device=dev,
                                dtype=torch.int32)
            idx[..., 3] = layout.num_regions + 2
            idx[..., 4] = idx[..., 1]  # repeats, counted by the selection rules
            out, lse = ops.gaze_attention(q, k, v, layout.region_ptr, tokens, fixed, idx, q_pos)
            (out.float().sum() + torch.nan_to_num(lse, neginf=0).sum()).backward()
    del os.environ["GAZE_ATTENTION_KERNEL"]


if __name__ == "__main__":
    main()
