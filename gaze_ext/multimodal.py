"""Multimodal sequences: text, images and video frames, with learnable context tokens
after each image or frame, and the attention structure of a Gaze Attention model.

- visual tokens attend densely and causally (to everything before them);
- the context tokens of an image or frame attend to that image or frame and to the
  context tokens before them in its group;
- text tokens are *routed*: they see every text and context token before them
  (the fixed tokens) plus the tokens of their top-K regions that end before them.

:class:`ContextTokens` builds the embedded sequence of a batch and its
:class:`MultimodalLayout`; :class:`GazeAttentionBlock` consumes both.
"""
from __future__ import annotations

import functools
from dataclasses import dataclass
from typing import List, Optional, Sequence, Tuple, Union

import torch
from torch import Tensor, nn

from .layout import DEFAULT_REGION_SHAPE, GazeLayout, Visual, build_layout, stack_layouts

PAD, TEXT, VISUAL, CONTEXT = 0, 1, 2, 3


@dataclass
class MultimodalLayout:
    """Token kinds and groups of a (padded) batch, with the derived attention structure.

    Every tensor here is O(L) in size: the block never builds an [L, L] mask (a 32K-token
    video would need a gigabyte per mask). :attr:`dense_mask` builds the whole mask on
    demand, for references and tests.

    kinds [B, L]: PAD / TEXT / VISUAL / CONTEXT. groups [B, L]: the image/frame a visual or
    context token belongs to (-1 for text and padding). lengths [B]: tokens per sample.
    gaze: the region layout (regions over visual tokens; fixed tokens = text + context).
    text_rows [B, Lt]: positions of each sample's text tokens, padded with L.
    visual_prefix: one past the last visual token of any sample (0 without one): a visual
    query sees every token before it, so one causal attention over the first
    visual_prefix tokens gives every visual row.
    frames: a region layout with one region per image or frame (its visual and context
    tokens, in group order) and no fixed tokens; context_rows [B, Lc]: positions of the
    context tokens, padded with L; context_frame [B, Lc] int32: each one's region in
    frames (-1 for padding). A context query sees its region's tokens up to itself.
    """

    kinds: Tensor
    groups: Tensor
    lengths: Tensor
    gaze: GazeLayout
    visuals: List[List[Visual]]
    text_rows: Tensor
    visual_prefix: int
    frames: GazeLayout
    context_rows: Tensor
    context_frame: Tensor

    @property
    def seq_len(self) -> int:
        return self.kinds.shape[1]

    @property
    def dense_mask(self) -> Tensor:
        """[B, 1, L, L] bool: what each query sees without routing: visual and text queries
        every token up to themselves, context queries their own image/frame up to
        themselves, a padding row itself alone (so no row is empty). Built on each access."""
        L = self.seq_len
        pos = torch.arange(L, device=self.kinds.device)
        causal = pos[None, :, None] >= pos[None, None, :]                      # [1, L, L]
        valid_key = pos[None, None, :] < self.lengths[:, None, None]           # [B, 1, L]
        kind, group = self.kinds[:, :, None], self.groups
        same_group = (group[:, :, None] == group[:, None, :]) & (group[:, None, :] >= 0)
        sees = (kind == VISUAL) | (kind == TEXT) | ((kind == CONTEXT) & same_group)
        itself = pos[None, :, None] == pos[None, None, :]
        return ((causal & valid_key & sees) | ((kind == PAD) & itself))[:, None]

    def row_positions(self, rows: Tensor) -> Tensor:
        """[B, n] positions padded with L (text_rows, context_rows) -> int32 q_pos, -1 (sees
        nothing) for padding."""
        return torch.where(rows < self.seq_len, rows, -1).to(torch.int32)

    def context_selection(self, heads: int) -> Tensor:
        """idx [B, heads, Lc, 1] int32 for gaze_attention over frames: each context row's
        own image/frame, -1 for padding."""
        B, Lc = self.context_frame.shape
        return self.context_frame[:, None, :, None].expand(B, heads, Lc, 1).contiguous()

    def to(self, device) -> "MultimodalLayout":
        return MultimodalLayout(self.kinds.to(device), self.groups.to(device),
                                self.lengths.to(device), self.gaze.to(device), self.visuals,
                                self.text_rows.to(device), self.visual_prefix,
                                self.frames.to(device), self.context_rows.to(device),
                                self.context_frame.to(device))


def sample_plan(parts: Sequence[Tuple], num_context: int):
    """Token kinds, groups and visuals of one sample from parts ("text", n) or
    ("visual", t, h, w): each frame of a visual is followed by num_context context tokens."""
    kinds: List[int] = []
    groups: List[int] = []
    visuals: List[Visual] = []
    group = 0
    for part in parts:
        if part[0] == "text":
            kinds += [TEXT] * part[1]
            groups += [-1] * part[1]
        elif part[0] == "visual":
            t, h, w = part[1:]
            visuals.append(Visual(len(kinds), t, h, w, frame_stride=h * w + num_context))
            for _ in range(t):
                kinds += [VISUAL] * (h * w) + [CONTEXT] * num_context
                groups += [group] * (h * w + num_context)
                group += 1
        else:
            raise ValueError(f"unknown part {part!r}: use ('text', n) or ('visual', t, h, w)")
    return kinds, groups, visuals


def build_multimodal_layout(plans: Sequence[Sequence[Tuple]], num_context: int = 4,
                            region_shape=DEFAULT_REGION_SHAPE,
                            device: Optional[Union[str, torch.device]] = None) -> MultimodalLayout:
    """Layout of a batch; each plan is a list of ("text", n) / ("visual", t, h, w) parts.
    Layouts are cached by their plans: a training loop over same-shaped batches builds
    one once (treat the returned tensors as read-only)."""
    key = tuple(tuple(tuple(part) for part in plan) for plan in plans)
    return _build_layout_cached(key, num_context, tuple(region_shape),
                                None if device is None else str(torch.device(device)))


def rows_where(selected: Tensor, pad: int) -> Tensor:
    """[B, L] bool -> [B, n] long: each row's selected positions, ascending, padded with pad."""
    B = selected.shape[0]
    n = int(selected.sum(1).max()) if B else 0
    rows = torch.full((B, n), pad, dtype=torch.long)
    for b in range(B):
        found = torch.nonzero(selected[b]).flatten()
        rows[b, : found.numel()] = found
    return rows


def frame_regions(groups: Tensor, seq_len: int) -> GazeLayout:
    """One sample's images and frames as regions: region g holds the positions of group g
    (groups [L]: ascending runs 0, 1, ..., -1 elsewhere), no fixed tokens."""
    positions = torch.nonzero(groups >= 0).flatten()
    of_group = groups[positions]
    counts = torch.bincount(of_group, minlength=int(of_group.max()) + 1 if positions.numel() else 0)
    ptr = torch.cat([counts.new_zeros(1), counts.cumsum(0)])
    last = positions[ptr[1:] - 1] if counts.numel() else positions
    i32 = lambda t: t.to(torch.int32)  # noqa: E731
    return GazeLayout(i32(ptr), i32(positions), i32(last), torch.zeros(0, dtype=torch.int32),
                      seq_len)


@functools.lru_cache(maxsize=64)
def _build_layout_cached(plans, num_context, region_shape, device) -> MultimodalLayout:
    samples = [sample_plan(p, num_context) for p in plans]
    B, L = len(samples), max((len(k) for k, _, _ in samples), default=0)
    kinds = torch.zeros(B, L, dtype=torch.long)
    groups = torch.full((B, L), -1, dtype=torch.long)
    lengths = torch.tensor([len(k) for k, _, _ in samples], dtype=torch.long)
    for b, (k, g, _) in enumerate(samples):
        kinds[b, : len(k)] = torch.tensor(k, dtype=torch.long)
        groups[b, : len(g)] = torch.tensor(g, dtype=torch.long)
    gaze = stack_layouts([build_layout(v, len(k), region_shape) for k, _, v in samples])
    gaze = gaze._replace(num_keys=L)

    text_rows = rows_where(kinds == TEXT, L)
    visual_at = torch.nonzero(kinds == VISUAL)
    visual_prefix = int(visual_at[:, 1].max()) + 1 if visual_at.numel() else 0
    frames = stack_layouts([frame_regions(groups[b], L) for b in range(B)])
    context_rows = rows_where(kinds == CONTEXT, L)
    context_frame = torch.where(context_rows < L,
                                groups.gather(1, context_rows.clamp(max=max(L - 1, 0))), -1)
    layout = MultimodalLayout(kinds, groups, lengths, gaze, [v for _, _, v in samples], text_rows,
                              visual_prefix, frames, context_rows, context_frame.to(torch.int32))
    return layout.to(device) if device is not None else layout


class ContextTokens(nn.Module):
    """Learnable context tokens (default 4) inserted after every image and video frame."""

    def __init__(self, d_model: int, num_tokens: int = 4):
        super().__init__()
        self.num_tokens = num_tokens
        self.tokens = nn.Parameter(torch.randn(num_tokens, d_model) * 0.02)

    def forward(self, samples: Sequence[Sequence[Tensor]], region_shape=DEFAULT_REGION_SHAPE
                ) -> Tuple[Tensor, MultimodalLayout]:
        """Embeds a batch. Each sample is a list of parts: text embeddings [n, d] or visual
        embeddings [h, w, d] (an image) / [t, h, w, d] (video frames). Returns the padded
        sequence [B, L, d] (context tokens inserted) and its layout."""
        plans, sequences = [], []
        for parts in samples:
            plan, pieces = [], []
            for part in parts:
                if part.dim() == 2:
                    plan.append(("text", part.shape[0]))
                    pieces.append(part)
                elif part.dim() in (3, 4):
                    frames = part if part.dim() == 4 else part[None]
                    t, h, w, d = frames.shape
                    plan.append(("visual", t, h, w))
                    context = self.tokens.to(frames.dtype).expand(t, -1, -1)
                    pieces.append(torch.cat([frames.reshape(t, h * w, d), context], 1).reshape(-1, d))
                else:
                    raise ValueError(f"a part must be [n, d], [h, w, d] or [t, h, w, d], got {tuple(part.shape)}")
            plans.append(plan)
            sequences.append(torch.cat(pieces) if pieces else self.tokens.new_zeros(0, self.tokens.shape[1]))
        layout = build_multimodal_layout(plans, self.num_tokens, region_shape,
                                         device=self.tokens.device)
        x = nn.utils.rnn.pad_sequence(sequences, batch_first=True)
        return x, layout
