"""Prefill / training benchmark: forward + backward of Lq text queries, each routed to
its own top-k regions, against dense attention over the whole cache.

    python -m benchmarks.prefill              # CPU (small) and CUDA when present

The text queries sit after the visual tokens and attend causally (to the cache and
to the text before them). Dense peer: F.scaled_dot_product_attention with a
lower-right causal mask over the whole sequence, K/V expanded to the query heads. Sparse
peer: FlexAttention with a block mask of the same selection (benchmarks/flex.py; forward
only on the CPU, where it has no backward; --no-flex leaves it out).
"""
from __future__ import annotations

import os
import sys
from dataclasses import asdict, dataclass
from typing import List

import torch
import torch.nn.functional as F
from torch.nn.attention.bias import causal_lower_right

import gaze_ext
from gaze_ext import ops, reference

from . import flex
from .common import (benchmark_main, environment, kernel_sections, kernel_times, markdown_table,
                     time_variants, with_env)

RESULTS_DIR = os.path.join(os.path.dirname(__file__), "results")


@dataclass
class PrefillShape:
    batch: int
    q_heads: int
    kv_heads: int
    head_dim: int
    frames: int
    frame_h: int
    frame_w: int
    text: int  # the queries: text tokens after the visual cache
    topk_fraction: float
    dtype: str


CPU_SHAPE = PrefillShape(1, 8, 2, 64, 8, 12, 12, 128, 0.10, "float32")
GPU_SHAPE = PrefillShape(1, 32, 8, 128, 32, 32, 32, 2048, 0.10, "bfloat16")
TARGET = {"cpu": None, "cuda": 3.0}
CORRELATION = 0.95  # rho of the correlated queries' AR(1) walk along the text


def correlated_queries(B, Hq, Lq, D, rho, device, dtype):
    """Queries whose neighbours along the text resemble each other, as those of
    consecutive text tokens do: q_i = rho q_(i-1) + sqrt(1 - rho^2) e_i per head."""
    noise = torch.randn(B, Hq, Lq, D, device=device)
    q = torch.empty_like(noise)
    q[:, :, 0] = noise[:, :, 0]
    for i in range(1, Lq):
        q[:, :, i] = rho * q[:, :, i - 1] + (1 - rho ** 2) ** 0.5 * noise[:, :, i]
    return q.to(dtype)


def tile_work(idx: torch.Tensor, layout, q_pos: torch.Tensor, rows_per_position: int,
              positions: int = 16):
    """What tiles of `positions` consecutive queries (the tensor-core kernels' tiles) work on.
    Returns the mean share of the regions their selections cover together, and two counts of
    the forward's (query row, key) products: over the tile's keys (the fixed tokens, then the
    union's regions, 64 keys a step, steps no row sees skipped), and what the warps compute
    (each warp of 16 rows skips the 8-key blocks none of its rows sees)."""
    ptr, tokens = layout.region_ptr.cpu(), layout.region_tokens.cpu()
    sizes = ptr[1:] - ptr[:-1]
    fixed = layout.fixed_tokens.cpu()  # with its -1 padding: the kernel walks it too
    idx, q_pos = idx.cpu(), q_pos.cpu()
    B, Hs, Lq, _ = idx.shape
    R = layout.num_regions
    fractions, pairs, computed = [], 0, 0
    for b in range(B):
        for i0 in range(0, Lq, positions):
            P = min(positions, Lq - i0)
            limit = q_pos[b, i0:i0 + P]
            for hs in range(Hs):
                chosen = idx[b, hs, i0:i0 + P]
                union = chosen[chosen >= 0].unique()
                fractions.append(union.numel() / max(R, 1))
                lengths = sizes[union]
                starts = torch.repeat_interleave(ptr[union] - (lengths.cumsum(0) - lengths), lengths)
                key_pos = torch.cat([fixed, tokens[starts + torch.arange(int(lengths.sum()))]])
                key_region = torch.cat([torch.full_like(fixed, R),  # R: a fixed token
                                        torch.repeat_interleave(union, lengths)])
                selected = torch.zeros(P, R + 1, dtype=torch.bool)
                selected[:, R] = True
                rows_of, slots = (chosen >= 0).nonzero(as_tuple=True)
                selected[rows_of, chosen[rows_of, slots].long()] = True
                sees = selected[:, key_region.long()] & (key_pos >= 0) & (key_pos <= limit[:, None])
                steps = -(-key_pos.numel() // 64)
                step_seen = torch.nn.functional.pad(sees.any(0), (0, steps * 64 - key_pos.numel()))
                rows = P * rows_per_position
                pairs += rows * 64 * int(step_seen.view(steps, 64).any(1).sum())
                row_sees = sees.repeat_interleave(rows_per_position, 0)
                warps = -(-rows // 16)
                row_sees = torch.nn.functional.pad(row_sees, (0, steps * 64 - key_pos.numel(),
                                                              0, warps * 16 - rows))
                blocks = row_sees.view(warps, 16, steps * 8, 8).any(3).any(1)
                computed += 16 * 8 * int(blocks.sum())
    return sum(fractions) / max(len(fractions), 1), pairs, computed


def flex_variants(q, k, v, grad, layout, idx, q_pos, gaze_forward):
    """FlexAttention on the shared selection of the i.i.d. queries: (variants, facts), or the
    reason it cannot run here in place of the facts. The block mask is built beforehand."""
    _, Hq, Lq, _ = q.shape
    N = k.shape[2]
    try:
        attend = flex.compiled_flex_attention()
        mask = flex.selection_block_mask(flex.key_maps(layout, N, q.device), idx, q_pos, Hq, Lq)
        # detached: on the CPU FlexAttention refuses inputs that require grad, even in no_grad
        qd, kd, vd = q.detach(), k.detach(), v.detach()
        out = attend(qd, kd, vd, mask)
        variants = {"flex_shared_fwd": lambda: attend(qd, kd, vd, mask)}
        if q.device.type == "cuda":  # FlexAttention has no backward on the CPU
            def forward_backward():
                attend(q, k, v, mask).backward(grad)
            forward_backward()  # compiles the backward here, where a failure is reported
            variants["flex_shared_fwd_bwd"] = forward_backward
        eager = flex.eager_flex_attention()
        return variants, flex.facts(mask, N, out, gaze_forward, lambda: eager(qd, kd, vd, mask))
    except Exception as error:  # a peer that cannot run here is reported, not fatal
        return {}, flex.describe_error(error)


def run_shape(shape: PrefillShape, device: str, with_flex: bool = True):
    torch.manual_seed(0)
    dtype = getattr(torch, shape.dtype)
    B, Hq, Hkv, D, Lq = shape.batch, shape.q_heads, shape.kv_heads, shape.head_dim, shape.text
    visual = shape.frames * shape.frame_h * shape.frame_w
    N = visual + Lq
    layout = gaze_ext.build_layout([(0, shape.frames, shape.frame_h, shape.frame_w)], N,
                                   device=device)
    K = max(1, round(shape.topk_fraction * layout.num_regions))
    q_pos = (visual + torch.arange(Lq, device=device, dtype=torch.int32)).expand(B, Lq).contiguous()
    queries = {
        "iid": torch.randn(B, Hq, Lq, D, device=device, dtype=dtype).requires_grad_(),
        "correlated": correlated_queries(B, Hq, Lq, D, CORRELATION, device, dtype).requires_grad_(),
    }
    q = queries["iid"]
    k = torch.randn(B, Hkv, N, D, device=device, dtype=dtype, requires_grad=True)
    v = torch.randn(B, Hkv, N, D, device=device, dtype=dtype, requires_grad=True)
    grad = torch.randn(B, Hq, Lq, D, device=device, dtype=dtype)
    desc = ops.region_pool(k.detach(), layout.region_ptr, layout.region_tokens)
    mask = causal_lower_right(Lq, N)
    G = Hq // Hkv

    def dense():
        kx = k.repeat_interleave(G, 1) if G > 1 else k
        vx = v.repeat_interleave(G, 1) if G > 1 else v
        out = F.scaled_dot_product_attention(q, kx, vx, attn_mask=mask)
        out.backward(grad)

    def select(query, share):
        idx, _ = ops.region_topk(query.detach(), desc, layout.region_ptr, K, share, q_pos,
                                 layout.region_pos)
        return idx

    def gaze(query, share):
        out, _ = ops.gaze_attention(query, k, v, layout.region_ptr, layout.region_tokens,
                                    layout.fixed_tokens, select(query, share), q_pos)
        out.backward(grad)

    def forward_only(query, share):
        with torch.no_grad():
            ops.gaze_attention(query, k, v, layout.region_ptr, layout.region_tokens,
                               layout.fixed_tokens, select(query, share), q_pos)

    def dense_forward():
        with torch.no_grad():
            kx = k.repeat_interleave(G, 1) if G > 1 else k
            vx = v.repeat_interleave(G, 1) if G > 1 else v
            F.scaled_dot_product_attention(q, kx, vx, attn_mask=mask)

    corr = queries["correlated"]
    variants = {"sdpa_fwd_bwd": dense, "gaze_shared_fwd_bwd": lambda: gaze(q, True),
                "gaze_per_head_fwd_bwd": lambda: gaze(q, False),
                "gaze_shared_fwd_bwd_correlated": lambda: gaze(corr, True),
                "sdpa_fwd": dense_forward, "gaze_shared_fwd": lambda: forward_only(q, True),
                "gaze_shared_fwd_correlated": lambda: forward_only(corr, True),
                "topk_shared": lambda: select(q, True)}
    if device == "cuda":  # the tensor-core kernels against the split-K ones, same inputs
        # and the selection's tiled scoring against one block scoring each row
        variants["topk_shared_one_block_per_row"] = with_env(
            "GAZE_TOPK_SCORING_BLOCKS", "1", lambda: select(q, True))
        variants["gaze_shared_fwd_bwd_correlated_split_k"] = with_env(
            "GAZE_ATTENTION_KERNEL", "split", lambda: gaze(corr, True))
        variants["gaze_shared_fwd_correlated_split_k"] = with_env(
            "GAZE_ATTENTION_KERNEL", "split", lambda: forward_only(corr, True))
    flex_facts = "left out (--no-flex)"
    # each query set's shared selection, for the peer and tile_work (not timed)
    shared_selection = {name: select(query, True) for name, query in queries.items()}
    if with_flex:
        idx = shared_selection["iid"]
        with torch.no_grad():
            gaze_forward, _ = ops.gaze_attention(q, k, v, layout.region_ptr, layout.region_tokens,
                                                 layout.fixed_tokens, idx, q_pos)
        peers, flex_facts = flex_variants(q, k, v, grad, layout, idx, q_pos, gaze_forward)
        variants.update(peers)
    times = time_variants(variants, device, rounds=5, min_time_s=0.2)
    # speed-up against dense for the attention rows; the selection alone has no dense peer
    rows = [dict(variant=n, ms=t * 1e3) if n.startswith("topk") else
            dict(variant=n, ms=t * 1e3, speedup=times["sdpa_fwd_bwd"] / t if "bwd" in n
                 else times["sdpa_fwd"] / t) for n, t in times.items()]
    ratios = {"iid": times["sdpa_fwd_bwd"] / times["gaze_shared_fwd_bwd"],
              "correlated": times["sdpa_fwd_bwd"] / times["gaze_shared_fwd_bwd_correlated"]}
    target = TARGET[device]
    verdicts = {name: "n/a" if target is None else ("PASS" if r >= target else "MISS")
                for name, r in ratios.items()}
    work = {name: tile_work(idx, layout, q_pos, G) for name, idx in shared_selection.items()}
    unions = {name: w[0] for name, w in work.items()}
    computed_share = {name: w[2] / max(w[1], 1) for name, w in work.items()}
    # forward TFLOP/s (4 D per query-key product): dense over every visible key, the
    # tensor-core forward over the key blocks its warps compute (not what is useful), the
    # CPU forward over the (row, key) pairs it attends (its [B, Hq, Lq, N] count is small)
    pairs = {"sdpa_fwd": Hq * B * sum(visual + i + 1 for i in range(Lq))}
    for name, variant in (("iid", "gaze_shared_fwd"), ("correlated", "gaze_shared_fwd_correlated")):
        if device == "cuda":
            pairs[variant] = work[name][2]
        else:
            pairs[variant] = int(reference.key_multiplicity(
                layout.region_ptr, layout.region_tokens, layout.fixed_tokens,
                shared_selection[name], N, Hq, q_pos).sum())
    for row in rows:
        if row["variant"] in pairs:
            row["TFLOP/s"] = 4 * D * pairs[row["variant"]] / (row["ms"] * 1e-3) / 1e12
    kernels = {name: kernel_times(variants[name], device)
               for name in ("gaze_shared_fwd_bwd_correlated", "sdpa_fwd_bwd")}
    return dict(device=device, shape=asdict(shape), keys=N, regions=layout.num_regions, topk=K,
                rows=rows, ratio=ratios["iid"], ratios=ratios, union_fraction=unions,
                computed_share=computed_share, kernels=kernels, flex=flex_facts,
                correlation=CORRELATION, target=target, verdicts=verdicts, env=environment(device))


def report(result) -> str:
    s = result["shape"]
    target = result["target"]
    lines = [
        f"# Prefill / training step on {result['device']}: Gaze Attention vs dense SDPA",
        "",
        f"B={s['batch']}, Hq={s['q_heads']}, Hkv={s['kv_heads']}, D={s['head_dim']}, {s['dtype']}; "
        f"{s['text']} text queries after {s['frames']} frames of {s['frame_h']}x{s['frame_w']} "
        f"tokens ({result['keys']} keys, {result['regions']} regions, top {result['topk']}), causal.",
        "Queries: i.i.d. normal (every query picks its regions independently: the worst case "
        "for tiles of queries), and *correlated* (an AR(1) walk along the text, "
        f"rho={result['correlation']}, as neighbouring text tokens resemble each other).",
        "",
        "Environment: " + ", ".join(f"{k}={v}" for k, v in result["env"].items()),
        "",
        markdown_table(result["rows"], ["variant", "ms", "speedup", "TFLOP/s"]),
        "",
        "TFLOP/s: forward, 4 D per query-key product; dense over every visible key, the "
        "tensor-core forward (CUDA) over the 8-key blocks its warps compute, the CPU forward "
        "over the (row, key) pairs it attends.",
        "",
    ]
    for name in ("iid", "correlated"):
        verdict = (f" (target {target}x): **{result['verdicts'][name]}**" if target
                   else " (no target on this device)")
        lines.append(f"- forward+backward, shared selection, {name} queries: "
                     f"{result['ratios'][name]:.2f}x faster than dense{verdict}; 16 consecutive "
                     f"queries select {100 * result['union_fraction'][name]:.0f}% of the regions "
                     f"together, and a tile's warps compute "
                     f"{100 * result['computed_share'][name]:.0f}% of its (row, key) products")
    flex_facts = result.get("flex")
    if isinstance(flex_facts, dict):
        flex_facts = {"shared selection, i.i.d. queries (`flex_shared_fwd`, and "
                      "`flex_shared_fwd_bwd` where it has a backward; block mask built beforehand)":
                      flex_facts}
    lines += [""] + flex.report_lines(flex_facts)
    lines += kernel_sections(result.get("kernels", {}))
    return "\n".join(lines + [""])


def main(argv: List[str] = None) -> int:
    return benchmark_main(
        "prefill", __doc__.split("\n")[0],
        lambda device, with_flex: run_shape(CPU_SHAPE if device == "cpu" else GPU_SHAPE, device,
                                            with_flex),
        report, RESULTS_DIR, argv)


if __name__ == "__main__":
    sys.exit(main())
