"""The progressive top-K schedule of Gaze Attention training: dense attention first, then K
lowered to its target over a number of steps."""
from __future__ import annotations

import math
from dataclasses import dataclass
from typing import Optional


@dataclass(frozen=True)
class TopKSchedule:
    """``schedule(step)`` gives the K to train with at ``step``, ``None`` meaning dense.

    Args:
        target: the final K.
        num_regions: regions per image/frame (dense = all of them); K starts here.
        dense_steps: steps of dense attention before K starts to fall.
        decay_steps: steps over which K falls from num_regions to target (0: at once).
        kind: "linear", "cosine" (slow start and end) or "constant" (K = target from the
            first step after dense_steps).
    """

    target: int
    num_regions: int
    dense_steps: int = 0
    decay_steps: int = 0
    kind: str = "linear"

    def __post_init__(self):
        if self.kind not in ("linear", "cosine", "constant"):
            raise ValueError(f"kind must be linear, cosine or constant, got {self.kind!r}")
        if not 1 <= self.target:
            raise ValueError(f"target must be >= 1, got {self.target}")
        if self.dense_steps < 0 or self.decay_steps < 0:
            raise ValueError("dense_steps and decay_steps must be >= 0")

    def fraction(self, step: int) -> float:
        """How far K has fallen: 0 (dense) to 1 (target)."""
        if step < self.dense_steps:
            return 0.0
        if self.kind == "constant" or self.decay_steps == 0:
            return 1.0
        t = min(1.0, (step - self.dense_steps) / self.decay_steps)
        return t if self.kind == "linear" else 0.5 - 0.5 * math.cos(math.pi * t)

    def __call__(self, step: int) -> Optional[int]:
        start = max(self.num_regions, self.target)
        k = round(start - self.fraction(step) * (start - self.target))
        return None if k >= self.num_regions else k
