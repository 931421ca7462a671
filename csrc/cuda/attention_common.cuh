// Work decomposition shared by the CUDA attention forward and backward.
//
// A *unit* is one query row i of batch b seen by one selection head hs, for a
// chunk of at most NH query heads: with a shared selection (idx has Hkv heads)
// the unit holds the query heads of KV head hs, so every gathered K/V row is
// read once for all of them; with one selection per query head it holds that
// head. A unit's keys are a virtual list, the fixed tokens then the tokens of
// the selected regions; it is cut into `splits` parts (flash-decoding), each
// handled by one thread block and merged by log-sum-exp, so a decode step with
// B = 1 still fills the GPU. Split s takes an equal share of the fixed tokens
// and of the selection slots.
#pragma once

#include <c10/util/FunctionRef.h>

#include <type_traits>

#include "../common/op_args.h"
#include "cuda_common.cuh"

namespace gaze::cuda {

constexpr int kAttnThreads = 128;
constexpr int kAttnWarps = kAttnThreads / 32;
constexpr int kKeyBatch = 32;   // keys scored, normalized and accumulated per step
constexpr int kRowsInFlight = 4;  // K/V rows a thread loads before it uses them
constexpr int kMaxSlots = 256;  // selection slots per split (host picks splits to fit)
constexpr int64_t kStaticSharedBudget = 16 * 1024;  // >= the split-K kernels' static shared memory

// The operands of gaze_attention, as every CUDA attention kernel reads them.
struct AttentionOperands {
  const void* q;     // [B, Hq, Lq, D]
  const void* k;     // [B, Hkv, N, D]
  const void* v;     // [B, Hkv, N, D]
  Strides4 qs, ks, vs;
  LayoutView layout;
  const int32_t* idx;    // [B, Hs, Lq, K] contiguous
  const int32_t* q_pos;  // [B, Lq] or null
  AttentionShape shape;
  float score_scale;     // scale * log2(e): scores in base 2
};

// What the backward kernels read and write besides the operands.
struct BackwardOperands {
  const void* grad_out;   // [B, Hq, Lq, D]
  Strides4 gs;
  const float* lse_in;    // [B, Hq, Lq]
  const float* delta;     // [B, Hq, Lq]: rowsum(dO * O) - dlse
  float* dq;              // [B, Hq, Lq, D] float32, contiguous
  float* dk;              // [B, Hkv, N, D] float32, contiguous, zero-filled
  float* dv;              // [B, Hkv, N, D] float32, contiguous, zero-filled
};

// Host side (attention_forward.cu / attention_backward.cu): fill them from the checked arguments.
void fill_operands(const AttentionArgs& a, AttentionOperands& p);
void fill_backward_operands(const AttentionBackwardArgs& args, const at::Tensor& delta,
                            at::Tensor& dq, at::Tensor& dk, at::Tensor& dv, BackwardOperands& p);

// The split-K kernels' parameters.
struct AttnParams : AttentionOperands, BackwardOperands {
  int head_chunks;       // query-head chunks per selection head (shared selection, G > NH)
  int splits;
  int lanes;             // lanes per K row in the scoring step (per V row in the streamed P V)
  int64_t units;

  // forward outputs
  void* out;              // [B, Hq, Lq, D] (dtype of q), when splits == 1
  float* lse;             // [B, Hq, Lq], when splits == 1
  float* partial_stats;   // [units, splits, NH, 2] (max, sum), when splits > 1; the merge
                          // overwrites each max with its split's weight
  float* partial_acc;     // [units, splits, NH, D], when splits > 1
};

struct Unit {
  int64_t b;
  int sel_head;   // row of idx
  int kv_head;
  int first_head; // first query head
  int num_heads;  // <= NH
  int i;          // query row
};

__device__ __forceinline__ Unit decode_unit(const AttnParams& p, int64_t u, int NH) {
  const AttentionShape& S = p.shape;
  Unit unit;
  unit.i = int(u % S.q_len);
  int64_t rest = u / S.q_len;
  const int chunk = int(rest % p.head_chunks);
  rest /= p.head_chunks;
  unit.sel_head = int(rest % S.sel_heads);
  unit.b = rest / S.sel_heads;
  const int G = S.group();
  if (S.per_head_selection()) {
    unit.first_head = unit.sel_head;
    unit.num_heads = 1;
    unit.kv_head = unit.sel_head / G;
  } else {  // shared selection: the KV head's query heads, NH at a time
    unit.kv_head = unit.sel_head;
    unit.first_head = unit.sel_head * G + chunk * NH;
    unit.num_heads = min(NH, G - chunk * NH);
  }
  return unit;
}

// The last index in [lo, hi] whose value in the ascending `offsets` is <= w (the first
// key of the region or slot holding key w, when offsets are first keys).
__device__ __forceinline__ int last_at_most(const int32_t* offsets, int lo, int hi, int w) {
  while (lo < hi) {
    const int mid = (lo + hi + 1) / 2;
    if (offsets[mid] <= w) {
      lo = mid;
    } else {
      hi = mid - 1;
    }
  }
  return lo;
}

// The keys of one split of one unit, in shared memory: fixed tokens
// [fixed_begin, fixed_end) then the regions of slots [0, num_slots).
struct KeyStream {
  int32_t region_begin[kMaxSlots];   // into region_tokens of the batch element
  int32_t region_offset[kMaxSlots + 1];  // exclusive prefix of region sizes
  int32_t fixed_begin, num_fixed, num_slots, length;

  // All threads of the block call this; ends with __syncthreads().
  __device__ void init(const AttnParams& p, const Unit& unit, int split) {
    const LayoutView& layout = p.layout;
    const AttentionShape& S = p.shape;
    const int F = layout.num_fixed, K = S.topk;
    const int32_t* slots =
        p.idx + ((unit.b * S.sel_heads + unit.sel_head) * S.q_len + unit.i) * int64_t(K);
    // the slots spread evenly: each split has floor or ceil of K / splits
    const int s0 = int(int64_t(K) * split / p.splits);
    const int s1 = int(int64_t(K) * (split + 1) / p.splits);
    if (threadIdx.x == 0) {
      fixed_begin = int(int64_t(F) * split / p.splits);
      num_fixed = int(int64_t(F) * (split + 1) / p.splits) - fixed_begin;
      num_slots = s1 - s0;
    }
    // region_offset temporarily holds each slot's size
    for (int t = threadIdx.x; t < s1 - s0; t += blockDim.x) {
      int32_t size = 0, begin = 0;
      if (slot_taken(layout, slots, s0 + t)) {  // the rule looks across split boundaries
        const RegionSpan span = layout.region(unit.b, slots[s0 + t]);
        begin = span.begin;
        size = span.size();
      }
      region_begin[t] = begin;
      region_offset[t] = size;
    }
    __syncthreads();
    if (threadIdx.x < 32) {  // exclusive scan of up to kMaxSlots sizes: 8 per lane
      // In 64 bits, clamped below 2^31 (unchecked or repeated huge regions could overflow
      // 32 bits): keys past the clamp are dropped, none is read out of bounds.
      constexpr int kPerLane = kMaxSlots / 32;
      const int64_t cap = int64_t(0x7FFFFFFF) - 2 * kKeyBatch - num_fixed;
      const int lane = threadIdx.x;
      int64_t local[kPerLane], sum = 0;
#pragma unroll
      for (int e = 0; e < kPerLane; ++e) {
        const int t = lane * kPerLane + e;
        local[e] = t < num_slots ? region_offset[t] : 0;
        sum += local[e];
      }
      int64_t inclusive = sum;
#pragma unroll
      for (int offset = 1; offset < 32; offset *= 2) {
        const int64_t other = __shfl_up_sync(0xFFFFFFFFu, inclusive, offset);
        if (lane >= offset) inclusive += other;
      }
      int64_t running = inclusive - sum;
#pragma unroll
      for (int e = 0; e < kPerLane; ++e) {
        const int t = lane * kPerLane + e;
        if (t < num_slots) region_offset[t] = int32_t(min(running, cap));
        running += local[e];
      }
      if (lane == 31) {
        region_offset[num_slots] = int32_t(min(inclusive, cap));
        length = num_fixed + region_offset[num_slots];
      }
    }
    __syncthreads();
  }

  // Key position of entry v < length (not yet checked against N or causality).
  __device__ int32_t position(const AttnParams& p, const Unit& unit, int v) const {
    if (v < num_fixed) return p.layout.fixed(unit.b)[fixed_begin + v];
    const int w = v - num_fixed;
    const int slot = last_at_most(region_offset, 0, num_slots - 1, w);
    return p.layout.region_token(unit.b, region_begin[slot] + (w - region_offset[slot]));
  }
};

// query[h][d] = (row i of query head first_head + h) * score_scale for the unit's heads, zeros
// for h in [num_heads, NH): [NH][D] float32 in shared memory. Every thread of the block calls it.
template <typename T>
__device__ void load_unit_query(const AttnParams& p, const Unit& unit, int NH, float* query) {
  const T* q = reinterpret_cast<const T*>(p.q);
  const int D = p.shape.head_dim;
  for (int e = threadIdx.x; e < NH * D; e += blockDim.x) {
    const int h = e / D, d = e % D;
    query[e] = h < unit.num_heads
                   ? to_float(q[p.qs.offset(unit.b, unit.first_head + h, unit.i) + d]) * p.score_scale
                   : 0.f;
  }
}

inline int num_heads_per_unit_template(int heads) {
  return heads <= 1 ? 1 : heads <= 2 ? 2 : heads <= 4 ? 4 : 8;
}

// partial[h] += vecs[h][c * C : (c + 1) * C] . x for the NH rows of vecs [NH][D]: one
// 16-byte chunk of a K or V row against every head of the unit.
template <int NH, int C>
__device__ __forceinline__ void dot_chunk_heads(const float* vecs, int D, int c, const float* x,
                                                float (&partial)[NH]) {
#pragma unroll
  for (int h = 0; h < NH; ++h) {
    float v[C];
    load_shared_floats<C>(vecs + h * D + c * C, v);
#pragma unroll
    for (int e = 0; e < C; ++e) partial[h] += v[e] * x[e];
  }
}

// dst[h][c * C + e] += sum over subsets s of sums[((s * owners) + owner) * C + e], owner =
// h * chunks + c: the partial sums of the threads that split a batch's keys, added in a
// fixed order (shared-memory atomics would make results vary from run to run).
__device__ __forceinline__ void add_subset_sums(const float* sums, int owners, int subsets, int C,
                                                int chunks, int D, int num_heads, float* dst) {
  for (int x = threadIdx.x; x < owners * C; x += blockDim.x) {
    const int owner = x / C, e = x % C;
    const int h = owner / chunks, c = owner % chunks;
    if (h >= num_heads) continue;
    float total = 0.f;
    for (int s = 0; s < subsets; ++s) total += sums[(s * owners + owner) * C + e];
    dst[h * D + c * C + e] += total;
  }
}

// GAZE_ATTENTION_KERNEL=auto (default) | tensor_core | split | split_block: which kernels run
// where several apply (the tests run each). split: the split-K family (attention_streamed.cu's
// forward where it applies); split_block: the split-K family with the block-synchronous
// forward everywhere, for comparing the two forwards. Host side (attention_forward.cu).
enum class KernelChoice { kAuto, kTensorCore, kSplit, kSplitBlock };
KernelChoice attention_kernel_choice();

// Host side (attention_forward.cu): the work decomposition. plan_units sets the units and
// returns the heads per unit NH; plan_splits then sets the splits per unit for a kernel of
// which resident_per_sm blocks fit on a multiprocessor.
int plan_units(const AttentionArgs& a, AttnParams& p);
void plan_splits(const AttentionArgs& a, AttnParams& p, int max_splits, int resident_per_sm);

// f(std::integral_constant<int, NH>{}) for the heads per unit that plan_units returned.
template <typename F>
void dispatch_heads_per_unit(int NH, F&& f) {
  switch (NH) {
    case 1: f(std::integral_constant<int, 1>{}); break;
    case 2: f(std::integral_constant<int, 2>{}); break;
    case 4: f(std::integral_constant<int, 4>{}); break;
    default: f(std::integral_constant<int, 8>{}); break;
  }
}

// Host side (attention_forward.cu): with p.splits > 1, allocates the splits' partial states
// and points p at them; calls launch_splits(), which launches one block per (unit, split) on
// the current stream; then merges the splits into out and lse.
void run_split_forward(const AttentionArgs& a, AttnParams& p, int NH,
                       c10::function_ref<void()> launch_splits);

// attention_streamed.cu: the forward whose warps stream their own keys. Plans the splits and
// launches when it applies to these arguments (16-byte K/V rows, head dim and heads within
// its registers, its tiles within shared memory), else returns false.
bool run_streamed_forward(const AttentionArgs& a, AttnParams& p, int NH);

// attention_tiled.cu: the tensor-core kernels for many query rows. Each launches
// and returns true when it applies to these arguments (fp16/bf16, head dim 64, 80,
// 96 or 128, sm_80+, enough query rows per tile), else returns false.
bool run_tiled_forward(const AttentionArgs& a, at::Tensor& out, at::Tensor& lse);
// dq, dk, dv: float32, contiguous, zero-filled; delta = rowsum(dO * O) - dlse.
bool run_tiled_backward(const AttentionBackwardArgs& args, const at::Tensor& delta, at::Tensor& dq,
                        at::Tensor& dk, at::Tensor& dv);

}  // namespace gaze::cuda
