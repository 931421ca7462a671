// Argument validation shared by the CPU and CUDA entry points. Shape, dtype and
// device checks always run; index *contents* are checked on CPU always and on
// CUDA only when GAZE_CHECK_INDICES=1 (it costs a device sync).
#pragma once

#include <ATen/core/Tensor.h>

#include <optional>

#include "layout.h"

namespace gaze {

// Layout tensors after validation: int32, contiguous, on the operands' device.
struct LayoutTensors {
  at::Tensor region_ptr;     // [R+1] or [B, R+1]
  at::Tensor region_tokens;  // [T] or [B, T]; undefined for ops that take none
  at::Tensor fixed_tokens;   // [F] or [B, F]; undefined for ops that take none
  at::Tensor region_pos;     // [R] or [B, R]; undefined when not given
  int64_t num_regions = 0;

  LayoutView view(int64_t num_keys) const;
};

// `t` is a float32/float16/bfloat16 tensor of rank `rank`.
void check_float_tensor(const char* op, const char* name, const at::Tensor& t, int64_t rank);

// `t` is on `device`.
void check_device(const char* op, const char* name, const at::Tensor& t, const at::Device& device);

// Validates region_ptr (+ region_tokens, fixed_tokens, region_pos when defined)
// for batch size B, returns contiguous int32 copies.
LayoutTensors check_layout(const char* op, int64_t batch, const at::Device& device,
                           const at::Tensor& region_ptr, const at::Tensor* region_tokens,
                           const at::Tensor* fixed_tokens, const at::Tensor* region_pos);

// q_pos [B, Lq] int32 or nothing; returns a contiguous copy or an undefined tensor.
at::Tensor check_q_pos(const char* op, const std::optional<at::Tensor>& q_pos, int64_t batch,
                       int64_t q_len, const at::Device& device);

// Whether index contents are checked for tensors on `device`.
bool index_contents_checked(const at::Device& device);

// Contents of the layout: region_ptr starts at 0, never decreases and stays
// within region_tokens; listed region tokens lie in [0, N); fixed tokens in [-1, N).
void check_layout_contents(const char* op, const LayoutTensors& layout, int64_t num_keys);

// idx [B, Hs, Lq, K] entries lie in [-1, R).
void check_selection_contents(const char* op, const at::Tensor& idx, int64_t num_regions);

}  // namespace gaze
