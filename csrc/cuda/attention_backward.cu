// CUDA gaze_attention backward, with the forward's decomposition into units
// and key batches (attention_common.cuh), for what the tensor-core backward
// (attention_tiled.cu) does not take. Per batch of kKeyBatch keys:
//   a. key positions;
//   b. a lane group per key recomputes s = q.k and dp = dO.v for the unit's
//      heads; P = 2^(s - lse), dS = P (dp - delta);
//   c. dq += dS K, in shared memory;
//   d. dk += scale dS q and dv += P dO, added to float32 buffers in global memory.
// By default units and splits run in parallel and step d uses atomics. With
// torch.use_deterministic_algorithms(True) one block per (batch, KV head) runs
// that head's units and their splits one after the other, and step d has each
// thread add one element of every key's dk/dv row in key order, without atomics:
// every sum happens in the same order on every run, keys listed twice included.
#include <ATen/Context.h>
#include <ATen/core/Tensor.h>
#include <ATen/ops/empty.h>
#include <ATen/ops/mul.h>
#include <ATen/ops/sub.h>
#include <ATen/ops/zeros.h>
#include <torch/library.h>

#include <tuple>

#include "../common/dispatch.h"
#include "../common/op_args.h"
#include "attention_common.cuh"

namespace gaze::cuda {
namespace {

template <typename T, bool kVec, int NH>
struct BackwardShared {
  float subset_sums[kAttnThreads * RowChunk<T, kVec>::kChunk];  // step c's partial sums
  float probs[NH][kKeyBatch];
  float dscores[NH][kKeyBatch];
  int32_t positions[kKeyBatch];
  float lse2[NH], delta[NH];
  KeyStream stream;
};

// One split of one unit. `query`, `grad`, `dq` are [NH][D] float in shared memory.
// kOrdered: the block alone writes this KV head's dk/dv rows (the deterministic kernel).
template <typename T, bool kVec, int NH, bool kOrdered>
__device__ void backward_unit(const AttnParams& p, int64_t u, int split, float* query,
                              float* grad, float* dq, BackwardShared<T, kVec, NH>& sh) {
  using Chunk = RowChunk<T, kVec>;
  constexpr int C = Chunk::kChunk;
  const int D = p.shape.head_dim, chunks = D / C;
  const Unit unit = decode_unit(p, u, NH);
  const LayoutView& layout = p.layout;
  const int Lq = p.shape.q_len;
  const int32_t limit = p.q_pos ? p.q_pos[unit.b * Lq + unit.i] : kNoCausalLimit;
  const int64_t first_row = (unit.b * p.shape.q_heads + unit.first_head) * int64_t(Lq) + unit.i;
  const T* q = reinterpret_cast<const T*>(p.q);
  const T* dout = reinterpret_cast<const T*>(p.grad_out);
  const T* k = reinterpret_cast<const T*>(p.k) + p.ks.offset(unit.b, unit.kv_head, 0);
  const T* v = reinterpret_cast<const T*>(p.v) + p.vs.offset(unit.b, unit.kv_head, 0);
  const int64_t kv_row0 = (unit.b * p.shape.kv_heads + unit.kv_head) * int64_t(layout.num_keys);
  const float to_natural = 1.0f / kLog2e;  // query holds q * scale * log2(e)

  for (int e = threadIdx.x; e < NH * D; e += kAttnThreads) {
    const int h = e / D, d = e % D;
    const bool live = h < unit.num_heads;
    query[e] = live ? to_float(q[p.qs.offset(unit.b, unit.first_head + h, unit.i) + d]) * p.score_scale : 0.f;
    grad[e] = live ? to_float(dout[p.gs.offset(unit.b, unit.first_head + h, unit.i) + d]) : 0.f;
    dq[e] = 0.f;
  }
  if (threadIdx.x < NH) {
    const int h = threadIdx.x;
    const bool live = h < unit.num_heads;
    const int64_t row = first_row + int64_t(h) * Lq;
    sh.lse2[h] = live ? p.lse_in[row] * kLog2e : kNegInf;
    sh.delta[h] = live ? p.delta[row] : 0.f;
  }
  sh.stream.init(p, unit, split);  // ends with a barrier

  const int lane = threadIdx.x % 32, warp = threadIdx.x / 32;
  const int sub = lane % p.lanes, group = warp * (32 / p.lanes) + lane / p.lanes;
  const int groups = kAttnThreads / p.lanes;
  const int dq_owners = NH * chunks;
  const int dq_subsets = max(1, min(kKeyBatch, kAttnThreads / max(dq_owners, 1)));

  for (int v0 = 0; v0 < sh.stream.length; v0 += kKeyBatch) {
    if (threadIdx.x < kKeyBatch) {
      const int e = v0 + threadIdx.x;
      int32_t pos = -1;
      if (e < sh.stream.length) pos = sh.stream.position(p, unit, e);
      sh.positions[threadIdx.x] = layout.visible(pos, limit) ? pos : -1;
    }
    __syncthreads();

    // b. P and dS per (head, key)
    for (int j = group; j < kKeyBatch; j += groups) {
      const int32_t pos = sh.positions[j];
      float s[NH] = {}, dp[NH] = {};
      if (pos >= 0) {
        const T* krow = k + int64_t(pos) * p.ks.row;
        const T* vrow = v + int64_t(pos) * p.vs.row;
        for (int c = sub; c < chunks; c += p.lanes) {
          Chunk kx, vx;
          kx.load(krow + int64_t(c) * C);
          vx.load(vrow + int64_t(c) * C);
          dot_chunk_heads<NH, C>(query, D, c, kx.v, s);
          dot_chunk_heads<NH, C>(grad, D, c, vx.v, dp);
        }
      }
#pragma unroll
      for (int h = 0; h < NH; ++h) {
        s[h] = warp_sum(s[h], p.lanes);
        dp[h] = warp_sum(dp[h], p.lanes);
      }
      if (sub == 0) {
#pragma unroll
        for (int h = 0; h < NH; ++h) {
          const bool live = pos >= 0 && sh.lse2[h] != kNegInf;
          const float prob = live ? exp2_approx(s[h] - sh.lse2[h]) : 0.f;
          sh.probs[h][j] = prob;
          sh.dscores[h][j] = live ? prob * (dp[h] - sh.delta[h]) : 0.f;  // 0 * NaN delta: 0
        }
      }
    }
    __syncthreads();

    // c. dq += dS K (scaled at the end)
    for (int o = threadIdx.x; o < dq_owners * dq_subsets; o += kAttnThreads) {
      const int owner = o % dq_owners, subset = o / dq_owners;
      const int h = owner / chunks, c = owner % chunks;
      if (h >= unit.num_heads) continue;
      float sum[C] = {};
      for (int j = subset; j < kKeyBatch; j += dq_subsets) {
        const int32_t pos = sh.positions[j];
        if (pos < 0) continue;
        Chunk x;
        x.load(k + int64_t(pos) * p.ks.row + int64_t(c) * C);
        const float w = sh.dscores[h][j];
#pragma unroll
        for (int e = 0; e < C; ++e) sum[e] += w * x.v[e];
      }
#pragma unroll
      for (int e = 0; e < C; ++e) {
        if (dq_subsets == 1) {
          dq[h * D + c * C + e] += sum[e];
        } else {
          sh.subset_sums[o * C + e] = sum[e];
        }
      }
    }

    // d. dk, dv rows
    if constexpr (kOrdered) {  // one element per thread, the batch's keys in order
      for (int d = threadIdx.x; d < D; d += kAttnThreads) {
        for (int j = 0; j < kKeyBatch; ++j) {
          const int32_t pos = sh.positions[j];
          if (pos < 0) continue;
          float dk_sum = 0.f, dv_sum = 0.f;
#pragma unroll
          for (int h = 0; h < NH; ++h) {
            dk_sum += sh.dscores[h][j] * to_natural * query[h * D + d];
            dv_sum += sh.probs[h][j] * grad[h * D + d];
          }
          const int64_t at = (kv_row0 + pos) * D + d;
          p.dk[at] += dk_sum;
          p.dv[at] += dv_sum;
        }
      }
    } else {  // one (key, chunk) per thread, atomics
      for (int o = threadIdx.x; o < kKeyBatch * chunks; o += kAttnThreads) {
        const int j = o / chunks, c = o % chunks;
        const int32_t pos = sh.positions[j];
        if (pos < 0) continue;
        float dk_sum[C] = {}, dv_sum[C] = {};
#pragma unroll
        for (int h = 0; h < NH; ++h) {
          const float ds = sh.dscores[h][j] * to_natural, pr = sh.probs[h][j];
#pragma unroll
          for (int e = 0; e < C; ++e) {
            dk_sum[e] += ds * query[h * D + c * C + e];
            dv_sum[e] += pr * grad[h * D + c * C + e];
          }
        }
        const int64_t at = (kv_row0 + pos) * D + int64_t(c) * C;
        if constexpr (C % 2 == 0) {  // 16-byte chunks: D and `at` are even, pairs aligned
#pragma unroll
          for (int e = 0; e < C; e += 2) {
            atomic_add_pair(p.dk + at + e, dk_sum[e], dk_sum[e + 1]);
            atomic_add_pair(p.dv + at + e, dv_sum[e], dv_sum[e + 1]);
          }
        } else {
          atomicAdd(p.dk + at, dk_sum[0]);
          atomicAdd(p.dv + at, dv_sum[0]);
        }
      }
    }
    __syncthreads();
    if (dq_subsets > 1) {  // in a fixed order, so the deterministic mode is bitwise repeatable
      add_subset_sums(sh.subset_sums, dq_owners, dq_subsets, C, chunks, D, unit.num_heads, dq);
      __syncthreads();
    }
  }

  // dq = scale * sum dS K; with splits several blocks add to the same rows
  const float scale = p.score_scale / kLog2e;
  for (int e = threadIdx.x; e < unit.num_heads * D; e += kAttnThreads) {
    const int h = e / D, d = e % D;
    float* dst = p.dq + (first_row + int64_t(h) * Lq) * D + d;
    if (p.splits == 1) {
      *dst = dq[e] * scale;
    } else {
      atomicAdd(dst, dq[e] * scale);
    }
  }
  __syncthreads();  // shared memory is reused by the next unit
}

template <typename T, bool kVec, int NH>
__global__ void __launch_bounds__(kAttnThreads) attention_backward_kernel(AttnParams p) {
  extern __shared__ __align__(16) float smem[];
  __shared__ BackwardShared<T, kVec, NH> sh;
  const int D = p.shape.head_dim;
  backward_unit<T, kVec, NH, false>(p, blockIdx.x / p.splits, int(blockIdx.x % p.splits), smem,
                                    smem + NH * D, smem + 2 * NH * D, sh);
}

// Deterministic: block (b, kv head) runs every unit (and split) that reads that KV head,
// in order.
template <typename T, bool kVec, int NH>
__global__ void __launch_bounds__(kAttnThreads) attention_backward_ordered_kernel(AttnParams p) {
  extern __shared__ __align__(16) float smem[];
  __shared__ BackwardShared<T, kVec, NH> sh;
  const AttentionShape& S = p.shape;
  const int D = p.shape.head_dim;
  const int64_t b = blockIdx.x / S.kv_heads;
  const int hk = int(blockIdx.x % S.kv_heads);
  // units are numbered ((b * Hs + hs) * head_chunks + chunk) * Lq + i
  const bool per_query_head = S.per_head_selection();
  const int hs_begin = per_query_head ? hk * S.group() : hk;
  const int hs_end = per_query_head ? hs_begin + S.group() : hk + 1;
  for (int hs = hs_begin; hs < hs_end; ++hs) {
    const int64_t first = (b * S.sel_heads + hs) * p.head_chunks * int64_t(S.q_len);
    for (int64_t u = first; u < first + int64_t(p.head_chunks) * S.q_len; ++u) {
      for (int split = 0; split < p.splits; ++split) {
        backward_unit<T, kVec, NH, true>(p, u, split, smem, smem + NH * D, smem + 2 * NH * D, sh);
      }
    }
  }
}

template <typename T, int NH>
void launch_backward(const AttentionArgs& a, AttnParams& p, bool vec, bool deterministic,
                     int64_t shared, cudaStream_t stream) {
  auto run = [&](auto kernel, bool ordered) {
    allow_dynamic_shared(kernel, shared);
    // deterministic: as few splits as the slot capacity allows (the ordered kernel runs
    // them in order, one block per (batch, KV head))
    plan_splits(a, p, ordered ? 1 : 16, resident_blocks(kernel, kAttnThreads, shared));
    const int64_t blocks = ordered ? int64_t(p.shape.batch) * p.shape.kv_heads : p.units * p.splits;
    kernel<<<grid_of(blocks, "gaze_attention_backward"), dim3(kAttnThreads), shared, stream>>>(p);
    C10_CUDA_KERNEL_LAUNCH_CHECK();
  };
  if (deterministic) {
    vec ? run(attention_backward_ordered_kernel<T, true, NH>, true)
        : run(attention_backward_ordered_kernel<T, false, NH>, true);
  } else {
    vec ? run(attention_backward_kernel<T, true, NH>, false)
        : run(attention_backward_kernel<T, false, NH>, false);
  }
}

}  // namespace

void fill_backward_operands(const AttentionBackwardArgs& args, const at::Tensor& delta,
                            at::Tensor& dq, at::Tensor& dk, at::Tensor& dv, BackwardOperands& p) {
  p.grad_out = args.grad_out.data_ptr();
  p.gs = strides_of(args.grad_out);
  p.lse_in = args.lse.data_ptr<float>();
  p.delta = delta.data_ptr<float>();
  p.dq = dq.data_ptr<float>();
  p.dk = dk.data_ptr<float>();
  p.dv = dv.data_ptr<float>();
}

namespace {

std::tuple<at::Tensor, at::Tensor, at::Tensor> gaze_attention_backward_cuda(
    const at::Tensor& grad_out, const std::optional<at::Tensor>& grad_lse, const at::Tensor& q,
    const at::Tensor& k, const at::Tensor& v, const at::Tensor& out, const at::Tensor& lse,
    const at::Tensor& region_ptr, const at::Tensor& region_tokens,
    const at::Tensor& fixed_tokens, const at::Tensor& idx,
    const std::optional<at::Tensor>& q_pos, double scale) {
  const c10::cuda::CUDAGuard guard(q.device());
  AttentionBackwardArgs args = prepare_gaze_attention_backward(
      grad_out, grad_lse, q, k, v, out, lse, region_ptr, region_tokens, fixed_tokens, idx, q_pos,
      scale);
  const AttentionArgs& a = args.fwd;
  at::Tensor dq = at::zeros(q.sizes(), q.options().dtype(at::kFloat));
  at::Tensor dk = at::zeros(k.sizes(), k.options().dtype(at::kFloat));
  at::Tensor dv = at::zeros(v.sizes(), v.options().dtype(at::kFloat));
  if (lse.numel() > 0 && k.numel() > 0) {
    // delta = rowsum(dO * O) - dlse, the softmax's own contribution to dS
    at::Tensor delta = at::mul(args.grad_out.to(at::kFloat), args.out.to(at::kFloat)).sum(-1);
    if (args.grad_lse.defined()) delta = at::sub(delta, args.grad_lse);
    delta = delta.contiguous();

    const bool deterministic = at::globalContext().deterministicAlgorithms();
    if (!deterministic && run_tiled_backward(args, delta, dq, dk, dv)) {
      return {dq.to(q.scalar_type()), dk.to(k.scalar_type()), dv.to(v.scalar_type())};
    }
    AttnParams p{};
    fill_operands(a, p);
    const int NH = plan_units(a, p);
    fill_backward_operands(args, delta, dq, dk, dv, p);
    const int64_t D = a.shape.head_dim;
    const int64_t shared = 3 * int64_t(NH) * D * 4;
    TORCH_CHECK(shared <= dynamic_shared_limit(kStaticSharedBudget),
                "gaze.gaze_attention_backward: head dim ", D,
                " is too large for the CUDA kernel");
    const auto stream = c10::cuda::getCurrentCUDAStream();
    dispatch_float_types(q.scalar_type(), "gaze_attention_backward", [&](auto tag) {
      using T = native_t<decltype(tag)>;
      const bool vec = rows_vectorizable<T>(p.k, D, {p.ks.batch, p.ks.head, p.ks.row}) &&
                       rows_vectorizable<T>(p.v, D, {p.vs.batch, p.vs.head, p.vs.row});
      p.lanes = lanes_per_row(D / (vec ? 16 / sizeof(T) : 1));
      switch (NH) {
        case 1: launch_backward<T, 1>(a, p, vec, deterministic, shared, stream); break;
        case 2: launch_backward<T, 2>(a, p, vec, deterministic, shared, stream); break;
        case 4: launch_backward<T, 4>(a, p, vec, deterministic, shared, stream); break;
        default: launch_backward<T, 8>(a, p, vec, deterministic, shared, stream); break;
      }
    });
  }
  return {dq.to(q.scalar_type()), dk.to(k.scalar_type()), dv.to(v.scalar_type())};
}

}  // namespace
}  // namespace gaze::cuda

TORCH_LIBRARY_IMPL(gaze, CUDA, m) {
  m.impl("gaze_attention_backward", &gaze::cuda::gaze_attention_backward_cuda);
}
