"""Region layouts: which key positions form each gaze region, and which are always visible.

A sequence holds text and the visual tokens of images or video frames, each visual in
raster order ``(t, h, w)`` starting at some offset. Each visual is cut into regions of
``r_t x r_h x r_w`` tokens (default ``1 x 6 x 6``; edge regions of grids that do not
divide are smaller). Positions in no visual (text, system prompt, context tokens) are
*fixed*: every query sees them.

The tensors (int32) are those the ops take:

- ``region_ptr [R+1]``: region ``r`` is ``region_tokens[region_ptr[r]:region_ptr[r+1]]``
- ``region_tokens [T]``: key positions, ascending within a region
- ``region_pos [R]``: the largest position of each region (for causal selection)
- ``fixed_tokens [F]``: always-visible positions, ``-1`` padding

A batched layout has a leading ``B`` axis on each; shorter samples are padded with
empty regions and ``-1`` fixed tokens.
"""
from __future__ import annotations

import math
import operator
from typing import NamedTuple, Optional, Sequence, Tuple, Union

import torch
from torch import Tensor

__all__ = ["Visual", "GazeLayout", "build_layout", "stack_layouts", "build_batch_layout",
           "validate_layout"]

RegionShape = Tuple[int, int, int]
_INT32_MAX = 2**31 - 1  # positions are int32
DEFAULT_REGION_SHAPE: RegionShape = (1, 6, 6)


class Visual(NamedTuple):
    """An image (t = 1) or video clip of t frames: h x w tokens per frame, in raster order
    from ``offset`` in the token sequence. Frame f starts at ``offset + f * frame_stride``
    (default h * w: frames back to back; larger when other tokens, such as context
    tokens, follow each frame)."""

    offset: int
    t: int
    h: int
    w: int
    frame_stride: Optional[int] = None

    @property
    def stride(self) -> int:
        return self.h * self.w if self.frame_stride is None else self.frame_stride

    @property
    def num_tokens(self) -> int:
        return self.t * self.h * self.w

    @property
    def end(self) -> int:
        """One past the last token."""
        return self.offset + (self.t - 1) * self.stride + self.h * self.w

    def positions(self) -> Tensor:
        """[t, h, w] int64 positions of the tokens."""
        frame = torch.arange(self.h * self.w).view(self.h, self.w)
        return self.offset + torch.arange(self.t)[:, None, None] * self.stride + frame


class GazeLayout(NamedTuple):
    region_ptr: Tensor     # [R+1] or [B, R+1] int32
    region_tokens: Tensor  # [T] or [B, T] int32
    region_pos: Tensor     # [R] or [B, R] int32
    fixed_tokens: Tensor   # [F] or [B, F] int32, -1 = padding
    num_keys: int          # N: the key axis the positions index

    @property
    def num_regions(self) -> int:
        return self.region_ptr.shape[-1] - 1

    @property
    def batched(self) -> bool:
        return self.region_ptr.dim() == 2

    def to(self, device: Union[str, torch.device]) -> "GazeLayout":
        return GazeLayout(self.region_ptr.to(device), self.region_tokens.to(device),
                          self.region_pos.to(device), self.fixed_tokens.to(device),
                          self.num_keys)


def _as_int(x, error: str) -> int:
    """x as an int (Python, NumPy or 0-dim tensor integers); ValueError(error) otherwise."""
    try:
        return operator.index(x)
    except TypeError:
        raise ValueError(error) from None


def _as_visual(v) -> Visual:
    v = Visual(*v)
    error = f"visual {tuple(v)}: offset, t, h, w and frame_stride must be ints"
    v = Visual(*(None if x is None else _as_int(x, error) for x in v))
    if min(v.t, v.h, v.w) < 1 or v.offset < 0:
        raise ValueError(f"visual {tuple(v)}: offset must be >= 0 and t, h, w >= 1")
    if v.stride < v.h * v.w:
        raise ValueError(f"visual {tuple(v)}: frame_stride must be >= h * w")
    return v


def _visual_regions(v: Visual, region_shape: RegionShape) -> Tensor:
    """[num_regions, r_t * r_h * r_w] positions of each region of v, -1 where an edge
    region is smaller; regions in raster order of (frame block, row block, column block)."""
    rt, rh, rw = region_shape
    nt, nh, nw = math.ceil(v.t / rt), math.ceil(v.h / rh), math.ceil(v.w / rw)
    grid = torch.full((nt * rt, nh * rh, nw * rw), -1, dtype=torch.int64)
    grid[: v.t, : v.h, : v.w] = v.positions()
    blocks = grid.view(nt, rt, nh, rh, nw, rw).permute(0, 2, 4, 1, 3, 5)
    return blocks.reshape(nt * nh * nw, rt * rh * rw)


def build_layout(visuals: Sequence, seq_len: int,
                 region_shape: RegionShape = DEFAULT_REGION_SHAPE,
                 fixed_tokens: Optional[Union[Sequence[int], Tensor]] = None,
                 device: Optional[Union[str, torch.device]] = None) -> GazeLayout:
    """Layout of one sample.

    Args:
        visuals: ``(offset, t, h, w[, frame_stride])`` per image or clip, non-overlapping,
            inside the sequence.
        seq_len: number of tokens (the key axis ``N``).
        region_shape: ``(r_t, r_h, r_w)`` tokens per region.
        fixed_tokens: always-visible positions in ``[0, seq_len)``, each once and in no
            visual (``-1`` padding allowed); default: every position in no visual (text and
            context tokens).
    """
    error = f"seq_len must be an int in [0, 2^31), got {seq_len!r}"
    seq_len = _as_int(seq_len, error)
    if not 0 <= seq_len <= _INT32_MAX:
        raise ValueError(error)
    error = f"region_shape {tuple(region_shape)} must be 3 positive ints (r_t, r_h, r_w)"
    region_shape = tuple(_as_int(x, error) for x in region_shape)
    if len(region_shape) != 3 or min(region_shape) < 1:
        raise ValueError(error)
    rt, rh, rw = region_shape
    visuals = [_as_visual(v) for v in visuals]
    in_visual = torch.zeros(seq_len, dtype=torch.bool)
    for v in visuals:
        if v.end > seq_len:
            raise ValueError(f"visual {tuple(v)} ends at {v.end}, past seq_len = {seq_len}")
        tokens = v.positions().flatten()
        if in_visual[tokens].any():
            raise ValueError(f"visual {tuple(v)} overlaps another visual")
        in_visual[tokens] = True

    blocks = [_visual_regions(v, region_shape) for v in visuals]
    blocks = torch.cat(blocks) if blocks else torch.zeros(0, rt * rh * rw, dtype=torch.int64)
    sizes = (blocks >= 0).sum(1)
    region_ptr = torch.zeros(blocks.shape[0] + 1, dtype=torch.int64)
    region_ptr[1:] = sizes.cumsum(0)
    region_tokens = blocks[blocks >= 0]  # row-major: region by region, ascending within
    region_pos = blocks.max(dim=1).values if blocks.numel() else torch.zeros(0, dtype=torch.int64)

    if fixed_tokens is None:
        fixed = torch.nonzero(~in_visual).flatten()
    else:
        fixed = torch.as_tensor(fixed_tokens).flatten()
        if fixed.is_floating_point() or fixed.dtype == torch.bool:
            raise ValueError(f"fixed_tokens must be integer positions, got {fixed.dtype}")
        fixed = fixed.cpu().long()
        _check_fixed_tokens(fixed, in_visual)
    layout = GazeLayout(region_ptr.int(), region_tokens.int(), region_pos.int(), fixed.int(),
                        seq_len)
    return layout.to(device) if device is not None else layout


def _check_fixed_tokens(fixed: Tensor, in_region: Tensor, where: str = "") -> None:
    """fixed [F] long positions, -1 padding; in_region [N] bool: the positions in a region.
    ValueError unless every entry is in [-1, N), no position is listed twice (the ops would
    attend it twice) and none is both fixed and in a region (the ops require one or the
    other)."""
    N = in_region.numel()
    if ((fixed < -1) | (fixed >= N)).any():
        raise ValueError(f"fixed_tokens holds positions outside [-1, {N}){where}")
    listed = fixed[fixed >= 0]
    values, counts = torch.unique(listed, return_counts=True)
    if (counts > 1).any():
        raise ValueError(f"fixed_tokens lists positions {values[counts > 1].tolist()[:8]} more "
                         f"than once{where}")
    shared = listed[in_region[listed]]
    if shared.numel():
        raise ValueError(f"positions {sorted(set(shared.tolist()))[:8]} are both in a region "
                         f"and fixed{where}")


def stack_layouts(layouts: Sequence[GazeLayout]) -> GazeLayout:
    """Batch single-sample layouts: pad with empty regions (region_pos 0), unused region
    tokens (0) and -1 fixed tokens; num_keys is the largest."""
    if not layouts:
        raise ValueError("stack_layouts needs at least one layout")
    if any(lay.batched for lay in layouts):
        raise ValueError("stack_layouts takes single-sample (unbatched) layouts")
    R = max(lay.num_regions for lay in layouts)
    T = max(lay.region_tokens.numel() for lay in layouts)
    F = max(lay.fixed_tokens.numel() for lay in layouts)

    def pad(t: Tensor, size: int, value: int) -> Tensor:
        return torch.nn.functional.pad(t, (0, size - t.numel()), value=value)

    ptr = torch.stack([pad(lay.region_ptr, R + 1, int(lay.region_ptr[-1])) for lay in layouts])
    tokens = torch.stack([pad(lay.region_tokens, T, 0) for lay in layouts])
    pos = torch.stack([pad(lay.region_pos, R, 0) for lay in layouts])
    fixed = torch.stack([pad(lay.fixed_tokens, F, -1) for lay in layouts])
    return GazeLayout(ptr, tokens, pos, fixed, max(lay.num_keys for lay in layouts))


def build_batch_layout(samples: Sequence, region_shape: RegionShape = DEFAULT_REGION_SHAPE,
                       device: Optional[Union[str, torch.device]] = None) -> GazeLayout:
    """Ragged batch: ``samples`` holds ``(visuals, seq_len)`` or
    ``(visuals, seq_len, fixed_tokens)`` per sample (see :func:`build_layout`)."""
    layouts = [build_layout(*s[:2], region_shape=region_shape,
                            fixed_tokens=s[2] if len(s) > 2 else None) for s in samples]
    batch = stack_layouts(layouts)
    return batch.to(device) if device is not None else batch


def validate_layout(layout: GazeLayout, num_keys: Optional[int] = None) -> None:
    """Check a (possibly hand-made) layout; raise ValueError naming the first problem.

    Checks: int32 tensors of matching ranks and batch sizes on one device; region_ptr
    starts at 0, never decreases and stays within region_tokens; region tokens in
    [0, N); fixed tokens in [-1, N); region_pos is each non-empty region's largest
    position; no position is listed twice (in two regions, twice in one, twice among the
    fixed tokens, or both in a region and fixed).
    """
    N = layout.num_keys if num_keys is None else num_keys
    names = ("region_ptr", "region_tokens", "region_pos", "fixed_tokens")
    tensors = [getattr(layout, n) for n in names]
    for name, t in zip(names, tensors):
        if not isinstance(t, Tensor) or t.dtype != torch.int32:
            raise ValueError(f"{name} must be an int32 tensor")
        if t.dim() != layout.region_ptr.dim() or t.dim() not in (1, 2):
            raise ValueError(f"{name} must be 1-D, or 2-D like region_ptr; got {t.dim()}-D")
        if t.device != layout.region_ptr.device:
            raise ValueError(f"{name} is on {t.device}, region_ptr on {layout.region_ptr.device}")
    if layout.batched and len({t.shape[0] for t in tensors}) != 1:
        raise ValueError(f"batch sizes differ: {[tuple(t.shape) for t in tensors]}")

    rows = [t.cpu().long() if layout.batched else t.cpu().long()[None] for t in tensors]
    for b, (ptr, tokens, pos, fixed) in enumerate(zip(*rows)):
        where = f" (batch {b})" if layout.batched else ""
        R = ptr.numel() - 1
        if R < 0 or ptr[0] != 0:
            raise ValueError(f"region_ptr must start at 0{where}")
        if (ptr[1:] < ptr[:-1]).any():
            r = int(torch.nonzero(ptr[1:] < ptr[:-1])[0])
            raise ValueError(f"region_ptr decreases at region {r}{where}")
        if ptr[-1] > tokens.numel():
            raise ValueError(f"region_ptr[-1] = {int(ptr[-1])} runs past region_tokens "
                             f"({tokens.numel()} entries){where}")
        if pos.numel() != R:
            raise ValueError(f"region_pos has {pos.numel()} entries, expected R = {R}{where}")
        used = tokens[: int(ptr[-1])]
        if ((used < 0) | (used >= N)).any():
            raise ValueError(f"region_tokens holds positions outside [0, {N}){where}")
        sizes = ptr[1:] - ptr[:-1]
        region_of = torch.repeat_interleave(torch.arange(R), sizes)  # [len(used)]
        largest = torch.full((R,), -1, dtype=torch.long).scatter_reduce(0, region_of, used, "amax")
        wrong = (sizes > 0) & (largest != pos)
        if wrong.any():
            r = int(torch.nonzero(wrong)[0])
            raise ValueError(f"region_pos[{r}] = {int(pos[r])} but the region's largest "
                             f"position is {int(largest[r])}{where}")
        # The ops weigh a key by how often its lists name it; the contract's union names
        # each once, so a hand-made layout must not list a position twice.
        region_count = torch.bincount(used, minlength=N)
        if (region_count > 1).any():
            twice = torch.nonzero(region_count > 1).flatten().tolist()
            raise ValueError(f"positions {twice[:8]} are listed in more than one region "
                             f"(or twice in one){where}")
        _check_fixed_tokens(fixed, region_count > 0, where)
