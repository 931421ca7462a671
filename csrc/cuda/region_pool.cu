// CUDA region_pool: one warp per (batch, head, region). Lanes split a key row in
// 16-byte chunks; when a row needs fewer than 32 lanes the warp reads several
// tokens at once and sums the partial rows with shuffles at the end. The backward
// adds each region's gradient to its tokens with atomics: one add per key element,
// so repeatable, unless a token is listed in several regions (then the order of its
// adds varies). Under torch.use_deterministic_algorithms(True) an ordered kernel
// runs instead: one warp per (batch, head) adds the regions in order, without atomics.
#include <ATen/Context.h>
#include <ATen/core/Tensor.h>
#include <ATen/ops/empty.h>
#include <ATen/ops/zeros.h>
#include <torch/library.h>

#include "../common/dispatch.h"
#include "../common/op_args.h"
#include "cuda_common.cuh"

namespace gaze::cuda {
namespace {

constexpr int kWarpsPerBlock = 8;

// The (batch, head, region) item of a warp, and how its lanes split a row: groups of
// `lanes` lanes take different tokens, the lanes of a group different chunks.
struct RegionWarp {
  int64_t item, b;
  int h, r, sub, group, groups;
  RegionSpan span;
  const int32_t* tokens;
  float mean;

  __device__ RegionWarp(const LayoutView& layout, int H, int lanes, int64_t warp_item)
      : item(warp_item) {
    const int R = layout.num_regions, lane = threadIdx.x % 32;
    b = item / (int64_t(H) * R);
    h = int((item / R) % H);
    r = int(item % R);
    sub = lane % lanes;
    group = lane / lanes;
    groups = 32 / lanes;
    span = layout.region(b, r);
    tokens = layout.tokens(b);
    mean = region_mean_scale<float>(span.size());
  }
};

// One warp per (b, h, r): the float32 mean of the region's keys.
template <typename T, bool kVec>
__global__ void __launch_bounds__(kWarpsPerBlock * 32)
    pool_kernel(const T* __restrict__ keys, Strides4 ks, LayoutView layout, int H, int D,
                int lanes, T* __restrict__ desc /* [B, H, R, D] */, int64_t items) {
  using Chunk = RowChunk<T, kVec>;
  constexpr int C = Chunk::kChunk;
  const int64_t item = int64_t(blockIdx.x) * kWarpsPerBlock + threadIdx.x / 32;
  if (item >= items) return;  // before RegionWarp reads the layout
  const RegionWarp w(layout, H, lanes, item);
  const int chunks = D / C;
  for (int c0 = 0; c0 < chunks; c0 += lanes) {
    const int c = c0 + w.sub;
    float acc[C] = {};
    for (int t = w.span.begin + w.group; t < w.span.end; t += w.groups) {
      const int32_t pos = w.tokens[t];
      if (c >= chunks || !layout.visible(pos, kNoCausalLimit)) continue;
      Chunk x;
      x.load(keys + ks.offset(w.b, w.h, pos) + int64_t(c) * C);
#pragma unroll
      for (int i = 0; i < C; ++i) acc[i] += x.v[i];
    }
    for (int offset = lanes; offset < 32; offset *= 2) {
#pragma unroll
      for (int i = 0; i < C; ++i) acc[i] += __shfl_xor_sync(0xFFFFFFFFu, acc[i], offset);
    }
    if (w.group == 0 && c < chunks) {
      Chunk out;
#pragma unroll
      for (int i = 0; i < C; ++i) out.v[i] = acc[i];
      out.store(desc + w.item * D + int64_t(c) * C, w.mean);
    }
  }
}

// One warp per (b, h, r): adds grad_desc / |region| to each listed key's row.
template <typename T, bool kVec>
__global__ void __launch_bounds__(kWarpsPerBlock * 32)
    pool_backward_kernel(const T* __restrict__ grad_desc, Strides4 gs, LayoutView layout, int H,
                         int D, int lanes, float* __restrict__ grad_keys /* [B, H, N, D] */,
                         int64_t items) {
  using Chunk = RowChunk<T, kVec>;
  constexpr int C = Chunk::kChunk;
  const int64_t item = int64_t(blockIdx.x) * kWarpsPerBlock + threadIdx.x / 32;
  if (item >= items) return;  // before RegionWarp reads the layout
  const RegionWarp w(layout, H, lanes, item);
  const int chunks = D / C;
  float* head = grad_keys + (w.b * H + w.h) * int64_t(layout.num_keys) * D;
  for (int c = w.sub; c < chunks; c += lanes) {
    Chunk g;
    g.load(grad_desc + gs.offset(w.b, w.h, w.r) + int64_t(c) * C);
    for (int t = w.span.begin + w.group; t < w.span.end; t += w.groups) {
      const int32_t pos = w.tokens[t];
      if (!layout.visible(pos, kNoCausalLimit)) continue;
      float* dst = head + int64_t(pos) * D + int64_t(c) * C;
#pragma unroll
      for (int i = 0; i < C; ++i) atomicAdd(dst + i, g.v[i] * w.mean);
    }
  }
}

// One warp per (b, h): adds every region's grad_desc / |region| to its keys' rows,
// region after region, token after token, each lane its own chunks of the row: every
// element receives its adds in one fixed order.
template <typename T, bool kVec>
__global__ void __launch_bounds__(kWarpsPerBlock * 32)
    pool_backward_ordered_kernel(const T* __restrict__ grad_desc, Strides4 gs, LayoutView layout,
                                 int H, int D, float* __restrict__ grad_keys /* [B, H, N, D] */,
                                 int64_t items /* B * H */) {
  using Chunk = RowChunk<T, kVec>;
  constexpr int C = Chunk::kChunk;
  const int64_t item = int64_t(blockIdx.x) * kWarpsPerBlock + threadIdx.x / 32;
  if (item >= items) return;
  const int64_t b = item / H;
  const int h = int(item % H), chunks = D / C;
  float* head = grad_keys + item * int64_t(layout.num_keys) * D;
  const int32_t* tokens = layout.tokens(b);
  for (int r = 0; r < layout.num_regions; ++r) {
    const RegionSpan span = layout.region(b, r);
    const float mean = region_mean_scale<float>(span.size());
    for (int c = threadIdx.x % 32; c < chunks; c += 32) {
      Chunk g;
      g.load(grad_desc + gs.offset(b, h, r) + int64_t(c) * C);
      for (int t = span.begin; t < span.end; ++t) {
        const int32_t pos = tokens[t];
        if (!layout.visible(pos, kNoCausalLimit)) continue;
        float* dst = head + int64_t(pos) * D + int64_t(c) * C;
#pragma unroll
        for (int i = 0; i < C; ++i) dst[i] += g.v[i] * mean;
      }
    }
  }
}

// One warp per (b, h, r) item over the rows of `rows` [B, H, *, D], which decide
// whether 16-byte loads apply; launch(kernel_variant_is_vectorized, lanes, grid, block).
template <typename T, typename Launch>
void launch_region_warps(const at::Tensor& rows, int64_t items, Launch&& launch) {
  const Strides4 s = strides_of(rows);
  const int64_t D = rows.size(3);
  const bool vec = rows_vectorizable<T>(rows.data_ptr(), D, {s.batch, s.head, s.row});
  const int lanes = lanes_per_row(D / (vec ? 16 / sizeof(T) : 1));
  launch(vec, lanes, grid_of(ceil_div(items, kWarpsPerBlock), "region_pool"), dim3(kWarpsPerBlock * 32));
  C10_CUDA_KERNEL_LAUNCH_CHECK();
}

// keys [B, Hkv, N, D] -> desc [B, Hkv, R, D]
at::Tensor region_pool_cuda(const at::Tensor& keys, const at::Tensor& region_ptr,
                            const at::Tensor& region_tokens) {
  const c10::cuda::CUDAGuard guard(keys.device());
  PoolArgs args = prepare_region_pool(keys, region_ptr, region_tokens);
  const at::Tensor& k = args.keys;
  const int64_t B = k.size(0), H = k.size(1), R = args.layout.num_regions, D = k.size(3);
  at::Tensor desc = at::empty({B, H, R, D}, k.options());
  const int64_t items = B * H * R;
  if (items == 0 || D == 0) return desc.zero_();
  const LayoutView layout = args.layout.view(k.size(2));
  const auto stream = c10::cuda::getCurrentCUDAStream();
  dispatch_float_types(k.scalar_type(), "region_pool", [&](auto tag) {
    using T = native_t<decltype(tag)>;
    launch_region_warps<T>(k, items, [&](bool vec, int lanes, dim3 grid, dim3 block) {
      auto kernel = vec ? pool_kernel<T, true> : pool_kernel<T, false>;
      kernel<<<grid, block, 0, stream>>>(reinterpret_cast<const T*>(k.data_ptr()), strides_of(k),
                                         layout, int(H), int(D), lanes,
                                         reinterpret_cast<T*>(desc.data_ptr()), items);
    });
  });
  return desc;
}

// grad_desc [B, Hkv, R, D] -> grad_keys [B, Hkv, N, D]
at::Tensor region_pool_backward_cuda(const at::Tensor& grad_desc, const at::Tensor& region_ptr,
                                     const at::Tensor& region_tokens, int64_t num_keys) {
  const c10::cuda::CUDAGuard guard(grad_desc.device());
  PoolBackwardArgs args = prepare_region_pool_backward(grad_desc, region_ptr, region_tokens,
                                                       num_keys);
  const at::Tensor& g = args.grad_desc;
  const int64_t B = g.size(0), H = g.size(1), R = args.layout.num_regions, D = g.size(3);
  at::Tensor grad_keys = at::zeros({B, H, num_keys, D}, g.options().dtype(at::kFloat));
  if (B * H * R == 0 || D == 0) return grad_keys.to(g.scalar_type());
  const LayoutView layout = args.layout.view(num_keys);
  const auto stream = c10::cuda::getCurrentCUDAStream();
  const bool ordered = at::globalContext().deterministicAlgorithms();
  const int64_t items = ordered ? B * H : B * H * R;
  dispatch_float_types(g.scalar_type(), "region_pool_backward", [&](auto tag) {
    using T = native_t<decltype(tag)>;
    const T* grad = reinterpret_cast<const T*>(g.data_ptr());
    launch_region_warps<T>(g, items, [&](bool vec, int lanes, dim3 grid, dim3 block) {
      if (ordered) {
        auto kernel = vec ? pool_backward_ordered_kernel<T, true> : pool_backward_ordered_kernel<T, false>;
        kernel<<<grid, block, 0, stream>>>(grad, strides_of(g), layout, int(H), int(D),
                                           grad_keys.data_ptr<float>(), items);
      } else {
        auto kernel = vec ? pool_backward_kernel<T, true> : pool_backward_kernel<T, false>;
        kernel<<<grid, block, 0, stream>>>(grad, strides_of(g), layout, int(H), int(D), lanes,
                                           grad_keys.data_ptr<float>(), items);
      }
    });
  });
  return grad_keys.to(g.scalar_type());
}

}  // namespace
}  // namespace gaze::cuda

TORCH_LIBRARY_IMPL(gaze, CUDA, m) {
  m.impl("region_pool", &gaze::cuda::region_pool_cuda);
  m.impl("region_pool_backward", &gaze::cuda::region_pool_backward_cuda);
}
