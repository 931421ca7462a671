"""Decode-step benchmark: Gaze Attention (region_topk + gaze_attention, descriptors cached)
against dense attention over the whole KV cache, at the same shapes, in one run.

    python -m benchmarks.decode            # CPU, and CUDA too when a GPU is present
    python -m benchmarks.decode --check    # exit 1 if a target ratio is missed

Peers: F.scaled_dot_product_attention with enable_gqa=True; the decode trick of viewing
each KV head's query heads as rows (one SDPA over [B, Hkv, G, D]); the same sparse
attention written in plain PyTorch (gather the selected rows, then SDPA); and FlexAttention
with a block mask of the same selection (benchmarks/flex.py; --no-flex leaves it out).
Every variant takes its turn over copies of the KV cache, as a model's layers would, so that
no step finds the rows its previous call read still in the cache (copies_needed).
Results go to benchmarks/results/decode-<device>.md and .json.
"""
from __future__ import annotations

import itertools
import math
import os
import sys
from dataclasses import asdict, dataclass
from typing import Callable, Dict, List

import torch
import torch.nn.functional as F

import gaze_ext
from gaze_ext import ops

from . import flex
from .common import (benchmark_main, environment, kernel_sections, kernel_times,
                     last_level_cache_bytes, markdown_table, memory_bandwidth, time_variants,
                     with_env, with_threads)

RESULTS_DIR = os.path.join(os.path.dirname(__file__), "results")


@dataclass
class DecodeShape:
    batch: int
    q_heads: int
    kv_heads: int
    head_dim: int
    frames: int
    frame_h: int
    frame_w: int
    text: int
    region: tuple
    topk_fraction: float
    dtype: str

    @property
    def torch_dtype(self):
        return getattr(torch, self.dtype)

    @property
    def keys(self) -> int:
        return self.frames * self.frame_h * self.frame_w + self.text


# Issue 2: a video-like cache on the CPU. Issue 3: a longer cache on the GPU.
CPU_SHAPE = DecodeShape(1, 32, 8, 128, 16, 24, 24, 512, (1, 6, 6), 0.10, "float32")
GPU_SHAPE = DecodeShape(8, 32, 8, 128, 32, 32, 32, 512, (1, 6, 6), 0.10, "bfloat16")
# targets: speed-up of gaze over the faster dense peer, per selection mode
TARGETS = {"cpu": {"shared": 4.0, "per_head": 1.5}, "cuda": {"shared": 6.0, "per_head": 3.0}}
# gaze_attention (shared selection) moving its bytes at this share of the copy bandwidth
BANDWIDTH_TARGET = {"cpu": None, "cuda": 0.70}
# the shared step in other element types too, on the CPU, where the kernels' 16-bit and
# float32 loops differ most (kept off the GPU run, whose time is counted)
OTHER_DTYPES = {"cpu": ("bfloat16", "float16"), "cuda": ()}
# CUDA: attention_shared again with each of these splits per unit (GAZE_SPLITS) instead of
# the plan's, to see whether the plan picks well
SPLIT_SWEEP = {"cpu": (), "cuda": (1, 2, 4, 8, 16, 32, 64)}
# CUDA: each op again with the kernel its plan replaced, to compare them in one run:
# attention_{mode}_block (GAZE_ATTENTION_KERNEL=split_block: the block-synchronous forward
# instead of the streamed one) and topk_{mode}_one_block (GAZE_TOPK_SCORING_BLOCKS=1: each row
# scored by its selecting block alone, without scoring_kernel)
ALTERNATIVES = {"cpu": False, "cuda": True}
# CPU: the shared step again with one KV head (a single (batch, KV head) task, whose keys
# the forward splits over the threads), against one thread and against dense
ONE_KV_HEAD = {"cpu": True, "cuda": False}
# selection modes: one selection per KV head (shared by its query heads), or per query head
MODES = {"shared": True, "per_head": False}
# KV cache copies rotated at most (copies_needed), for shapes too small to leave the cache
MAX_CACHE_COPIES = 16


def padded_regions(layout) -> torch.Tensor:
    """[R, S] positions of each region, -1 padded (for the plain-PyTorch peer)."""
    ptr, tokens = layout.region_ptr.long().cpu(), layout.region_tokens.long().cpu()
    sizes = ptr[1:] - ptr[:-1]
    S = int(sizes.max()) if sizes.numel() else 1
    out = torch.full((sizes.numel(), S), -1, dtype=torch.long)
    for r in range(sizes.numel()):
        out[r, : sizes[r]] = tokens[ptr[r]: ptr[r + 1]]
    return out.to(layout.region_ptr.device)


def torch_gather_attention(q, k, v, fixed, regions, idx):
    """Plain PyTorch: gather fixed + selected rows per selection head, masked SDPA."""
    B, Hq, _, D = q.shape
    Hkv, Hs = k.shape[1], idx.shape[1]
    pos = regions[idx[:, :, 0].long().clamp(min=0)].flatten(2)           # [B, Hs, K*S]
    pos = torch.where(idx[:, :, 0, :, None].expand(-1, -1, -1, regions.shape[1]).flatten(2) >= 0, pos, -1)
    pos = torch.cat([fixed.long().expand(B, Hs, -1), pos], dim=2)        # [B, Hs, P]
    valid = pos >= 0
    kv_head = torch.arange(Hs, device=q.device) // (Hs // Hkv)
    rows = pos.clamp(min=0)
    ks = k[:, kv_head].gather(2, rows[..., None].expand(-1, -1, -1, D))
    vs = v[:, kv_head].gather(2, rows[..., None].expand(-1, -1, -1, D))
    qs = q.view(B, Hs, Hq // Hs, D)
    out = F.scaled_dot_product_attention(qs, ks, vs, attn_mask=valid[:, :, None, :])
    return out.view(B, Hq, 1, D)


def shared_step_rows(layout, regions, idx, num_keys: int) -> torch.Tensor:
    """Row numbers, in k.view(-1, D), of the distinct rows a shared-selection step reads:
    each (batch, KV head)'s fixed tokens and the tokens of its selected regions."""
    B, Hs = idx.shape[:2]
    sel = idx[:, :, 0].long()                                            # [B, Hs, K]
    pos = regions[sel.clamp(min=0)]                                      # [B, Hs, K, S]
    pos = torch.where((sel >= 0)[..., None], pos, -1).flatten(2)
    pos = torch.cat([layout.fixed_tokens.long().expand(B, Hs, -1), pos], dim=2)
    base = torch.arange(B * Hs, device=idx.device).view(B, Hs, 1) * num_keys
    return (base + pos)[pos >= 0]


def row_counts(layout, idx, share: bool, G: int) -> Dict[str, float]:
    """Key rows per (batch, KV head) and query: those the kernel reads (fixed rows once per
    group, region rows once per selection head) and the distinct rows any head needs."""
    ptr = layout.region_ptr.long().cpu()
    sizes = ptr[1:] - ptr[:-1]
    F_ = int((layout.fixed_tokens >= 0).sum())
    sel = idx[:, :, 0].cpu().long()                                        # [B, Hs, K]
    per_sel = torch.where(sel >= 0, sizes[sel.clamp(min=0)], 0).sum(-1)  # [B, Hs]
    if share:
        read = distinct = F_ + per_sel.double().mean().item()
    else:
        B, Hq, _ = sel.shape
        grouped = sel.view(B, Hq // G, G * sel.shape[-1])
        union = [[sizes[torch.unique(g[g >= 0])].sum().item() for g in row] for row in grouped]
        read = F_ + per_sel.view(B, -1, G).sum(-1).double().mean().item()
        distinct = F_ + torch.tensor(union, dtype=torch.float64).mean().item()
    return {"read": read, "distinct": distinct}


@dataclass
class CacheCopy:
    """One layer's KV cache for the timed steps, with its descriptors and selections."""
    k: torch.Tensor               # [B, Hkv, N, D]
    v: torch.Tensor               # [B, Hkv, N, D]
    desc: torch.Tensor            # [B, Hkv, R, D]
    idx: Dict[str, torch.Tensor]  # per selection mode: [B, Hs, 1, K]


def cache_copy(q, layout, K: int, kv_shape, dtype, device) -> CacheCopy:
    k = torch.randn(*kv_shape, device=device, dtype=dtype)
    v = torch.randn(*kv_shape, device=device, dtype=dtype)
    desc = ops.region_pool(k, layout.region_ptr, layout.region_tokens)
    idx = {mode: ops.region_topk(q, desc, layout.region_ptr, K, share)[0]
           for mode, share in MODES.items()}
    return CacheCopy(k, v, desc, idx)


def copies_needed(step_bytes: float, device: str) -> int:
    """How many KV caches the timed steps rotate through, as a model's layers: enough that
    between two steps on one cache the steps on the others move twice the last-level cache.
    A step then reads its rows from memory, as in a model, whose other layers pass through
    the cache in between; one cache timed call after call would serve a small sparse step
    from the cache that its previous call filled."""
    return min(MAX_CACHE_COPIES,
               1 + math.ceil(2 * last_level_cache_bytes(device) / max(step_bytes, 1.0)))


def rotating(copies, step: Callable) -> Callable[[], object]:
    """A variant that runs step(copy) on the next copy at each call."""
    turn = itertools.cycle(copies)
    return lambda: step(next(turn))


def flex_variants(q, copies: List[CacheCopy], layout, gaze_outputs):
    """FlexAttention on each mode's selections: (variants, per-mode facts), or the reason it
    cannot run here in place of the facts. flex_<mode> attends with the block masks built
    beforehand (one per cache copy); flex_mask_<mode> builds one mask, which a decode step
    would redo, as its selection changes."""
    _, Hq, Lq, _ = q.shape
    first = copies[0]
    N = first.k.shape[2]
    try:
        attend, eager = flex.compiled_flex_attention(), flex.eager_flex_attention()
        maps = flex.key_maps(layout, N, q.device)
        variants, facts = {}, {}
        for mode in MODES:
            def build(idx=first.idx[mode]):
                return flex.selection_block_mask(maps, idx, None, Hq, Lq)
            masked = [(copy, flex.selection_block_mask(maps, copy.idx[mode], None, Hq, Lq))
                      for copy in copies]
            mask = masked[0][1]
            out = attend(q, first.k, first.v, mask)
            variants[f"flex_{mode}"] = rotating(masked, lambda cm: attend(q, cm[0].k, cm[0].v,
                                                                          cm[1]))
            variants[f"flex_mask_{mode}"] = build
            facts[mode] = flex.facts(mask, N, out, gaze_outputs[mode],
                                     lambda mask=mask: eager(q, first.k, first.v, mask))
        return variants, facts
    except Exception as error:  # a peer that cannot run here is reported, not fatal
        return {}, flex.describe_error(error)


def run_shape(shape: DecodeShape, device: str, with_flex: bool = True) -> Dict[str, object]:
    torch.manual_seed(0)
    dtype = shape.torch_dtype
    B, Hq, Hkv, D = shape.batch, shape.q_heads, shape.kv_heads, shape.head_dim
    G = Hq // Hkv
    N = shape.keys
    layout = gaze_ext.build_layout([(0, shape.frames, shape.frame_h, shape.frame_w)], N,
                                   region_shape=shape.region, device=device)
    R = layout.num_regions
    K = max(1, round(shape.topk_fraction * R))
    q = torch.randn(B, Hq, 1, D, device=device, dtype=dtype)
    kv_shape = (B, Hkv, N, D)
    copies = [cache_copy(q, layout, K, kv_shape, dtype, device)]
    elt = copies[0].k.element_size()

    # Bytes each op must move, by the first copy's selections.
    dense_bytes = 2 * B * Hkv * N * D * elt + 2 * B * Hq * D * elt
    topk_bytes = B * Hkv * R * D * elt + B * Hq * D * elt
    attn_bytes, attn_read = {}, {}
    for mode, share in MODES.items():
        counts = row_counts(layout, copies[0].idx[mode], share, G)
        kv_bytes = 2 * B * Hkv * D * elt
        attn_bytes[mode] = kv_bytes * counts["distinct"] + 2 * B * Hq * D * elt
        attn_read[mode] = kv_bytes * counts["read"] + 2 * B * Hq * D * elt
    step_bytes = attn_bytes["shared"] + topk_bytes  # the smallest step timed
    while len(copies) < copies_needed(step_bytes, device):
        copies.append(cache_copy(q, layout, K, kv_shape, dtype, device))
    first = copies[0]
    regions = padded_regions(layout)

    bw = memory_bandwidth(device)
    floor_bw = bw["copy"] if device == "cuda" else bw["read"]
    q_grouped = q.view(B, Hkv, G, D)
    variants = {
        "sdpa_gqa": rotating(copies, lambda c: F.scaled_dot_product_attention(
            q, c.k, c.v, enable_gqa=True)),
        "sdpa_grouped_rows": rotating(copies, lambda c: F.scaled_dot_product_attention(
            q_grouped, c.k, c.v)),
    }
    gaze_outputs = {}
    for mode, share in MODES.items():
        gaze_outputs[mode], _ = ops.gaze_attention(q, first.k, first.v, layout.region_ptr,
                                                   layout.region_tokens, layout.fixed_tokens,
                                                   first.idx[mode])

        def gaze_step(c, share=share):
            sel, _ = ops.region_topk(q, c.desc, layout.region_ptr, K, share)
            return ops.gaze_attention(q, c.k, c.v, layout.region_ptr, layout.region_tokens,
                                      layout.fixed_tokens, sel)

        variants[f"gaze_{mode}"] = rotating(copies, gaze_step)
        variants[f"topk_{mode}"] = rotating(copies, lambda c, share=share: ops.region_topk(
            q, c.desc, layout.region_ptr, K, share))
        variants[f"attention_{mode}"] = rotating(copies, lambda c, mode=mode: ops.gaze_attention(
            q, c.k, c.v, layout.region_ptr, layout.region_tokens, layout.fixed_tokens,
            c.idx[mode]))
        variants[f"torch_gather_{mode}"] = rotating(
            copies, lambda c, mode=mode: torch_gather_attention(q, c.k, c.v, layout.fixed_tokens,
                                                                regions, c.idx[mode]))
        if ALTERNATIVES[device]:
            variants[f"attention_{mode}_block"] = with_env(
                "GAZE_ATTENTION_KERNEL", "split_block", variants[f"attention_{mode}"])
            variants[f"topk_{mode}_one_block"] = with_env(
                "GAZE_TOPK_SCORING_BLOCKS", "1", variants[f"topk_{mode}"])
    # The shared step's distinct K and V rows copied out by torch.index_select, with no
    # arithmetic: the rate at which these gathered rows can be read here.
    gathers = []
    for c in copies:
        rows = shared_step_rows(layout, regions, c.idx["shared"], N)
        gathers.append((c.k.view(-1, D), c.v.view(-1, D), rows,
                        torch.empty(2, rows.numel(), D, device=device, dtype=dtype)))

    def gather_rows(g):
        k_rows, v_rows, rows, out = g
        torch.index_select(k_rows, 0, rows, out=out[0])
        torch.index_select(v_rows, 0, rows, out=out[1])

    variants["gather_rows_shared"] = rotating(gathers, gather_rows)
    # The shared step's fixed tokens padded with -1 to the cache's length, as a cache that
    # sized its fixed list by its capacity would pass them: the split-K kernels read every
    # entry (GazeKVCache sizes the list by the steps left instead).
    padded_fixed = torch.full((B, N), -1, dtype=torch.int32, device=device)
    padded_fixed[:, : layout.fixed_tokens.numel()] = layout.fixed_tokens
    variants["attention_shared_padded_fixed"] = rotating(copies, lambda c: ops.gaze_attention(
        q, c.k, c.v, layout.region_ptr, layout.region_tokens, padded_fixed, c.idx["shared"]))
    for splits in SPLIT_SWEEP[device]:
        variants[f"attention_shared_splits_{splits}"] = with_env(
            "GAZE_SPLITS", str(splits), variants["attention_shared"])
    flex_facts = "left out (--no-flex)"
    if with_flex:
        peers, flex_facts = flex_variants(q, copies, layout, gaze_outputs)
        variants.update(peers)
    times = time_variants(variants, device)
    dense = min(times["sdpa_gqa"], times["sdpa_grouped_rows"])

    rows = []
    for name in ("sdpa_gqa", "sdpa_grouped_rows"):
        rows.append(dict(variant=name, ms=times[name] * 1e3, speedup=dense / times[name],
                         MB=dense_bytes / 1e6, GBps=dense_bytes / times[name] / 1e9,
                         floor_ratio=times[name] / (dense_bytes / floor_bw)))
    ratios = {}
    for mode in MODES:
        for name, nbytes in ((f"gaze_{mode}", attn_bytes[mode] + topk_bytes),
                             (f"topk_{mode}", topk_bytes), (f"attention_{mode}", attn_bytes[mode]),
                             (f"torch_gather_{mode}", attn_bytes[mode]),
                             (f"flex_{mode}", attn_bytes[mode]), (f"flex_mask_{mode}", None),
                             (f"attention_{mode}_padded_fixed", attn_bytes[mode]),
                             (f"gather_rows_{mode}", attn_bytes[mode]),
                             (f"attention_{mode}_block", attn_bytes[mode]),
                             (f"topk_{mode}_one_block", topk_bytes)):
            if name not in times:
                continue
            row = dict(variant=name, ms=times[name] * 1e3, speedup=dense / times[name])
            if nbytes is not None:
                row.update(MB=nbytes / 1e6, GBps=nbytes / times[name] / 1e9,
                           floor_ratio=times[name] / (nbytes / floor_bw))
            if name == f"attention_{mode}":
                row["read_MB"] = attn_read[mode] / 1e6
            rows.append(row)
        ratios[mode] = dense / times[f"gaze_{mode}"]
    targets = TARGETS[device]
    verdicts = {m: ("PASS" if ratios[m] >= targets[m] else "MISS") for m in ratios}
    attention_row = next(r for r in rows if r["variant"] == "attention_shared")
    bandwidth_share = 1.0 / attention_row["floor_ratio"]
    if BANDWIDTH_TARGET[device] is not None:
        verdicts["attention_bandwidth"] = ("PASS" if bandwidth_share >= BANDWIDTH_TARGET[device]
                                           else "MISS")
    cache = dict(copies=len(copies), last_level_MB=last_level_cache_bytes(device) / 1e6,
                 moved_between_MB=(len(copies) - 1) * step_bytes / 1e6)
    return dict(device=device, shape=asdict(shape), regions=R, topk=K, keys=N,
                bandwidth_GBps={k: v / 1e9 for k, v in bw.items()}, floor_bandwidth=
                "copy" if device == "cuda" else "read", rows=rows, ratios=ratios,
                targets=targets, verdicts=verdicts, bandwidth_share=bandwidth_share,
                bandwidth_target=BANDWIDTH_TARGET[device], flex=flex_facts, cache=cache,
                split_sweep=[dict(splits=n, us=times[f"attention_shared_splits_{n}"] * 1e6)
                             for n in SPLIT_SWEEP[device]],
                padded_fixed=dict(entries=N, valid=int((layout.fixed_tokens >= 0).sum()),
                                  cost=times["attention_shared_padded_fixed"]
                                  / times["attention_shared"]),
                other_dtypes=[other_dtype_row(shape, device, name, q, layout, K,
                                              step_bytes / elt) for name in OTHER_DTYPES[device]],
                one_kv_head=one_kv_head_row(shape, device, layout, K) if ONE_KV_HEAD[device]
                else None,
                kernels={name: kernel_times(variants[name], device)
                         for name in ("gaze_shared", "sdpa_grouped_rows", "sdpa_gqa", "flex_shared")
                         if name in variants},
                env=environment(device))


def dense_and_shared_step(q, copies: List[CacheCopy], layout, K: int) -> Dict[str, Callable]:
    """The dense peers and the shared-selection step (region_topk + gaze_attention), each
    rotating over `copies`, for q [B, Hq, 1, D]."""
    B, Hq, _, D = q.shape
    Hkv = copies[0].k.shape[1]

    def gaze_step(c):
        sel, _ = ops.region_topk(q, c.desc, layout.region_ptr, K, True)
        return ops.gaze_attention(q, c.k, c.v, layout.region_ptr, layout.region_tokens,
                                  layout.fixed_tokens, sel)

    return {
        "sdpa_gqa": rotating(copies, lambda c: F.scaled_dot_product_attention(
            q, c.k, c.v, enable_gqa=True)),
        "sdpa_grouped_rows": rotating(copies, lambda c: F.scaled_dot_product_attention(
            q.view(B, Hkv, Hq // Hkv, D), c.k, c.v)),
        "gaze_shared": rotating(copies, gaze_step)}


def other_dtype_row(shape: DecodeShape, device: str, dtype_name: str, q, layout, K: int,
                    step_elements: float) -> Dict[str, object]:
    """The shared-selection step against the dense peers in another element type, on fresh
    cache copies of that type (as many as its smaller steps need); step_elements: the
    elements the shared step moves."""
    B, Hkv, D = shape.batch, shape.kv_heads, shape.head_dim
    dtype = getattr(torch, dtype_name)
    q = q.to(dtype)
    count = copies_needed(step_elements * q.element_size(), device)
    copies = [cache_copy(q, layout, K, (B, Hkv, shape.keys, D), dtype,
                         device) for _ in range(count)]
    times = time_variants(dense_and_shared_step(q, copies, layout, K), device)
    dense = min(times["sdpa_gqa"], times["sdpa_grouped_rows"])
    return dict(dtype=dtype_name, dense_ms=dense * 1e3, gaze_shared_ms=times["gaze_shared"] * 1e3,
                speedup=dense / times["gaze_shared"], copies=count)


def one_kv_head_row(shape: DecodeShape, device: str, layout, K: int) -> Dict[str, object]:
    """The shared-selection step with a single KV head and its G query heads, the same cache
    length: one (batch, KV head) task, so the CPU forward splits its keys over the threads.
    Timed on all threads and on one, against the faster dense peer at that shape."""
    G, D, N = shape.q_heads // shape.kv_heads, shape.head_dim, shape.keys
    dtype = shape.torch_dtype
    q = torch.randn(1, G, 1, D, device=device, dtype=dtype)
    copies = [cache_copy(q, layout, K, (1, 1, N, D), dtype, device)]
    step_bytes = 2 * D * copies[0].k.element_size() * row_counts(
        layout, copies[0].idx["shared"], True, G)["distinct"]
    while len(copies) < copies_needed(step_bytes, device):
        copies.append(cache_copy(q, layout, K, (1, 1, N, D), dtype, device))

    def attention(c):
        return ops.gaze_attention(q, c.k, c.v, layout.region_ptr, layout.region_tokens,
                                  layout.fixed_tokens, c.idx["shared"])

    variants = dense_and_shared_step(q, copies, layout, K)
    variants["attention_shared"] = rotating(copies, attention)
    variants["attention_shared_one_thread"] = with_threads(1, rotating(copies, attention))
    times = time_variants(variants, device)
    dense = min(times["sdpa_gqa"], times["sdpa_grouped_rows"])
    return dict(q_heads=G, threads=torch.get_num_threads(), copies=len(copies),
                dense_ms=dense * 1e3, gaze_shared_ms=times["gaze_shared"] * 1e3,
                speedup=dense / times["gaze_shared"],
                attention_ms=times["attention_shared"] * 1e3,
                attention_one_thread_ms=times["attention_shared_one_thread"] * 1e3)


def report(result: Dict[str, object]) -> str:
    s = result["shape"]
    lines = [
        f"# Decode step on {result['device']}: Gaze Attention vs dense SDPA",
        "",
        f"B={s['batch']}, Hq={s['q_heads']}, Hkv={s['kv_heads']}, D={s['head_dim']}, {s['dtype']}; "
        f"{s['frames']} frames of {s['frame_h']}x{s['frame_w']} tokens in {tuple(s['region'])} "
        f"regions + {s['text']} text tokens = {result['keys']} keys, {result['regions']} regions, "
        f"top {result['topk']} ({s['topk_fraction']:.0%}); descriptors cached.",
        "",
        "Environment: " + ", ".join(f"{k}={v}" for k, v in result["env"].items()),
        "",
        "Measured bandwidth (GB/s): " + ", ".join(
            f"{k} {v:.1f}" for k, v in result["bandwidth_GBps"].items())
        + f"; floor = bytes / {result['floor_bandwidth']} bandwidth.",
        "",
        markdown_table(result["rows"], ["variant", "ms", "speedup", "MB", "GBps", "floor_ratio"]),
        "",
        "MB: bytes the op must move (distinct K/V rows needed by the step, q, out; descriptors "
        "for top-k). speedup: over the faster dense peer. floor_ratio: time / (MB / bandwidth).",
        "",
    ]
    cache = result.get("cache")
    if cache:
        factor = cache["moved_between_MB"] / cache["last_level_MB"]
        lines += [f"KV caches: {cache['copies']} copies, each call on the next, as a model's "
                  f"layers take turns: between two steps on one copy, the shared steps on the "
                  f"others move {cache['moved_between_MB']:.0f} MB, {factor:.1f}x the "
                  f"{cache['last_level_MB']:.0f} MB last-level cache"
                  + (", so each step reads its rows from memory." if factor >= 2 else
                     " (under 2x: steps may find their rows in the cache; the shape is small)."),
                  ""]
    for mode, ratio in result["ratios"].items():
        lines.append(f"- {mode} selection: region_topk + gaze_attention is {ratio:.2f}x faster "
                     f"than the faster dense peer (target {result['targets'][mode]}x): "
                     f"**{result['verdicts'][mode]}**")
    share, target = result["bandwidth_share"], result["bandwidth_target"]
    lines.append(f"- gaze_attention (shared selection) moves its bytes at {share:.0%} of the "
                 f"{result['floor_bandwidth']} bandwidth measured above"
                 + (f" (target {target:.0%}): **{result['verdicts']['attention_bandwidth']}**"
                    if target is not None else " (no target on this device)"))
    gbps = {r["variant"]: r.get("GBps") for r in result["rows"]}
    if gbps.get("gather_rows_shared"):
        lines.append(f"- `gather_rows_shared` (torch.index_select of the shared step's distinct "
                     f"K and V rows, no arithmetic) reads them at "
                     f"{gbps['gather_rows_shared']:.1f} GB/s; gaze_attention moves its bytes at "
                     f"{gbps['attention_shared'] / gbps['gather_rows_shared']:.0%} of that rate")
    padded = result.get("padded_fixed")
    if padded:
        lines.append(f"- `attention_shared_padded_fixed`: the same step with its fixed-token list "
                     f"padded with -1 to the cache's length ({padded['entries']} entries, "
                     f"{padded['valid']} valid) takes {padded['cost']:.2f}x the time (the CUDA "
                     "split-K kernels read every entry; GazeKVCache sizes the list by the "
                     "steps left)")
    ms = {r["variant"]: r["ms"] for r in result["rows"]}
    for mode in ("shared", "per_head"):
        for op, suffix, alternative, planned in (
                ("attention", "block", "the block-synchronous split-K forward "
                 "(GAZE_ATTENTION_KERNEL=split_block)", "the streamed one"),
                ("topk", "one_block", "region_topk with one block per row "
                 "(GAZE_TOPK_SCORING_BLOCKS=1)", "the plan's scoring blocks")):
            name = f"{op}_{mode}_{suffix}"
            if name in ms:
                lines.append(f"- `{name}`: {alternative} takes "
                             f"{ms[name] / ms[f'{op}_{mode}']:.2f}x the time of {planned}")
    sweep = result.get("split_sweep")
    if sweep:
        auto = next(r["ms"] for r in result["rows"] if r["variant"] == "attention_shared") * 1e3
        lines.append("- `attention_shared` with GAZE_SPLITS splits per unit instead of the "
                     "plan's: " + ", ".join(f"{r['splits']}: {r['us']:.1f} us" for r in sweep)
                     + f" (the plan: {auto:.1f} us)")
    flex_facts = result.get("flex")
    if isinstance(flex_facts, dict):
        flex_facts = {f"{mode} selection (`flex_{mode}`; `flex_mask_{mode}` builds its block "
                      "mask, which a step would redo as the selection changes)": fact
                      for mode, fact in flex_facts.items()}
    lines += [""] + flex.report_lines(flex_facts)
    lines += kernel_sections(result.get("kernels", {}))
    if result["other_dtypes"]:
        lines += ["", "Other element types, on cache copies drawn in that type (as many as its "
                  "smaller steps need): region_topk + gaze_attention (shared selection) against "
                  "the faster dense peer in that type (no target).",
                  "", markdown_table(result["other_dtypes"],
                                     ["dtype", "copies", "dense_ms", "gaze_shared_ms", "speedup"])]
    one = result.get("one_kv_head")
    if one:
        lines += ["", f"One KV head (B=1, Hq={one['q_heads']}, Hkv=1, the same cache; "
                  f"{one['copies']} copies): a single (batch, KV head) task, whose key blocks "
                  f"the CPU forward splits over the {one['threads']} threads and merges by "
                  f"log-sum-exp. gaze_attention takes {one['attention_ms']:.3f} ms, against "
                  f"{one['attention_one_thread_ms']:.3f} ms on one thread "
                  f"({one['attention_one_thread_ms'] / one['attention_ms']:.2f}x); "
                  f"region_topk + gaze_attention {one['gaze_shared_ms']:.3f} ms, "
                  f"{one['speedup']:.2f}x faster than the faster dense peer "
                  f"({one['dense_ms']:.3f} ms)."]
    return "\n".join(lines) + "\n"


def main(argv: List[str] = None) -> int:
    return benchmark_main(
        "decode", __doc__.split("\n")[0],
        lambda device, with_flex: run_shape(CPU_SHAPE if device == "cpu" else GPU_SHAPE, device,
                                            with_flex),
        report, RESULTS_DIR, argv)


if __name__ == "__main__":
    sys.exit(main())
