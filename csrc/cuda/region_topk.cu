// CUDA region_topk: one thread block per query row (b, hs, i).
//
//   1. the row's query (summed over the GQA group for a shared selection) goes to
//      shared memory;
//   2. warps score every region (lanes split the descriptor row in 16-byte
//      chunks) and store a 32-bit order key per region, 0 when not selectable;
//   3. an MSB-first radix select (4 passes of 8 bits) finds the k-th largest key;
//   4. keys above it, and the lowest-index keys equal to it, are collected;
//   5. they are ordered by the shared 64-bit selection key (score descending, region
//      ascending), exactly the CPU order: by counting each key's rank when there are
//      few, else by a bitonic sort.
// Keys and the sort buffer live in shared memory when they fit, else in a
// global scratch buffer; nothing depends on the data on the host (no sync).
#include <ATen/core/Tensor.h>
#include <ATen/ops/empty.h>
#include <torch/library.h>

#include <algorithm>
#include <tuple>

#include "../common/dispatch.h"
#include "../common/op_args.h"
#include "cuda_common.cuh"

namespace gaze::cuda {
namespace {

constexpr int kThreads = 512;
constexpr int kRowsInFlight = 4;  // descriptor rows a lane group loads before it uses them
constexpr int kWarps = kThreads / 32;
constexpr int kRankSortSize = 256;  // up to this many keys, step 5 counts ranks
constexpr int64_t kSharedBudget = 96 * 1024;     // dynamic shared memory per block we use
// Global scratch per launch when the keys or the sort buffer do not fit in shared memory;
// rows past it go to further launches. gaze_sim's build sets a small one, so that its tests
// reach several launches with a few rows.
#ifndef GAZE_TOPK_SCRATCH_BYTES
#define GAZE_TOPK_SCRATCH_BYTES (512ll << 20)
#endif
constexpr int64_t kScratchBudget = GAZE_TOPK_SCRATCH_BYTES;

struct TopkParams {
  const void* q;
  const void* desc;
  Strides4 qs, ds;
  LayoutView layout;
  const int32_t* q_pos;  // [B, Lq] or null
  AttentionShape shape;
  int lanes;             // lanes per descriptor row
  int sort_size;         // power of two >= min(k, R)
  bool keys_in_shared, sort_in_shared;
  uint32_t* key_scratch;   // [rows in launch, R] when not in shared memory
  uint64_t* sort_scratch;  // [rows in launch, sort_size] when not in shared memory
  int64_t first_row;
  int32_t* idx_out;   // [B, Hs, Lq, k]
  float* score_out;   // [B, Hs, Lq, k]
};

// The digit of the K-th largest key in one radix pass: the largest d with
// histogram[255] + ... + histogram[d] >= *remaining (0 if none), run by warp 0. Lane l
// sums the eight bins 255 - 8l ... 248 - 8l, a scan over the lanes counts from the top,
// and the first lane that reaches the count walks its bins. (One thread walking down the
// bins was a chain of up to 255 dependent shared loads, in each of the four passes.)
__device__ __forceinline__ void select_digit(const uint32_t* histogram, int shift,
                                             uint32_t* prefix, uint32_t* remaining) {
  const int lane = threadIdx.x;
  const int top = 255 - 8 * lane;  // this lane's bins: top, top - 1, ..., top - 7
  uint32_t bins = 0u;
#pragma unroll
  for (int e = 0; e < 8; ++e) bins += histogram[top - e];
  uint32_t through = bins;  // the bins of lanes 0..lane
#pragma unroll
  for (int offset = 1; offset < 32; offset *= 2) {
    const uint32_t other = __shfl_up_sync(0xFFFFFFFFu, through, offset);
    if (lane >= offset) through += other;
  }
  const uint32_t need = *remaining;
  const unsigned reached = __ballot_sync(0xFFFFFFFFu, through >= need);
  // the first lane that reaches the count, else the last: its walk then ends at digit 0
  const int walker = reached != 0u ? __ffs(int(reached)) - 1 : 31;
  __syncwarp();  // every lane has read *remaining before the walker writes it
  if (lane == walker) {
    uint32_t above = through - bins;
    int digit = top;
    for (; digit > top - 7; --digit) {
      if (above + histogram[digit] >= need) break;
      above += histogram[digit];
    }
    *remaining = need - above;
    *prefix |= uint32_t(digit) << shift;
  }
}

__device__ __forceinline__ int block_count(int local, int* shared_total) {
  local = warp_sum(local);
  if (threadIdx.x % 32 == 0) atomicAdd(shared_total, local);
  __syncthreads();
  return *shared_total;
}

template <typename T, bool kVec>
__global__ void __launch_bounds__(kThreads) topk_kernel(TopkParams p) {
  using Chunk = RowChunk<T, kVec>;
  constexpr int C = Chunk::kChunk;
  extern __shared__ __align__(16) unsigned char smem_raw[];
  __shared__ uint32_t histogram[256];
  __shared__ int counters[4];  // candidates, taken, equal-rank base, scratch
  __shared__ uint32_t select_prefix, select_remaining;

  const AttentionShape& S = p.shape;
  const LayoutView& layout = p.layout;
  const int R = layout.num_regions, D = S.head_dim, K = S.topk, G = S.group();
  const bool shared_sel = S.sel_heads == S.kv_heads;
  const int64_t row = p.first_row + blockIdx.x;
  const int64_t b = row / (int64_t(S.sel_heads) * S.q_len);
  const int hs = int((row / S.q_len) % S.sel_heads);
  const int i = int(row % S.q_len);
  const int hk = shared_sel ? hs : hs / G;
  const int32_t limit = p.q_pos ? p.q_pos[b * S.q_len + i] : kNoCausalLimit;

  float* query = reinterpret_cast<float*>(smem_raw);
  uint32_t* keys = p.keys_in_shared ? reinterpret_cast<uint32_t*>(query + D)
                                    : p.key_scratch + int64_t(blockIdx.x) * R;
  uint64_t* sorted =
      p.sort_in_shared
          ? reinterpret_cast<uint64_t*>(smem_raw + ((D + (p.keys_in_shared ? R : 0)) * 4 + 15) / 16 * 16)
          : p.sort_scratch + int64_t(blockIdx.x) * p.sort_size;
  if (threadIdx.x < 4) counters[threadIdx.x] = 0;

  // 1. the query, summed over the group's heads for a shared selection
  const T* q = reinterpret_cast<const T*>(p.q);
  for (int d = threadIdx.x; d < D; d += kThreads) {
    float s = 0.f;
    if (shared_sel) {
      for (int g = 0; g < G; ++g) s += to_float(q[p.qs.offset(b, hs * G + g, i) + d]);
    } else {
      s = to_float(q[p.qs.offset(b, hs, i) + d]);
    }
    query[d] = s;
  }
  __syncthreads();

  // 2. one order key per region; groups of `lanes` lanes share a descriptor row, and each
  // group loads kRowsInFlight rows' chunks before it uses them, so their loads overlap (a
  // decode step has few rows: one block per row has to keep many loads in flight)
  const T* desc = reinterpret_cast<const T*>(p.desc);
  const int lane = threadIdx.x % 32, sub = lane % p.lanes, group = lane / p.lanes;
  const int groups_per_warp = 32 / p.lanes, chunks = D / C;
  const int row_group = (threadIdx.x / 32) * groups_per_warp + group;
  const int row_groups = kWarps * groups_per_warp;
  for (int r0 = 0; r0 < R; r0 += row_groups * kRowsInFlight) {  // uniform trip count per warp (shuffles)
    float partial[kRowsInFlight] = {};
    for (int c = sub; c < chunks; c += p.lanes) {
      Chunk x[kRowsInFlight];
#pragma unroll
      for (int u = 0; u < kRowsInFlight; ++u) {
        const int r = r0 + u * row_groups + row_group;
        if (r < R) {
          x[u].load(desc + p.ds.offset(b, hk, r) + int64_t(c) * C);
        } else {
          x[u].zero();
        }
      }
#pragma unroll
      for (int u = 0; u < kRowsInFlight; ++u) {
#pragma unroll
        for (int e = 0; e < C; ++e) partial[u] += query[c * C + e] * x[u].v[e];
      }
    }
#pragma unroll
    for (int u = 0; u < kRowsInFlight; ++u) {
      const int r = r0 + u * row_groups + row_group;
      const float sum = warp_sum(partial[u], p.lanes);
      if (r < R && sub == 0) {
        // the mean over the group is its sum divided by G, as on the CPU
        const float score = shared_sel ? sum / float(G) : sum;
        keys[r] = layout.selectable(b, r, limit) ? score_order_key(score) : 0u;
      }
    }
  }
  __syncthreads();

  // 3. radix select of the K-th largest key among the candidates (keys != 0)
  int local = 0;
  for (int r = threadIdx.x; r < R; r += kThreads) local += keys[r] != 0u;
  const int candidates = block_count(local, &counters[0]);
  uint32_t threshold = 1u;     // take every candidate above it...
  int take_equal = candidates;  // ...and this many equal to it
  if (candidates > K) {
    if (threadIdx.x == 0) {
      select_prefix = 0u;
      select_remaining = uint32_t(K);
    }
    uint32_t mask = 0u;
    for (int shift = 24; shift >= 0; shift -= 8) {
      for (int j = threadIdx.x; j < 256; j += kThreads) histogram[j] = 0u;
      __syncthreads();
      const uint32_t prefix = select_prefix;
      for (int r = threadIdx.x; r < R; r += kThreads) {
        const uint32_t key = keys[r];
        if (key != 0u && (key & mask) == prefix) atomicAdd(&histogram[(key >> shift) & 255u], 1u);
      }
      __syncthreads();
      if (threadIdx.x < 32) select_digit(histogram, shift, &select_prefix, &select_remaining);
      mask |= 255u << shift;
      __syncthreads();
    }
    threshold = select_prefix;
    take_equal = int(select_remaining);
  } else {
    threshold = 0u;  // every candidate is above "0"
    take_equal = 0;
  }

  // 4. collect keys > threshold, and the first `take_equal` keys == threshold by index
  int* taken = &counters[1];
  int* equal_base = &counters[2];
  __shared__ int warp_equal[kWarps];
  for (int r0 = 0; r0 < R; r0 += kThreads) {
    const int r = r0 + threadIdx.x;
    const uint32_t key = r < R ? keys[r] : 0u;
    const bool equal = key != 0u && key == threshold && take_equal > 0;
    const unsigned ballot = __ballot_sync(0xFFFFFFFFu, equal);
    if (lane == 0) warp_equal[threadIdx.x / 32] = __popc(ballot);
    __syncthreads();
    int rank = *equal_base + __popc(ballot & ((1u << lane) - 1u));
    for (int w = 0; w < threadIdx.x / 32; ++w) rank += warp_equal[w];
    if (key != 0u && (key > threshold || (equal && rank < take_equal))) {
      sorted[atomicAdd(taken, 1)] = (uint64_t(key) << 32) | uint64_t(0xFFFFFFFFu - uint32_t(r));
    }
    __syncthreads();
    if (threadIdx.x == 0) {
      for (int w = 0; w < kWarps; ++w) *equal_base += warp_equal[w];
    }
    __syncthreads();
  }
  const int n_taken = *taken;

  // 5. descending order; the keys are distinct (each holds its region)
  const int64_t out = row * K;
  auto write = [&](int slot, uint64_t key) {
    p.idx_out[out + slot] = region_of_selection_key(key);
    p.score_out[out + slot] = score_from_order_key(uint32_t(key >> 32));
  };
  if (p.sort_size <= kRankSortSize) {
    // a key's slot is the number of keys above it, counted by a group of lanes: one
    // pass and no barrier, where the bitonic sort takes a barrier per stage (28 for 128)
    const int group = min(32, kThreads / p.sort_size);
    const int e = threadIdx.x / group, part = threadIdx.x % group;
    const uint64_t key = e < n_taken ? sorted[e] : 0ull;
    int rank = 0;
    for (int j = part; j < n_taken; j += group) rank += sorted[j] > key;
    for (int offset = group / 2; offset > 0; offset /= 2) {
      rank += __shfl_xor_sync(0xFFFFFFFFu, rank, offset);
    }
    if (part == 0 && e < n_taken) write(rank, key);
  } else {
    // bitonic sort, padded with zero keys (below every real key)
    for (int j = n_taken + threadIdx.x; j < p.sort_size; j += kThreads) sorted[j] = 0ull;
    __syncthreads();
    block_bitonic_sort</*kDescending=*/true>(sorted, p.sort_size);
    for (int j = threadIdx.x; j < n_taken; j += kThreads) write(j, sorted[j]);
  }
  for (int j = n_taken + threadIdx.x; j < K; j += kThreads) {
    p.idx_out[out + j] = -1;
    p.score_out[out + j] = kNegInf;
  }
}

int next_pow2(int64_t x) {
  int p = 1;
  while (p < x) p *= 2;
  return p;
}

std::tuple<at::Tensor, at::Tensor> region_topk_cuda(const at::Tensor& q, const at::Tensor& desc,
                                                    const at::Tensor& region_ptr, int64_t k,
                                                    bool share_kv,
                                                    const std::optional<at::Tensor>& q_pos,
                                                    const std::optional<at::Tensor>& region_pos) {
  const c10::cuda::CUDAGuard guard(q.device());
  TopkArgs args = prepare_region_topk(q, desc, region_ptr, k, share_kv, q_pos, region_pos);
  const AttentionShape& S = args.shape;
  at::Tensor idx = at::empty({S.batch, S.sel_heads, S.q_len, S.topk}, q.options().dtype(at::kInt));
  at::Tensor score = at::empty({S.batch, S.sel_heads, S.q_len, S.topk},
                               q.options().dtype(at::kFloat));
  const int64_t rows = int64_t(S.batch) * S.sel_heads * S.q_len;
  if (rows == 0) return {idx, score};

  const int64_t R = args.layout.num_regions, D = S.head_dim;
  TopkParams p{};
  p.q = args.q.data_ptr();
  p.desc = args.desc.data_ptr();
  p.qs = strides_of(args.q);
  p.ds = strides_of(args.desc);
  p.layout = args.layout.view(0);
  p.q_pos = args.q_pos.defined() ? args.q_pos.data_ptr<int32_t>() : nullptr;
  p.shape = S;
  p.sort_size = next_pow2(std::max<int64_t>(1, std::min<int64_t>(k, R)));
  p.idx_out = idx.data_ptr<int32_t>();
  p.score_out = score.data_ptr<float>();

  // Shared memory: the query, then the keys and the sort buffer when they fit.
  int64_t shared = D * 4;
  p.keys_in_shared = shared + R * 4 <= kSharedBudget;
  if (p.keys_in_shared) shared += R * 4;
  shared = (shared + 15) / 16 * 16;
  p.sort_in_shared = shared + int64_t(p.sort_size) * 8 <= kSharedBudget;
  if (p.sort_in_shared) shared += int64_t(p.sort_size) * 8;
  TORCH_CHECK(shared <= kSharedBudget, "gaze.region_topk: head dim ", D, " is too large");
  const int64_t scratch_per_row =
      (p.keys_in_shared ? 0 : R * 4) + (p.sort_in_shared ? 0 : int64_t(p.sort_size) * 8);
  const int64_t rows_per_launch = std::min<int64_t>(  // a grid holds up to 2^31 - 1 blocks
      0x7FFFFFFF, scratch_per_row == 0 ? rows
                                       : std::max<int64_t>(1, std::min(rows, kScratchBudget / scratch_per_row)));
  at::Tensor key_scratch, sort_scratch;
  if (!p.keys_in_shared) {
    key_scratch = at::empty({rows_per_launch, R}, q.options().dtype(at::kInt));
    p.key_scratch = reinterpret_cast<uint32_t*>(key_scratch.data_ptr<int32_t>());
  }
  if (!p.sort_in_shared) {
    sort_scratch = at::empty({rows_per_launch, p.sort_size}, q.options().dtype(at::kLong));
    p.sort_scratch = reinterpret_cast<uint64_t*>(sort_scratch.data_ptr<int64_t>());
  }

  const auto stream = c10::cuda::getCurrentCUDAStream();
  dispatch_float_types(q.scalar_type(), "region_topk", [&](auto tag) {
    using T = native_t<decltype(tag)>;
    const bool vec = rows_vectorizable<T>(p.desc, D, {p.ds.batch, p.ds.head, p.ds.row});
    p.lanes = lanes_per_row(D / (vec ? 16 / sizeof(T) : 1));
    auto kernel = vec ? topk_kernel<T, true> : topk_kernel<T, false>;
    allow_dynamic_shared(kernel, shared);
    for (int64_t first = 0; first < rows; first += rows_per_launch) {
      p.first_row = first;
      const int64_t n = std::min(rows_per_launch, rows - first);
      kernel<<<dim3(n), dim3(kThreads), shared, stream>>>(p);
      C10_CUDA_KERNEL_LAUNCH_CHECK();
    }
  });
  return {idx, score};
}

}  // namespace
}  // namespace gaze::cuda

TORCH_LIBRARY_IMPL(gaze, CUDA, m) { m.impl("region_topk", &gaze::cuda::region_topk_cuda); }
