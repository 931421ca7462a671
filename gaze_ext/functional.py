"""Gaze Attention as one call: pool the keys into region descriptors (or take cached
ones), pick each query's top-k regions, attend over them plus the fixed tokens."""
from __future__ import annotations

from typing import NamedTuple, Optional

import torch
from torch import Tensor

from . import ops
from .layout import GazeLayout


class GazeAttentionOutput(NamedTuple):
    out: Tensor    # [B, Hq, Lq, D]
    lse: Tensor    # [B, Hq, Lq] float32
    idx: Tensor    # [B, Hs, Lq, k] int32 selected regions
    score: Tensor  # [B, Hs, Lq, k] float32 their scores


def gaze_attention(q: Tensor, k: Tensor, v: Tensor, layout: GazeLayout, topk: Optional[int],
                   *, share_kv: bool = True, q_pos: Optional[Tensor] = None,
                   scale: Optional[float] = None, desc: Optional[Tensor] = None,
                   return_selection: bool = False):
    """Gaze Attention of ``q [B, Hq, Lq, D]`` over ``k, v [B, Hkv, N, D]``.

    Args:
        layout: the region layout of the keys (:func:`gaze_ext.build_layout`).
        topk: regions per query; ``None`` selects every region (dense over the layout).
        share_kv: one selection per KV head (mean score of its query heads) instead of
            one per query head.
        q_pos: ``[B, Lq]`` int32 query positions for causality (``None``: all keys visible).
        scale: softmax scale, default ``D ** -0.5``.
        desc: cached descriptors ``[B, Hkv, R, D]`` (``ops.region_pool(k, ...)``); pooled
            from ``k`` when not given.
        return_selection: also return ``lse``, ``idx`` and ``score``.

    Returns:
        ``out [B, Hq, Lq, D]``, or a :class:`GazeAttentionOutput` with ``return_selection``.
        Gradients reach q, k, v through the attention; the selection has none.
    """
    num_regions = layout.region_ptr.shape[-1] - 1
    k_slots = max(num_regions, 1) if topk is None else topk
    with torch.no_grad():
        if desc is None:
            desc = ops.region_pool(k, layout.region_ptr, layout.region_tokens)
        idx, score = ops.region_topk(q, desc, layout.region_ptr, k_slots, share_kv, q_pos,
                                     layout.region_pos if q_pos is not None else None)
    out, lse = ops.gaze_attention(q, k, v, layout.region_ptr, layout.region_tokens,
                                  layout.fixed_tokens, idx, q_pos, scale)
    if return_selection:
        return GazeAttentionOutput(out, lse, idx, score)
    return out
