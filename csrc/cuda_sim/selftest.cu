// Kernels that test gaze_sim itself (python_tests/test_cuda_sim.py): its mma.sync and
// ldmatrix against a matmul through mma.cuh's fragment helpers, its warp collectives, and the
// errors it must raise. Built only into gaze_sim, never into the package.
#include <ATen/core/Tensor.h>
#include <ATen/ops/empty.h>
#include <torch/library.h>

#include "../cuda/async_copy.cuh"
#include "../cuda/cuda_common.cuh"
#include "../cuda/mma.cuh"

namespace gaze::cuda {
namespace {

// c [16, 16] = a [16, 16] . b [16, 16] by one warp, the fragments loaded with mma.cuh's
// ldmatrix helpers from shared copies: A row-major and B k-major, or (`transposed`) A
// stored transposed and B n-major, the four layouts the tensor-core kernels use.
template <typename T>
__global__ void mma_kernel(const uint16_t* a, const uint16_t* b, float* c, bool transposed) {
  constexpr int kStride = 24;  // 16 elements and a pad: 16-byte rows
  __shared__ __align__(16) uint16_t a_tile[16 * kStride];
  __shared__ __align__(16) uint16_t b_tile[16 * kStride];
  const int lane = threadIdx.x, g = lane / 4, t = lane % 4;
  for (int i = lane; i < 16 * 16; i += 32) {
    const int row = i / 16, col = i % 16;  // a: (m, k), b: (k, n)
    a_tile[transposed ? col * kStride + row : row * kStride + col] = a[i];
    b_tile[transposed ? col * kStride + row : row * kStride + col] = b[i];
  }
  __syncthreads();
  uint32_t a_frag[4], b_frags[4];
  if (transposed) {
    load_a_fragment_transposed(a_tile, kStride, a_frag);
    load_b_fragments_n_major(b_tile, kStride, b_frags);
  } else {
    load_a_fragment(a_tile, kStride, a_frag);
    load_b_fragments_k_major(b_tile, kStride, b_frags);
  }
  for (int half = 0; half < 2; ++half) {  // columns [8 half, 8 half + 8)
    float d[4] = {0.f, 0.f, 0.f, 0.f};
    mma_16x8x16<T>(d, a_frag, {b_frags[2 * half], b_frags[2 * half + 1]});
    const int col = 8 * half + 2 * t;
    c[g * 16 + col] = d[0];
    c[g * 16 + col + 1] = d[1];
    c[(g + 8) * 16 + col] = d[2];
    c[(g + 8) * 16 + col + 1] = d[3];
  }
}

// ldmatrix from a row address that is not 16-byte aligned: an error.
__global__ void misaligned_ldmatrix_kernel(float* out) {
  __shared__ __align__(16) uint16_t tile[8 * 16];
  for (int i = threadIdx.x; i < 8 * 16; i += 32) tile[i] = 0;
  __syncthreads();
  uint32_t r[4];
  load_matrices_x4<false>(tile + threadIdx.x % 8 * 16 + 1, r);
  out[threadIdx.x] = float(r[0]);
}

// One ldmatrix.x4 whose 32 rows lie `stride` 16-bit elements apart (a multiple of 8, at
// most 72): the emulator counts the shared-memory wavefronts it would take on a GPU.
__global__ void strided_ldmatrix_kernel(float* out, int stride) {
  __shared__ __align__(16) uint16_t tile[32 * 72];
  for (int i = threadIdx.x; i < 32 * 72; i += 32) tile[i] = 0;
  __syncthreads();
  uint32_t r[4];
  load_matrices_x4<false>(tile + threadIdx.x * stride, r);
  out[threadIdx.x] = float(r[0]);
}

// Thread i copies src[8i, 8i + 8) into shared memory with cp.async, as two groups of 16
// bytes, and then (after the barrier) reads its neighbour's eight floats. `waits`: 0: no
// copy_async_wait, 1: wait for all but the last group, 2: for all.
__global__ void async_copy_kernel(const float* src /* [8 * 64] */, float* out, int waits) {
  __shared__ __align__(16) float tile[8 * 64];
  const int i = threadIdx.x;
  copy_async_16(tile + 8 * i, src + 8 * i);
  copy_async_commit();
  copy_async_16(tile + 8 * i + 4, src + 8 * i + 4);
  copy_async_commit();
  if (waits == 1) copy_async_wait<1>();
  if (waits == 2) copy_async_wait<0>();
  __syncthreads();
  const int j = (i + 1) % 64;
  for (int c = 0; c < 8; ++c) out[8 * i + c] = tile[8 * j + c];
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

// Two warps: each reads the other's slots, passes the value through a shuffle, then
// overwrites its own slots. Right only with the barrier before the overwrite; without it,
// warps that advanced in lockstep would still read before either overwrote.
__global__ void overwrite_kernel(float* out /* [gridDim, 64] */, bool barrier) {
  __shared__ float slots[64];
  const int i = threadIdx.x;
  slots[i] = float(i);
  __syncthreads();
  float v = slots[(i + 32) % 64];
  v = __shfl_xor_sync(0xFFFFFFFFu, v, 1);
  if (barrier) __syncthreads();
  slots[i] = -1.f;
  out[blockIdx.x * 64 + i] = v;
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

at::Tensor mma_product(const at::Tensor& a, const at::Tensor& b, bool transposed) {
  at::Tensor c = at::empty({16, 16}, a.options().dtype(at::kFloat));
  const auto* a16 = reinterpret_cast<const uint16_t*>(a.data_ptr());
  const auto* b16 = reinterpret_cast<const uint16_t*>(b.data_ptr());
  if (a.scalar_type() == at::kBFloat16) {
    mma_kernel<__nv_bfloat16><<<1, 32>>>(a16, b16, c.data_ptr<float>(), transposed);
  } else {
    mma_kernel<__half><<<1, 32>>>(a16, b16, c.data_ptr<float>(), transposed);
  }
  return c;
}

at::Tensor async_copies(const at::Tensor& src, int64_t waits) {
  at::Tensor out = at::empty(src.sizes(), src.options());
  async_copy_kernel<<<1, 64>>>(src.data_ptr<float>(), out.data_ptr<float>(), int(waits));
  return out;
}

at::Tensor misaligned_ldmatrix() {
  at::Tensor out = at::empty({32}, at::kFloat);
  misaligned_ldmatrix_kernel<<<1, 32>>>(out.data_ptr<float>());
  return out;
}

at::Tensor strided_ldmatrix(int64_t stride) {
  TORCH_CHECK(stride >= 0 && stride <= 72 && stride % 8 == 0, "stride: a multiple of 8 up to 72");
  at::Tensor out = at::empty({32}, at::kFloat);
  strided_ldmatrix_kernel<<<1, 32>>>(out.data_ptr<float>(), int(stride));
  return out;
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

at::Tensor overwrites(bool barrier) {
  at::Tensor out = at::empty({16, 64}, at::kFloat);
  overwrite_kernel<<<16, 64>>>(out.data_ptr<float>(), barrier);
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
  m.def("selftest_misaligned_ldmatrix", &gaze::cuda::misaligned_ldmatrix);
  m.def("selftest_strided_ldmatrix", &gaze::cuda::strided_ldmatrix);
  m.def("selftest_async_copies", &gaze::cuda::async_copies);
  m.def("selftest_warp_ops", &gaze::cuda::warp_ops);
  m.def("selftest_neighbours", &gaze::cuda::neighbours);
  m.def("selftest_overwrites", &gaze::cuda::overwrites);
  m.def("selftest_divergent", &gaze::cuda::divergent);
  m.def("selftest_trap", &gaze::cuda::trap);
  m.def("selftest_empty_grid", &gaze::cuda::empty_grid);
}
