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
// Steps 1-2 may run first, in a kernel that writes every row's keys to a global buffer;
// topk_kernel then starts at step 3:
//   - few rows (a decode step: one per batch element and KV head): one block per row would
//     leave most of the GPU idle while it reads the row's descriptors, so scoring_kernel
//     scores each row with several blocks, each a share of the regions;
//   - many rows in runs of at least kTileRows / 4 positions (prefill): one block per row
//     would read all of its KV head's descriptors for every row, so scoring_tile_kernel
//     scores tiles of kTileRows rows x kTileRegions regions from shared memory, a GEMM.
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
  int scoring_blocks;    // blocks of scoring_kernel per row
  bool keys_scored;      // a scoring kernel ran: the keys are in key_scratch
  bool keys_in_shared, sort_in_shared;
  uint32_t* key_scratch;   // [rows in launch, R]: the scoring kernels' keys, or topk_kernel's
                           // when they do not fit in its shared memory
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

// The query row a block works for.
struct TopkRow {
  int64_t b;
  int hs, i;
  int hk;         // its KV head: the descriptors it scores
  int32_t limit;  // causal limit
};

__device__ __forceinline__ TopkRow topk_row(const TopkParams& p, int64_t row) {
  const AttentionShape& S = p.shape;
  TopkRow r;
  r.b = row / (int64_t(S.sel_heads) * S.q_len);
  r.hs = int((row / S.q_len) % S.sel_heads);
  r.i = int(row % S.q_len);
  r.hk = S.sel_heads == S.kv_heads ? r.hs : r.hs / S.group();
  r.limit = p.q_pos ? p.q_pos[r.b * S.q_len + r.i] : kNoCausalLimit;
  return r;
}

// 1. query[D] = the row's query, summed over the group's heads for a shared selection;
// ends with a barrier.
template <typename T>
__device__ void load_topk_query(const TopkParams& p, const TopkRow& row, float* query) {
  const AttentionShape& S = p.shape;
  const int G = S.group();
  const T* q = reinterpret_cast<const T*>(p.q);
  for (int d = threadIdx.x; d < S.head_dim; d += kThreads) {
    float s = 0.f;
    if (S.sel_heads == S.kv_heads) {
      for (int g = 0; g < G; ++g) s += to_float(q[p.qs.offset(row.b, row.hs * G + g, row.i) + d]);
    } else {
      s = to_float(q[p.qs.offset(row.b, row.hs, row.i) + d]);
    }
    query[d] = s;
  }
  __syncthreads();
}

// 2. keys[r] for the regions r of [r_begin, r_end): the order key of the row's score, 0
// when not selectable. Groups of `lanes` lanes share a descriptor row, and each group loads
// kRowsInFlight rows' chunks before it uses them, so their loads overlap.
template <typename T, bool kVec>
__device__ void score_regions(const TopkParams& p, const TopkRow& row, const float* query,
                              int r_begin, int r_end, uint32_t* keys) {
  using Chunk = RowChunk<T, kVec>;
  constexpr int C = Chunk::kChunk;
  const AttentionShape& S = p.shape;
  const T* desc = reinterpret_cast<const T*>(p.desc);
  const int lane = threadIdx.x % 32, sub = lane % p.lanes, group = lane / p.lanes;
  const int groups_per_warp = 32 / p.lanes, chunks = S.head_dim / C;
  const int row_group = (threadIdx.x / 32) * groups_per_warp + group;
  const int row_groups = kWarps * groups_per_warp;
  const bool shared_sel = S.sel_heads == S.kv_heads;
  // uniform trip count per warp (shuffles)
  for (int r0 = r_begin; r0 < r_end; r0 += row_groups * kRowsInFlight) {
    float partial[kRowsInFlight] = {};
    for (int c = sub; c < chunks; c += p.lanes) {
      Chunk x[kRowsInFlight];
#pragma unroll
      for (int u = 0; u < kRowsInFlight; ++u) {
        const int r = r0 + u * row_groups + row_group;
        if (r < r_end) {
          x[u].load(desc + p.ds.offset(row.b, row.hk, r) + int64_t(c) * C);
        } else {
          x[u].zero();
        }
      }
      float qc[C];
      load_shared_floats<C>(query + c * C, qc);
#pragma unroll
      for (int u = 0; u < kRowsInFlight; ++u) {
#pragma unroll
        for (int e = 0; e < C; ++e) partial[u] += qc[e] * x[u].v[e];
      }
    }
#pragma unroll
    for (int u = 0; u < kRowsInFlight; ++u) {
      const int r = r0 + u * row_groups + row_group;
      const float sum = warp_sum(partial[u], p.lanes);
      if (r < r_end && sub == 0) {
        // the mean over the group is its sum divided by G, as on the CPU
        const float score = shared_sel ? sum / float(S.group()) : sum;
        keys[r] = p.layout.selectable(row.b, r, row.limit) ? score_order_key(score) : 0u;
      }
    }
  }
}

// Steps 1-2 for p.scoring_blocks blocks per row: block (row, part) scores the part-th share
// of the regions into the row's keys in key_scratch.
template <typename T, bool kVec>
__global__ void __launch_bounds__(kThreads) scoring_kernel(TopkParams p) {
  extern __shared__ __align__(16) float query[];  // [D]
  const int64_t local = blockIdx.x / p.scoring_blocks;
  const int part = int(blockIdx.x % p.scoring_blocks);
  const TopkRow row = topk_row(p, p.first_row + local);
  const int64_t R = p.layout.num_regions;
  load_topk_query<T>(p, row, query);
  score_regions<T, kVec>(p, row, query, int(R * part / p.scoring_blocks),
                         int(R * (part + 1) / p.scoring_blocks), p.key_scratch + local * R);
}

constexpr int kTileRows = 64, kTileRegions = 64, kTileDepth = 32;  // scoring_tile_kernel
constexpr int kTileThreads = 256;  // 16 x 16, each 4 rows x 4 regions
constexpr int kTilePad = 4;        // floats after each row of a tile: 16-byte aligned rows

// Steps 1-2 for the launch's rows, which are whole runs of q_len positions of one (b, hs):
// block (run, row tile, region tile) computes the scores of up to kTileRows positions of
// one run against kTileRegions of its KV head's descriptors, kTileDepth elements of D at
// a time through shared memory (both tiles d-major, so a thread reads 4 rows and 4
// regions with two 16-byte loads per d), and writes their keys to key_scratch.
template <typename T>
__global__ void __launch_bounds__(kTileThreads) scoring_tile_kernel(TopkParams p) {
  __shared__ __align__(16) float row_tile[kTileDepth][kTileRows + kTilePad];
  __shared__ __align__(16) float region_tile[kTileDepth][kTileRegions + kTilePad];
  const AttentionShape& S = p.shape;
  const int R = p.layout.num_regions, D = S.head_dim, G = S.group();
  const int row_tiles = (S.q_len + kTileRows - 1) / kTileRows;
  const int region_tiles = (R + kTileRegions - 1) / kTileRegions;
  const int r0 = int(blockIdx.x % region_tiles) * kTileRegions;
  const int64_t rest = blockIdx.x / region_tiles;
  const int i0 = int(rest % row_tiles) * kTileRows;
  const int64_t run = p.first_row / S.q_len + rest / row_tiles;  // (b, hs)
  const TopkRow first = topk_row(p, run * S.q_len + i0);
  const bool shared_sel = S.sel_heads == S.kv_heads;
  const T* q = reinterpret_cast<const T*>(p.q);
  const T* desc = reinterpret_cast<const T*>(p.desc);
  const int tx = threadIdx.x % 16, ty = threadIdx.x / 16;

  float acc[4][4] = {};
  for (int d0 = 0; d0 < D; d0 += kTileDepth) {
    for (int e = threadIdx.x; e < kTileDepth * kTileRows; e += kTileThreads) {
      const int x = e / kTileDepth, d = d0 + e % kTileDepth, i = i0 + x;
      float v = 0.f;
      if (i < S.q_len && d < D) {
        if (shared_sel) {
          for (int g = 0; g < G; ++g) {
            v += to_float(q[p.qs.offset(first.b, first.hs * G + g, i) + d]);
          }
        } else {
          v = to_float(q[p.qs.offset(first.b, first.hs, i) + d]);
        }
      }
      row_tile[e % kTileDepth][x] = v;
    }
    for (int e = threadIdx.x; e < kTileDepth * kTileRegions; e += kTileThreads) {
      const int x = e / kTileDepth, d = d0 + e % kTileDepth, r = r0 + x;
      region_tile[e % kTileDepth][x] =
          r < R && d < D ? to_float(desc[p.ds.offset(first.b, first.hk, r) + d]) : 0.f;
    }
    __syncthreads();
#pragma unroll 8
    for (int d = 0; d < kTileDepth; ++d) {
      float a[4], b[4];
      load_shared_floats<4>(&row_tile[d][ty * 4], a);
      load_shared_floats<4>(&region_tile[d][tx * 4], b);
#pragma unroll
      for (int y = 0; y < 4; ++y) {
#pragma unroll
        for (int x = 0; x < 4; ++x) acc[y][x] += a[y] * b[x];
      }
    }
    __syncthreads();  // the tiles are refilled next
  }

  const int64_t first_local = run * S.q_len - p.first_row;  // the run's first row in the launch
#pragma unroll
  for (int y = 0; y < 4; ++y) {
    const int i = i0 + ty * 4 + y;
    if (i >= S.q_len) continue;
    const int32_t limit = p.q_pos ? p.q_pos[first.b * S.q_len + i] : kNoCausalLimit;
    uint32_t* keys = p.key_scratch + (first_local + i) * R;
#pragma unroll
    for (int x = 0; x < 4; ++x) {
      const int r = r0 + tx * 4 + x;
      if (r >= R) continue;
      // the mean over the group is its sum divided by G, as on the CPU
      const float score = shared_sel ? acc[y][x] / float(G) : acc[y][x];
      keys[r] = p.layout.selectable(first.b, r, limit) ? score_order_key(score) : 0u;
    }
  }
}

template <typename T, bool kVec>
__global__ void __launch_bounds__(kThreads) topk_kernel(TopkParams p) {
  extern __shared__ __align__(16) unsigned char smem_raw[];
  __shared__ uint32_t histogram[256];
  __shared__ int counters[4];  // candidates, taken, equal-rank base, scratch
  __shared__ uint32_t select_prefix, select_remaining;

  const AttentionShape& S = p.shape;
  const int R = p.layout.num_regions, D = S.head_dim, K = S.topk;
  const int64_t row = p.first_row + blockIdx.x;
  const int lane = threadIdx.x % 32;

  float* query = reinterpret_cast<float*>(smem_raw);
  uint32_t* scored = p.key_scratch + int64_t(blockIdx.x) * R;  // when a scoring kernel ran
  uint32_t* keys = p.keys_in_shared ? reinterpret_cast<uint32_t*>(query + D) : scored;
  uint64_t* sorted =
      p.sort_in_shared
          ? reinterpret_cast<uint64_t*>(smem_raw + ((D + (p.keys_in_shared ? R : 0)) * 4 + 15) / 16 * 16)
          : p.sort_scratch + int64_t(blockIdx.x) * p.sort_size;
  if (threadIdx.x < 4) counters[threadIdx.x] = 0;

  if (!p.keys_scored) {
    const TopkRow this_row = topk_row(p, row);
    load_topk_query<T>(p, this_row, query);
    score_regions<T, kVec>(p, this_row, query, 0, R, keys);
  } else if (p.keys_in_shared) {
    for (int r = threadIdx.x; r < R; r += kThreads) keys[r] = scored[r];
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

// Blocks of scoring_kernel per row: with few rows, as many as fill the GPU's slots for the
// kernel in one wave, but no more than give each a full round of loads (row_groups x
// kRowsInFlight regions); 1 (no scoring_kernel) when the rows alone fill half the slots.
int plan_scoring_blocks(int64_t rows, int64_t R, int lanes, int resident_per_sm) {
  const int64_t round = int64_t(kWarps) * (32 / lanes) * kRowsInFlight;
  const int64_t slots = int64_t(resident_per_sm) * multiprocessor_count();
  const int64_t blocks = std::min(slots / rows, ceil_div(R, round));
  return int(std::clamp<int64_t>(blocks, 1, std::max<int64_t>(R, 1)));
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

  const auto stream = c10::cuda::getCurrentCUDAStream();
  dispatch_float_types(q.scalar_type(), "region_topk", [&](auto tag) {
    using T = native_t<decltype(tag)>;
    const bool vec = rows_vectorizable<T>(p.desc, D, {p.ds.batch, p.ds.head, p.ds.row});
    p.lanes = lanes_per_row(D / (vec ? 16 / sizeof(T) : 1));
    auto scorer = vec ? scoring_kernel<T, true> : scoring_kernel<T, false>;
    auto tile_scorer = scoring_tile_kernel<T>;
    auto kernel = vec ? topk_kernel<T, true> : topk_kernel<T, false>;

    // Shared memory: the query, then the keys and the sort buffer when they fit.
    int64_t shared = D * 4;
    p.keys_in_shared = shared + R * 4 <= kSharedBudget;
    if (p.keys_in_shared) shared += R * 4;
    shared = (shared + 15) / 16 * 16;
    p.sort_in_shared = shared + int64_t(p.sort_size) * 8 <= kSharedBudget;
    if (p.sort_in_shared) shared += int64_t(p.sort_size) * 8;
    TORCH_CHECK(shared <= kSharedBudget, "gaze.region_topk: head dim ", D, " is too large");
    const int64_t sort_bytes = p.sort_in_shared ? 0 : int64_t(p.sort_size) * 8;

    // Who scores: scoring_tile_kernel for runs of positions long enough to share its tiles
    // (its launches take whole runs, so the scratch must hold one); else scoring_kernel
    // with the plan's blocks per row, or the selecting block itself (1).
    // GAZE_TOPK_SCORING_BLOCKS=n forces n blocks of scoring_kernel per row (1: none), for
    // measuring the plan.
    const int forced = forced_count("GAZE_TOPK_SCORING_BLOCKS");
    const bool tiled = forced == 0 && R > 0 && S.q_len >= kTileRows / 4 &&
                       kScratchBudget / (R * 4 + sort_bytes) >= S.q_len;
    p.scoring_blocks = tiled ? 1
                       : forced > 0 ? int(std::min<int64_t>(forced, std::max<int64_t>(R, 1)))
                                    : plan_scoring_blocks(rows, R, p.lanes,
                                                          resident_blocks(scorer, kThreads, D * 4));
    p.keys_scored = tiled || p.scoring_blocks > 1;
    const int64_t scratch_per_row = (!p.keys_in_shared || p.keys_scored ? R * 4 : 0) + sort_bytes;
    const int64_t most_rows = 0x7FFFFFFF / p.scoring_blocks;  // a grid's 2^31 - 1 blocks
    int64_t rows_per_launch = std::min(
        most_rows, scratch_per_row == 0
                       ? rows
                       : std::max<int64_t>(1, std::min(rows, kScratchBudget / scratch_per_row)));
    if (tiled) rows_per_launch -= rows_per_launch % S.q_len;
    at::Tensor key_scratch, sort_scratch;
    if (!p.keys_in_shared || p.keys_scored) {
      key_scratch = at::empty({rows_per_launch, R}, q.options().dtype(at::kInt));
      p.key_scratch = reinterpret_cast<uint32_t*>(key_scratch.data_ptr<int32_t>());
    }
    if (!p.sort_in_shared) {
      sort_scratch = at::empty({rows_per_launch, p.sort_size}, q.options().dtype(at::kLong));
      p.sort_scratch = reinterpret_cast<uint64_t*>(sort_scratch.data_ptr<int64_t>());
    }

    allow_dynamic_shared(scorer, D * 4);
    allow_dynamic_shared(kernel, shared);
    for (int64_t first = 0; first < rows; first += rows_per_launch) {
      p.first_row = first;
      const int64_t n = std::min(rows_per_launch, rows - first);
      if (tiled) {
        const int64_t tile_blocks =
            n / S.q_len * ceil_div(S.q_len, kTileRows) * ceil_div(R, kTileRegions);
        tile_scorer<<<grid_of(tile_blocks, "region_topk"), dim3(kTileThreads), 0, stream>>>(p);
        C10_CUDA_KERNEL_LAUNCH_CHECK();
      } else if (p.scoring_blocks > 1) {
        scorer<<<grid_of(n * p.scoring_blocks, "region_topk"), dim3(kThreads), D * 4, stream>>>(p);
        C10_CUDA_KERNEL_LAUNCH_CHECK();
      }
      kernel<<<dim3(n), dim3(kThreads), shared, stream>>>(p);
      C10_CUDA_KERNEL_LAUNCH_CHECK();
    }
  });
  return {idx, score};
}

}  // namespace
}  // namespace gaze::cuda

TORCH_LIBRARY_IMPL(gaze, CUDA, m) { m.impl("region_topk", &gaze::cuda::region_topk_cuda); }
