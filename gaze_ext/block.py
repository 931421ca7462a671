"""The Gaze Attention block of a multimodal LLM, its KV cache and a dense reference.

:class:`GazeAttentionBlock` holds q/k/v/o projections with rotary embeddings and GQA.
Over a whole sequence (training, prefill) visual queries attend densely and causally
(one causal SDPA over the prefix of the sequence that holds every visual token), context
queries attend to their own image or frame (``gaze_attention`` with one region per image
or frame), and every text query picks its own top-K regions (teacher forcing); no
[L, L] mask is built. During generation each new token is a routed text query over the
:class:`GazeKVCache`, whose region descriptors are pooled once, after the prefill.
``topk=None`` is dense attention. Padding positions of a ragged batch get finite,
unspecified outputs (the reference's differ): mask them out of a loss.
"""
from __future__ import annotations

from typing import List, Optional

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from . import ops, reference
from .multimodal import TEXT, MultimodalLayout


def rotate(x: Tensor, positions: Tensor, theta: float) -> Tensor:
    """Rotary embedding (half-split form) of x [B, H, L, D] at positions [B, L]."""
    D = x.shape[-1]
    dtype = torch.promote_types(x.dtype, torch.float32)
    freqs = theta ** (-torch.arange(0, D // 2, device=x.device, dtype=dtype) * 2 / D)
    angles = positions.to(dtype)[:, None, :, None] * freqs                   # [B, 1, L, D/2]
    cos, sin = angles.cos(), angles.sin()
    x1, x2 = x[..., : D // 2].to(dtype), x[..., D // 2:].to(dtype)
    return torch.cat([x1 * cos - x2 * sin, x1 * sin + x2 * cos], dim=-1).to(x.dtype)


class GazeKVCache:
    """Preallocated keys, values and region descriptors of every layer, for generation.

    After :meth:`start` (from the prompt's layout) the prompt's forward pass fills k/v and
    each layer's descriptors; every decode step then writes one key/value row per sample at
    its current length and appends that position to the fixed tokens, in place, so a step
    allocates nothing here and can be captured in a CUDA graph (after :meth:`start`, which
    sets the layout tensors the steps read). A step does not synchronize with the host: the
    room left is counted on the host as well (by :meth:`end_step`; replays of a captured
    step are not counted there).

    The fixed-token list is as wide as the prompt's fixed tokens plus the steps left, not
    as the cache: its -1 padding is not free (the CUDA split-K kernel walks padding entries
    as it walks keys), and a list as wide as a mostly visual cache would be mostly padding.
    """

    def __init__(self, num_layers: int, batch: int, kv_heads: int, head_dim: int, max_len: int,
                 dtype=torch.float32, device=None):
        shape = (batch, kv_heads, max_len, head_dim)
        self.k = [torch.zeros(shape, dtype=dtype, device=device) for _ in range(num_layers)]
        self.v = [torch.zeros(shape, dtype=dtype, device=device) for _ in range(num_layers)]
        self.desc: List[Optional[Tensor]] = [None] * num_layers
        self.max_len = max_len
        self.length = torch.zeros(batch, dtype=torch.long, device=device)
        self.fixed_tokens = torch.full((batch, 0), -1, dtype=torch.int32, device=device)  # start()
        self.fixed_count = torch.zeros(batch, dtype=torch.long, device=device)
        self.region_ptr = self.region_tokens = self.region_pos = None
        self.decoding = False
        self.steps_left: Optional[int] = None  # decode steps before the longest sample is full

    def start(self, layout: MultimodalLayout) -> None:
        """Takes the prompt's layout; the prompt's forward pass fills the layers."""
        gaze = layout.gaze
        if layout.seq_len > self.max_len:
            raise ValueError(f"prompt of {layout.seq_len} tokens exceeds max_len {self.max_len}")
        B = self.length.shape[0]
        batched = lambda t: t if t.dim() == 2 else t.expand(B, -1)  # noqa: E731
        self.region_ptr = batched(gaze.region_ptr).contiguous()
        self.region_tokens = batched(gaze.region_tokens).contiguous()
        self.region_pos = batched(gaze.region_pos).contiguous()
        fixed = batched(gaze.fixed_tokens)
        # the valid fixed tokens compacted to the front, so decode steps append after them
        order = torch.sort((fixed < 0).to(torch.int8), dim=1, stable=True).indices
        fixed = fixed.gather(1, order)
        self.fixed_count.copy_((fixed >= 0).sum(1))
        self.length.copy_(layout.lengths)
        # room for every step left: the longest sample fills the cache first
        width = int(self.fixed_count.max()) + self.max_len - int(self.length.max())
        if self.fixed_tokens.shape[1] != width:
            self.fixed_tokens = self.fixed_tokens.new_empty((B, width))
        self.fixed_tokens.fill_(-1)
        kept = min(width, fixed.shape[1])  # past it, only padding
        self.fixed_tokens[:, :kept] = fixed[:, :kept]
        self.steps_left = self.max_len - int(self.length.max())
        self.decoding = False

    def begin_step(self) -> None:
        """A decode step: each sample's next position becomes a fixed (text) token."""
        if self.steps_left is None:
            raise RuntimeError("GazeKVCache.begin_step before start()")
        # (counted on the host: reading self.length would stall the step on the device)
        if self.steps_left <= 0:
            raise RuntimeError("GazeKVCache is full")
        self.fixed_tokens.scatter_(1, self.fixed_count[:, None], self.length[:, None].to(torch.int32))
        self.fixed_count += 1
        self.decoding = True

    def end_step(self) -> None:
        self.length += 1
        self.steps_left -= 1


class GazeAttentionBlock(nn.Module):
    def __init__(self, d_model: int, num_heads: int, num_kv_heads: Optional[int] = None,
                 head_dim: Optional[int] = None, share_kv: bool = True,
                 rope_theta: float = 10000.0):
        super().__init__()
        self.num_heads = num_heads
        self.num_kv_heads = num_kv_heads or num_heads
        self.head_dim = head_dim or d_model // num_heads
        if num_heads % self.num_kv_heads:
            raise ValueError("num_heads must be a multiple of num_kv_heads")
        self.share_kv = share_kv
        self.rope_theta = rope_theta
        self.scale = self.head_dim ** -0.5
        self.q_proj = nn.Linear(d_model, num_heads * self.head_dim, bias=False)
        self.k_proj = nn.Linear(d_model, self.num_kv_heads * self.head_dim, bias=False)
        self.v_proj = nn.Linear(d_model, self.num_kv_heads * self.head_dim, bias=False)
        self.o_proj = nn.Linear(num_heads * self.head_dim, d_model, bias=False)
        self.last_selection: Optional[Tensor] = None  # idx of the text queries, when recording
        self.record_selection = False

    def _project(self, x: Tensor, positions: Tensor):
        B, L, _ = x.shape
        q = self.q_proj(x).view(B, L, self.num_heads, self.head_dim).transpose(1, 2)
        k = self.k_proj(x).view(B, L, self.num_kv_heads, self.head_dim).transpose(1, 2)
        v = self.v_proj(x).view(B, L, self.num_kv_heads, self.head_dim).transpose(1, 2)
        return rotate(q, positions, self.rope_theta), rotate(k, positions, self.rope_theta), v

    def _merge_heads(self, out: Tensor) -> Tensor:
        B, H, L, D = out.shape
        return self.o_proj(out.transpose(1, 2).reshape(B, L, H * D))

    def _slots(self, topk: Optional[int], num_regions: int) -> int:
        return max(num_regions, 1) if topk is None else max(1, min(topk, max(num_regions, 1)))

    def forward(self, x: Tensor, layout: Optional[MultimodalLayout], topk: Optional[int],
                cache: Optional[GazeKVCache] = None, layer: int = 0) -> Tensor:
        """x [B, L, d] -> [B, L, d]. With a cache in a decode step, x is [B, 1, d]."""
        if cache is not None and cache.decoding:
            return self._decode(x, topk, cache, layer)
        B, L, _ = x.shape
        positions = torch.arange(L, device=x.device).expand(B, L)
        q, k, v = self._project(x, positions)
        gaze = layout.gaze
        # Rows are gathered to [B, H, rows, D] and scattered back into out; padding entries
        # of the row lists point past the end (row L of out, dropped).
        def gather(rows):
            index = rows.clamp(max=L - 1)[:, None, :, None]
            return q.gather(2, index.expand(B, self.num_heads, rows.shape[1], self.head_dim))

        def scatter(out, rows, values):
            index = rows[:, None, :, None].expand(B, self.num_heads, rows.shape[1], self.head_dim)
            return out.scatter(2, index, values)

        # visual queries: every token before them, so one causal SDPA over the prefix that
        # holds them all (FlashAttention on GPUs, no mask); its other rows are replaced below.
        # Text rows before the last visual token are thus computed and dropped: the price of
        # a mask-free kernel, small unless long text precedes the visual tokens.
        P = layout.visual_prefix
        if P > 0:
            dense = F.scaled_dot_product_attention(q[:, :, :P], k[:, :, :P], v[:, :, :P],
                                                   is_causal=True, scale=self.scale,
                                                   enable_gqa=True)
            out = F.pad(dense, (0, 0, 0, L + 1 - P))
        else:
            out = q.new_zeros(B, self.num_heads, L + 1, self.head_dim)
        # context queries: their own image or frame up to themselves, one region of frames
        rows = layout.context_rows
        if rows.shape[1] > 0:
            frames = layout.frames
            context, _ = ops.gaze_attention(gather(rows), k, v, frames.region_ptr,
                                            frames.region_tokens, frames.fixed_tokens,
                                            layout.context_selection(self.num_kv_heads),
                                            layout.row_positions(rows), self.scale)
            out = scatter(out, rows, context)
        # text queries: routed
        rows = layout.text_rows
        q_text = gather(rows)
        q_pos = layout.row_positions(rows)
        with torch.no_grad():
            desc = ops.region_pool(k, gaze.region_ptr, gaze.region_tokens)
            idx, _ = ops.region_topk(q_text, desc, gaze.region_ptr,
                                     self._slots(topk, gaze.num_regions), self.share_kv, q_pos,
                                     gaze.region_pos)
        routed, _ = ops.gaze_attention(q_text, k, v, gaze.region_ptr, gaze.region_tokens,
                                       gaze.fixed_tokens, idx, q_pos, self.scale)
        if self.record_selection:
            self.last_selection = idx
        out = scatter(out, rows, routed)[:, :, :L]
        if cache is not None:
            cache.k[layer][:, :, :L] = k.detach()
            cache.v[layer][:, :, :L] = v.detach()
            cache.desc[layer] = desc
        return self._merge_heads(out)

    def _decode(self, x: Tensor, topk: Optional[int], cache: GazeKVCache, layer: int) -> Tensor:
        B = x.shape[0]
        positions = cache.length[:, None]
        q, k, v = self._project(x, positions)
        write_at = positions[:, None, :, None].expand(B, self.num_kv_heads, 1, self.head_dim)
        cache.k[layer].scatter_(2, write_at, k.to(cache.k[layer].dtype))
        cache.v[layer].scatter_(2, write_at, v.to(cache.v[layer].dtype))
        q_pos = positions.to(torch.int32)
        num_regions = cache.region_ptr.shape[-1] - 1
        idx, _ = ops.region_topk(q, cache.desc[layer], cache.region_ptr,
                                 self._slots(topk, num_regions), self.share_kv, q_pos,
                                 cache.region_pos)
        if self.record_selection:
            self.last_selection = idx
        out, _ = ops.gaze_attention(q, cache.k[layer], cache.v[layer], cache.region_ptr,
                                    cache.region_tokens, cache.fixed_tokens, idx, q_pos,
                                    self.scale)
        return self._merge_heads(out)

    def reference_forward(self, x: Tensor, layout: MultimodalLayout, topk: Optional[int]) -> Tensor:
        """The same block in pure PyTorch with one dense mask per query (for tests): routing
        by gaze_ext.reference, then a masked softmax over all keys."""
        B, L, _ = x.shape
        positions = torch.arange(L, device=x.device).expand(B, L)
        q, k, v = self._project(x, positions)
        gaze = layout.gaze
        G = self.num_heads // self.num_kv_heads
        with torch.no_grad():
            desc = reference.region_pool(k.detach(), gaze.region_ptr, gaze.region_tokens)
            q_pos = positions.to(torch.int32)
            idx, _ = reference.region_topk(q.detach(), desc, gaze.region_ptr,
                                           self._slots(topk, gaze.num_regions), self.share_kv,
                                           q_pos, gaze.region_pos)
            routed = reference.key_multiplicity(gaze.region_ptr, gaze.region_tokens,
                                                gaze.fixed_tokens, idx, L, self.num_heads,
                                                q_pos) > 0                 # [B, H, L, L]
            is_text = (layout.kinds == TEXT)[:, None, :, None]
            mask = torch.where(is_text, routed, layout.dense_mask.expand_as(routed))
        kx, vx = k.repeat_interleave(G, 1), v.repeat_interleave(G, 1)
        dtype = torch.promote_types(x.dtype, torch.float32)
        logits = (q.to(dtype) @ kx.to(dtype).transpose(-1, -2)) * self.scale
        weights = torch.softmax(logits.masked_fill(~mask, float("-inf")), dim=-1)
        return self._merge_heads((weights @ vx.to(dtype)).to(x.dtype))
