"""Python entry points of the torch.ops.gaze ops, their fake (meta) kernels and autograd.

Shapes follow ``F.scaled_dot_product_attention``: ``q [B, Hq, Lq, D]``,
``k, v [B, Hkv, N, D]`` with ``Hq % Hkv == 0`` (query head ``h`` uses KV head
``h // (Hq // Hkv)``). Index tensors are int32; a *position* indexes the key axis ``N``.
The region layout (see :mod:`gaze_ext.layout`) is ``region_ptr [R+1]``,
``region_tokens [T]``, ``fixed_tokens [F]`` and ``region_pos [R]``, each optionally
with a leading batch axis ``B``.

dtypes: float32, float16, bfloat16 on every device; float64 on CPU (for gradcheck).
Accumulation, softmax and log-sum-exp run in float32 (float64 for float64 inputs).
Inside ``torch.autocast`` floating operands are cast to the autocast dtype first.
"""
from __future__ import annotations

from typing import Optional, Tuple

import torch
from torch import Tensor

from . import _C  # noqa: F401  (loading the library registers torch.ops.gaze)

__all__ = ["region_pool", "region_topk", "gaze_attention"]


def region_pool(keys: Tensor, region_ptr: Tensor, region_tokens: Tensor) -> Tensor:
    """Region descriptors: the mean of each region's keys.

    Args:
        keys: ``[B, Hkv, N, D]`` float.
        region_ptr: ``[R+1]`` or ``[B, R+1]`` int32, non-decreasing from 0.
        region_tokens: ``[T]`` or ``[B, T]`` int32 key positions; region ``r`` is
            ``region_tokens[..., region_ptr[..., r]:region_ptr[..., r+1]]``.

    Returns:
        ``desc [B, Hkv, R, D]`` in the dtype of ``keys``, summed in float32; an empty
        region gives zeros. Differentiable in ``keys``.
    """
    return torch.ops.gaze.region_pool(keys, region_ptr, region_tokens)


def region_topk(
    q: Tensor,
    desc: Tensor,
    region_ptr: Tensor,
    k: int,
    share_kv: bool = True,
    q_pos: Optional[Tensor] = None,
    region_pos: Optional[Tensor] = None,
) -> Tuple[Tensor, Tensor]:
    """The ``k`` best regions per query by ``score = q . desc`` (float32).

    Args:
        q: ``[B, Hq, Lq, D]``.
        desc: ``[B, Hkv, R, D]``, dtype of ``q`` (from :func:`region_pool`).
        region_ptr: ``[R+1]`` or ``[B, R+1]`` int32: empty regions are never selected.
        k: slots per query, ``>= 1``; ``k >= R`` selects every selectable region.
        share_kv: one selection per KV head, from the mean score of its query heads
            (``Hs = Hkv``); otherwise one per query head (``Hs = Hq``).
        q_pos: ``[B, Lq]`` int32 query positions; with it a region is selectable only
            if ``region_pos <= q_pos`` (needs ``region_pos``).
        region_pos: ``[R]`` or ``[B, R]`` int32, the largest position of each region.

    Returns:
        ``idx`` int32 and ``score`` float32, both ``[B, Hs, Lq, k]``: descending score,
        ties to the lower region index (NaN scores last); ``-1`` / ``-inf`` past the
        selectable count. Not differentiable.
    """
    return torch.ops.gaze.region_topk(q, desc, region_ptr, k, share_kv, q_pos, region_pos)


def gaze_attention(
    q: Tensor,
    k: Tensor,
    v: Tensor,
    region_ptr: Tensor,
    region_tokens: Tensor,
    fixed_tokens: Tensor,
    idx: Tensor,
    q_pos: Optional[Tensor] = None,
    scale: Optional[float] = None,
) -> Tuple[Tensor, Tensor]:
    """Attention of each query over the fixed tokens and the tokens of its selected regions.

    Args:
        q: ``[B, Hq, Lq, D]``; ``k``, ``v``: ``[B, Hkv, N, D]``, same dtype.
        region_ptr, region_tokens: the region layout (see :func:`region_pool`).
        fixed_tokens: ``[F]`` or ``[B, F]`` int32 positions every query sees; ``-1`` is padding
            (on CUDA the split-K kernels walk padding entries as they walk keys: keep it short).
        idx: ``[B, Hs, Lq, K]`` int32 selected regions, ``Hs`` = ``Hq`` or ``Hkv`` (query
            head ``h`` reads row ``h`` or ``h // G``); ``-1`` slots are skipped and a region
            equal to the last one taken counts once.
        q_pos: ``[B, Lq]`` int32; with it only keys at positions ``<= q_pos`` are visible.
        scale: softmax scale, default ``D ** -0.5``.

    Returns:
        ``out [B, Hq, Lq, D]`` (dtype of ``q``) and ``lse [B, Hq, Lq]`` float32, the natural
        log of the softmax denominator. A query that sees no key gives ``out = 0`` and
        ``lse = -inf``; one with a NaN or ``+inf`` score gives NaN ``out``, ``lse`` and
        gradients, as SDPA does. Differentiable in ``q``, ``k``, ``v`` (and through ``lse``).
    """
    if scale is None:  # (D = 0: every logit is 0, whatever the scale)
        scale = q.shape[-1] ** -0.5 if q.shape[-1] > 0 else 1.0
    return torch.ops.gaze.gaze_attention(
        q, k, v, region_ptr, region_tokens, fixed_tokens, idx, q_pos, float(scale)
    )


# ----------------------------------------------------------------------------
# Fake kernels: output metadata only, for torch.compile and meta tensors.
# ----------------------------------------------------------------------------
def _acc_dtype(dtype: torch.dtype) -> torch.dtype:
    return torch.float64 if dtype == torch.float64 else torch.float32


@torch.library.register_fake("gaze::region_pool")
def _region_pool_fake(keys, region_ptr, region_tokens):
    B, H, _, D = keys.shape
    return keys.new_empty((B, H, region_ptr.shape[-1] - 1, D))


@torch.library.register_fake("gaze::region_pool_backward")
def _region_pool_backward_fake(grad_desc, region_ptr, region_tokens, num_keys):
    B, H, _, D = grad_desc.shape
    return grad_desc.new_empty((B, H, num_keys, D))


@torch.library.register_fake("gaze::region_topk")
def _region_topk_fake(q, desc, region_ptr, k, share_kv, q_pos, region_pos):
    B, Hq, Lq, _ = q.shape
    Hs = desc.shape[1] if share_kv else Hq
    idx = q.new_empty((B, Hs, Lq, k), dtype=torch.int32)
    score = q.new_empty((B, Hs, Lq, k), dtype=torch.float32)
    return idx, score


@torch.library.register_fake("gaze::gaze_attention")
def _gaze_attention_fake(q, k, v, region_ptr, region_tokens, fixed_tokens, idx, q_pos, scale):
    B, Hq, Lq, D = q.shape
    out = q.new_empty((B, Hq, Lq, D))
    lse = q.new_empty((B, Hq, Lq), dtype=_acc_dtype(q.dtype))
    return out, lse


@torch.library.register_fake("gaze::gaze_attention_backward")
def _gaze_attention_backward_fake(grad_out, grad_lse, q, k, v, out, lse, region_ptr,
                                  region_tokens, fixed_tokens, idx, q_pos, scale):
    return q.new_empty(q.shape), k.new_empty(k.shape), v.new_empty(v.shape)


# ----------------------------------------------------------------------------
# Autograd: backward formulas call registered ops, so they trace under torch.compile.
# ----------------------------------------------------------------------------
def _region_pool_setup(ctx, inputs, output):
    keys, region_ptr, region_tokens = inputs
    ctx.save_for_backward(region_ptr, region_tokens)
    ctx.num_keys = keys.shape[2]


def _region_pool_backward(ctx, grad_desc):
    region_ptr, region_tokens = ctx.saved_tensors
    grad_keys = torch.ops.gaze.region_pool_backward(
        grad_desc, region_ptr, region_tokens, ctx.num_keys
    )
    return grad_keys, None, None


torch.library.register_autograd(
    "gaze::region_pool", _region_pool_backward, setup_context=_region_pool_setup
)


def _gaze_attention_setup(ctx, inputs, output):
    q, k, v, region_ptr, region_tokens, fixed_tokens, idx, q_pos, scale = inputs
    out, lse = output
    ctx.save_for_backward(q, k, v, out, lse, region_ptr, region_tokens, fixed_tokens, idx, q_pos)
    ctx.scale = scale


def _gaze_attention_backward(ctx, grad_out, grad_lse):
    q, k, v, out, lse, region_ptr, region_tokens, fixed_tokens, idx, q_pos = ctx.saved_tensors
    # Neither gradient is None: autograd passes zeros for an output that was not used.
    dq, dk, dv = torch.ops.gaze.gaze_attention_backward(
        grad_out, grad_lse, q, k, v, out, lse, region_ptr, region_tokens, fixed_tokens, idx,
        q_pos, ctx.scale,
    )
    return dq, dk, dv, None, None, None, None, None, None


torch.library.register_autograd(
    "gaze::gaze_attention", _gaze_attention_backward, setup_context=_gaze_attention_setup
)


# ----------------------------------------------------------------------------
# Autocast: inside torch.autocast the ops run in the region's lower-precision dtype, as
# F.scaled_dot_product_attention does, so float32 and 16-bit operands are cast rather than
# refused as mixed. (torch.library.register_autocast casts to a dtype fixed when it is
# registered; these kernels read the region's dtype at each call.)
# ----------------------------------------------------------------------------
def _autocast_kernel(op, device_type: str):
    def kernel(*args):
        dtype = torch.get_autocast_dtype(device_type)
        cast = [a.to(dtype) if isinstance(a, Tensor) and a.is_floating_point()
                and a.dtype != torch.float64 else a for a in args]  # float64 stays, as in torch
        with torch.autocast(device_type, enabled=False):
            return op(*cast)
    return kernel


_autocast_lib = torch.library.Library("gaze", "IMPL")
for _name in ("region_pool", "region_topk", "gaze_attention"):
    for _device, _key in (("cpu", "AutocastCPU"), ("cuda", "AutocastCUDA")):
        _autocast_lib.impl(_name, _autocast_kernel(getattr(torch.ops.gaze, _name).default, _device),
                           _key)
