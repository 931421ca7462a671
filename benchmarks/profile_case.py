"""The benchmarks' GPU steps, run a few times for a kernel profiler: `gpu_check.sh profile`
runs Nsight Compute over it, so that each kernel's stall reasons, occupancy and memory
throughput come back from one device call (GPU-NOTES: profile before changing a kernel).

    ncu --kernel-name regex:... python3 -m benchmarks.profile_case decode

decode: region_topk + gaze_attention at the decode benchmark's GPU shape, one selection per
KV head, then one per query head; prefill: the prefill benchmark's correlated-query step,
forward and backward, one selection per KV head. (`--device cpu` runs the same steps on the
CPU: the tests do, on tiny shapes, so that a device call never finds this script broken.)
"""
import argparse

import torch

import gaze_ext
from benchmarks import decode, prefill
from gaze_ext import ops


def decode_steps(repeats: int, device: str = "cuda") -> None:
    s = decode.GPU_SHAPE
    N = s.frames * s.frame_h * s.frame_w + s.text
    layout = gaze_ext.build_layout([(0, s.frames, s.frame_h, s.frame_w)], N,
                                   region_shape=s.region, device=device)
    K = max(1, round(s.topk_fraction * layout.num_regions))
    dtype = getattr(torch, s.dtype)
    q = torch.randn(s.batch, s.q_heads, 1, s.head_dim, device=device, dtype=dtype)
    k, v = (torch.randn(s.batch, s.kv_heads, N, s.head_dim, device=device, dtype=dtype)
            for _ in range(2))
    desc = ops.region_pool(k, layout.region_ptr, layout.region_tokens)
    for share in (True, False):
        for _ in range(repeats):
            idx, _ = ops.region_topk(q, desc, layout.region_ptr, K, share)
            ops.gaze_attention(q, k, v, layout.region_ptr, layout.region_tokens,
                               layout.fixed_tokens, idx)


def prefill_steps(repeats: int, device: str = "cuda"):
    s = prefill.GPU_SHAPE
    visual = s.frames * s.frame_h * s.frame_w
    N = visual + s.text
    layout = gaze_ext.build_layout([(0, s.frames, s.frame_h, s.frame_w)], N, device=device)
    K = max(1, round(s.topk_fraction * layout.num_regions))
    dtype = getattr(torch, s.dtype)
    q_pos = (visual + torch.arange(s.text, device=device, dtype=torch.int32)).expand(
        s.batch, s.text).contiguous()
    q = prefill.correlated_queries(s.batch, s.q_heads, s.text, s.head_dim, prefill.CORRELATION,
                                   device, dtype).requires_grad_()
    k, v = (torch.randn(s.batch, s.kv_heads, N, s.head_dim, device=device, dtype=dtype,
                        requires_grad=True) for _ in range(2))
    grad = torch.randn(q.shape, device=device, dtype=dtype)
    desc = ops.region_pool(k.detach(), layout.region_ptr, layout.region_tokens)
    for _ in range(repeats):
        idx, _ = ops.region_topk(q.detach(), desc, layout.region_ptr, K, True, q_pos,
                                 layout.region_pos)
        out, _ = ops.gaze_attention(q, k, v, layout.region_ptr, layout.region_tokens,
                                    layout.fixed_tokens, idx, q_pos)
        out.backward(grad)
    return q, k, v


def main(argv=None) -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("step", choices=("decode", "prefill"))
    parser.add_argument("--repeats", type=int, default=2)
    parser.add_argument("--device", default="cuda")
    args = parser.parse_args(argv)
    (decode_steps if args.step == "decode" else prefill_steps)(args.repeats, args.device)
    if torch.device(args.device).type == "cuda":
        torch.cuda.synchronize()


if __name__ == "__main__":
    main()
