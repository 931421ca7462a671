// CUDA gaze_attention forward and backward on tensor cores, for many query rows
// (prefill and training), where every query position has its own selection.
//
// A thread block owns a tile of up to kTileRows query rows: the query heads of
// one selection head (the G heads of a KV head for a shared selection, else one
// head) at `positions` consecutive query positions; row r is position
// r / heads, head r % heads. Each warp owns 16 rows: one MMA row block.
//
//   1. Setup (build_union): the slots of the tile's selections become
//      (position, region) entries, the contract's rules applied (slot_taken),
//      sorted; their distinct regions with keys, ascending, are the tile's *union*.
//   2. The tile's keys are the fixed tokens, then the tokens of the union, in
//      steps of kTileKeys (step_keys). Each step finds its keys' positions and
//      the multiplicity of each key for each position's query: 1 for a fixed
//      token, the number of times its region was taken for a region token (looked
//      up once per union region the step reaches), 0 past the causal limit or
//      outside [0, N); then which keys, and which 8-key blocks of each warp, some
//      row sees. A step that no row sees is skipped: fixed tokens past the tile's
//      causal limits cost no matrix math.
//   3. The step's K and V rows are gathered into shared memory with cp.async, and
//      each warp runs its 16 rows against them with mma.sync m16n8k16 (fp16/bf16 in,
//      fp32 accumulate; fragments loaded with ldmatrix), the multiplicities weighting
//      the softmax; a warp skips the key blocks its rows do not see. The gathers
//      overlap the products: the forward gathers a step's V rows during S = Q K^T
//      (Q in registers) and the next step's K rows once that step is found, during
//      the V wait and O += P V (steps and multiplicities are double-buffered for this;
//      the K/V tiles are not).
// Forward: S = Q K^T, online softmax in registers, O += P V (P rounded to the
// input type, as in FlashAttention). Backward: S and dP = dO V^T recomputed,
// P = 2^(S - lse), dS = P (dP - delta); dQ += dS K in registers (the tile owns its
// rows), and through shared memory dV += P^T dO, dK += dS^T Q for the step's
// keys, added to float32 dK/dV with atomics (other tiles share the keys).
// The rows of a tile share every K/V read, so a tile pays for the union of its
// rows' selections: neighbouring text tokens mostly pick the same regions.
#include <ATen/core/Tensor.h>
#include <ATen/ops/arange.h>
#include <ATen/ops/empty.h>
#include <ATen/ops/searchsorted.h>
#include <ATen/ops/sort.h>
#include <c10/util/Exception.h>

#include <algorithm>
#include <tuple>
#include <type_traits>

#include "../common/op_args.h"
#include "async_copy.cuh"
#include "attention_common.cuh"
#include "mma.cuh"

namespace gaze::cuda {
namespace {

constexpr int kTileThreads = 128;
constexpr int kTileWarps = kTileThreads / 32;
constexpr int kTileRows = 16 * kTileWarps;  // query rows per block
constexpr int kTileKeys = 64;               // keys per step
constexpr int kKeyBlocks = kTileKeys / 8;   // MMA n-blocks of a step
constexpr int kMaxEntries = 2048;           // positions * topk per block
constexpr int kRowPad = 8;  // 16-bit elements after each shared row: lanes' rows hit different banks
constexpr int kProbStride = kTileKeys + kRowPad;  // row stride of the P and dS tiles
// By default tiles need kMinRowsAuto rows (one full warp when there are enough tiles to
// fill the GPU several times over, as with one selection per query head and many slots);
// with fewer, the split-K kernels are the better fit.
constexpr int kMinRowsAuto = 32;
constexpr int kMinRowsManyTiles = 16;
constexpr int kManyTilesPerSM = 4;
static_assert(kTileKeys == 4 * 16 && kTileWarps == 4, "the backward gives each warp 16 keys");

struct TileParams : AttentionOperands, BackwardOperands {  // q, k, v, grad_out: rows 16-byte aligned
  int positions;       // query positions per tile
  int heads;           // query heads per tile; positions * heads <= kTileRows
  int position_tiles;  // ceil(Lq / positions)
  int sort_size;       // power of two >= positions * topk

  // backward: the key-major pass (region_keys_backward_kernel) adds dK/dV of the regions'
  // keys, so the tile kernel adds only the fixed tokens'
  int region_keys_elsewhere;
  const int64_t* selections;         // sorted ((b Hs + hs) R + region) Lq + position
  const int64_t* selection_offsets;  // [B Hs R + 1]: each (b, hs, region)'s first selection

  // forward outputs
  void* out;   // [B, Hq, Lq, D] contiguous, dtype of q
  float* lse;  // [B, Hq, Lq]
};

// Byte offsets of a block's dynamic shared memory.
struct TileSmemLayout {
  int64_t q, k, v;       // uint16 [kTileRows][D + kRowPad] each (raw fp16/bf16)
  int64_t grad;          // backward: dO rows, like q
  int64_t probs, dscores;  // backward: uint16 [kTileRows][kProbStride]
  int64_t entries;       // uint64 [sort_size]: (position << 32 | region), sorted
  int64_t union_id;      // int32 [sort_size]: sorted regions, then the union's region ids
  int64_t union_begin;   // int32 [sort_size]: union region's first index into region_tokens
  int64_t union_offset;  // int32 [sort_size]: union region's first key in the union's key list
  int64_t weights;       // uint16 [2][positions][kTileKeys]: two steps' multiplicities
  int64_t total;
};

GAZE_HD TileSmemLayout tile_smem_layout(int D, int sort_size, int positions, bool backward) {
  TileSmemLayout s;
  const int64_t tile = int64_t(kTileRows) * (D + kRowPad) * 2;  // multiples of 16 bytes
  const int64_t prob_tile = backward ? int64_t(kTileRows) * kProbStride * 2 : 0;
  s.q = 0;
  s.k = tile;
  s.v = 2 * tile;
  s.grad = 3 * tile;
  s.probs = s.grad + (backward ? tile : 0);
  s.dscores = s.probs + prob_tile;
  s.entries = s.dscores + prob_tile;
  s.union_id = s.entries + 8 * int64_t(sort_size);
  s.union_begin = s.union_id + 4 * int64_t(sort_size);
  s.union_offset = s.union_begin + 4 * int64_t(sort_size);
  s.weights = s.union_offset + 4 * int64_t(sort_size);
  s.total = s.weights + 2 * 2 * int64_t(positions) * kTileKeys;
  return s;
}

// The current step's keys (static shared memory). A step's *runs* are its fixed tokens
// (run 0, when it has any), then one per union region it reaches, in order; the union
// holds no empty region, so a step has at most kTileKeys runs. Multiplicities are looked
// up once per (position, run).
struct StepKeys {
  int32_t pos[kTileKeys];         // -1: no key
  int32_t region[kTileKeys];      // -1: a fixed token (or no key)
  int32_t run[kTileKeys];         // the key's run (any, when it has no key)
  uint32_t seen[kTileKeys / 32];   // bit j % 32 of word j / 32: some row sees key j
  uint32_t warp_blocks[kTileWarps];  // bit nb: some row of the warp sees a key of [8 nb, 8 nb + 8)

  __device__ bool sees(int j) const { return seen[j / 32] >> (j % 32) & 1u; }
};

static_assert(kTileRows == kTileKeys, "load_tile_rows fills query and key tiles alike");

// Calls f(r, c, at) for each 16-byte chunk this thread copies into a shared tile of 64
// rows of D 16-bit elements (row stride D + kRowPad): chunk c (8 elements) of row r, at
// element `at` of the tile. The tile's 8 D chunks are a whole number per thread
// (D % 16 == 0), unrolled; where a thread's column is the same in every chunk (D = 64,
// 128, 256) its rows and offsets step by constants.
template <int D, typename F>
__device__ __forceinline__ void for_each_tile_chunk(F f) {
  constexpr int kChunks = D / 8, kStride = D + kRowPad;
  static_assert(kTileRows * kChunks % kTileThreads == 0, "every thread copies as many chunks");
  constexpr bool kFixedColumn = kTileThreads % kChunks == 0;
  const int tid = threadIdx.x;
#pragma unroll
  for (int i = 0; i < kTileRows * kChunks / kTileThreads; ++i) {
    const int x = tid + i * kTileThreads;
    const int r = kFixedColumn ? tid / kChunks + i * (kTileThreads / kChunks) : x / kChunks;
    const int c = kFixedColumn ? tid % kChunks : x % kChunks;
    f(r, c, r * kStride + c * 8);
  }
}

// A shared tile of 64 rows of D 16-bit elements from global memory, 16 bytes per thread
// at a time: row r from row_source(r), zeros where it is null. kAsync: the rows are copied
// with cp.async, as one group per thread (committed here); they are in place after
// copy_async_wait and a barrier.
template <int D, bool kAsync = false, typename RowSource>
__device__ __forceinline__ void load_tile_rows(uint16_t* dst, RowSource row_source) {
  for_each_tile_chunk<D>([&](int r, int c, int at) {
    const uint16_t* src = row_source(r);
    if (kAsync && src != nullptr) {
      copy_async_16(dst + at, src + c * 8);
    } else {
      uint4 chunk = make_uint4(0, 0, 0, 0);
      if (src != nullptr) chunk = __ldg(reinterpret_cast<const uint4*>(src + c * 8));
      *reinterpret_cast<uint4*>(dst + at) = chunk;
    }
  });
  if (kAsync) copy_async_commit();
}

// The block's tile and its shared memory.
template <int D>
struct TileBlock {
  static_assert(D % 16 == 0, "fragments are loaded 16 columns at a time");

  int64_t b;
  int sel_head, kv_head, first_head, i0;
  int positions;  // this tile's query positions (the last tile may have fewer)
  int rows;       // positions * heads
  uint16_t *tile_q, *tile_k, *tile_v, *tile_grad, *tile_probs, *tile_dscores;
  uint64_t* entries;
  int32_t *union_id, *union_begin, *union_offset;
  // Two steps' keys and multiplicities, [buf]: the kernels compute on one step while
  // they find the next and gather its K/V rows.
  StepKeys* steps;
  uint16_t* weights;  // of step buf at weights + buf * weights_size (an index: no local array)
  int weights_size;
  // [positions][kTileKeys]: multiplicity per (position, run) of the step being found. The
  // forward's Q tile (its Q is in registers by then); the backward's K tile (next_step runs
  // after every warp is done with it, before the next step's rows are gathered).
  uint16_t* run_counts;
  int num_union, num_keys;  // after build_union

  __device__ TileBlock(const TileParams& p, unsigned char* smem, StepKeys* two_steps, bool backward)
      : steps(two_steps) {
    const AttentionShape& S = p.shape;
    const int tile = int(blockIdx.x % p.position_tiles);
    sel_head = int((blockIdx.x / p.position_tiles) % S.sel_heads);
    b = blockIdx.x / (int64_t(p.position_tiles) * S.sel_heads);
    const bool shared_sel = S.sel_heads == S.kv_heads;
    kv_head = shared_sel ? sel_head : sel_head / S.group();
    first_head = shared_sel ? sel_head * S.group() : sel_head;
    i0 = tile * p.positions;
    positions = min(p.positions, S.q_len - i0);
    rows = positions * p.heads;
    const TileSmemLayout L = tile_smem_layout(D, p.sort_size, p.positions, backward);
    tile_q = reinterpret_cast<uint16_t*>(smem + L.q);
    tile_k = reinterpret_cast<uint16_t*>(smem + L.k);
    tile_v = reinterpret_cast<uint16_t*>(smem + L.v);
    tile_grad = reinterpret_cast<uint16_t*>(smem + L.grad);
    tile_probs = reinterpret_cast<uint16_t*>(smem + L.probs);
    tile_dscores = reinterpret_cast<uint16_t*>(smem + L.dscores);
    entries = reinterpret_cast<uint64_t*>(smem + L.entries);
    union_id = reinterpret_cast<int32_t*>(smem + L.union_id);
    union_begin = reinterpret_cast<int32_t*>(smem + L.union_begin);
    union_offset = reinterpret_cast<int32_t*>(smem + L.union_offset);
    weights = reinterpret_cast<uint16_t*>(smem + L.weights);
    weights_size = p.positions * kTileKeys;
    run_counts = backward ? tile_k : tile_q;
    static_assert(kTileKeys <= D + kRowPad, "run_counts fits a tile: positions <= kTileRows");
  }

  // Row r of the tile in a [B, H, Lq, D] tensor.
  __device__ int head_of(const TileParams& p, int r) const { return first_head + r % p.heads; }
  __device__ int query_of(const TileParams& p, int r) const { return i0 + r / p.heads; }

  // The tile's rows of a [B, Hq, Lq, D] tensor into a shared tile (zeros past `rows`).
  __device__ void load_rows(const TileParams& p, const void* src, const Strides4& s, uint16_t* dst) const {
    const uint16_t* base = reinterpret_cast<const uint16_t*>(src);
    load_tile_rows<D>(dst, [&](int r) {
      return r < rows ? base + s.offset(b, head_of(p, r), query_of(p, r)) : nullptr;
    });
  }

  // Step 1: causal limits per position, sorted entries, the union and its key
  // offsets; sets num_union and num_keys. Ends with __syncthreads().
  __device__ void build_union(const TileParams& p, int32_t* limits, int32_t* warp_totals) {
    const AttentionShape& S = p.shape;
    const LayoutView& layout = p.layout;
    const int K = S.topk;
    if (threadIdx.x < kTileRows) {
      const int t = threadIdx.x;
      limits[t] = t >= positions ? -1 : p.q_pos ? p.q_pos[b * S.q_len + i0 + t] : kNoCausalLimit;
    }
    // (position, region) of every slot taken; the others sort last
    const int32_t* tile_slots = p.idx + ((b * S.sel_heads + sel_head) * int64_t(S.q_len) + i0) * K;
    for (int e = threadIdx.x; e < p.sort_size; e += kTileThreads) {
      uint64_t entry = ~0ull;
      if (e < positions * K) {
        const int32_t* slots = tile_slots + int64_t(e / K) * K;
        if (slot_taken(layout, slots, e % K)) entry = (uint64_t(e / K) << 32) | uint32_t(slots[e % K]);
      }
      entries[e] = entry;
    }
    __syncthreads();
    block_bitonic_sort</*kDescending=*/false>(entries, p.sort_size);

    // the distinct regions with keys, ascending (an empty region adds no key: left out,
    // every union region has a key, so a step reaches at most kTileKeys of them)
    constexpr int32_t kNone = 0x7FFFFFFF;
    for (int e = threadIdx.x; e < p.sort_size; e += kTileThreads) {
      const int32_t region = int32_t(uint32_t(entries[e]));
      union_id[e] = entries[e] == ~0ull || layout.region(b, region).size() == 0 ? kNone : region;
    }
    __syncthreads();
    block_bitonic_sort</*kDescending=*/false>(union_id, p.sort_size);
    auto first_of_its_region = [&](int e) {
      return union_id[e] != kNone && (e == 0 || union_id[e] != union_id[e - 1]);
    };
    for (int e = threadIdx.x; e < p.sort_size; e += kTileThreads) union_offset[e] = first_of_its_region(e);
    num_union = block_exclusive_scan(union_offset, p.sort_size, warp_totals);
    for (int e = threadIdx.x; e < p.sort_size; e += kTileThreads) {
      if (first_of_its_region(e)) union_begin[union_offset[e]] = union_id[e];
    }
    __syncthreads();
    for (int u = threadIdx.x; u < num_union; u += kTileThreads) {  // ids back to union_id; spans
      const int32_t region = union_begin[u];
      const RegionSpan span = layout.region(b, region);
      union_id[u] = region;
      union_begin[u] = span.begin;
      union_offset[u] = span.size();
    }
    num_keys = layout.num_fixed + block_exclusive_scan(union_offset, num_union, warp_totals);
  }

  // The first step from k0 on whose keys some row sees, its keys and multiplicities in
  // steps[buf] and weights; num_keys when there is none. All threads call it; it
  // ends with a barrier when it looked at a step.
  __device__ int64_t next_step(const TileParams& p, int64_t k0, const int32_t* limits, int buf) const {
    while (k0 < num_keys && !step_keys(p, k0, limits, buf)) k0 += kTileKeys;
    return min(k0, int64_t(num_keys));
  }

  // The union region of union key w (a key past the fixed tokens): the last one whose first
  // key is <= w, searched in [lo, hi].
  __device__ int union_of_key(int w, int lo, int hi) const { return last_at_most(union_offset, lo, hi, w); }

  // Step 2 for the keys [k0, k0 + kTileKeys), k0 < num_keys: their positions, regions and
  // runs into steps[buf], the multiplicities into step buf's weights. Returns whether any
  // row sees any key; ends with a barrier. Every thread finds the step's runs by itself (two
  // searches of the union), so the multiplicity lookups per (position, run) go before the
  // one barrier in the middle, with the keys' positions. Writes steps[buf] and run_counts
  // before that barrier.
  __device__ bool step_keys(const TileParams& p, int64_t k0, const int32_t* limits, int buf) const {
    StepKeys& step = steps[buf];
    uint16_t* step_weights = weights + buf * weights_size;
    const LayoutView& layout = p.layout;
    const int tid = threadIdx.x;
    const int num_fixed = layout.num_fixed;
    const int end = int(min(k0 + kTileKeys, int64_t(num_keys)));
    const int fixed_runs = k0 < num_fixed ? 1 : 0;
    int first_union = 0, last_union = -1;  // the union regions of the step's other keys
    if (end > num_fixed) {
      first_union = union_of_key(int(max(k0, int64_t(num_fixed))) - num_fixed, 0, num_union - 1);
      last_union = union_of_key(end - 1 - num_fixed, first_union, num_union - 1);
    }
    // <= kTileKeys: the union's regions all have keys. Clamped all the same (and the keys'
    // runs with it), so that unchecked spans whose key offsets overflow int32 (ascending no
    // more) cannot take run_counts past its rows.
    const int num_runs = min(fixed_runs + last_union - first_union + 1, kTileKeys);
    if (tid < kTileKeys) {
      const int64_t e = k0 + tid;
      int32_t pos = -1, region = -1, run = 0;
      if (e < num_fixed) {
        pos = layout.fixed(b)[e];
      } else if (e < end) {
        const int w = int(e) - num_fixed;
        const int u = union_of_key(w, first_union, last_union);
        pos = layout.region_token(b, union_begin[u] + (w - union_offset[u]));
        region = union_id[u];
        run = min(fixed_runs + u - first_union, kTileKeys - 1);
      }
      step.pos[tid] = layout.visible(pos, kNoCausalLimit) ? pos : -1;
      step.region[tid] = region;
      step.run[tid] = run;
      if (tid < kTileKeys / 32) step.seen[tid] = 0;
      if (tid < kTileWarps) step.warp_blocks[tid] = 0;
    }
    for (int x = tid; x < p.positions * num_runs; x += kTileThreads) {
      const int position = x / num_runs, r = x % num_runs;
      run_counts[position * kTileKeys + r] = uint16_t(
          r < fixed_runs ? 1
                         : entry_count((uint64_t(position) << 32) | uint32_t(union_id[first_union + r - fixed_runs]),
                                       p.sort_size));
    }
    __syncthreads();
    // A warp takes whole positions, a lane keys 2 lane and 2 lane + 1 (one 32-bit store of
    // their multiplicities). The warp's ballots add up in registers over its positions;
    // lane 0 adds them to the step's masks once: the keys seen, and for each tile warp the
    // keys its rows see (a position's rows [position heads, (position + 1) heads) may span
    // two or more warps).
    static_assert(kTileKeys == 64 && kTileThreads % 32 == 0, "a lane takes two keys");
    const int lane = tid % 32, key0 = 2 * lane;
    const int32_t pos0 = step.pos[key0], pos1 = step.pos[key0 + 1];
    const int32_t run0 = step.run[key0], run1 = step.run[key0 + 1];
    uint32_t seen_even = 0, seen_odd = 0;   // bit l: some row sees key 2 l (2 l + 1)
    uint32_t warp_lanes[kTileWarps] = {};   // bit l: a row of warp w sees key 2 l or 2 l + 1
    for (int position = tid / 32; position < p.positions; position += kTileWarps) {
      const int32_t limit = limits[position];
      const uint16_t* counts = run_counts + position * kTileKeys;
      const uint32_t count0 = pos0 >= 0 && pos0 <= limit ? counts[run0] : 0u;
      const uint32_t count1 = pos1 >= 0 && pos1 <= limit ? counts[run1] : 0u;
      *reinterpret_cast<uint32_t*>(step_weights + position * kTileKeys + key0) = count0 | count1 << 16;
      const uint32_t even = __ballot_sync(0xFFFFFFFFu, count0 > 0);
      const uint32_t odd = __ballot_sync(0xFFFFFFFFu, count1 > 0);
      seen_even |= even;
      seen_odd |= odd;
      const int first_warp = position * p.heads / 16, last_warp = ((position + 1) * p.heads - 1) / 16;
#pragma unroll
      for (int w = 0; w < kTileWarps; ++w) {
        if (w >= first_warp && w <= last_warp) warp_lanes[w] |= even | odd;
      }
    }
    if (lane == 0) {
      // lane bits l of the even and odd keys to key bits 2 l and 2 l + 1
      auto spread = [](uint32_t x) {  // bit i of 16 to bit 2 i
        x = (x | x << 8) & 0x00FF00FFu;
        x = (x | x << 4) & 0x0F0F0F0Fu;
        x = (x | x << 2) & 0x33333333u;
        return (x | x << 1) & 0x55555555u;
      };
      if (seen_even | seen_odd) {
        atomicOr(&step.seen[0], spread(seen_even & 0xFFFFu) | spread(seen_odd & 0xFFFFu) << 1);
        atomicOr(&step.seen[1], spread(seen_even >> 16) | spread(seen_odd >> 16) << 1);
      }
#pragma unroll
      for (int w = 0; w < kTileWarps; ++w) {
        uint32_t blocks = 0;  // block nb: keys [8 nb, 8 nb + 8) = lanes [4 nb, 4 nb + 4)
#pragma unroll
        for (int nb = 0; nb < kKeyBlocks; ++nb) blocks |= uint32_t((warp_lanes[w] >> (4 * nb) & 0xFu) != 0) << nb;
        if (blocks != 0) atomicOr(&step.warp_blocks[w], blocks);
      }
    }
    return __syncthreads_or((seen_even | seen_odd) != 0);
  }

  // How many times `entry` occurs in the sorted entries.
  __device__ int entry_count(uint64_t entry, int n) const {
    int lo = 0, hi = n;  // the first entry >= `entry`
    while (lo < hi) {
      const int mid = (lo + hi) / 2;
      if (entries[mid] < entry) {
        lo = mid + 1;
      } else {
        hi = mid;
      }
    }
    int count = 0;
    while (lo < n && entries[lo] == entry) {
      ++count;
      ++lo;
    }
    return count;
  }

  // Step 3: starts copying the seen keys' rows of step `buf` from a [B, Hkv, N, D] tensor
  // into a shared tile (zeros for the others), one cp.async group per thread: in place
  // after copy_async_wait and a barrier.
  __device__ void gather_keys(const void* src, const Strides4& s, int buf, uint16_t* dst) const {
    const StepKeys& step = steps[buf];
    const uint16_t* base = reinterpret_cast<const uint16_t*>(src) + s.offset(b, kv_head, 0);
    const uint64_t row_stride = uint64_t(s.row);
    // (load_tile_rows' null-pointer test would be a 64-bit compare per row after the multiply;
    // a seen key's position is in [0, N): an unsigned product needs no sign extension)
    const uint64_t seen = uint64_t(step.seen[1]) << 32 | step.seen[0];
    static_assert(kTileKeys == 64, "a step's seen keys are one 64-bit mask");
    for_each_tile_chunk<D>([&](int j, int c, int at) {
      if (seen >> j & 1u) {
        copy_async_16(dst + at, base + c * 8 + uint32_t(step.pos[j]) * row_stride);
      } else {
        *reinterpret_cast<uint4*>(dst + at) = make_uint4(0, 0, 0, 0);
      }
    });
    copy_async_commit();
  }

  // The multiplicities of step buf's keys j and j + 1 (j even) for this thread's row of
  // selection `sel` (-1: none), in the low and high 16 bits: one load.
  __device__ uint32_t weight_pair(int buf, int sel, int j) const {
    return sel >= 0 ? *reinterpret_cast<const uint32_t*>(weights + buf * weights_size + sel * kTileKeys + j) : 0u;
  }

  // Step buf's key blocks (bit nb: keys [8 nb, 8 nb + 8)) that some row of `warp` sees;
  // the warp skips the products of the others, whose P and dS are zero for its rows.
  __device__ uint32_t warp_key_blocks(int warp, int buf) const { return steps[buf].warp_blocks[warp]; }
};

template <int N>
__device__ __forceinline__ void zero_fragments(float (&acc)[N][4]) {
#pragma unroll
  for (int n = 0; n < N; ++n) {
#pragma unroll
    for (int e = 0; e < 4; ++e) acc[n][e] = 0.f;
  }
}

// The fragment loads below take 16 x 16 blocks with ldmatrix (mma.cuh): four 16-byte rows
// per lane and instruction, where 16-bit loads of single elements would need 16 (the
// shared tiles' row strides, D + 8 and kTileKeys + 8 elements, keep ldmatrix's eight rows
// of a matrix in distinct banks). Every call is warp-uniform: `blocks` comes from a ballot.
static_assert(kKeyBlocks % 2 == 0, "key blocks are loaded in pairs");

// acc[nb] = rows [row0, row0 + 16) of `rows_tile` times the kTileKeys rows of
// `keys_tile`, transposed: (16 x D) . (D x 64), every key block (the key-major pass, whose
// rows all selected the step's region).
template <typename T, int D>
__device__ __forceinline__ void rows_times_all_keys(const uint16_t* rows_tile, const uint16_t* keys_tile,
                                                    int row0, float (&acc)[kKeyBlocks][4]) {
  constexpr int kStride = D + kRowPad;
  zero_fragments(acc);
#pragma unroll
  for (int kk = 0; kk < D / 16; ++kk) {
    uint32_t a[4];
    load_a_fragment(rows_tile + row0 * kStride + kk * 16, kStride, a);
#pragma unroll
    for (int nb = 0; nb < kKeyBlocks; nb += 2) {
      uint32_t bk[4];  // key blocks nb and nb + 1
      load_b_fragments_n_major(keys_tile + nb * 8 * kStride + kk * 16, kStride, bk);
      mma_16x8x16<T>(acc[nb], a, {bk[0], bk[1]});
      mma_16x8x16<T>(acc[nb + 1], a, {bk[2], bk[3]});
    }
  }
}

// A warp's 16 rows as A fragments, one 16-column slice kk of D at a time, for
// rows_times_keys: from a shared tile at each call, or from registers.
template <int D>
struct SharedRows {
  const uint16_t* rows;  // the warp's first row in a shared tile
  __device__ void operator()(int kk, uint32_t (&a)[4]) const {
    load_a_fragment(rows + kk * 16, D + kRowPad, a);
  }
};
template <int D>
struct RowFragments {
  uint32_t a[D / 16][4];
  // rows [row0, row0 + 16) of a shared tile over all of D (the forward keeps Q so)
  __device__ void load(const uint16_t* rows_tile, int row0) {
#pragma unroll
    for (int kk = 0; kk < D / 16; ++kk) SharedRows<D>{rows_tile + row0 * (D + kRowPad)}(kk, a[kk]);
  }
  __device__ void operator()(int kk, uint32_t (&out)[4]) const {
#pragma unroll
    for (int i = 0; i < 4; ++i) out[i] = a[kk][i];
  }
};

// Key blocks nb (kFirst) and nb + 1 (kSecond) of rows_times_keys, over all of D.
template <typename T, int D, bool kFirst, bool kSecond, typename Rows>
__device__ __forceinline__ void rows_times_key_pair(const Rows& rows, const uint16_t* keys_tile, int nb,
                                                    float (&acc)[kKeyBlocks][4]) {
  constexpr int kStride = D + kRowPad;
#pragma unroll
  for (int kk = 0; kk < D / 16; ++kk) {
    uint32_t a[4], bk[4];  // bk: key blocks nb and nb + 1
    rows(kk, a);
    load_b_fragments_n_major(keys_tile + nb * 8 * kStride + kk * 16, kStride, bk);
    if (kFirst) mma_16x8x16<T>(acc[nb], a, {bk[0], bk[1]});
    if (kSecond) mma_16x8x16<T>(acc[nb + 1], a, {bk[2], bk[3]});
  }
}

// acc[nb] = a warp's 16 rows (SharedRows or RowFragments) times the kTileKeys rows of
// `keys_tile`, transposed: (16 x D) . (D x 64), for S = Q K^T and dP = dO V^T; only the key
// blocks in `blocks` (warp_key_blocks), zeros for the others. The tests of `blocks` sit
// outside the loop over D, one branch per pair of key blocks: tested inside it, once per
// pair and 16 columns, they cost the forward's step ~200 instructions of branches and bit
// tests (and a WARPSYNC per mma.sync) for its 64 mma.sync. Rows from shared memory are
// loaded once per pair of key blocks that some row sees.
template <typename T, int D, typename Rows>
__device__ __forceinline__ void rows_times_keys(const Rows& rows, const uint16_t* keys_tile, uint32_t blocks,
                                                float (&acc)[kKeyBlocks][4]) {
  zero_fragments(acc);
#pragma unroll
  for (int nb = 0; nb < kKeyBlocks; nb += 2) {
    const uint32_t pair = (blocks >> nb) & 3u;
    if (pair == 3u) {
      rows_times_key_pair<T, D, true, true>(rows, keys_tile, nb, acc);
    } else if (pair == 1u) {
      rows_times_key_pair<T, D, true, false>(rows, keys_tile, nb, acc);
    } else if (pair == 2u) {
      rows_times_key_pair<T, D, false, true>(rows, keys_tile, nb, acc);
    }
  }
}

// acc[dn] += probs (16 x 64, C fragments in registers) times the kTileKeys rows of
// `keys_tile` (64 x D), for O += P V and dQ += dS K. The C fragments of key blocks
// 2ks and 2ks + 1 are the A fragment of k-step ks, skipped when neither is in `blocks`.
template <typename T, int D>
__device__ __forceinline__ void probs_times_keys(const float (&probs)[kKeyBlocks][4], uint32_t blocks,
                                                 const uint16_t* keys_tile, float (&acc)[D / 8][4]) {
  constexpr int kStride = D + kRowPad;
#pragma unroll
  for (int ks = 0; ks < kTileKeys / 16; ++ks) {
    if (((blocks >> (2 * ks)) & 3u) == 0) continue;
    const uint32_t a[4] = {pack_pair<T>(probs[2 * ks][0], probs[2 * ks][1]),
                           pack_pair<T>(probs[2 * ks][2], probs[2 * ks][3]),
                           pack_pair<T>(probs[2 * ks + 1][0], probs[2 * ks + 1][1]),
                           pack_pair<T>(probs[2 * ks + 1][2], probs[2 * ks + 1][3])};
#pragma unroll
    for (int dn = 0; dn < D / 8; dn += 2) {
      uint32_t bk[4];  // columns dn and dn + 1
      load_b_fragments_k_major(keys_tile + ks * 16 * kStride + dn * 8, kStride, bk);
      mma_16x8x16<T>(acc[dn], a, {bk[0], bk[1]});
      mma_16x8x16<T>(acc[dn + 1], a, {bk[2], bk[3]});
    }
  }
}

// acc[dn] += (keys [key0, key0 + 16) of the shared kTileRows x kTileKeys matrix
// `by_row`, transposed) times the kTileRows rows of `rows_tile`: (16 x 64) . (64 x D),
// for dV = P^T dO and dK = dS^T Q. Rows [16 ks, 16 ks + 16) are warp ks's: skipped when
// warp_blocks[ks] has neither of the two key blocks (their P and dS are zero).
template <typename T, int D>
__device__ __forceinline__ void keys_times_rows(const uint16_t* by_row, const uint16_t* rows_tile,
                                                int key0, const uint32_t* warp_blocks,
                                                float (&acc)[D / 8][4]) {
  constexpr int kStride = D + kRowPad;
#pragma unroll
  for (int ks = 0; ks < kTileRows / 16; ++ks) {
    if (((warp_blocks[ks] >> (key0 / 8)) & 3u) == 0) continue;
    uint32_t a[4];
    load_a_fragment_transposed(by_row + ks * 16 * kProbStride + key0, kProbStride, a);
#pragma unroll
    for (int dn = 0; dn < D / 8; dn += 2) {
      uint32_t br[4];
      load_b_fragments_k_major(rows_tile + ks * 16 * kStride + dn * 8, kStride, br);
      mma_16x8x16<T>(acc[dn], a, {br[0], br[1]});
      mma_16x8x16<T>(acc[dn + 1], a, {br[2], br[3]});
    }
  }
}

// For this thread's row h of its warp (h = 0: lane row g, 1: g + 8; tile row `row`):
// P = count(j) 2^(S scale - lse2) and dS = P (dP - delta) over the step's keys, in place
// in s and dp, and rounded to T into the shared P and dS tiles. lse2 = -inf: P = dS = 0.
// count_pair(j), j even: the counts of keys j and j + 1, in the low and high 16 bits.
template <typename T, typename CountPair>
__device__ __forceinline__ void probs_and_dscores(float (&s)[kKeyBlocks][4], float (&dp)[kKeyBlocks][4],
                                                  int h, int row, float lse2, float delta,
                                                  float score_scale, CountPair count_pair,
                                                  uint16_t* tile_probs, uint16_t* tile_dscores) {
  const int t4 = threadIdx.x % 4;
#pragma unroll
  for (int nb = 0; nb < kKeyBlocks; ++nb) {
    const uint32_t counts = count_pair(nb * 8 + 2 * t4);
#pragma unroll
    for (int c = 0; c < 2; ++c) {
      const int n = int(counts >> (16 * c) & 0xFFFFu);
      // An unseen key gets dS = 0 even where delta is NaN (a NaN row's NaN stays in its keys).
      const bool seen = n > 0 && lse2 != kNegInf;
      const float pj = seen ? float(n) * exp2_approx(s[nb][2 * h + c] * score_scale - lse2) : 0.f;
      s[nb][2 * h + c] = pj;
      dp[nb][2 * h + c] = seen ? pj * (dp[nb][2 * h + c] - delta) : 0.f;
    }
    const int at = row * kProbStride + nb * 8 + 2 * t4;
    *reinterpret_cast<uint32_t*>(tile_probs + at) = pack_pair<T>(s[nb][2 * h], s[nb][2 * h + 1]);
    *reinterpret_cast<uint32_t*>(tile_dscores + at) = pack_pair<T>(dp[nb][2 * h], dp[nb][2 * h + 1]);
  }
}

// Adds factor * acc (keys_times_rows' result: this warp's keys key0 + g and key0 + g + 8)
// to the float32 rows [row0 + pos(j)] of dst [.., D]; keys with pos(j) < 0 are skipped.
template <int D, typename Position>
__device__ __forceinline__ void add_key_rows(float* dst, int64_t row0, int key0,
                                             const float (&acc)[D / 8][4], float factor,
                                             Position pos) {
  const int lane = threadIdx.x % 32, g = lane / 4, t4 = lane % 4;
#pragma unroll
  for (int half = 0; half < 2; ++half) {
    const int32_t at = pos(key0 + g + 8 * half);
    if (at < 0) continue;
    float* dst_row = dst + (row0 + at) * D + 2 * t4;
#pragma unroll
    for (int dn = 0; dn < D / 8; ++dn) {
      atomic_add_pair(dst_row + dn * 8, acc[dn][2 * half] * factor, acc[dn][2 * half + 1] * factor);
    }
  }
}

template <typename T, int D>
__global__ void __launch_bounds__(kTileThreads) attention_forward_tiled_kernel(TileParams p) {
  extern __shared__ __align__(16) unsigned char smem[];
  __shared__ StepKeys steps[2];
  __shared__ int32_t limits[kTileRows];  // causal limit per position (-1: no query)
  __shared__ int32_t warp_totals[kTileWarps];
  TileBlock<D> tb(p, smem, steps, /*backward=*/false);
  tb.load_rows(p, p.q, p.qs, tb.tile_q);
  tb.build_union(p, limits, warp_totals);
  RowFragments<D> q_rows;  // this warp's 16 rows of Q, for every step's S = Q K^T
  q_rows.load(tb.tile_q, threadIdx.x / 32 * 16);  // after build_union's barriers
  __syncthreads();  // every warp has its Q: the Q tile holds run_counts from here

  const int warp = threadIdx.x / 32, lane = threadIdx.x % 32, t4 = lane % 4;
  const bool warp_active = warp * 16 < tb.rows;
  const int row[2] = {warp * 16 + lane / 4, warp * 16 + lane / 4 + 8};  // this thread's rows
  const int sel[2] = {row[0] < tb.rows ? row[0] / p.heads : -1, row[1] < tb.rows ? row[1] / p.heads : -1};
  float acc[D / 8][4] = {};  // O, unnormalized; row[h] in elements 2h, 2h + 1
  float row_max[2] = {kNegInf, kNegInf};
  float row_sum[2] = {0.f, 0.f};  // over this thread's columns; the quad adds up at the end

  // The gathers fly while the tensor cores work: a step's V rows during S = Q K^T and
  // the softmax (and the search for the next step), the next step's K rows during the V
  // wait and O += P V.
  int buf = 0;
  int64_t k0 = tb.next_step(p, 0, limits, buf);
  if (k0 < tb.num_keys) tb.gather_keys(p.k, p.ks, buf, tb.tile_k);
  while (k0 < tb.num_keys) {
    copy_async_wait<0>();
    __syncthreads();  // the step's K rows are in; every warp is done with the V tile
    tb.gather_keys(p.v, p.vs, buf, tb.tile_v);

    const uint32_t blocks = warp_active ? tb.warp_key_blocks(warp, buf) : 0u;
    float s[kKeyBlocks][4];
    if (blocks != 0) {  // else no row of this warp sees a key of the step: nothing changes
      rows_times_keys<T, D>(q_rows, tb.tile_k, blocks, s);
      // multiplicities and the online softmax (h: row[h], elements 2h and 2h + 1)
#pragma unroll
      for (int h = 0; h < 2; ++h) {
        uint32_t counts[kKeyBlocks];  // this thread's two keys of each block, 16 bits each
#pragma unroll
        for (int nb = 0; nb < kKeyBlocks; ++nb) counts[nb] = tb.weight_pair(buf, sel[h], nb * 8 + 2 * t4);
        float step_max = kNegInf;
#pragma unroll
        for (int nb = 0; nb < kKeyBlocks; ++nb) {
#pragma unroll
          for (int c = 0; c < 2; ++c) {
            const bool on = (counts[nb] >> (16 * c) & 0xFFFFu) != 0;
            const float x = on ? s[nb][2 * h + c] * p.score_scale : kNegInf;
            s[nb][2 * h + c] = x;
            step_max = fmaxf(step_max, x);
          }
        }
        step_max = fmaxf(step_max, __shfl_xor_sync(0xFFFFFFFFu, step_max, 1));
        step_max = fmaxf(step_max, __shfl_xor_sync(0xFFFFFFFFu, step_max, 2));
        const float new_max = fmaxf(row_max[h], step_max);
        const float safe = softmax_safe_max(new_max);
        const float rescale = softmax_rescale(row_max[h], new_max);
        row_max[h] = new_max;
        float sum = 0.f;
#pragma unroll
        for (int nb = 0; nb < kKeyBlocks; ++nb) {
#pragma unroll
          for (int c = 0; c < 2; ++c) {
            // An unseen key's score is -inf here: 2^(-inf - safe) is 0 (safe is finite, or
            // +inf, or NaN, which makes the row NaN whatever the unseen keys give).
            const int count = int(counts[nb] >> (16 * c) & 0xFFFFu);
            const float pj = float(count) * exp2_approx(s[nb][2 * h + c] - safe);
            s[nb][2 * h + c] = pj;
            sum += pj;
          }
        }
        row_sum[h] = row_sum[h] * rescale + sum;
#pragma unroll
        for (int dn = 0; dn < D / 8; ++dn) {
          acc[dn][2 * h] *= rescale;
          acc[dn][2 * h + 1] *= rescale;
        }
      }
    }

    // The next step's keys (after their barriers every warp is done with the K tile): its
    // K rows fly during this step's V wait and O += P V.
    const int64_t next = tb.next_step(p, k0 + kTileKeys, limits, buf ^ 1);
    if (next < tb.num_keys) {
      tb.gather_keys(p.k, p.ks, buf ^ 1, tb.tile_k);
      copy_async_wait<1>();
    } else {
      copy_async_wait<0>();
    }
    __syncthreads();  // the V rows are in
    if (blocks != 0) probs_times_keys<T, D>(s, blocks, tb.tile_v, acc);
    k0 = next;
    buf ^= 1;
  }

  if (!warp_active) return;
  T* out = reinterpret_cast<T*>(p.out);
#pragma unroll
  for (int h = 0; h < 2; ++h) {
    float sum = row_sum[h];
    sum += __shfl_xor_sync(0xFFFFFFFFu, sum, 1);
    sum += __shfl_xor_sync(0xFFFFFFFFu, sum, 2);
    if (row[h] >= tb.rows) continue;
    const int64_t out_row =
        (tb.b * p.shape.q_heads + tb.head_of(p, row[h])) * int64_t(p.shape.q_len) + tb.query_of(p, row[h]);
    const float norm = softmax_normalizer(sum);
    uint32_t* dst = reinterpret_cast<uint32_t*>(out + out_row * D);
#pragma unroll
    for (int dn = 0; dn < D / 8; ++dn) {
      dst[dn * 4 + t4] = pack_pair<T>(acc[dn][2 * h] * norm, acc[dn][2 * h + 1] * norm);
    }
    if (t4 == 0) p.lse[out_row] = softmax_lse(row_max[h], sum);
  }
}

template <typename T, int D>
__global__ void __launch_bounds__(kTileThreads) attention_backward_tiled_kernel(TileParams p) {
  extern __shared__ __align__(16) unsigned char smem[];
  __shared__ StepKeys steps[2];
  __shared__ int32_t limits[kTileRows];
  __shared__ int32_t warp_totals[kTileWarps];
  TileBlock<D> tb(p, smem, steps, /*backward=*/true);
  tb.load_rows(p, p.q, p.qs, tb.tile_q);
  tb.load_rows(p, p.grad_out, p.gs, tb.tile_grad);
  for (int x = threadIdx.x; x < kTileRows * kProbStride; x += kTileThreads) {  // idle rows stay 0
    tb.tile_probs[x] = 0;
    tb.tile_dscores[x] = 0;
  }
  tb.build_union(p, limits, warp_totals);

  const AttentionShape& S = p.shape;
  const int warp = threadIdx.x / 32, lane = threadIdx.x % 32, g = lane / 4, t4 = lane % 4;
  const bool warp_active = warp * 16 < tb.rows;
  const uint16_t* q_tile_rows = tb.tile_q + warp * 16 * (D + kRowPad);  // this warp's rows
  const uint16_t* grad_tile_rows = tb.tile_grad + warp * 16 * (D + kRowPad);
  const int row[2] = {warp * 16 + g, warp * 16 + g + 8};
  const int sel[2] = {row[0] < tb.rows ? row[0] / p.heads : -1, row[1] < tb.rows ? row[1] / p.heads : -1};
  float lse2[2], delta[2];  // per row: lse in base 2 (-inf: no keys, P = 0), delta
  int64_t stat_row[2];
#pragma unroll
  for (int h = 0; h < 2; ++h) {
    stat_row[h] = (tb.b * S.q_heads + tb.head_of(p, row[h])) * int64_t(S.q_len) + tb.query_of(p, row[h]);
    const bool live = row[h] < tb.rows;
    lse2[h] = live ? p.lse_in[stat_row[h]] * kLog2e : kNegInf;
    delta[h] = live ? p.delta[stat_row[h]] : 0.f;
  }
  const float scale = p.score_scale / kLog2e;
  float dq[D / 8][4] = {};
  const int64_t kv_row0 = (tb.b * S.kv_heads + tb.kv_head) * int64_t(p.layout.num_keys);

  // The gathers fly while the tensor cores work: a step's V rows during S = Q K^T, the
  // next step's K and V rows during this step's dK/dV products (when the tile adds them).
  int buf = 0;
  int64_t k0 = tb.next_step(p, 0, limits, buf);
  if (k0 < tb.num_keys) {
    tb.gather_keys(p.k, p.ks, buf, tb.tile_k);
    tb.gather_keys(p.v, p.vs, buf, tb.tile_v);
  }
  while (k0 < tb.num_keys) {
    copy_async_wait<1>();
    __syncthreads();  // the step's K rows are in; every warp is done with the P and dS tiles

    const uint32_t blocks = warp_active ? tb.warp_key_blocks(warp, buf) : 0u;
    float s[kKeyBlocks][4];
    if (warp_active) rows_times_keys<T, D>(SharedRows<D>{q_tile_rows}, tb.tile_k, blocks, s);
    copy_async_wait<0>();
    __syncthreads();  // the V rows are in
    if (warp_active) {  // idle rows' P and dS stay zero from the start
      float dp[kKeyBlocks][4];
      rows_times_keys<T, D>(SharedRows<D>{grad_tile_rows}, tb.tile_v, blocks, dp);
      // P and dS (with multiplicities) to shared memory for dV, dK
#pragma unroll
      for (int h = 0; h < 2; ++h) {
        probs_and_dscores<T>(s, dp, h, row[h], lse2[h], delta[h], p.score_scale,
                             [&](int j) { return tb.weight_pair(buf, sel[h], j); }, tb.tile_probs,
                             tb.tile_dscores);
      }
      probs_times_keys<T, D>(dp, blocks, tb.tile_k, dq);
    }
    __syncthreads();  // P and dS are in; every warp is done with the K and V tiles

    const int64_t next = tb.next_step(p, k0 + kTileKeys, limits, buf ^ 1);
    if (next < tb.num_keys) {
      tb.gather_keys(p.k, p.ks, buf ^ 1, tb.tile_k);
      tb.gather_keys(p.v, p.vs, buf ^ 1, tb.tile_v);
    }
    // dV += P^T dO and dK += scale dS^T Q for this warp's 16 keys, to global memory (only
    // the fixed tokens' when the key-major pass adds the regions')
    if (!(p.region_keys_elsewhere && k0 >= p.layout.num_fixed)) {
      const StepKeys& step = steps[buf];
      const int key0 = warp * 16;
      float grad_keys[D / 8][4];
#pragma unroll
      for (int pass = 0; pass < 2; ++pass) {
        zero_fragments(grad_keys);
        keys_times_rows<T, D>(pass == 0 ? tb.tile_probs : tb.tile_dscores,
                              pass == 0 ? tb.tile_grad : tb.tile_q, key0, step.warp_blocks, grad_keys);
        add_key_rows<D>(pass == 0 ? p.dv : p.dk, kv_row0, key0, grad_keys, pass == 0 ? 1.f : scale,
                        [&](int j) {
                          const bool here = step.sees(j) && !(p.region_keys_elsewhere && step.region[j] >= 0);
                          return here ? step.pos[j] : -1;
                        });
      }
    }
    k0 = next;
    buf ^= 1;
  }

  if (!warp_active) return;
#pragma unroll
  for (int h = 0; h < 2; ++h) {
    if (row[h] >= tb.rows) continue;
    float2* dst = reinterpret_cast<float2*>(p.dq + stat_row[h] * D);
#pragma unroll
    for (int dn = 0; dn < D / 8; ++dn) {
      dst[dn * 4 + t4] = make_float2(dq[dn][2 * h] * scale, dq[dn][2 * h + 1] * scale);
    }
  }
}

// The key-major pass of the tensor-core backward. The tile kernel would add dK/dV of a
// region's keys once per tile that selected the region (some 90 tiles per key at the GPU
// prefill shape, one float32 atomic per key element each time). Here one block per
// (batch, selection head, region) runs over exactly the rows that selected the region
// (from an inverted index sorted on the device), recomputes P and dS from the saved lse
// and delta, and keeps dK/dV of the region's keys in registers: one atomic per key element
// (a token may sit in several regions). A slot listed twice is two rows, as it counts twice.

// Each taken slot of idx as ((b Hs + hs) R + region) Lq + position; others sort last.
__global__ void selection_keys_kernel(TileParams p, int64_t* keys /* [B Hs Lq K] */, int64_t total) {
  const int64_t e = int64_t(blockIdx.x) * blockDim.x + threadIdx.x;
  if (e >= total) return;
  const AttentionShape& S = p.shape;
  const int64_t row = e / S.topk;  // (b Hs + hs) Lq + position
  const int32_t* slots = p.idx + row * S.topk;
  const int slot = int(e % S.topk);
  keys[e] = slot_taken(p.layout, slots, slot)
                ? ((row / S.q_len) * p.layout.num_regions + slots[slot]) * S.q_len + row % S.q_len
                : INT64_MAX;
}

template <typename T, int D>
__global__ void __launch_bounds__(kTileThreads) region_keys_backward_kernel(TileParams p) {
  extern __shared__ __align__(16) unsigned char smem[];
  __shared__ int32_t key_pos[kTileKeys];      // -1: no key
  __shared__ int64_t row_stat[2][kTileRows];  // per chunk parity: the row's index into lse/delta
                                              // ((b Hq + h) Lq + i), -1: none
  __shared__ int32_t row_limit[2][kTileRows];
  // the row's element offsets in q and grad_out (-1: none), so that its gathers need no
  // 64-bit arithmetic but an add
  __shared__ int64_t row_q_offset[2][kTileRows], row_grad_offset[2][kTileRows];
  __shared__ uint32_t all_rows[kTileWarps];   // keys_times_rows' masks: every row chunk counts
  const AttentionShape& S = p.shape;
  const LayoutView& layout = p.layout;
  const int64_t begin = p.selection_offsets[blockIdx.x], end = p.selection_offsets[blockIdx.x + 1];
  if (begin == end) return;  // no query selected this region
  const int64_t group = blockIdx.x / layout.num_regions;  // b Hs + hs
  const int region = int(blockIdx.x % layout.num_regions);
  const int64_t b = group / S.sel_heads;
  const int sel_head = int(group % S.sel_heads);
  const bool shared_sel = S.sel_heads == S.kv_heads;
  const int kv_head = shared_sel ? sel_head : sel_head / S.group();
  const int first_head = shared_sel ? sel_head * S.group() : sel_head;
  const int per_chunk = kTileRows / p.heads;  // selections per chunk of rows
  const TileSmemLayout L = tile_smem_layout(D, 0, 0, /*backward=*/true);
  uint16_t* tile_q = reinterpret_cast<uint16_t*>(smem + L.q);
  uint16_t* tile_k = reinterpret_cast<uint16_t*>(smem + L.k);
  uint16_t* tile_v = reinterpret_cast<uint16_t*>(smem + L.v);
  uint16_t* tile_grad = reinterpret_cast<uint16_t*>(smem + L.grad);
  uint16_t* tile_probs = reinterpret_cast<uint16_t*>(smem + L.probs);
  uint16_t* tile_dscores = reinterpret_cast<uint16_t*>(smem + L.dscores);
  const int warp = threadIdx.x / 32, g = threadIdx.x % 32 / 4;
  if (threadIdx.x < kTileWarps) all_rows[threadIdx.x] = 0xFFu;
  const float scale = p.score_scale / kLog2e;
  const int64_t kv_row0 = (b * S.kv_heads + kv_head) * int64_t(layout.num_keys);
  const RegionSpan span = layout.region(b, region);

  // Rows of the chunk from selection e0 into row_stat/limit/q_offset/grad_offset[parity] (row
  // x: selection e0 + x / heads, head x % heads); the caller synchronizes.
  auto chunk_rows = [&](int64_t e0, int parity) {
    if (threadIdx.x >= kTileRows) return;
    const int x = threadIdx.x;
    const int64_t e = e0 + x / p.heads;
    int64_t stat = -1, q_offset = -1, grad_offset = -1;
    int32_t limit = -1;
    if (x < per_chunk * p.heads && e < end) {
      const int i = int(p.selections[e] % S.q_len);
      const int head = first_head + x % p.heads;
      stat = (b * S.q_heads + head) * int64_t(S.q_len) + i;
      limit = p.q_pos ? p.q_pos[b * S.q_len + i] : kNoCausalLimit;
      q_offset = p.qs.offset(b, head, i);
      grad_offset = p.gs.offset(b, head, i);
    }
    row_stat[parity][x] = stat;
    row_limit[parity][x] = limit;
    row_q_offset[parity][x] = q_offset;
    row_grad_offset[parity][x] = grad_offset;
  };
  // Starts copying the chunk's rows of a [B, Hq, Lq, D] tensor, at the element offsets
  // `offsets` (one cp.async group).
  auto gather_rows = [&](const void* src, const int64_t* offsets, uint16_t* dst) {
    const uint16_t* base = reinterpret_cast<const uint16_t*>(src);
    for_each_tile_chunk<D>([&](int r, int c, int at) {
      const int64_t offset = offsets[r];
      if (offset >= 0) {
        copy_async_16(dst + at, base + offset + c * 8);
      } else {
        *reinterpret_cast<uint4*>(dst + at) = make_uint4(0, 0, 0, 0);
      }
    });
    copy_async_commit();
  };

  // The gathers fly while the tensor cores work: a chunk's Q rows during dP = dO V^T, the
  // next chunk's dO rows during dK += dS^T Q, its Q rows from then on.
  for (int k0 = span.begin; k0 < span.end; k0 += kTileKeys) {
    if (threadIdx.x < kTileKeys) {
      const int t = k0 + threadIdx.x;
      const int32_t pos = t < span.end ? layout.tokens(b)[t] : -1;
      key_pos[threadIdx.x] = layout.visible(pos, kNoCausalLimit) ? pos : -1;
    }
    chunk_rows(begin, 0);
    __syncthreads();
    auto key_rows = [&](const void* src, const Strides4& s) {
      const uint16_t* base = reinterpret_cast<const uint16_t*>(src) + s.offset(b, kv_head, 0);
      return [=](int j) { return key_pos[j] >= 0 ? base + key_pos[j] * s.row : nullptr; };
    };
    load_tile_rows<D, /*kAsync=*/true>(tile_k, key_rows(p.k, p.ks));
    load_tile_rows<D, /*kAsync=*/true>(tile_v, key_rows(p.v, p.vs));
    gather_rows(p.grad_out, row_grad_offset[0], tile_grad);
    gather_rows(p.q, row_q_offset[0], tile_q);
    float dv[D / 8][4], dk[D / 8][4];
    zero_fragments(dv);
    zero_fragments(dk);

    for (int64_t e0 = begin; e0 < end; e0 += per_chunk) {
      const int parity = int((e0 - begin) / per_chunk % 2);
      const int64_t next_e0 = e0 + per_chunk;
      copy_async_wait<1>();
      __syncthreads();  // K, V and the chunk's dO rows are in (its Q rows may still fly)
      // this warp's 16 rows: P = 2^(S - lse) where the key is visible, dS = P (dP - delta)
      float s[kKeyBlocks][4], dp[kKeyBlocks][4];
      rows_times_all_keys<T, D>(tile_grad, tile_v, warp * 16, dp);
      copy_async_wait<0>();
      __syncthreads();  // the Q rows are in
      rows_times_all_keys<T, D>(tile_q, tile_k, warp * 16, s);
#pragma unroll
      for (int h = 0; h < 2; ++h) {
        const int row = warp * 16 + g + 8 * h;
        const int64_t stat = row_stat[parity][row];
        const int32_t limit = row_limit[parity][row];
        probs_and_dscores<T>(s, dp, h, row, stat >= 0 ? p.lse_in[stat] * kLog2e : kNegInf,
                             stat >= 0 ? p.delta[stat] : 0.f, p.score_scale,
                             [&](int j) {
                               auto visible = [&](int key) { return uint32_t(key_pos[key] >= 0 && key_pos[key] <= limit); };
                               return visible(j) | visible(j + 1) << 16;
                             },
                             tile_probs, tile_dscores);
      }
      if (next_e0 < end) chunk_rows(next_e0, parity ^ 1);
      __syncthreads();  // P and dS are in
      // dV += P^T dO, dK += dS^T Q for this warp's 16 keys
      keys_times_rows<T, D>(tile_probs, tile_grad, warp * 16, all_rows, dv);
      __syncthreads();  // every warp is done with the dO rows
      if (next_e0 < end) gather_rows(p.grad_out, row_grad_offset[parity ^ 1], tile_grad);
      keys_times_rows<T, D>(tile_dscores, tile_q, warp * 16, all_rows, dk);
      __syncthreads();  // every warp is done with the Q rows, P and dS
      if (next_e0 < end) gather_rows(p.q, row_q_offset[parity ^ 1], tile_q);
    }

    auto position = [&](int j) { return key_pos[j]; };
    add_key_rows<D>(p.dv, kv_row0, warp * 16, dv, 1.f, position);
    add_key_rows<D>(p.dk, kv_row0, warp * 16, dk, scale, position);
    __syncthreads();  // key_pos, the row_* arrays and the K/V tiles are rewritten next
  }
}

int next_pow2(int x) {
  int p = 1;
  while (p < x) p *= 2;
  return p;
}

bool rows_aligned(const at::Tensor& t) {  // every [.., D] row 16-byte aligned
  return rows_vectorizable<c10::Half>(t.data_ptr(), t.size(-1), {t.stride(0), t.stride(1), t.stride(2)});
}

// The tile plan for these arguments into p, or false when the tensor-core kernels do not apply.
bool plan_tiles(const AttentionArgs& a, TileParams& p) {
  const KernelChoice choice = attention_kernel_choice();
  if (choice == KernelChoice::kSplit || choice == KernelChoice::kSplitBlock) return false;
  const AttentionShape& S = a.shape;
  const at::ScalarType dtype = a.q.scalar_type();
  if (dtype != at::kHalf && dtype != at::kBFloat16) return false;
  if (S.head_dim != 64 && S.head_dim != 80 && S.head_dim != 96 && S.head_dim != 128) return false;
  const int heads = S.sel_heads == S.kv_heads ? S.group() : 1;
  if (heads > kTileRows || S.topk > kMaxEntries) return false;
  const int by_entries = S.topk > 0 ? kMaxEntries / S.topk : kTileRows;  // K = 0: fixed tokens only
  const int positions = std::min({kTileRows / heads, by_entries, S.q_len});
  if (choice == KernelChoice::kAuto && positions * heads < kMinRowsAuto) {
    const int64_t tiles = int64_t(S.batch) * S.sel_heads * ceil_div(S.q_len, positions);
    const bool many_tiles = tiles >= int64_t(kManyTilesPerSM) * multiprocessor_count();
    if (positions * heads < kMinRowsManyTiles || !many_tiles) return false;
  }
  if (!rows_aligned(a.q) || !rows_aligned(a.k) || !rows_aligned(a.v)) return false;
  fill_operands(a, p);
  p.positions = positions;
  p.heads = heads;
  p.position_tiles = int(ceil_div(S.q_len, positions));
  p.sort_size = next_pow2(positions * S.topk);
  return true;
}

// Whether the device and binary have bf16/fp16 mma.sync and `shared` bytes of dynamic
// shared memory fit the kernel; if so, allows it that much.
template <typename Kernel>
bool prepare_launch(Kernel kernel, int64_t shared) {
  if (current_device_attribute<cudaDevAttrComputeCapabilityMajor>() < 8) return false;
  const cudaFuncAttributes attributes = kernel_attributes(kernel);
  if (attributes.binaryVersion < 80) return false;
  if (shared > dynamic_shared_limit(int64_t(attributes.sharedSizeBytes))) return false;
  allow_dynamic_shared(kernel, shared);
  return true;
}

template <typename Kernel>
void launch(Kernel kernel, const TileParams& p, int64_t shared, int64_t blocks) {
  kernel<<<grid_of(blocks, "gaze_attention"), dim3(kTileThreads), shared,
           c10::cuda::getCurrentCUDAStream()>>>(p);
  C10_CUDA_KERNEL_LAUNCH_CHECK();
}

// f(integral_constant<int, D>{}) for the head dims the tensor-core kernels take.
template <typename F>
auto with_head_dim(int head_dim, F&& f) {
  switch (head_dim) {
    case 64: return f(std::integral_constant<int, 64>{});
    case 80: return f(std::integral_constant<int, 80>{});
    case 96: return f(std::integral_constant<int, 96>{});
    default: return f(std::integral_constant<int, 128>{});
  }
}

int64_t tile_blocks(const TileParams& p) {
  return int64_t(p.shape.batch) * p.shape.sel_heads * p.position_tiles;
}

template <typename T>
bool run_forward(const TileParams& p) {
  return with_head_dim(p.shape.head_dim, [&](auto head_dim) {
    constexpr int D = decltype(head_dim)::value;
    const auto kernel = attention_forward_tiled_kernel<T, D>;
    const int64_t shared = tile_smem_layout(D, p.sort_size, p.positions, false).total;
    if (!prepare_launch(kernel, shared)) return false;
    launch(kernel, p, shared, tile_blocks(p));
    return true;
  });
}

// The inverted index of the selections for the key-major pass: p.selections and
// p.selection_offsets point into the tensors returned (kept alive until the kernels ran).
std::tuple<at::Tensor, at::Tensor> index_selections(const at::Tensor& idx, TileParams& p) {
  const AttentionShape& S = p.shape;
  const int64_t total = idx.numel(), groups = int64_t(S.batch) * S.sel_heads;
  at::Tensor keys = at::empty({total}, idx.options().dtype(at::kLong));
  selection_keys_kernel<<<grid_of(ceil_div(total, kTileThreads), "gaze_attention"), dim3(kTileThreads),
                          0, c10::cuda::getCurrentCUDAStream()>>>(p, keys.data_ptr<int64_t>(), total);
  C10_CUDA_KERNEL_LAUNCH_CHECK();
  at::Tensor sorted = std::get<0>(at::sort(keys));
  at::Tensor bounds = at::arange(groups * p.layout.num_regions + 1, keys.options()).mul_(S.q_len);
  at::Tensor offsets = at::searchsorted(sorted, bounds);
  p.selections = sorted.data_ptr<int64_t>();
  p.selection_offsets = offsets.data_ptr<int64_t>();
  return {sorted, offsets};
}

template <typename T>
bool run_backward(TileParams& p, const at::Tensor& idx) {
  return with_head_dim(p.shape.head_dim, [&](auto head_dim) {
    constexpr int D = decltype(head_dim)::value;
    const auto tiles = attention_backward_tiled_kernel<T, D>;
    const auto regions = region_keys_backward_kernel<T, D>;
    const int64_t tile_shared = tile_smem_layout(D, p.sort_size, p.positions, true).total;
    const int64_t region_shared = tile_smem_layout(D, 0, 0, true).total;
    if (!prepare_launch(tiles, tile_shared)) return false;
    const int64_t region_blocks = int64_t(p.shape.batch) * p.shape.sel_heads * p.layout.num_regions;
    at::Tensor index[2];
    if (p.shape.topk > 0 && region_blocks > 0 && prepare_launch(regions, region_shared)) {
      std::tie(index[0], index[1]) = index_selections(idx, p);
      launch(regions, p, region_shared, region_blocks);
      p.region_keys_elsewhere = 1;
    }
    launch(tiles, p, tile_shared, tile_blocks(p));
    return true;
  });
}

}  // namespace

bool run_tiled_forward(const AttentionArgs& a, at::Tensor& out, at::Tensor& lse) {
  TileParams p{};
  if (!plan_tiles(a, p)) return false;
  p.out = out.data_ptr();
  p.lse = lse.data_ptr<float>();
  return a.q.scalar_type() == at::kBFloat16 ? run_forward<__nv_bfloat16>(p) : run_forward<__half>(p);
}

bool run_tiled_backward(const AttentionBackwardArgs& args, const at::Tensor& delta, at::Tensor& dq,
                        at::Tensor& dk, at::Tensor& dv) {
  TileParams p{};
  if (!plan_tiles(args.fwd, p) || !rows_aligned(args.grad_out)) return false;
  fill_backward_operands(args, delta, dq, dk, dv, p);
  const at::Tensor& idx = args.fwd.idx;
  return args.fwd.q.scalar_type() == at::kBFloat16 ? run_backward<__nv_bfloat16>(p, idx)
                                                   : run_backward<__half>(p, idx);
}

}  // namespace gaze::cuda
