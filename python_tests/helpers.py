"""Shared test helpers: devices, random layouts and the error rules against the reference."""
from __future__ import annotations

from typing import List, Optional

import pytest
import torch

import gaze_ext
from gaze_ext.layout import GazeLayout, stack_layouts

DTYPES = [torch.float32, torch.float16, torch.bfloat16]


def cuda_ready() -> bool:
    return torch.cuda.is_available() and gaze_ext.build_info()["cuda"]


DEVICES = ["cpu", pytest.param("cuda", marks=pytest.mark.skipif(
    not cuda_ready(), reason="needs a GPU and the CUDA kernels"))]


def random_layout(gen: torch.Generator, num_keys: int, max_regions: int = 8,
                  max_region_size: int = 9, empty_regions: bool = True,
                  fixed_fraction: float = 0.5, fixed_padding: int = 2) -> GazeLayout:
    """A hand-made-style layout of one sample: regions of random sizes (some empty) over
    random distinct positions, ascending within a region; a random part of the remaining
    positions fixed (in random order, with -1 padding); the rest in no list."""
    perm = torch.randperm(num_keys, generator=gen)
    R = int(torch.randint(0, max_regions + 1, (1,), generator=gen))
    sizes = torch.randint(0 if empty_regions else 1, max_region_size + 1, (R,), generator=gen)
    sizes = sizes.clamp(max=num_keys)
    tokens, ptr, pos, used = [], [0], [], 0
    for size in sizes.tolist():
        size = min(size, num_keys - used)
        members = perm[used: used + size].sort().values
        used += size
        tokens.append(members)
        ptr.append(ptr[-1] + size)
        pos.append(int(members.max()) if size else 0)
    rest = perm[used:]
    n_fixed = int(round(fixed_fraction * rest.numel()))
    fixed = rest[torch.randperm(rest.numel(), generator=gen)[:n_fixed]]
    pad_at = torch.randint(0, fixed.numel() + 1, (fixed_padding,), generator=gen)
    fixed = fixed.tolist()
    for p in sorted(pad_at.tolist(), reverse=True):
        fixed.insert(p, -1)
    as_int = lambda x: torch.tensor(x, dtype=torch.int32)  # noqa: E731
    return GazeLayout(as_int(ptr), torch.cat(tokens).int() if tokens else as_int([]),
                      as_int(pos), as_int(fixed), num_keys)


def random_batch_layout(gen: torch.Generator, batch: int, num_keys: int,
                        shared: bool = False, **kwargs) -> GazeLayout:
    if shared:
        return random_layout(gen, num_keys, **kwargs)
    return stack_layouts([random_layout(gen, num_keys, **kwargs) for _ in range(batch)])


def random_selection(gen: torch.Generator, shape, num_regions: int,
                     repeats: bool = True) -> torch.Tensor:
    """idx int32 of `shape` with entries in [-1, R): random regions, -1 slots, and
    (with repeats) some regions listed twice in a row or twice apart."""
    idx = torch.randint(-1, max(num_regions, 0), shape, generator=gen, dtype=torch.int32)
    if repeats and shape[-1] > 1:
        dup = torch.rand(shape[:-1] + (shape[-1] - 1,), generator=gen) < 0.2
        idx[..., 1:] = torch.where(dup, idx[..., :-1], idx[..., 1:])
    return idx


def random_tensor(gen: torch.Generator, shape, dtype: torch.dtype, device: str,
                  strided=False) -> torch.Tensor:
    """Normal values. strided=True: a view with permuted, padded strides ([B, L, H, D]
    storage, every other head, padded rows); strided="last": also a stride of 2 on D."""
    if not strided:
        return torch.randn(shape, generator=gen).to(device=device, dtype=dtype)
    B, H, L, D = shape
    step = 2 if strided == "last" else 1
    base = torch.randn(B, L + 1, 2 * H, step * D + 3, generator=gen).to(device=device,
                                                                      dtype=dtype)
    return base[:, :L, ::2, : step * D: step].transpose(1, 2)


def error_bound_check(name: str, value: torch.Tensor, ref: torch.Tensor,
                      same_dtype_ref: torch.Tensor, factor: float, atol: float) -> None:
    """The kernel's error against the high-precision reference is at most `factor` times
    that of the same-dtype PyTorch reference, plus atol."""
    assert value.shape == ref.shape, f"{name}: shape {value.shape} vs {ref.shape}"
    finite = torch.isfinite(ref)
    assert torch.equal(torch.isfinite(value), finite), f"{name}: inf/NaN pattern differs"
    value, ref, same = value.double()[finite], ref.double()[finite], same_dtype_ref.double()[finite]
    err = (value - ref).abs().max().item() if value.numel() else 0.0
    base = (same - ref).abs().max().item() if value.numel() else 0.0
    assert err <= factor * base + atol, (
        f"{name}: max error {err:.3g} > {factor} x same-dtype reference error {base:.3g} + {atol}")


def atol_for(dtype: torch.dtype) -> float:
    return {torch.float32: 1e-5, torch.float64: 1e-10, torch.float16: 1e-3,
            torch.bfloat16: 8e-3}[dtype]


def high_precision(dtype: torch.dtype) -> torch.dtype:
    """The reference precision for a kernel dtype: float64 for float32, else float32."""
    return torch.float64 if dtype in (torch.float32, torch.float64) else torch.float32


def seeds(n: int, base: int = 0) -> List[int]:
    return list(range(base, base + n))


def generator(seed: int) -> torch.Generator:
    return torch.Generator().manual_seed(seed)


def q_positions(gen: torch.Generator, batch: int, q_len: int, num_keys: int,
                low: Optional[int] = None) -> torch.Tensor:
    low = -1 if low is None else low
    return torch.randint(low, num_keys + 1, (batch, q_len), generator=gen, dtype=torch.int32)

