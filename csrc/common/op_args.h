// Validation of each op's arguments, shared by its CPU and CUDA entry points so
// both reject exactly the same inputs with the same messages.
#pragma once

#include <ATen/core/Tensor.h>

#include <optional>

#include "checks.h"
#include "layout.h"

namespace gaze {

// A [B, H, L, D] operand with unit stride on D (copied if it had none).
at::Tensor with_unit_last_stride(const at::Tensor& t);
Strides4 strides_of(const at::Tensor& t);

struct PoolArgs {
  at::Tensor keys;  // [B, Hkv, N, D], unit stride on D
  LayoutTensors layout;
};

// region_pool(keys, region_ptr, region_tokens)
PoolArgs prepare_region_pool(const at::Tensor& keys, const at::Tensor& region_ptr,
                             const at::Tensor& region_tokens);

struct PoolBackwardArgs {
  at::Tensor grad_desc;  // [B, Hkv, R, D], unit stride on D
  LayoutTensors layout;
  int64_t num_keys;
};

// region_pool_backward(grad_desc, region_ptr, region_tokens, num_keys)
PoolBackwardArgs prepare_region_pool_backward(const at::Tensor& grad_desc,
                                              const at::Tensor& region_ptr,
                                              const at::Tensor& region_tokens, int64_t num_keys);

struct TopkArgs {
  at::Tensor q;      // [B, Hq, Lq, D], unit stride on D
  at::Tensor desc;   // [B, Hkv, R, D], unit stride on D
  at::Tensor q_pos;  // [B, Lq] or undefined
  LayoutTensors layout;
  AttentionShape shape;  // sel_heads = Hkv (share_kv) or Hq; topk = k
};

TopkArgs prepare_region_topk(const at::Tensor& q, const at::Tensor& desc,
                             const at::Tensor& region_ptr, int64_t k, bool share_kv,
                             const std::optional<at::Tensor>& q_pos,
                             const std::optional<at::Tensor>& region_pos);

struct AttentionArgs {
  at::Tensor q, k, v;  // [B, Hq, Lq, D], [B, Hkv, N, D] x2; unit stride on D
  at::Tensor idx;      // [B, Hs, Lq, K] contiguous int32
  at::Tensor q_pos;    // [B, Lq] or undefined
  LayoutTensors layout;
  AttentionShape shape;
  int64_t num_keys;
  double scale;  // float64 kernels use it as is, others round it
};

AttentionArgs prepare_gaze_attention(const char* op, const at::Tensor& q, const at::Tensor& k,
                                     const at::Tensor& v, const at::Tensor& region_ptr,
                                     const at::Tensor& region_tokens,
                                     const at::Tensor& fixed_tokens, const at::Tensor& idx,
                                     const std::optional<at::Tensor>& q_pos, double scale);

struct AttentionBackwardArgs {
  AttentionArgs fwd;
  at::Tensor grad_out;  // [B, Hq, Lq, D], unit stride on D
  at::Tensor out;       // [B, Hq, Lq, D], unit stride on D
  at::Tensor lse;       // [B, Hq, Lq] float32 (float64 for float64 q), contiguous
  at::Tensor grad_lse;  // like lse, or undefined
};

AttentionBackwardArgs prepare_gaze_attention_backward(
    const at::Tensor& grad_out, const std::optional<at::Tensor>& grad_lse, const at::Tensor& q,
    const at::Tensor& k, const at::Tensor& v, const at::Tensor& out, const at::Tensor& lse,
    const at::Tensor& region_ptr, const at::Tensor& region_tokens,
    const at::Tensor& fixed_tokens, const at::Tensor& idx,
    const std::optional<at::Tensor>& q_pos, double scale);

}  // namespace gaze
