// CUDA gaze_attention forward: split-K gathered attention (flash-decoding), for
// decode steps and whatever the tensor-core kernel (attention_tiled.cu)
// does not take. The host side picks the kernel; this file's block-synchronous
// kernel takes what the streamed one (attention_streamed.cu) does not: rows that
// cannot be read 16 bytes at a time, head dims past its registers or shared memory.
//
// Each thread block runs one split of one unit (see attention_common.cuh) in
// steps of kKeyBatch keys:
//   a. the batch's key positions (masked by N and causality) go to shared memory;
//   b. groups of lanes score one K row each for all the unit's heads (16-byte
//      loads, shuffle reduction);
//   c. one warp per head updates the base-2 online softmax;
//   d. threads own (head, 16-byte chunk of D, key subset) and add p * V into the
//      float32 accumulator in shared memory.
// With 16-byte rows, K and V rows are copied to shared tiles with cp.async ahead of
// their use: the batch's V rows while its K rows are scored, the next batch's K rows
// during P V, so no step waits for a full load latency once the stream runs.
// With one split the block writes out and lse; with several it writes partial
// (max, sum, accumulator) and a second kernel merges them by log-sum-exp.
#include <ATen/core/Tensor.h>
#include <ATen/ops/empty.h>
#include <torch/library.h>

#include <algorithm>
#include <cstdlib>
#include <cstring>
#include <tuple>

#include "../common/dispatch.h"
#include "../common/op_args.h"
#include "../common/work_split.h"
#include "async_copy.cuh"
#include "attention_common.cuh"

namespace gaze::cuda {
namespace {

template <typename T, bool kVec, int NH>
__global__ void __launch_bounds__(kAttnThreads, kVec ? 8 : 4)
    attention_forward_kernel(AttnParams p) {
  using Chunk = RowChunk<T, kVec>;
  // Rows a thread loads before it uses them: 4 from global memory, 2 from the shared tiles
  // (short latency), which keeps the kernel within 64 registers (8 blocks per SM)
  constexpr int kRows = kVec ? 2 : kRowsInFlight;
  constexpr int C = Chunk::kChunk;
  const int D = p.shape.head_dim, chunks = D / C;
  extern __shared__ __align__(16) float smem[];
  float* query = smem;                    // [NH][D], scaled to base-2 scores
  float* acc = query + NH * D;            // [NH][D]
  T* k_tile = reinterpret_cast<T*>(acc + NH * D);  // kVec: [kKeyBatch][D], the batch's K rows
  T* v_tile = k_tile + kKeyBatch * D;              // kVec: [kKeyBatch][D], its V rows
  __shared__ float probs[NH][kKeyBatch];  // scores, then probabilities
  __shared__ int32_t positions[2][kKeyBatch];  // this batch's and the next one's
  __shared__ float row_max[NH], row_sum[NH], rescale[NH];
  __shared__ float subset_sums[kAttnThreads * C];  // step d's partial sums, reduced in order
  __shared__ KeyStream stream;

  const int64_t u = blockIdx.x / p.splits;
  const int split = int(blockIdx.x % p.splits);
  const Unit unit = decode_unit(p, u, NH);
  const LayoutView& layout = p.layout;
  const int32_t limit = p.q_pos ? p.q_pos[unit.b * p.shape.q_len + unit.i] : kNoCausalLimit;
  const T* k = reinterpret_cast<const T*>(p.k) + p.ks.offset(unit.b, unit.kv_head, 0);
  const T* v = reinterpret_cast<const T*>(p.v) + p.vs.offset(unit.b, unit.kv_head, 0);

  load_unit_query<T>(p, unit, NH, query);
  for (int e = threadIdx.x; e < NH * D; e += kAttnThreads) acc[e] = 0.f;
  if (threadIdx.x < NH) {
    row_max[threadIdx.x] = kNegInf;
    row_sum[threadIdx.x] = 0.f;
  }
  stream.init(p, unit, split);  // ends with a barrier

  const int lane = threadIdx.x % 32, warp = threadIdx.x / 32;
  const int sub = lane % p.lanes, group = warp * (32 / p.lanes) + lane / p.lanes;
  const int groups = kAttnThreads / p.lanes;
  // step d: threads own (head, chunk, key subset)
  const int owners = NH * chunks;
  const int subsets = max(1, min(kKeyBatch, kAttnThreads / max(owners, 1)));

  // a. the visible positions of batch v0's keys (-1: none) into positions[buf]
  auto find_positions = [&](int v0, int buf) {
    if (threadIdx.x < kKeyBatch) {
      const int e = v0 + threadIdx.x;
      int32_t pos = -1;
      if (e < stream.length) pos = stream.position(p, unit, e);
      positions[buf][threadIdx.x] = layout.visible(pos, limit) ? pos : -1;
    }
  };
  // kVec: starts copying the rows of batch buf's visible keys (one cp.async group)
  auto copy_rows = [&](const T* src, int64_t row_stride, int buf, T* tile) {
    for (int x = threadIdx.x; x < kKeyBatch * chunks; x += kAttnThreads) {
      const int j = x / chunks, c = x % chunks;
      const int32_t pos = positions[buf][j];
      if (pos >= 0) copy_async_16(tile + j * D + c * C, src + int64_t(pos) * row_stride + int64_t(c) * C);
    }
    copy_async_commit();
  };

  // kVec: the loads fly while the block computes: the batch's V rows during its scoring
  // and softmax, the next batch's K rows during P V, its V rows from then on.
  find_positions(0, 0);
  __syncthreads();
  if constexpr (kVec) {
    copy_rows(k, p.ks.row, 0, k_tile);
    copy_rows(v, p.vs.row, 0, v_tile);
  }
  for (int v0 = 0, buf = 0; v0 < stream.length; v0 += kKeyBatch, buf ^= 1) {
    const int32_t* batch_positions = positions[buf];
    const bool more = v0 + kKeyBatch < stream.length;
    if constexpr (kVec) copy_async_wait<1>();
    __syncthreads();  // (kVec: the K rows are in)
    if (more) find_positions(v0 + kKeyBatch, buf ^ 1);

    // b. scores: one K row per lane group, all heads at once; a group loads the chunks of
    // kRows rows before it uses them, so their loads overlap. The trip count is
    // the same across a warp (kKeyBatch is a multiple of groups, or a warp has no rows).
    for (int j0 = group; j0 < kKeyBatch; j0 += groups * kRows) {
      int32_t pos[kRows];
      float partial[kRows][NH] = {};
#pragma unroll
      for (int u = 0; u < kRows; ++u) {
        const int j = j0 + u * groups;
        pos[u] = j < kKeyBatch ? batch_positions[j] : -1;
      }
      for (int c = sub; c < chunks; c += p.lanes) {
        Chunk x[kRows];
#pragma unroll
        for (int u = 0; u < kRows; ++u) {
          if (pos[u] >= 0 && kVec) {
            x[u].load_shared(k_tile + (j0 + u * groups) * D + c * C);
          } else if (pos[u] >= 0) {
            x[u].load(k + int64_t(pos[u]) * p.ks.row + int64_t(c) * C);
          } else {
            x[u].zero();
          }
        }
#pragma unroll
        for (int u = 0; u < kRows; ++u) dot_chunk_heads<NH, C>(query, D, c, x[u].v, partial[u]);
      }
#pragma unroll
      for (int u = 0; u < kRows; ++u) {
#pragma unroll
        for (int h = 0; h < NH; ++h) partial[u][h] = warp_sum(partial[u][h], p.lanes);
        const int j = j0 + u * groups;
        if (sub == 0 && j < kKeyBatch) {
#pragma unroll
          for (int h = 0; h < NH; ++h) {
            probs[h][j] = (pos[u] >= 0 && h < unit.num_heads) ? partial[u][h] : kNegInf;
          }
        }
      }
    }
    __syncthreads();

    // c. online softmax, one warp per head (kKeyBatch == 32 keys: one per lane)
    for (int h = warp; h < NH; h += kAttnWarps) {
      const float s = probs[h][lane];
      const float old_max = row_max[h];
      const float new_max = fmaxf(old_max, warp_max(s));
      const float pj = exp2_approx(s - softmax_safe_max(new_max));
      probs[h][lane] = pj;
      const float sum = warp_sum(pj);
      __syncwarp();  // every lane has read row_max[h] before lane 0 writes it
      if (lane == 0) {
        const float r = softmax_rescale(old_max, new_max);
        rescale[h] = r;
        row_sum[h] = row_sum[h] * r + sum;
        row_max[h] = new_max;
      }
    }
    __syncthreads();

    // d. acc = acc * rescale + P V
    for (int e = threadIdx.x; e < NH * D; e += kAttnThreads) acc[e] *= rescale[e / D];
    if constexpr (kVec) copy_async_wait<0>();
    __syncthreads();  // (kVec: the V rows are in; every thread is done with the K tile)
    if (kVec && more) copy_rows(k, p.ks.row, buf ^ 1, k_tile);
    for (int o = threadIdx.x; o < owners * subsets; o += kAttnThreads) {
      const int owner = o % owners, subset = o / owners;
      const int h = owner / chunks, c = owner % chunks;
      if (h >= unit.num_heads) continue;
      float sum[C] = {};
      for (int j0 = subset; j0 < kKeyBatch; j0 += subsets * kRows) {  // loads overlap
        Chunk x[kRows];
        float w[kRows];
#pragma unroll
        for (int u = 0; u < kRows; ++u) {
          const int j = j0 + u * subsets;
          const int32_t pos = j < kKeyBatch ? batch_positions[j] : -1;
          w[u] = pos >= 0 ? probs[h][j] : 0.f;
          if (pos >= 0 && kVec) {
            x[u].load_shared(v_tile + j * D + c * C);
          } else if (pos >= 0) {
            x[u].load(v + int64_t(pos) * p.vs.row + int64_t(c) * C);
          } else {
            x[u].zero();
          }
        }
#pragma unroll
        for (int u = 0; u < kRows; ++u) {  // keys in ascending order, as before
#pragma unroll
          for (int e = 0; e < C; ++e) sum[e] += w[u] * x[u].v[e];
        }
      }
#pragma unroll
      for (int e = 0; e < C; ++e) {
        if (subsets == 1) {
          acc[h * D + c * C + e] += sum[e];
        } else {
          subset_sums[o * C + e] = sum[e];
        }
      }
    }
    if (subsets > 1) {  // the subsets' sums in a fixed order: the forward is deterministic
      __syncthreads();
      add_subset_sums(subset_sums, owners, subsets, C, chunks, D, unit.num_heads, acc);
    }
    __syncthreads();  // every thread is done with the V tile
    if (kVec && more) copy_rows(v, p.vs.row, buf ^ 1, v_tile);
  }

  // out / lse, or this split's partial state
  if (p.splits == 1) {
    T* out = reinterpret_cast<T*>(p.out);
    const int64_t first_row =
        (unit.b * p.shape.q_heads + unit.first_head) * int64_t(p.shape.q_len) + unit.i;
    for (int e = threadIdx.x; e < unit.num_heads * D; e += kAttnThreads) {
      const int h = e / D, d = e % D;
      const int64_t row = first_row + int64_t(h) * p.shape.q_len;
      out[row * D + d] = from_float<T>(acc[e] * softmax_normalizer(row_sum[h]));
    }
    if (threadIdx.x < unit.num_heads) {
      p.lse[first_row + int64_t(threadIdx.x) * p.shape.q_len] =
          softmax_lse(row_max[threadIdx.x], row_sum[threadIdx.x]);
    }
  } else {
    const int64_t slot = u * p.splits + split;
    for (int e = threadIdx.x; e < NH * D; e += kAttnThreads) {
      p.partial_acc[slot * NH * D + e] = acc[e];
    }
    if (threadIdx.x < NH) {
      p.partial_stats[(slot * NH + threadIdx.x) * 2 + 0] = row_max[threadIdx.x];
      p.partial_stats[(slot * NH + threadIdx.x) * 2 + 1] = row_sum[threadIdx.x];
    }
  }
}

// Merges the splits of each unit: out = sum_s w_s acc_s / sum_s w_s l_s with
// w_s = 2^(m_s - max_s m_s). One block per (unit, head). Warp 0 computes each split's weight
// once and writes it over that split's max (partial_stats is this call's scratch); then each
// thread's loads of acc_s are independent (unrolled), so they fly together instead of costing
// one latency per split.
template <typename T, int NH>
__global__ void __launch_bounds__(kAttnThreads) merge_splits_kernel(AttnParams p) {
  const int64_t u = blockIdx.x / NH;
  const int h = int(blockIdx.x % NH);
  const Unit unit = decode_unit(p, u, NH);
  if (h >= unit.num_heads) return;  // the whole block: before any barrier
  const int D = p.shape.head_dim, S = p.splits;
  const int64_t split_stride = int64_t(NH) * 2;           // partial_stats: [units, S, NH, 2]
  float* stats = p.partial_stats + (u * S * NH + h) * 2;  // (max, sum) of split s at s * stride
  const int64_t row =
      (unit.b * p.shape.q_heads + unit.first_head + h) * int64_t(p.shape.q_len) + unit.i;
  __shared__ float total;
  if (threadIdx.x < 32) {
    const int lane = threadIdx.x;
    float m = kNegInf;
    for (int s = lane; s < S; s += 32) m = fmaxf(m, stats[s * split_stride]);
    m = warp_max(m);
    const float safe = softmax_safe_max(m);
    float l = 0.f;
    for (int s = lane; s < S; s += 32) {
      const float w = softmax_split_weight(stats[s * split_stride], safe);
      l += w * stats[s * split_stride + 1];
      stats[s * split_stride] = w;
    }
    l = warp_sum(l);
    if (lane == 0) {
      total = l;
      p.lse[row] = softmax_lse(m, l);
    }
  }
  __syncthreads();  // (also makes warp 0's weights in global memory visible to the block)
  T* out = reinterpret_cast<T*>(p.out);
  const float* acc = p.partial_acc + (u * S * NH + h) * int64_t(D);  // split s at s * NH * D
  for (int d = threadIdx.x; d < D; d += kAttnThreads) {
    float sum = 0.f;
#pragma unroll 8
    for (int s = 0; s < S; ++s) sum += stats[s * split_stride] * acc[int64_t(s) * NH * D + d];
    out[row * D + d] = from_float<T>(sum * softmax_normalizer(total));
  }
}

template <typename T, int NH>
void launch_forward(const AttentionArgs& a, AttnParams& p, bool vec, int64_t shared,
                    cudaStream_t stream) {
  auto kernel = vec ? attention_forward_kernel<T, true, NH> : attention_forward_kernel<T, false, NH>;
  allow_dynamic_shared(kernel, shared);
  plan_splits(a, p, 64, resident_blocks(kernel, kAttnThreads, shared));
  run_split_forward(a, p, NH, [&] {
    kernel<<<grid_of(p.units * p.splits, "gaze_attention"), dim3(kAttnThreads), shared, stream>>>(p);
  });
}

}  // namespace

int plan_units(const AttentionArgs& a, AttnParams& p) {
  const AttentionShape& S = a.shape;
  const int G = S.group();
  const bool per_query_head = S.per_head_selection();
  const int heads = per_query_head ? 1 : G;
  const int NH = num_heads_per_unit_template(std::min(heads, 8));
  p.head_chunks = per_query_head ? 1 : int(ceil_div(G, NH));
  p.units = int64_t(S.batch) * S.sel_heads * p.head_chunks * S.q_len;
  return NH;
}

void plan_splits(const AttentionArgs& a, AttnParams& p, int max_splits, int resident_per_sm) {
  const AttentionShape& S = a.shape;
  // Splits whose blocks fill whole waves of resident blocks (pieces_filling_rounds), none
  // with less than ~64 keys' worth of work, at most kMaxSlots slots each.
  const int64_t wave = int64_t(std::max(resident_per_sm, 1)) * multiprocessor_count();
  const int64_t num_fixed = a.layout.fixed_tokens.size(-1);
  const int64_t work = std::max<int64_t>(1, (num_fixed + int64_t(S.topk) * 8) / 64);
  int64_t splits = pieces_filling_rounds(p.units, wave, std::min<int64_t>(work, max_splits));
  // GAZE_SPLITS=n (n >= 1): n splits per unit, within what the kernels take; for measuring
  // the plan (the decode benchmark sweeps it)
  if (const int forced = forced_count("GAZE_SPLITS"); forced > 0) splits = std::min(forced, max_splits);
  splits = std::max<int64_t>(splits, ceil_div(S.topk, kMaxSlots));
  p.splits = int(splits);
}

void run_split_forward(const AttentionArgs& a, AttnParams& p, int NH,
                       c10::function_ref<void()> launch_splits) {
  at::Tensor stats, partial;  // the splits' (max, sum) and accumulators
  if (p.splits > 1) {
    const auto options = a.q.options().dtype(at::kFloat);
    stats = at::empty({p.units, p.splits, NH, 2}, options);
    partial = at::empty({p.units, p.splits, NH, a.shape.head_dim}, options);
    p.partial_stats = stats.data_ptr<float>();
    p.partial_acc = partial.data_ptr<float>();
  }
  launch_splits();
  C10_CUDA_KERNEL_LAUNCH_CHECK();
  if (p.splits == 1) return;
  const dim3 grid = grid_of(p.units * NH, "gaze_attention");  // one block per (unit, head)
  const auto stream = c10::cuda::getCurrentCUDAStream();
  dispatch_float_types(a.q.scalar_type(), "gaze_attention", [&](auto tag) {
    using T = native_t<decltype(tag)>;
    dispatch_heads_per_unit(NH, [&](auto heads) {
      constexpr int kHeads = decltype(heads)::value;
      merge_splits_kernel<T, kHeads><<<grid, dim3(kAttnThreads), 0, stream>>>(p);
    });
  });
  C10_CUDA_KERNEL_LAUNCH_CHECK();
}

KernelChoice attention_kernel_choice() {
  const char* env = std::getenv("GAZE_ATTENTION_KERNEL");
  if (env == nullptr || *env == '\0' || std::strcmp(env, "auto") == 0) return KernelChoice::kAuto;
  if (std::strcmp(env, "tensor_core") == 0) return KernelChoice::kTensorCore;
  if (std::strcmp(env, "split") == 0) return KernelChoice::kSplit;
  if (std::strcmp(env, "split_block") == 0) return KernelChoice::kSplitBlock;
  TORCH_CHECK(false, "GAZE_ATTENTION_KERNEL must be auto, tensor_core, split or split_block, not '",
              env, "'");
}

void fill_operands(const AttentionArgs& a, AttentionOperands& p) {
  p.q = a.q.data_ptr();
  p.k = a.k.data_ptr();
  p.v = a.v.data_ptr();
  p.qs = strides_of(a.q);
  p.ks = strides_of(a.k);
  p.vs = strides_of(a.v);
  p.layout = a.layout.view(a.num_keys);
  p.idx = a.idx.data_ptr<int32_t>();
  p.q_pos = a.q_pos.defined() ? a.q_pos.data_ptr<int32_t>() : nullptr;
  p.shape = a.shape;
  p.score_scale = static_cast<float>(a.scale) * kLog2e;
}

namespace {

std::tuple<at::Tensor, at::Tensor> gaze_attention_cuda(
    const at::Tensor& q, const at::Tensor& k, const at::Tensor& v, const at::Tensor& region_ptr,
    const at::Tensor& region_tokens, const at::Tensor& fixed_tokens, const at::Tensor& idx,
    const std::optional<at::Tensor>& q_pos, double scale) {
  const c10::cuda::CUDAGuard guard(q.device());
  AttentionArgs a = prepare_gaze_attention("gaze_attention", q, k, v, region_ptr, region_tokens,
                                           fixed_tokens, idx, q_pos, scale);
  at::Tensor out = at::empty(q.sizes(), q.options());
  at::Tensor lse = at::empty({q.size(0), q.size(1), q.size(2)}, q.options().dtype(at::kFloat));
  if (lse.numel() == 0) return {out, lse};
  if (run_tiled_forward(a, out, lse)) return {out, lse};

  AttnParams p{};
  fill_operands(a, p);
  const int NH = plan_units(a, p);
  p.out = out.data_ptr();
  p.lse = lse.data_ptr<float>();
  if (attention_kernel_choice() != KernelChoice::kSplitBlock && run_streamed_forward(a, p, NH)) {
    return {out, lse};
  }
  const auto stream = c10::cuda::getCurrentCUDAStream();
  dispatch_float_types(q.scalar_type(), "gaze_attention", [&](auto tag) {
    using T = native_t<decltype(tag)>;
    const int64_t D = a.shape.head_dim;
    // query and acc (float32), then with 16-byte rows the K and V tiles; where the tiles do
    // not fit (a GPU with little shared memory, D = 256 in float32), element loads instead
    const int64_t limit = dynamic_shared_limit(kStaticSharedBudget);
    const int64_t tiles = 2 * kKeyBatch * D * int64_t(sizeof(T));
    int64_t shared = 2 * int64_t(NH) * D * 4;
    const bool vec = rows_vectorizable<T>(p.k, D, {p.ks.batch, p.ks.head, p.ks.row}) &&
                     rows_vectorizable<T>(p.v, D, {p.vs.batch, p.vs.head, p.vs.row}) &&
                     shared + tiles <= limit;
    if (vec) shared += tiles;
    TORCH_CHECK(shared <= limit, "gaze.gaze_attention: head dim ", D, " is too large for the CUDA kernel");
    p.lanes = lanes_per_row(D / (vec ? 16 / sizeof(T) : 1));
    dispatch_heads_per_unit(NH, [&](auto heads) {
      launch_forward<T, decltype(heads)::value>(a, p, vec, shared, stream);
    });
  });
  return {out, lse};
}

}  // namespace
}  // namespace gaze::cuda

TORCH_LIBRARY_IMPL(gaze, CUDA, m) { m.impl("gaze_attention", &gaze::cuda::gaze_attention_cuda); }
