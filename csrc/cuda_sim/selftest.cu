// Kernels that test gaze_sim itself (python_tests/test_cuda_sim.py): its mma.sync
// against a matmul through mma.cuh's fragment helpers, its warp collectives, and the
// errors it must raise. Built only into gaze_sim, never into the package.
#include <ATen/core/Tensor.h>
#include <ATen/ops/empty.h>
#include <torch/library.h>

#include "../cuda/cuda_common.cuh"
#include "../cuda/mma.cuh"

namespace gaze::cuda {
namespace {

// c [16, 8] = a [16, 16] . b [16, 8] by one warp: A fragments as mma.cuh documents them,
// B through b_fragment_k_major from a k-major copy in shared memory.
template <typename T>
__global__ void mma_kernel(const uint16_t* a, const uint16_t* b, float* c) {
  __shared__ uint16_t b_tile[16 * 8];
  const int lane = threadIdx.x, g = lane / 4, t = lane % 4;
  for (int i = lane; i < 16 * 8; i += 32) b_tile[i] = b[i];
  __syncthreads();
  auto pair = [&](int row, int col) { return pack_raw_pair(a[row * 16 + col], a[row * 16 + col + 1]); };
  const uint32_t a_frag[4] = {pair(g, 2 * t), pair(g + 8, 2 * t), pair(g, 2 * t + 8), pair(g + 8, 2 * t + 8)};
  uint32_t b_frag[2];
  b_fragment_k_major(b_tile, 8, b_frag);
  float d[4] = {0.f, 0.f, 0.f, 0.f};
  mma_16x8x16<T>(d, a_frag, b_frag);
  c[g * 8 + 2 * t] = d[0];
  c[g * 8 + 2 * t + 1] = d[1];
  c[(g + 8) * 8 + 2 * t] = d[2];
  c[(g + 8) * 8 + 2 * t + 1] = d[3];
}

// Per lane of one warp: the warp sum (xor shuffles), the inclusive prefix sum (up
// shuffles), the ballot of x > 0, and __syncthreads_or of x > 100 over the block.
__global__ void warp_ops_kernel(const float* x, float* out /* [4, blockDim] */) {
  const int i = threadIdx.x, n = blockDim.x;
  const float v = x[i];
  out[i] = warp_sum(v);
  float inclusive = v;
  for (int offset = 1; offset < 32; offset *= 2) {
    const float other = __shfl_up_sync(0xFFFFFFFFu, inclusive, offset);
    if (i % 32 >= offset) inclusive += other;
  }
  out[n + i] = inclusive;
  out[2 * n + i] = float(__ballot_sync(0xFFFFFFFFu, v > 0.f) & 0xFFFFu);  // exact in float
  out[3 * n + i] = float(__syncthreads_or(v > 100.f));
}

// Each thread writes its slot of shared memory, then reads its neighbour's: right only
// with the barrier between.
__global__ void neighbour_kernel(float* out, bool barrier) {
  __shared__ float slots[64];
  const int i = threadIdx.x;
  slots[i] = float(i);
  if (barrier) __syncthreads();
  out[i] = slots[(i + 1) % 64];
}

// Odd lanes wait at __syncthreads() while even lanes wait in a shuffle: a deadlock.
__global__ void divergent_kernel(float* out) {
  float v = float(threadIdx.x);
  if (threadIdx.x % 2) {
    __syncthreads();
  } else {
    v = __shfl_xor_sync(0xFFFFFFFFu, v, 2);
  }
  out[threadIdx.x] = v;
}

__global__ void trap_kernel() { __trap(); }

at::Tensor mma_product(const at::Tensor& a, const at::Tensor& b) {
  at::Tensor c = at::empty({16, 8}, a.options().dtype(at::kFloat));
  const auto* a16 = reinterpret_cast<const uint16_t*>(a.data_ptr());
  const auto* b16 = reinterpret_cast<const uint16_t*>(b.data_ptr());
  if (a.scalar_type() == at::kBFloat16) {
    mma_kernel<__nv_bfloat16><<<1, 32>>>(a16, b16, c.data_ptr<float>());
  } else {
    mma_kernel<__half><<<1, 32>>>(a16, b16, c.data_ptr<float>());
  }
  return c;
}

at::Tensor warp_ops(const at::Tensor& x) {
  at::Tensor out = at::empty({4, x.size(0)}, x.options());
  warp_ops_kernel<<<1, unsigned(x.size(0))>>>(x.data_ptr<float>(), out.data_ptr<float>());
  return out;
}

at::Tensor neighbours(bool barrier) {
  at::Tensor out = at::empty({64}, at::kFloat);
  neighbour_kernel<<<1, 64>>>(out.data_ptr<float>(), barrier);
  return out;
}

at::Tensor divergent() {
  at::Tensor out = at::empty({32}, at::kFloat);
  divergent_kernel<<<1, 32>>>(out.data_ptr<float>());
  return out;
}

at::Tensor trap(const at::Tensor& x) {
  trap_kernel<<<1, 32>>>();
  return x;
}

at::Tensor empty_grid(const at::Tensor& x) {
  trap_kernel<<<0, 32>>>();
  return x;
}

}  // namespace
}  // namespace gaze::cuda

TORCH_LIBRARY_FRAGMENT(gaze_sim, m) {
  m.def("selftest_mma", &gaze::cuda::mma_product);
  m.def("selftest_warp_ops", &gaze::cuda::warp_ops);
  m.def("selftest_neighbours", &gaze::cuda::neighbours);
  m.def("selftest_divergent", &gaze::cuda::divergent);
  m.def("selftest_trap", &gaze::cuda::trap);
  m.def("selftest_empty_grid", &gaze::cuda::empty_grid);
}
