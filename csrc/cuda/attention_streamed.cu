// CUDA gaze_attention forward for decode: split-K gathered attention (flash-decoding)
// whose warps stream their own keys.
//
// The block-synchronous kernel (attention_forward.cu) takes every 32-key batch through
// 5-6 block barriers (positions, scores, softmax, rescale, P V); on an H100 it moved its
// bytes at 19% of copy bandwidth, stalled at those barriers rather than waiting for bytes.
// Here the block (same units and splits) meets at barriers once per kPositionBatch keys,
// to publish the positions of the visible ones, packed (padding, keys past the causal
// limit and out-of-range entries take no tile), and once at the end. In between, each warp
// streams its own tiles of kWarpKeys keys with its own online-softmax state (max and sum
// per head, the accumulator in registers) and its own double-buffered cp.async copies of
// the tiles' K and V rows, waiting only for its own copies. Per tile:
//   scores: lane (key, half) = (lane % 16, lane / 16) dots the key's K row with the unit's
//     NH query rows over every other chunk of D; one shuffle adds the two halves;
//   softmax: the tile's max and sum per head over 16 lanes;
//   P V: lane owns chunk c of D for a group of heads and a subset of the tile's keys.
// At the end the warps' states merge in shared memory, in a fixed order (deterministic),
// into out and lse, or into the split's partial state for merge_splits_kernel.
//
// Takes 16-byte rows with at most 32 chunks of 16 bytes per lane set (bf16/fp16 D <= 256,
// D <= 128 with 8 heads per unit; float32 D <= 128) whose tiles fit in shared memory; the
// block-synchronous kernel takes the rest.
#include <ATen/core/Tensor.h>

#include "../common/dispatch.h"
#include "../common/op_args.h"
#include "async_copy.cuh"
#include "attention_common.cuh"

namespace gaze::cuda {
namespace {

constexpr int kWarpKeys = 16;         // keys per warp tile: one per lane of a half warp
constexpr int kStages = 2;            // tiles per warp in shared memory: one computed, one loading
constexpr int kPositionBatch = 1024;  // keys whose positions the block publishes at a time
constexpr int kTileChunkGroup = 8;    // 16-byte chunks per 128-byte line of shared memory banks

template <typename T, int NH>
struct StreamedShape {
  static constexpr int kChunk = 16 / sizeof(T);  // elements per 16-byte chunk
  // The P V accumulator holds kHeadsPerLane heads x kChunk floats per lane (at most 32
  // registers); with 8 heads of 16-bit elements two lane sets split the heads.
  static constexpr int kHeadsPerLane = NH * kChunk <= 32 ? NH : 32 / kChunk;
  static constexpr int kHeadGroups = NH / kHeadsPerLane;
  static_assert(kHeadGroups <= 2, "head_value picks one of at most two head groups");
};

// Slot of chunk c of row j in a tile: c XOR (j mod 8) inside whole lines of 8 chunks. The
// scoring reads chunk c of 16 rows at once, the P V a row's chunks; both then fall in
// distinct banks, without padding the rows.
__device__ __forceinline__ int tile_slot(int j, int c, int chunks) {
  // (j >= 0: a mask, where the signed j % 8 costs a sign fix-up at every use)
  return c < (chunks & ~(kTileChunkGroup - 1)) ? c ^ (j & (kTileChunkGroup - 1)) : c;
}

template <typename T, int NH>
__global__ void __launch_bounds__(kAttnThreads, 3) attention_streamed_kernel(AttnParams p) {
  using Shape = StreamedShape<T, NH>;
  using Chunk = RowChunk<T, true>;
  constexpr int C = Shape::kChunk, kHeadsPerLane = Shape::kHeadsPerLane;
  const int D = p.shape.head_dim, chunks = D / C;
  extern __shared__ __align__(16) float smem[];
  float* query = smem;  // [NH][D], scaled to base-2 scores
  // [kAttnWarps][kStages][K, V][kWarpKeys][D]; at the end, the warps' accumulators
  // [kAttnWarps][NH][D] in float32
  T* tiles = reinterpret_cast<T*>(query + NH * D);
  __shared__ int32_t positions[kPositionBatch];  // visible key positions, then -1
  __shared__ int32_t visible_before[kAttnThreads], warp_totals[kAttnWarps];
  __shared__ __align__(16) float probs[kAttnWarps][kWarpKeys][NH];
  __shared__ float warp_maxima[kAttnWarps][NH], warp_sums[kAttnWarps][NH];
  __shared__ KeyStream stream;

  const int64_t u = blockIdx.x / p.splits;
  const int split = int(blockIdx.x % p.splits);
  const Unit unit = decode_unit(p, u, NH);
  const int32_t limit = p.q_pos ? p.q_pos[unit.b * p.shape.q_len + unit.i] : kNoCausalLimit;
  const T* k = reinterpret_cast<const T*>(p.k) + p.ks.offset(unit.b, unit.kv_head, 0);
  const T* v = reinterpret_cast<const T*>(p.v) + p.vs.offset(unit.b, unit.kv_head, 0);
  load_unit_query<T>(p, unit, NH, query);
  stream.init(p, unit, split);  // ends with a barrier

  const int lane = threadIdx.x % 32, warp = threadIdx.x / 32;
  const int key = lane % kWarpKeys, half = lane / kWarpKeys;  // the scoring's roles
  // the P V's roles: chunk `owned` of heads [group * kHeadsPerLane, ...) for keys
  // subset, subset + subsets, ... of each tile
  const int lanes = p.lanes;  // a power of two >= chunks; lanes * kHeadGroups <= 32
  const int owned = lane % lanes, group = lane / lanes % Shape::kHeadGroups;
  const int subset = lane / (lanes * Shape::kHeadGroups);
  const int subsets = 32 / (lanes * Shape::kHeadGroups);
  auto head_value = [&](const float(&x)[NH], int h) {  // x[group * kHeadsPerLane + h]
    if constexpr (Shape::kHeadGroups == 2) {
      if (group == 1) return x[h + kHeadsPerLane];
    }
    return x[h];
  };

  float row_max[NH], row_sum[NH];  // the same in every lane of the warp
  float acc[kHeadsPerLane][C] = {};
#pragma unroll
  for (int h = 0; h < NH; ++h) {
    row_max[h] = kNegInf;
    row_sum[h] = 0.f;
  }
  T* warp_tiles = tiles + int64_t(warp) * kStages * 2 * kWarpKeys * D;
  auto tile = [&](int stage, int kv) { return warp_tiles + (stage * 2 + kv) * kWarpKeys * D; };

  for (int64_t b0 = 0; b0 < stream.length; b0 += kPositionBatch) {
    // The batch's visible positions, in stream order and packed: keys out of range, past
    // the causal limit or -1 padding cost no tile. Thread t looks up entries
    // [t * kPerThread, (t + 1) * kPerThread) of the batch, every load issued before the
    // first use, so they overlap.
    const int batch = int(min(int64_t(kPositionBatch), stream.length - b0));
    constexpr int kPerThread = kPositionBatch / kAttnThreads;
    int32_t found[kPerThread];
#pragma unroll
    for (int e = 0; e < kPerThread; ++e) {
      const int x = threadIdx.x * kPerThread + e;
      found[e] = x < batch ? stream.position(p, unit, int(b0) + x) : -1;
    }
    int visible = 0;
#pragma unroll
    for (int e = 0; e < kPerThread; ++e) visible += p.layout.visible(found[e], limit);
    visible_before[threadIdx.x] = visible;
    // (its first barrier: every warp is done with the previous batch's positions)
    const int n = block_exclusive_scan(visible_before, kAttnThreads, warp_totals);
    int at = visible_before[threadIdx.x];
#pragma unroll
    for (int e = 0; e < kPerThread; ++e) {
      if (p.layout.visible(found[e], limit)) positions[at++] = found[e];
    }
    if (threadIdx.x < kWarpKeys && n + int(threadIdx.x) < kPositionBatch) {
      positions[n + threadIdx.x] = -1;  // the last tile's tail
    }
    __syncthreads();

    // One cp.async group per tile and lane: the K and V rows of tile t's visible keys. The
    // V rows of the others are zeros (their probabilities are 0, and 0 * a stale NaN is not).
    auto copy_tile = [&](int t, int stage) {
      T* k_tile = tile(stage, 0);
      T* v_tile = tile(stage, 1);
      if (owned < chunks) {  // lane copies chunk `owned` of rows lane / lanes, + 32 / lanes, ...
        for (int j = lane / lanes; j < kWarpKeys; j += 32 / lanes) {
          const int32_t pos = positions[t * kWarpKeys + j];  // -1 past the batch's n keys
          const int at = j * D + tile_slot(j, owned, chunks) * C;
          if (pos >= 0) {  // (an unsigned product: no sign extension)
            copy_async_16(k_tile + at, k + owned * C + uint32_t(pos) * uint64_t(p.ks.row));
            copy_async_16(v_tile + at, v + owned * C + uint32_t(pos) * uint64_t(p.vs.row));
          } else {
            *reinterpret_cast<uint4*>(v_tile + at) = make_uint4(0, 0, 0, 0);
          }
        }
      }
      copy_async_commit();
    };

    const int num_tiles = (n + kWarpKeys - 1) / kWarpKeys;
    if (warp < num_tiles) copy_tile(warp, 0);
    for (int t = warp, stage = 0; t < num_tiles; t += kAttnWarps, stage ^= 1) {
      if (t + kAttnWarps < num_tiles) {
        copy_tile(t + kAttnWarps, stage ^ 1);
      } else {
        copy_async_commit();  // an empty group: the wait below still means tile t
      }
      copy_async_wait<1>();
      __syncwarp();  // every lane's copies of tile t are in
      const T* k_tile = tile(stage, 0);
      const T* v_tile = tile(stage, 1);

      // scores of key `key` over the chunks of this half, then both halves
      float score[NH] = {};
#pragma unroll 4
      for (int c = half; c < chunks; c += 2) {
        Chunk x;
        x.load_shared(k_tile + key * D + tile_slot(key, c, chunks) * C);
        dot_chunk_heads<NH, C>(query, D, c, x.v, score);
      }
      const bool seen = positions[t * kWarpKeys + key] >= 0;
      float rescale[NH];
#pragma unroll
      for (int h = 0; h < NH; ++h) {
        score[h] += __shfl_xor_sync(0xFFFFFFFFu, score[h], kWarpKeys);
        const float s = seen && h < unit.num_heads ? score[h] : kNegInf;
        const float new_max = fmaxf(row_max[h], warp_max(s, kWarpKeys));
        const float prob = exp2_approx(s - softmax_safe_max(new_max));
        rescale[h] = softmax_rescale(row_max[h], new_max);
        row_sum[h] = row_sum[h] * rescale[h] + warp_sum(prob, kWarpKeys);
        row_max[h] = new_max;
        if (half == 0) probs[warp][key][h] = prob;
      }
      __syncwarp();  // probs are in

      // acc = acc * rescale + P V over this lane's keys of the tile
#pragma unroll
      for (int h = 0; h < kHeadsPerLane; ++h) {
        const float r = head_value(rescale, h);
#pragma unroll
        for (int x = 0; x < C; ++x) acc[h][x] *= r;
      }
      if (owned < chunks) {
#pragma unroll 4
        for (int j = subset; j < kWarpKeys; j += subsets) {
          Chunk x;
          x.load_shared(v_tile + j * D + tile_slot(j, owned, chunks) * C);
          float w[kHeadsPerLane];
          load_shared_floats<kHeadsPerLane>(&probs[warp][j][group * kHeadsPerLane], w);
#pragma unroll
          for (int h = 0; h < kHeadsPerLane; ++h) {
#pragma unroll
            for (int y = 0; y < C; ++y) acc[h][y] += w[h] * x.v[y];
          }
        }
      }
      __syncwarp();  // every lane is done with this stage and with probs before they refill
    }
  }

  // the key subsets' sums of each (chunk, head group), then the warps' states
  for (int offset = lanes * Shape::kHeadGroups; offset < 32; offset *= 2) {
#pragma unroll
    for (int h = 0; h < kHeadsPerLane; ++h) {
#pragma unroll
      for (int x = 0; x < C; ++x) acc[h][x] += __shfl_xor_sync(0xFFFFFFFFu, acc[h][x], offset);
    }
  }
  __syncthreads();  // every warp is done with its tiles: they take the accumulators now
  float* warp_acc = reinterpret_cast<float*>(tiles);  // [kAttnWarps][NH][D]
  if (subset == 0 && owned < chunks) {
#pragma unroll
    for (int h = 0; h < kHeadsPerLane; ++h) {
      float* row = warp_acc + (warp * NH + group * kHeadsPerLane + h) * D + owned * C;
#pragma unroll
      for (int x = 0; x < C; ++x) row[x] = acc[h][x];
    }
  }
  if (lane == 0) {
#pragma unroll
    for (int h = 0; h < NH; ++h) {
      warp_maxima[warp][h] = row_max[h];
      warp_sums[warp][h] = row_sum[h];
    }
  }
  __syncthreads();

  // Merged: max M over the warps, weights 2^(m_w - M), sum and accumulator weighted
  auto merged_max = [&](int h) {
    float m = kNegInf;
#pragma unroll
    for (int w = 0; w < kAttnWarps; ++w) m = fmaxf(m, warp_maxima[w][h]);
    return m;
  };
  auto merged_sum = [&](int h, float safe_max) {
    float l = 0.f;
#pragma unroll
    for (int w = 0; w < kAttnWarps; ++w) l += exp2_approx(warp_maxima[w][h] - safe_max) * warp_sums[w][h];
    return l;
  };
  const int64_t first_row =
      (unit.b * p.shape.q_heads + unit.first_head) * int64_t(p.shape.q_len) + unit.i;
  const int64_t slot = u * p.splits + split;
  for (int x = threadIdx.x; x < NH * D; x += kAttnThreads) {
    const int h = x / D, d = x % D;
    const float safe_max = softmax_safe_max(merged_max(h));
    float a = 0.f;
#pragma unroll
    for (int w = 0; w < kAttnWarps; ++w) {
      a += exp2_approx(warp_maxima[w][h] - safe_max) * warp_acc[(w * NH + h) * D + d];
    }
    if (p.splits > 1) {
      p.partial_acc[slot * NH * D + x] = a;
    } else if (h < unit.num_heads) {
      const int64_t row = first_row + int64_t(h) * p.shape.q_len;
      reinterpret_cast<T*>(p.out)[row * D + d] =
          from_float<T>(a * softmax_normalizer(merged_sum(h, safe_max)));
    }
  }
  if (threadIdx.x < NH) {
    const int h = threadIdx.x;
    const float m = merged_max(h), l = merged_sum(h, softmax_safe_max(m));
    if (p.splits > 1) {
      p.partial_stats[(slot * NH + h) * 2 + 0] = m;
      p.partial_stats[(slot * NH + h) * 2 + 1] = l;
    } else if (h < unit.num_heads) {
      p.lse[first_row + int64_t(h) * p.shape.q_len] = softmax_lse(m, l);
    }
  }
}

template <typename T, int NH>
bool launch_streamed(const AttentionArgs& a, AttnParams& p, cudaStream_t stream) {
  using Shape = StreamedShape<T, NH>;
  const int64_t D = a.shape.head_dim;
  const bool rows_16_bytes = rows_vectorizable<T>(p.k, D, {p.ks.batch, p.ks.head, p.ks.row}) &&
                             rows_vectorizable<T>(p.v, D, {p.vs.batch, p.vs.head, p.vs.row});
  if (!rows_16_bytes) return false;
  const int lanes = lanes_per_row(D / Shape::kChunk);
  if (lanes * Shape::kHeadGroups > 32 || D / Shape::kChunk > 32) return false;
  const int64_t shared = int64_t(NH) * D * 4 + int64_t(kAttnWarps) * kStages * 2 * kWarpKeys * D * int64_t(sizeof(T));
  if (shared > dynamic_shared_limit(kStaticSharedBudget)) return false;
  p.lanes = lanes;
  auto kernel = attention_streamed_kernel<T, NH>;
  allow_dynamic_shared(kernel, shared);
  plan_splits(a, p, 64, resident_blocks(kernel, kAttnThreads, shared));
  run_split_forward(a, p, NH, [&] {
    kernel<<<grid_of(p.units * p.splits, "gaze_attention"), dim3(kAttnThreads), shared, stream>>>(p);
  });
  return true;
}

}  // namespace

bool run_streamed_forward(const AttentionArgs& a, AttnParams& p, int NH) {
  const auto stream = c10::cuda::getCurrentCUDAStream();
  bool launched = false;
  dispatch_float_types(a.q.scalar_type(), "gaze_attention", [&](auto tag) {
    using T = native_t<decltype(tag)>;
    dispatch_heads_per_unit(NH, [&](auto heads) {
      launched = launch_streamed<T, decltype(heads)::value>(a, p, stream);
    });
  });
  return launched;
}

}  // namespace gaze::cuda
