"""Pure-PyTorch oracles of the torch.ops.gaze ops, written from the contract with dense
masks. They are slow (O(Lq * N) memory) and meant for tests and for checking kernels.

Every function computes in ``compute_dtype``: by default float32 (float64 for float64
inputs), which is the reference the kernels are measured against; passing the input
dtype gives the "same-dtype PyTorch" baseline whose error sets the tolerance.
All are differentiable with ordinary autograd, which gives the reference gradients.
"""
from __future__ import annotations

from typing import Optional, Tuple

import torch
from torch import Tensor


def _default_compute_dtype(dtype: torch.dtype) -> torch.dtype:
    return torch.float64 if dtype == torch.float64 else torch.float32


def _batched(t: Tensor, batch: int) -> Tensor:
    """[X] (shared by the batch) or [B, X] -> [B, X]."""
    return t.unsqueeze(0).expand(batch, -1) if t.dim() == 1 else t


def region_membership(region_ptr: Tensor, region_tokens: Tensor, batch: int, num_keys: int,
                      dtype: torch.dtype = torch.float32) -> Tensor:
    """M [B, R, N]: how many times key n is listed in region r."""
    ptr = _batched(region_ptr, batch).long()
    tokens = _batched(region_tokens, batch).long()
    R = ptr.shape[1] - 1
    M = torch.zeros(batch, R, num_keys, dtype=dtype, device=region_ptr.device)
    for b in range(batch):
        for r in range(R):
            lo, hi = int(ptr[b, r]), int(ptr[b, r + 1])
            members = tokens[b, lo:hi]
            M[b, r].index_add_(0, members, torch.ones(members.numel(), dtype=dtype,
                                                       device=M.device))
    return M


def region_pool(keys: Tensor, region_ptr: Tensor, region_tokens: Tensor,
                compute_dtype: Optional[torch.dtype] = None) -> Tensor:
    """keys [B, Hkv, N, D] -> desc [B, Hkv, R, D]: mean of each region's keys (0 if empty)."""
    cdt = compute_dtype or _default_compute_dtype(keys.dtype)
    B, _, N, _ = keys.shape
    M = region_membership(region_ptr, region_tokens, B, N, cdt)           # [B, R, N]
    counts = (_batched(region_ptr, B)[:, 1:] - _batched(region_ptr, B)[:, :-1]).to(cdt)
    sums = torch.einsum("brn,bhnd->bhrd", M, keys.to(cdt))
    inv = torch.where(counts > 0, 1.0 / counts.clamp(min=1), torch.zeros_like(counts))
    return (sums * inv[:, None, :, None]).to(keys.dtype)


def region_scores(q: Tensor, desc: Tensor, share_kv: bool,
                  compute_dtype: Optional[torch.dtype] = None) -> Tensor:
    """float32 scores [B, Hs, Lq, R]: q . desc per query head, or the mean over each
    KV head's query heads with share_kv."""
    cdt = compute_dtype or _default_compute_dtype(q.dtype)
    B, Hq, Lq, D = q.shape
    Hkv, R = desc.shape[1], desc.shape[2]
    G = Hq // Hkv
    s = torch.einsum("bkgid,bkrd->bkgir", q.to(cdt).view(B, Hkv, G, Lq, D), desc.to(cdt))
    s = s.sum(2) / G if share_kv else s.reshape(B, Hq, Lq, R)
    return s.float()


def selectable_regions(region_ptr: Tensor, batch: int, q_len: int, q_pos: Optional[Tensor],
                       region_pos: Optional[Tensor]) -> Tensor:
    """bool [B, 1, Lq, R]: non-empty and, with q_pos, region_pos <= q_pos."""
    ptr = _batched(region_ptr, batch)
    ok = (ptr[:, 1:] > ptr[:, :-1])[:, None, None, :].expand(-1, 1, q_len, -1)
    if q_pos is not None:
        pos = _batched(region_pos, batch)
        ok = ok & (pos[:, None, None, :] <= q_pos[:, None, :, None])
    return ok


def region_topk(q: Tensor, desc: Tensor, region_ptr: Tensor, k: int, share_kv: bool = True,
                q_pos: Optional[Tensor] = None, region_pos: Optional[Tensor] = None,
                compute_dtype: Optional[torch.dtype] = None) -> Tuple[Tensor, Tensor]:
    """idx int32, score float32 [B, Hs, Lq, k]: descending score, ties to the lower index,
    NaN after every number, unselectable regions never; -1 / -inf padding."""
    B, _, Lq, _ = q.shape
    scores = region_scores(q, desc, share_kv, compute_dtype)               # [B, Hs, Lq, R]
    R = scores.shape[-1]
    ok = selectable_regions(region_ptr, B, Lq, q_pos, region_pos).expand_as(scores)
    # Lexicographic order by successive stable sorts, least significant key first:
    # region index (the identity), then score descending, then NaN last, then selectable first.
    order = torch.arange(R, device=q.device).expand_as(scores)
    key = torch.where(scores.isnan(), float("-inf"), scores)
    for sort_key, descending in ((key, True), (scores.isnan(), False), (~ok, False)):
        perm = torch.sort(sort_key.gather(-1, order).float(), dim=-1, descending=descending,
                          stable=True).indices
        order = order.gather(-1, perm)
    kept = min(k, R)
    idx = order[..., :kept]
    sel_ok = ok.gather(-1, idx)
    out_idx = torch.full(scores.shape[:-1] + (k,), -1, dtype=torch.int32, device=q.device)
    out_score = torch.full(scores.shape[:-1] + (k,), float("-inf"), device=q.device)
    out_idx[..., :kept] = torch.where(sel_ok, idx, -1).int()
    out_score[..., :kept] = torch.where(sel_ok, scores.gather(-1, idx), float("-inf"))
    return out_idx, out_score


def key_multiplicity(region_ptr: Tensor, region_tokens: Tensor, fixed_tokens: Tensor,
                     idx: Tensor, num_keys: int, q_heads: int,
                     q_pos: Optional[Tensor] = None) -> Tensor:
    """W [B, Hq, Lq, N] float64: how many times query (b, h, i) attends key n.

    Fixed tokens (-1 skipped) plus the tokens of the regions in idx: -1 and out-of-range
    slots skipped, a region equal to the last one taken counted once; with q_pos only
    positions <= q_pos."""
    B, Hs, Lq, K = idx.shape
    R = region_ptr.shape[-1] - 1
    dev = idx.device
    M = region_membership(region_ptr, region_tokens, B, num_keys, torch.float64)  # [B, R, N]
    taken = torch.zeros(B, Hs, Lq, R + 1, dtype=torch.float64, device=dev)  # slot R: discard
    last = torch.full((B, Hs, Lq), -1, dtype=torch.long, device=dev)
    for j in range(K):
        r = idx[..., j].long()
        valid = (r >= 0) & (r < R)
        take = valid & (r != last)
        taken.scatter_add_(-1, torch.where(take, r, R).unsqueeze(-1),
                           torch.ones(B, Hs, Lq, 1, dtype=torch.float64, device=dev))
        last = torch.where(valid, r, last)
    W = torch.einsum("bsir,brn->bsin", taken[..., :R], M)
    fixed = _batched(fixed_tokens, B).long()
    fixed_count = torch.zeros(B, num_keys + 1, dtype=torch.float64, device=dev)
    fixed_count.scatter_add_(1, torch.where(fixed >= 0, fixed, num_keys),
                             torch.ones_like(fixed, dtype=torch.float64))
    W = W + fixed_count[:, None, None, :num_keys]
    if Hs != q_heads:
        W = W.repeat_interleave(q_heads // Hs, dim=1)
    if q_pos is not None:
        visible = torch.arange(num_keys, device=dev)[None, None, :] <= q_pos[:, :, None]
        W = W * visible[:, None, :, :]
    return W


def gaze_attention(q: Tensor, k: Tensor, v: Tensor, region_ptr: Tensor, region_tokens: Tensor,
                   fixed_tokens: Tensor, idx: Tensor, q_pos: Optional[Tensor] = None,
                   scale: Optional[float] = None,
                   compute_dtype: Optional[torch.dtype] = None) -> Tuple[Tensor, Tensor]:
    """out [B, Hq, Lq, D] (dtype of q), lse [B, Hq, Lq] float32 (float64 for float64 q):
    softmax over the visible keys, each weighted by its multiplicity."""
    cdt = compute_dtype or _default_compute_dtype(q.dtype)
    B, Hq, Lq, D = q.shape
    Hkv, N = k.shape[1], k.shape[2]
    if scale is None:
        scale = D ** -0.5 if D > 0 else 1.0
    W = key_multiplicity(region_ptr, region_tokens, fixed_tokens, idx, N, Hq, q_pos).to(cdt)
    kx = k.to(cdt).repeat_interleave(Hq // Hkv, dim=1)
    vx = v.to(cdt).repeat_interleave(Hq // Hkv, dim=1)
    logits = torch.einsum("bhid,bhnd->bhin", q.to(cdt), kx) * scale
    logits = torch.where(W > 0, logits, float("-inf"))
    if N > 0:
        row_max = logits.amax(dim=-1, keepdim=True).detach()
    else:  # no keys at all: nothing to reduce
        row_max = logits.new_zeros(B, Hq, Lq, 1)
    row_max = torch.where(row_max == float("-inf"), torch.zeros_like(row_max), row_max)
    weights = W * torch.exp(logits - row_max)
    denom = weights.sum(dim=-1, keepdim=True)
    has_keys = denom != 0  # NaN (a NaN or +inf logit) stays NaN, as in SDPA
    denom_safe = torch.where(has_keys, denom, torch.ones_like(denom))
    out = torch.einsum("bhin,bhnd->bhid", weights / denom_safe, vx)
    lse = torch.where(has_keys, row_max + torch.log(denom_safe), float("-inf")).squeeze(-1)
    return out.to(q.dtype), lse.to(_default_compute_dtype(q.dtype))
