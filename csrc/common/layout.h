// Read-only views of the region layout and the attention operands, shared by the
// CPU and CUDA kernels. Every index read goes through these accessors, which
// clamp or skip out-of-range contents: the CPU path checks contents before it
// runs, the CUDA path only under GAZE_CHECK_INDICES=1, and neither may touch
// memory outside its tensors on any input.
#pragma once

#include <cstdint>

#include "math.h"

namespace gaze {

constexpr int32_t kNoCausalLimit = 0x7FFFFFFF;

struct RegionSpan {
  int32_t begin;  // into region_tokens of the batch element
  int32_t end;
  GAZE_HD int32_t size() const { return end - begin; }
};

// One batch element's view is `ptr + b * batch_stride`; a batch stride of 0
// means the tensor has no batch axis and is shared by the whole batch.
struct LayoutView {
  const int32_t* region_ptr = nullptr;     // [R+1] or [B, R+1]
  const int32_t* region_tokens = nullptr;  // [T] or [B, T]
  const int32_t* fixed_tokens = nullptr;   // [F] or [B, F]
  const int32_t* region_pos = nullptr;     // [R] or [B, R]; may be null
  int64_t ptr_batch_stride = 0;
  int64_t tokens_batch_stride = 0;
  int64_t fixed_batch_stride = 0;
  int64_t pos_batch_stride = 0;
  int32_t num_regions = 0;        // R
  int32_t num_region_tokens = 0;  // T
  int32_t num_fixed = 0;          // F
  int32_t num_keys = 0;           // N

  // Region r of batch b, clamped into [0, T] with end >= begin.
  GAZE_HD RegionSpan region(int64_t b, int32_t r) const {
    const int32_t* p = region_ptr + b * ptr_batch_stride + r;
    int32_t begin = p[0], end = p[1];
    begin = begin < 0 ? 0 : (begin > num_region_tokens ? num_region_tokens : begin);
    end = end < begin ? begin : (end > num_region_tokens ? num_region_tokens : end);
    return {begin, end};
  }
  // Region r lists at least one key. Top-k never reads region_tokens, so this
  // looks at region_ptr alone.
  GAZE_HD bool nonempty(int64_t b, int32_t r) const {
    const int32_t* p = region_ptr + b * ptr_batch_stride + r;
    return p[1] > p[0];
  }
  GAZE_HD const int32_t* tokens(int64_t b) const { return region_tokens + b * tokens_batch_stride; }
  // region_tokens[b, index] with index clamped into [0, T): kernels that find a token
  // from prefix sums of region sizes stay in bounds even when unchecked, overlapping
  // spans overflow those sums. Needs T > 0.
  GAZE_HD int32_t region_token(int64_t b, int32_t index) const {
    index = index < 0 ? 0 : (index >= num_region_tokens ? num_region_tokens - 1 : index);
    return tokens(b)[index];
  }
  GAZE_HD const int32_t* fixed(int64_t b) const { return fixed_tokens + b * fixed_batch_stride; }
  GAZE_HD bool is_region(int32_t r) const {
    return static_cast<uint32_t>(r) < static_cast<uint32_t>(num_regions);
  }
  // Key position `pos` exists and is visible to a query at causal limit `limit`.
  GAZE_HD bool visible(int32_t pos, int32_t limit) const {
    return static_cast<uint32_t>(pos) < static_cast<uint32_t>(num_keys) && pos <= limit;
  }
  // Region r may be chosen by a query at causal limit `limit`.
  GAZE_HD bool selectable(int64_t b, int32_t r, int32_t limit) const {
    return nonempty(b, r) && position_allows(b, r, limit);
  }
  // The causal half of `selectable`: region r is not after the limit.
  GAZE_HD bool position_allows(int64_t b, int32_t r, int32_t limit) const {
    return region_pos == nullptr || limit == kNoCausalLimit ||
           region_pos[b * pos_batch_stride + r] <= limit;
  }
};

// Whether slot s of a query's selection adds its region, by the contract's rules:
// -1 (or out-of-range) slots are skipped, and a region equal to the last one taken
// counts once. The last region taken before slot s is the nearest earlier region
// id (a skipped repeat equals it), so each slot is decided on its own: kernels
// may look at the slots in parallel.
GAZE_HD bool slot_taken(const LayoutView& layout, const int32_t* slots, int32_t s) {
  const int32_t r = slots[s];
  if (!layout.is_region(r)) return false;
  for (int32_t t = s - 1; t >= 0; --t) {
    if (layout.is_region(slots[t])) return slots[t] != r;
  }
  return true;
}

// Element strides of a [B, H, L, D] tensor (the last stride is 1 by construction).
struct Strides4 {
  int64_t batch, head, row;
  GAZE_HD int64_t offset(int64_t b, int64_t h, int64_t i) const {
    return b * batch + h * head + i * row;
  }
};

struct AttentionShape {
  int32_t batch;      // B
  int32_t q_heads;    // Hq
  int32_t kv_heads;   // Hkv
  int32_t q_len;      // Lq
  int32_t head_dim;   // D
  int32_t sel_heads;  // Hs: Hq (per query head) or Hkv (shared per KV head)
  int32_t topk;       // slots per query in idx
  GAZE_HD int32_t group() const { return q_heads / kv_heads; }
  // Each query head of a group has its own selection (else one per KV head: with G = 1
  // the two are the same).
  GAZE_HD bool per_head_selection() const { return sel_heads == q_heads && group() > 1; }
};

}  // namespace gaze
