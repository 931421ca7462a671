"""A small multimodal decoder built on GazeAttentionBlock: RMSNorm, SwiGLU, learnable
context tokens, a visual projection, and generate() with the Gaze KV cache."""
from __future__ import annotations

from typing import List, Optional, Sequence

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from .block import GazeAttentionBlock, GazeKVCache
from .layout import DEFAULT_REGION_SHAPE
from .multimodal import ContextTokens, MultimodalLayout


class SwiGLU(nn.Module):
    def __init__(self, d_model: int, hidden: int):
        super().__init__()
        self.gate = nn.Linear(d_model, hidden, bias=False)
        self.up = nn.Linear(d_model, hidden, bias=False)
        self.down = nn.Linear(hidden, d_model, bias=False)

    def forward(self, x: Tensor) -> Tensor:
        return self.down(F.silu(self.gate(x)) * self.up(x))


class DecoderLayer(nn.Module):
    def __init__(self, d_model: int, num_heads: int, num_kv_heads: int, mlp_hidden: int,
                 share_kv: bool):
        super().__init__()
        self.attn_norm = nn.RMSNorm(d_model)
        self.attn = GazeAttentionBlock(d_model, num_heads, num_kv_heads, share_kv=share_kv)
        self.mlp_norm = nn.RMSNorm(d_model)
        self.mlp = SwiGLU(d_model, mlp_hidden)

    def forward(self, x, layout, topk, cache=None, layer=0, reference=False):
        h = self.attn_norm(x)
        if reference:
            x = x + self.attn.reference_forward(h, layout, topk)
        else:
            x = x + self.attn(h, layout, topk, cache, layer)
        return x + self.mlp(self.mlp_norm(x))


class GazeLM(nn.Module):
    """Text tokens and visual features in, next-token logits out.

    A sample is a list of parts: LongTensor text ids [n], or visual features [h, w, F]
    (an image) / [t, h, w, F] (video frames), projected to d_model; context tokens
    follow every image and frame.
    """

    def __init__(self, vocab_size: int, visual_dim: int, d_model: int = 128, num_layers: int = 2,
                 num_heads: int = 4, num_kv_heads: int = 2, mlp_hidden: Optional[int] = None,
                 num_context: int = 4, region_shape=DEFAULT_REGION_SHAPE, share_kv: bool = True):
        super().__init__()
        self.region_shape = tuple(region_shape)
        self.embed = nn.Embedding(vocab_size, d_model)
        self.visual_proj = nn.Linear(visual_dim, d_model)
        self.context = ContextTokens(d_model, num_context)
        self.layers = nn.ModuleList(
            DecoderLayer(d_model, num_heads, num_kv_heads, mlp_hidden or 4 * d_model, share_kv)
            for _ in range(num_layers))
        self.norm = nn.RMSNorm(d_model)
        self.lm_head = nn.Linear(d_model, vocab_size, bias=False)

    def embed_batch(self, samples: Sequence[Sequence[Tensor]]):
        """(x [B, L, d], layout) for a batch of samples."""
        parts = [[self.embed(p) if p.dtype == torch.long else self.visual_proj(p) for p in s]
                 for s in samples]
        return self.context(parts, self.region_shape)

    def forward(self, x: Tensor, layout: MultimodalLayout, topk: Optional[int] = None,
                cache: Optional[GazeKVCache] = None, reference: bool = False) -> Tensor:
        """Logits [B, L, V]. reference=True runs every block's pure-PyTorch reference."""
        for i, layer in enumerate(self.layers):
            x = layer(x, layout, topk, cache, i, reference)
        return self.lm_head(self.norm(x))

    def new_cache(self, batch: int, max_len: int, device=None, dtype=torch.float32) -> GazeKVCache:
        attn = self.layers[0].attn
        return GazeKVCache(len(self.layers), batch, attn.num_kv_heads, attn.head_dim, max_len,
                           dtype, device)

    @torch.no_grad()
    def generate(self, samples: Sequence[Sequence[Tensor]], max_new_tokens: int,
                 topk: Optional[int] = None, return_logits: bool = False):
        """Greedy decoding with the cache: returns new tokens [B, T] (and their logits
        [B, T, V] with return_logits)."""
        x, layout = self.embed_batch(samples)
        B = x.shape[0]
        # inside torch.autocast the projections give keys and values in its dtype
        device_type = x.device.type
        dtype = (torch.get_autocast_dtype(device_type) if torch.is_autocast_enabled(device_type)
                 else x.dtype)
        cache = self.new_cache(B, layout.seq_len + max_new_tokens, x.device, dtype)
        cache.start(layout)
        logits = self.forward(x, layout, topk, cache)
        last = logits.gather(1, (layout.lengths - 1)[:, None, None].expand(B, 1, logits.shape[-1]))
        tokens: List[Tensor] = []
        step_logits: List[Tensor] = []
        for step in range(max_new_tokens):
            step_logits.append(last[:, 0])
            token = last[:, 0].argmax(-1)
            tokens.append(token)
            if step + 1 == max_new_tokens:
                break
            cache.begin_step()
            last = self.forward(self.embed(token)[:, None], None, topk, cache)
            cache.end_step()
        out = torch.stack(tokens, 1)
        return (out, torch.stack(step_logits, 1)) if return_logits else out
