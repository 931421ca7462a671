"""Shared test helpers: devices, random layouts and the error rules against the reference."""
from __future__ import annotations

import contextlib
import os
import subprocess
import sys
from typing import List, Optional

import pytest
import torch

import gaze_ext
from gaze_ext.layout import GazeLayout, stack_layouts

DTYPES = [torch.float32, torch.float16, torch.bfloat16]

# The test files of the CPU kernels themselves, which test_cpu_isa.py and
# test_cpu_sanitized.py run again in other processes.
KERNEL_TESTS = ["test_region_pool.py", "test_region_topk.py", "test_gaze_attention.py",
                "test_fuzz.py"]


def simd_level_used(isa: Optional[str] = None) -> str:
    """The vector level the CPU kernels of a new process use, with GAZE_CPU_ISA=isa (None:
    unset, the widest this CPU has); a level the CPU lacks falls back to a lower one."""
    env = {k: v for k, v in os.environ.items() if k != "GAZE_CPU_ISA"}
    if isa is not None:
        env["GAZE_CPU_ISA"] = isa
    probe = subprocess.run(
        [sys.executable, "-c", "import gaze_ext; print(gaze_ext.build_info()['cpu_simd'])"],
        env=env, capture_output=True, text=True, check=True)
    return probe.stdout.strip()


@contextlib.contextmanager
def cpu_threads(n: int):
    """torch's CPU thread count set to n inside the block."""
    before = torch.get_num_threads()
    torch.set_num_threads(n)
    try:
        yield
    finally:
        torch.set_num_threads(before)


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


def topk_many_regions(seed: int, regions: int, q_heads: int, q_len: int, kv_heads: int = 2,
                      head_dim: int = 8):
    """Small integer-valued q [1, q_heads, q_len, D] and descriptors [1, kv_heads, R, D] over
    one-key regions, for top-k beyond shared memory (ties decided by the tie rule)."""
    gen = generator(seed)
    ptr = torch.arange(regions + 1, dtype=torch.int32)
    q = torch.randint(-3, 4, (1, q_heads, q_len, head_dim), generator=gen).float()
    desc = torch.randint(-3, 4, (1, kv_heads, regions, head_dim), generator=gen).float()
    return q, desc, ptr


TILED_CASES = [
    # B, Hq, Hkv, Lq, N, D, selection heads, causal, k, strided q/k/v
    (2, 8, 2, 37, 400, 128, "kv", True, 12, False),  # 16 positions per tile, a ragged last tile
    (1, 4, 4, 70, 300, 64, "kv", False, 9, True),    # G = 1: 64 positions per tile
    (2, 12, 2, 20, 350, 64, "kv", True, 20, False),  # G = 6: 10 positions, 4 idle rows
    (1, 4, 1, 90, 500, 128, "q", True, 30, False),   # one selection per query head
    (1, 2, 1, 40, 200, 128, "kv", True, 200, True),  # k >= R: 10 positions (entries bound)
    (1, 8, 2, 33, 200, 64, "kv", True, 0, False),    # no slots: fixed tokens only
    (2, 8, 2, 19, 250, 80, "kv", True, 8, False),    # head dims 80 and 96
    (1, 4, 4, 40, 260, 96, "kv", False, 6, True),
]


def aligned_tensor(gen: torch.Generator, shape, dtype: torch.dtype, strided: bool,
                   device: str) -> torch.Tensor:
    """Normal values; strided: a [B, L, H, D] storage with padded rows, viewed as
    [B, H, L, D], every row still 16-byte aligned (the tensor-core kernels' requirement)."""
    if not strided:
        return torch.randn(shape, generator=gen).to(device, dtype)
    B, H, L, D = shape
    return torch.randn(B, L, H, D + 8, generator=gen).to(device, dtype)[..., :D].transpose(1, 2)


def tiled_case(case: int, dtype: torch.dtype, device: str):
    """TILED_CASES[case]: (generator, layout, idx, q_pos or None, [q, k, v]), the index
    tensors on the CPU, q/k/v on `device`."""
    row = TILED_CASES[case]
    gen = generator(2000 + case)
    layout = random_batch_layout(gen, row[0], row[4], max_regions=40, max_region_size=16)
    idx, q_pos, qkv = case_inputs(gen, row, layout,
                                  lambda s: aligned_tensor(gen, s, dtype, row[-1], device))
    return gen, layout, idx, q_pos, qkv


def case_inputs(gen: torch.Generator, row, layout: GazeLayout, make_tensor):
    """A TILED_CASES or SPLIT_CASES row's idx, q_pos (or None) and [q, k, v], each made
    by make_tensor(shape)."""
    B, Hq, Hkv, Lq, N, D, sel, causal, K, _ = row
    Hs = Hkv if sel == "kv" else Hq
    idx = random_selection(gen, (B, Hs, Lq, K), layout.num_regions)
    q_pos = q_positions(gen, B, Lq, N) if causal else None
    qkv = [make_tensor(s) for s in qkv_shapes(B, Hq, Hkv, Lq, N, D)]
    return idx, q_pos, qkv


def qkv_shapes(B: int, Hq: int, Hkv: int, Lq: int, N: int, D: int):
    """The shapes of q [B, Hq, Lq, D], k and v [B, Hkv, N, D]."""
    return (B, Hq, Lq, D), (B, Hkv, N, D), (B, Hkv, N, D)


def mixed_layouts_case(device: str):
    """K contiguous, q and V padded [B, L, H, D + 8] views (rows 16-byte aligned), bf16:
    (generator, layout, idx, q_pos, [q, k, v] on `device`)."""
    gen = generator(19)
    B, Hq, Hkv, Lq, N, D = 2, 8, 2, 20, 300, 64
    layout = random_batch_layout(gen, B, N, max_regions=30, max_region_size=12)
    idx = random_selection(gen, (B, Hkv, Lq, 6), layout.num_regions)
    q_pos = q_positions(gen, B, Lq, N)
    qkv = [aligned_tensor(gen, s, torch.bfloat16, strided, device)
           for s, strided in zip(qkv_shapes(B, Hq, Hkv, Lq, N, D), (True, False, True))]
    assert qkv[1].stride() != qkv[2].stride()
    return gen, layout, idx, q_pos, qkv


# One axis empty at a time: (B, Lq, N, D, with regions), for test_fuzz and gaze_sim.
ZERO_SIZE_CASES = [(0, 2, 30, 8, True), (2, 0, 30, 8, True), (2, 2, 0, 8, False),
                   (2, 2, 30, 0, True), (2, 2, 30, 8, False)]
ZERO_SIZE_IDS = ["B=0", "Lq=0", "N=0", "D=0", "R=0"]


def zero_size_case(B: int, Lq: int, N: int, D: int, regions: bool):
    """A ZERO_SIZE_CASES row: (shared layout, [q, k, v] on the CPU), Hq = 4, Hkv = 2."""
    gen = generator(77)
    layout = random_batch_layout(gen, B, N, shared=True, max_regions=5 if regions else 0)
    return layout, [torch.randn(s, generator=gen) for s in qkv_shapes(B, 4, 2, Lq, N, D)]


SPLIT_CASES = [
    # B, Hq, Hkv, Lq, N, D, selection heads, causal, k, strided
    (2, 8, 2, 1, 300, 128, "kv", False, 8, False),     # decode, G = 4
    (1, 8, 1, 2, 400, 64, "kv", True, 20, True),       # G = 8, strided
    (2, 4, 4, 3, 250, 96, "q", True, 6, False),        # per-head selection
    (1, 6, 2, 1, 6000, 64, "kv", False, 700, False),   # many slots: several splits, merged
    (1, 2, 1, 2, 300, 256, "q", False, 5, False),      # head dim 256
    (1, 2, 2, 2, 200, 40, "kv", True, 0, "last"),      # no slots; D = 40; unit-stride-free rows
    (1, 12, 1, 2, 300, 64, "kv", True, 10, False),     # G = 12: two head chunks, the last of 4
    (2, 4, 2, 2, 300, 64, "q", True, 8, False),        # per-head selection over 2 KV heads
]


def split_case(case: int, dtype: torch.dtype, device: str = "cpu"):
    """SPLIT_CASES[case] (shapes for the split-K kernels): (generator, [q, k, v] on
    `device`, (region_ptr, region_tokens, fixed_tokens, idx, q_pos or None, scale) on
    the CPU)."""
    row = SPLIT_CASES[case]
    B, N = row[0], row[4]
    gen = generator(300 + case)
    if N > 1000:
        layout = gaze_ext.build_layout([(0, 40, 12, 12)], N, region_shape=(1, 2, 3))
    else:
        layout = random_batch_layout(gen, B, N, max_regions=40, max_region_size=12)
    idx, q_pos, qkv = case_inputs(gen, row, layout,
                                  lambda s: random_tensor(gen, s, dtype, device, row[-1]))
    args = (layout.region_ptr, layout.region_tokens, layout.fixed_tokens, idx, q_pos, 0.3)
    return gen, qkv, args
