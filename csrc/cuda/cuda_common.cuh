// Helpers shared by the CUDA kernels: element types, 16-byte row chunks, warp
// reductions, launch plumbing. Index and softmax arithmetic come from
// ../common (shared with the CPU kernels).
#pragma once

#include <c10/cuda/CUDAException.h>
#include <c10/cuda/CUDAGuard.h>
#include <c10/cuda/CUDAStream.h>
#include <cuda_bf16.h>
#include <cuda_fp16.h>

#include <algorithm>
#include <atomic>
#include <cstdint>
#include <cstdlib>
#include <map>
#include <mutex>
#include <tuple>
#include <utility>

#include "../common/layout.h"
#include "../common/math.h"

namespace gaze::cuda {

// c10 element types -> CUDA's own.
template <typename T>
struct Native {
  using type = T;
};
template <>
struct Native<c10::Half> {
  using type = __half;
};
template <>
struct Native<c10::BFloat16> {
  using type = __nv_bfloat16;
};
template <typename T>
using native_t = typename Native<T>::type;

__device__ __forceinline__ float to_float(float x) { return x; }
__device__ __forceinline__ float to_float(__half x) { return __half2float(x); }
__device__ __forceinline__ float to_float(__nv_bfloat16 x) { return __bfloat162float(x); }

template <typename T>
__device__ __forceinline__ T from_float(float x);
template <>
__device__ __forceinline__ float from_float<float>(float x) { return x; }
template <>
__device__ __forceinline__ __half from_float<__half>(float x) { return __float2half_rn(x); }
template <>
__device__ __forceinline__ __nv_bfloat16 from_float<__nv_bfloat16>(float x) {
  return __float2bfloat16_rn(x);
}

// A row is read in chunks of kChunk elements: 16 bytes when the row layout
// allows (kVectorized), else one element.
template <typename T, bool kVectorized>
struct RowChunk {
  static constexpr int kChunk = kVectorized ? 16 / sizeof(T) : 1;
  float v[kChunk];

  // From global memory, through the read-only cache.
  __device__ __forceinline__ void load(const T* p) { load_from</*kGlobal=*/true>(p); }
  // From shared memory (kVectorized: 16-byte aligned).
  __device__ __forceinline__ void load_shared(const T* p) { load_from</*kGlobal=*/false>(p); }
  template <bool kGlobal>
  __device__ __forceinline__ void load_from(const T* p) {
    auto read = [](const auto* src) {
      if constexpr (kGlobal) {
        return __ldg(src);
      } else {
        return *src;
      }
    };
    if constexpr (kVectorized) {
      const uint4 raw = read(reinterpret_cast<const uint4*>(p));
      const T* e = reinterpret_cast<const T*>(&raw);
#pragma unroll
      for (int i = 0; i < kChunk; ++i) v[i] = to_float(e[i]);
    } else {
      v[0] = to_float(read(p));
    }
  }
  __device__ __forceinline__ void zero() {
#pragma unroll
    for (int i = 0; i < kChunk; ++i) v[i] = 0.f;
  }
  __device__ __forceinline__ void store(T* p, float scale) const {
    if constexpr (kVectorized) {
      uint4 raw;
      T* e = reinterpret_cast<T*>(&raw);
#pragma unroll
      for (int i = 0; i < kChunk; ++i) e[i] = from_float<T>(v[i] * scale);
      *reinterpret_cast<uint4*>(p) = raw;
    } else {
      p[0] = from_float<T>(v[0] * scale);
    }
  }
};

// Whether rows of D elements at these element strides can be read 16 bytes at a time.
template <typename T>
inline bool rows_vectorizable(const void* base, int64_t D, std::initializer_list<int64_t> strides) {
  constexpr int64_t chunk = 16 / sizeof(T);
  if (reinterpret_cast<uintptr_t>(base) % 16 != 0 || D % chunk != 0) return false;
  for (int64_t s : strides) {
    if (s % chunk != 0) return false;
  }
  return true;
}

// dst[0, N) = src[0, N) from shared memory, 16 bytes at a time when N is a multiple of 4 (src
// then 16-byte aligned): the compiler cannot see the alignment of a runtime offset and would
// load each float alone.
template <int N>
__device__ __forceinline__ void load_shared_floats(const float* src, float (&dst)[N]) {
  if constexpr (N % 4 == 0) {
#pragma unroll
    for (int e = 0; e < N; e += 4) {
      const float4 f = *reinterpret_cast<const float4*>(src + e);
      dst[e] = f.x;
      dst[e + 1] = f.y;
      dst[e + 2] = f.z;
      dst[e + 3] = f.w;
    }
  } else {
#pragma unroll
    for (int e = 0; e < N; ++e) dst[e] = src[e];
  }
}

template <typename T>
__device__ __forceinline__ T warp_sum(T x, int width = 32) {
#pragma unroll
  for (int offset = width / 2; offset > 0; offset /= 2) x += __shfl_xor_sync(0xFFFFFFFFu, x, offset, width);
  return x;
}

template <typename T>
__device__ __forceinline__ T warp_max(T x, int width = 32) {
#pragma unroll
  for (int offset = width / 2; offset > 0; offset /= 2) {
    x = fmaxf(x, __shfl_xor_sync(0xFFFFFFFFu, x, offset, width));
  }
  return x;
}

// Sorts data[0, n) in shared or global memory, n a power of two, with every
// thread of the block (bitonic network; ends with __syncthreads() when n >= 2, so
// callers need a barrier between writing data and calling it). Ascending, or
// descending with kDescending.
template <bool kDescending, typename Key>
__device__ void block_bitonic_sort(Key* data, int n) {
  for (int size = 2; size <= n; size <<= 1) {
    for (int stride = size / 2; stride > 0; stride >>= 1) {
      for (int t = threadIdx.x; t < n / 2; t += blockDim.x) {
        const int a = 2 * t - (t & (stride - 1)), c = a + stride;  // a has bit `stride` clear
        const Key x = data[a], y = data[c];
        const bool a_first = ((a & size) == 0) != kDescending;  // this pair's sequence ascends
        if (a_first ? y < x : x < y) {
          data[a] = y;
          data[c] = x;
        }
      }
      __syncthreads();
    }
  }
}

// Replaces data[0, n) by its exclusive prefix sum, with every thread of the block
// (each sums a contiguous run); returns the total. `warp_totals` holds one int per
// warp. Starts and ends with __syncthreads().
__device__ __forceinline__ int32_t block_exclusive_scan(int32_t* data, int n, int32_t* warp_totals) {
  __syncthreads();
  const int per_thread = (n + blockDim.x - 1) / blockDim.x;
  const int begin = min(n, int(threadIdx.x) * per_thread), end = min(n, begin + per_thread);
  int32_t sum = 0;
  for (int e = begin; e < end; ++e) sum += data[e];
  const int lane = threadIdx.x % 32, warp = threadIdx.x / 32;
  int32_t inclusive = sum;
#pragma unroll
  for (int offset = 1; offset < 32; offset *= 2) {
    const int32_t other = __shfl_up_sync(0xFFFFFFFFu, inclusive, offset);
    if (lane >= offset) inclusive += other;
  }
  if (lane == 31) warp_totals[warp] = inclusive;
  __syncthreads();
  int32_t running = inclusive - sum, total = 0;
  for (int w = 0; w < int(blockDim.x / 32); ++w) {
    if (w < warp) running += warp_totals[w];
    total += warp_totals[w];
  }
  for (int e = begin; e < end; ++e) {
    const int32_t x = data[e];
    data[e] = running;
    running += x;
  }
  __syncthreads();
  return total;
}

// dst[0] += a, dst[1] += b atomically (dst 8-byte aligned): one vector atomic on sm_90+,
// half the instructions of two scalar ones.
__device__ __forceinline__ void atomic_add_pair(float* dst, float a, float b) {
#if defined(__CUDA_ARCH__) && __CUDA_ARCH__ >= 900
  atomicAdd(reinterpret_cast<float2*>(dst), make_float2(a, b));
#else
  atomicAdd(dst, a);
  atomicAdd(dst + 1, b);
#endif
}

// Lanes of a warp that share one row: the fewest power-of-two lanes covering
// `chunks` chunks (up to 32); each warp then works on 32 / lanes rows at once.
inline int lanes_per_row(int64_t chunks) {
  int lanes = 1;
  while (lanes < 32 && lanes < chunks) lanes *= 2;
  return lanes;
}

// kAttr of the current device, asked of the runtime once per device (attributes that are
// never 0, which marks "not read yet").
template <cudaDeviceAttr kAttr>
int current_device_attribute() {
  constexpr int kMaxDevices = 64;
  static std::atomic<int> cached[kMaxDevices] = {};
  int device = 0, value = 0;
  C10_CUDA_CHECK(cudaGetDevice(&device));
  if (device < kMaxDevices && (value = cached[device].load(std::memory_order_relaxed)) != 0) return value;
  C10_CUDA_CHECK(cudaDeviceGetAttribute(&value, kAttr, device));
  if (device < kMaxDevices) cached[device].store(value, std::memory_order_relaxed);
  return value;
}

inline int multiprocessor_count() { return current_device_attribute<cudaDevAttrMultiProcessorCount>(); }

// Lets `kernel` use `bytes` of dynamic shared memory on the current device. The runtime is
// called only when more is asked than before: a few microseconds a launch otherwise, which
// a decode step notices.
template <typename Kernel>
void allow_dynamic_shared(Kernel kernel, int64_t bytes) {
  static std::mutex mutex;
  static std::map<std::pair<const void*, int>, int64_t> allowed;  // (kernel, device) -> bytes
  int device = 0;
  C10_CUDA_CHECK(cudaGetDevice(&device));
  const std::lock_guard<std::mutex> lock(mutex);
  int64_t& current = allowed[{reinterpret_cast<const void*>(kernel), device}];
  if (bytes <= current) return;
  C10_CUDA_CHECK(cudaFuncSetAttribute(kernel, cudaFuncAttributeMaxDynamicSharedMemorySize, int(bytes)));
  current = bytes;
}

// What query() answers for (kernel, current device, extra...), asked of the runtime once:
// the launches below run on every call, and a decode step notices a few microseconds.
// (Each call site has its own query type, so its own table.)
template <typename Value, typename Query, typename... Extra>
Value asked_once(const void* kernel, Query query, Extra... extra) {
  static std::mutex mutex;
  static std::map<std::tuple<const void*, int, Extra...>, Value> known;
  int device = 0;
  C10_CUDA_CHECK(cudaGetDevice(&device));
  const std::lock_guard<std::mutex> lock(mutex);
  const auto key = std::make_tuple(kernel, device, extra...);
  auto found = known.find(key);
  if (found == known.end()) found = known.emplace(key, query()).first;
  return found->second;
}

// cudaFuncGetAttributes of `kernel` on the current device (the prefill kernels check their
// binary's architecture before every launch).
template <typename Kernel>
cudaFuncAttributes kernel_attributes(Kernel kernel) {
  return asked_once<cudaFuncAttributes>(reinterpret_cast<const void*>(kernel), [&] {
    cudaFuncAttributes attributes;
    C10_CUDA_CHECK(cudaFuncGetAttributes(&attributes, kernel));
    return attributes;
  });
}

// Blocks of `kernel` (`threads` threads, `shared` bytes of dynamic shared memory) that fit
// on one multiprocessor of the current device at once.
template <typename Kernel>
int resident_blocks(Kernel kernel, int threads, int64_t shared) {
  return asked_once<int>(reinterpret_cast<const void*>(kernel), [&] {
    int blocks = 0;
    C10_CUDA_CHECK(cudaOccupancyMaxActiveBlocksPerMultiprocessor(&blocks, kernel, threads, size_t(shared)));
    return std::max(blocks, 1);
  }, threads, shared);
}

inline int64_t ceil_div(int64_t a, int64_t b) { return (a + b - 1) / b; }

// The count in environment variable `name` (a number >= 0; unset or empty: 0), with which a
// kernel's plan is overridden to measure it against forced values (GAZE_SPLITS,
// GAZE_TOPK_SCORING_BLOCKS). 0 means: the plan.
inline int forced_count(const char* name) {
  const char* env = std::getenv(name);
  if (env == nullptr || *env == '\0') return 0;
  char* end = nullptr;
  const long n = std::strtol(env, &end, 10);
  TORCH_CHECK(*end == '\0' && n >= 0 && n <= (1 << 20), name,
              " must be a number (0: planned), not '", env, "'");
  return int(n);
}

// A 1-D grid of `blocks` thread blocks (CUDA allows up to 2^31 - 1 in x).
inline dim3 grid_of(int64_t blocks, const char* op) {
  TORCH_CHECK(blocks <= int64_t(0x7FFFFFFF), "gaze.", op, ": the inputs need ", blocks,
              " thread blocks, more than CUDA's 2^31 - 1; split the batch");
  return dim3(static_cast<unsigned>(blocks));
}

// Dynamic shared memory a block of the current device may use, leaving `static_bytes`
// for the kernel's static shared memory.
inline int64_t dynamic_shared_limit(int64_t static_bytes) {
  return int64_t(current_device_attribute<cudaDevAttrMaxSharedMemoryPerBlockOptin>()) - static_bytes;
}

}  // namespace gaze::cuda
