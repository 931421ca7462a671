"""FlexAttention as a peer: what a researcher would write instead of these kernels.

torch's `flex_attention` (compiled) is told to see exactly the keys gaze_attention sees,
through a mask_mod over (batch, head, query, key) built from the same selection. Its block
mask skips a 128 x 128 (query, key) block only when no query of the block sees any of its
keys. The regions of an image are spatial patches of a row-major token grid, so each one
touches several key blocks: with 10% of the regions selected, a decode step's mask still
computes about half the blocks, and 128 prefill queries together nearly all of them, while
gaze_attention gathers exactly the selected rows. The benchmarks report the share of blocks
it computes next to its time.
"""
from __future__ import annotations

from typing import Callable, Dict, List, NamedTuple, Optional, Union

import torch


class KeyMaps(NamedTuple):
    """What a layout says of each key, for mask_mods: built once per layout, not per step."""
    region_of: torch.Tensor  # [N] long: the region listing key n, R when none
    is_fixed: torch.Tensor   # [N] bool: key n is a fixed token
    num_regions: int


def key_maps(layout, num_keys: int, device) -> KeyMaps:
    """KeyMaps of a layout shared by the batch in which no key sits in two regions
    (build_layout's)."""
    if layout.region_ptr.dim() != 1:
        raise ValueError("key_maps takes a layout shared by the batch")
    ptr = layout.region_ptr.long().to(device)
    R = ptr.numel() - 1
    listed = layout.region_tokens.long().to(device)[: int(ptr[-1])]
    region_of = torch.full((num_keys,), R, dtype=torch.long, device=device)
    region_of[listed] = torch.repeat_interleave(torch.arange(R, device=device), ptr.diff())
    if (torch.bincount(listed, minlength=num_keys) > 1).any():
        raise ValueError("key_maps: a key listed twice has no single region")
    fixed = layout.fixed_tokens.long().to(device)
    is_fixed = torch.zeros(num_keys, dtype=torch.bool, device=device)
    is_fixed[fixed[fixed >= 0]] = True
    return KeyMaps(region_of, is_fixed, R)


def selection_mask_mod(maps: KeyMaps, idx: torch.Tensor, q_pos: Optional[torch.Tensor],
                       q_heads: int) -> Callable:
    """mask_mod(b, h, i, n): whether gaze_attention's query (b, h, i) sees key n under the
    selection idx [B, Hs, Lq, K]: n is a fixed token or in a selected region, and n <= q_pos."""
    device, R, N = idx.device, maps.num_regions, maps.region_of.numel()
    B, Hs, Lq, _ = idx.shape
    chosen = torch.zeros(B, Hs, Lq, R + 1, dtype=torch.bool, device=device)  # [..., R]: none
    slots = idx.long()
    chosen.scatter_(3, torch.where(slots >= 0, slots, R), True)
    chosen[..., R] = False
    limit = (q_pos.long() if q_pos is not None
             else torch.full((B, Lq), N, dtype=torch.long, device=device))
    group = q_heads // Hs
    region_of, is_fixed = maps.region_of, maps.is_fixed

    def mask_mod(b, h, i, n):
        return (n <= limit[b, i]) & (is_fixed[n] | chosen[b, h // group, i, region_of[n]])
    return mask_mod


def selection_block_mask(maps: KeyMaps, idx, q_pos, q_heads: int, q_len: int):
    """FlexAttention's BlockMask for selection_mask_mod (one per query head, as enable_gqa
    needs), built by torch's create_block_mask: what a step redoes when its selection
    changes."""
    from torch.nn.attention.flex_attention import create_block_mask
    mask_mod = selection_mask_mod(maps, idx, q_pos, q_heads)
    return create_block_mask(mask_mod, idx.shape[0], q_heads, q_len, maps.region_of.numel(),
                             device=idx.device.type)


def computed_share(block_mask, num_keys: int) -> float:
    """The share of the (query block, key block) pairs FlexAttention computes. Counted here:
    torch 2.11's BlockMask.sparsity() divides blocks by elements, which is wrong when a
    length is not a multiple of the block size."""
    computed = block_mask.kv_num_blocks.sum()
    if block_mask.full_kv_num_blocks is not None:
        computed = computed + block_mask.full_kv_num_blocks.sum()
    key_blocks = -(-num_keys // block_mask.BLOCK_SIZE[1])
    return computed.item() / (block_mask.kv_num_blocks.numel() * key_blocks)


# An output difference from gaze_attention beyond this share of its largest magnitude is
# more than 16-bit rounding: the reports then check the mask with eager flex_attention too.
DISAGREEMENT = 1e-2


def facts(block_mask, num_keys: int, out: torch.Tensor, gaze_out: torch.Tensor,
          eager_out: Callable[[], torch.Tensor]) -> Dict[str, float]:
    """What the reports say of one run of the peer: the share of blocks it computes and the
    largest difference of its output from gaze_attention's. When that difference is not
    small, also eager flex_attention's with the same mask (eager_out() computes it), which
    tells a wrong mask from a wrong compiled kernel. (On the 2-core AMD EPYC that CI had on
    2026-12-06, torch 2.14.1's compiled CPU kernel returned NaN in a few rows, or rows off by
    ~1, in some processes and not others, with enable_gqa or without; eager: 3e-7.)"""
    def max_abs_diff(candidate: torch.Tensor) -> float:
        return (candidate.float() - gaze_out.float()).abs().max().item()
    result = dict(computed_share=computed_share(block_mask, num_keys),
                  max_abs_diff=max_abs_diff(out))
    scale = max(1.0, gaze_out.float().abs().max().item())
    if not result["max_abs_diff"] <= DISAGREEMENT * scale:  # also when it is NaN
        try:
            result["eager_max_abs_diff"] = max_abs_diff(eager_out())
        except Exception as error:  # reported with the compiled figure, not fatal
            result["eager_error"] = describe_error(error)
    return result


def eager_flex_attention() -> Callable:
    """compiled_flex_attention's function without torch.compile: the mask_mod evaluated on
    every (query, key) pair, slow and memory-hungry but independent of the compiled kernel."""
    import warnings
    from torch.nn.attention.flex_attention import flex_attention

    def attend(q, k, v, block_mask):
        with warnings.catch_warnings():  # "use torch.compile": that is the other figure
            warnings.simplefilter("ignore")
            return flex_attention(q, k, v, block_mask=block_mask, enable_gqa=True)
    return attend


def compiled_flex_attention() -> Callable:
    """(q, k, v, block_mask) -> out, through torch.compile (FlexAttention's fast path); K/V
    heads shared by groups of query heads, as gaze_attention takes them."""
    from torch.nn.attention.flex_attention import flex_attention
    compiled = torch.compile(flex_attention, dynamic=False)
    return lambda q, k, v, block_mask: compiled(q, k, v, block_mask=block_mask, enable_gqa=True)


def describe_error(error: BaseException) -> str:
    """One line for a report: why the peer could not run here."""
    first = str(error).strip().splitlines()[0] if str(error).strip() else ""
    return f"{type(error).__name__}: {first[:200]}"


def report_lines(facts: Union[None, str, Dict[str, Dict[str, float]]]) -> List[str]:
    """Report lines on the peer: for each {label: facts}, the share of blocks it computes and
    its agreement with gaze_attention; or the reason it did not run."""
    if facts is None:
        return []
    if isinstance(facts, str):
        return [f"- FlexAttention peer: {facts}"]
    return [f"- FlexAttention, {label}: computes {fact['computed_share']:.0%} of its (query "
            f"block, key block) pairs; max |out - gaze_attention's out| = "
            f"{fact['max_abs_diff']:.2g}{eager_note(fact)}" for label, fact in facts.items()]


def eager_note(fact: Dict[str, float]) -> str:
    if "eager_max_abs_diff" in fact:
        return (f" (torch's compiled kernel; eager flex_attention with the same mask: "
                f"{fact['eager_max_abs_diff']:.2g})")
    if "eager_error" in fact:
        return f" (eager flex_attention with the same mask could not run: {fact['eager_error']})"
    return ""
