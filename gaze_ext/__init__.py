"""gaze_ext: Gaze Attention (arXiv 2605.13080) kernels as torch.ops.gaze, and the layers above them.

- ``gaze_ext.ops``: region_pool, region_topk, gaze_attention (CPU and CUDA kernels)
- ``gaze_ext.layout``: region layouts from image/frame grids, and their validator
- ``gaze_ext.gaze_attention``: pool -> top-k -> attention in one call
- ``gaze_ext.reference``: pure-PyTorch oracles of the ops
"""
import torch  # noqa: F401  (the extension links against torch's libraries)

from . import ops, reference
from ._C import build_info
from .functional import GazeAttentionOutput, gaze_attention
from .layout import (GazeLayout, Visual, build_batch_layout, build_layout, stack_layouts,
                     validate_layout)

__version__ = "0.1.0"

__all__ = [
    "ops", "reference", "build_info", "gaze_attention", "GazeAttentionOutput", "GazeLayout",
    "Visual", "build_layout", "build_batch_layout", "stack_layouts", "validate_layout",
]
