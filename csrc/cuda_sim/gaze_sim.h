// gaze_sim: runs this package's CUDA kernels on the CPU, for tests on machines
// without a GPU (python_tests/cuda_sim.py builds it; tests only, never shipped).
//
// python_tests/cuda_sim.py rewrites each csrc/cuda source a little (kernel launches
// become gaze_sim::Launch calls, `extern __shared__` arrays the launch's dynamic shared
// buffer, other `__shared__` variables references to per-block storage, the ops are
// registered as torch.ops.gaze_sim.* taking CPU tensors) and compiles it as C++ with
// this header included first.
//
// Execution model: the blocks of a grid run one after another; the threads of a
// block are fibers on one OS thread, switched only at barriers, so atomics are plain
// read-modify-writes. What the emulator checks that a GPU would not report:
//   - __syncthreads() reached while other threads wait in a warp collective, a warp
//     collective with exited lanes or lanes at different collectives: an error
//     naming the block, instead of a hang or undefined behaviour;
//   - shared memory (dynamic and static) is filled before each block with 0xFF bytes
//     (NaN as floats, -1 as integers), or in a quarter of the blocks with zeros, so
//     reads of unwritten shared memory show;
//   - launches of zero blocks, blocks over 1,024 threads, more than 48 KB of
//     dynamic shared memory without cudaFuncSetAttribute;
//   - __trap() fails the launch.
// mma.sync is computed from the fragment layout of the PTX ISA manual (fp32
// accumulation), independently of the kernels' own description of it. ldmatrix also
// counts the shared-memory wavefronts a GPU would take for it (more than one per 8 x 8
// matrix when its rows share banks), so tests can hold the tile layouts conflict-free.
#pragma once

// The CUDA runtime calls the kernels' host code makes, answered by the emulator
// as an H100 would (gaze_sim.cpp).
#define cudaGetDevice gaze_sim_cudaGetDevice
#define cudaDeviceGetAttribute gaze_sim_cudaDeviceGetAttribute
#define cudaFuncSetAttribute gaze_sim_cudaFuncSetAttribute
#define cudaFuncGetAttributes gaze_sim_cudaFuncGetAttributes
#define cudaOccupancyMaxActiveBlocksPerMultiprocessor gaze_sim_cudaOccupancyMaxActiveBlocksPerMultiprocessor

#include <cuda_bf16.h>
#include <cuda_fp16.h>
#include <cuda_runtime.h>

#include <cstddef>
#include <cstdint>
#include <cstring>
#include <functional>
#include <tuple>
#include <type_traits>
#include <vector>

// cuda_runtime.h declares these for `const void*` only outside nvcc.
template <typename... Params>
cudaError_t gaze_sim_cudaFuncSetAttribute(void (*kernel)(Params...), cudaFuncAttribute attr, int value) {
  return gaze_sim_cudaFuncSetAttribute(reinterpret_cast<const void*>(kernel), attr, value);
}
template <typename... Params>
cudaError_t gaze_sim_cudaFuncGetAttributes(cudaFuncAttributes* attributes, void (*kernel)(Params...)) {
  return gaze_sim_cudaFuncGetAttributes(attributes, reinterpret_cast<const void*>(kernel));
}
template <typename... Params>
cudaError_t gaze_sim_cudaOccupancyMaxActiveBlocksPerMultiprocessor(int* blocks, void (*kernel)(Params...),
                                                                   int threads, size_t shared) {
  return gaze_sim_cudaOccupancyMaxActiveBlocksPerMultiprocessor(
      blocks, reinterpret_cast<const void*>(kernel), threads, shared);
}

#ifndef __launch_bounds__
#define __launch_bounds__(...)
#endif

namespace gaze_sim {

// kHeld: ready, but held back while other warps take their turn (Block::warps_in_turn).
enum class FiberState { kReady, kHeld, kAtBlockBarrier, kAtWarpCollective, kDone };

struct AsyncCopy {  // cp.async of 16 bytes, not yet done
  void* dst;
  const void* src;
};

struct Fiber {
  uint3 thread;
  FiberState state = FiberState::kReady;
  unsigned collectives = 0;       // warp collectives passed: picks the exchange buffer
  void* stack_pointer = nullptr;  // saved while switched out
  std::vector<AsyncCopy> async_copies;  // issued and not yet done, oldest first
  std::vector<size_t> async_groups;     // committed groups: their ends in async_copies
};

inline Fiber* g_current = nullptr;
inline uint3 g_block_idx;
inline dim3 g_block_dim, g_grid_dim;
inline unsigned char* g_dynamic_shared = nullptr;

// Block barrier; returns whether any thread's predicate was nonzero.
int syncthreads_or(int predicate);

// Writes `bytes` (<= 32) of this lane's value, waits for the 32 lanes of its warp
// (all must take part: `mask` must be full), and returns the 32 slots, 32 bytes apart.
const unsigned char* warp_exchange(unsigned mask, const void* value, size_t bytes);

[[noreturn]] void trap();

// Records that a kernel ran (called at the top of every kernel by the rewrite; the
// test asks torch.ops.gaze_sim.take_launched_kernels() which ran).
void note_kernel(const char* signature);

inline int lane_id() { return int(g_current->thread.x % 32); }

template <typename T>
T shfl_from(unsigned mask, T value, int source) {
  static_assert(sizeof(T) <= 32 && std::is_trivially_copyable_v<T>);
  const unsigned char* slots = warp_exchange(mask, &value, sizeof(T));
  T out;
  std::memcpy(&out, slots + 32 * source, sizeof(T));
  return out;
}

// d += a * b for one m16n8k16 block (row.col, fp16/bf16 in, fp32 accumulate).
template <typename T>
void mma_16x8x16(float (&d)[4], const uint32_t (&a)[4], const uint32_t (&b)[2]) {
  struct Operands {
    uint32_t a[4], b[2];
  } mine{{a[0], a[1], a[2], a[3]}, {b[0], b[1]}};
  const unsigned char* slots = warp_exchange(0xFFFFFFFFu, &mine, sizeof(mine));
  auto lane_operands = [&](int lane) {
    Operands o;
    std::memcpy(&o, slots + 32 * lane, sizeof(o));
    return o;
  };
  auto element = [](uint32_t word, int half) {  // element `half` (0: low 16 bits) of a pair
    const uint16_t bits = uint16_t(word >> (16 * half));
    T x;
    std::memcpy(&x, &bits, sizeof(x));
    return float(x);
  };
  // PTX ISA, "Matrix Fragments for mma.m16n8k16 with floating point type": lane
  // (groupID, threadID_in_group) = (lane / 4, lane % 4) holds
  //   A element i (0-7): row groupID (+8 when i is 2, 3, 6 or 7),
  //                      column 2 * threadID_in_group + i % 2 (+8 when i >= 4);
  //   B element i (0-3): row 2 * threadID_in_group + i % 2 (+8 when i >= 2), column groupID;
  //   C element i (0-3): row groupID (+8 when i >= 2), column 2 * threadID_in_group + i % 2;
  // two 16-bit elements per 32-bit register, the lower index in the low half.
  auto a_at = [&](int row, int col) {
    const int i = (row >= 8 ? 2 : 0) + (col % 8) % 2 + (col >= 8 ? 4 : 0);
    const int lane = (row % 8) * 4 + (col % 8) / 2;
    return element(lane_operands(lane).a[i / 2], i % 2);
  };
  auto b_at = [&](int row, int col) {
    const int i = (row >= 8 ? 2 : 0) + (row % 8) % 2;
    const int lane = col * 4 + (row % 8) / 2;
    return element(lane_operands(lane).b[i / 2], i % 2);
  };
  const int lane = lane_id(), group = lane / 4, in_group = lane % 4;
  for (int i = 0; i < 4; ++i) {
    const int row = group + (i >= 2 ? 8 : 0), col = 2 * in_group + i % 2;
    float sum = d[i];
    for (int k = 0; k < 16; ++k) sum += a_at(row, k) * b_at(k, col);
    d[i] = sum;
  }
}

// ldmatrix.sync.aligned.m8n8.x4[.trans].shared.b16, from the PTX ISA's description of
// ldmatrix: lane l gives the address of row l % 8 of matrix l / 8 (eight 16-bit
// elements); lane (g, t) = (l / 4, l % 4) receives in register i elements (g, 2t) and
// (g, 2t + 1) of matrix i, or with .trans (2t, g) and (2t + 1, g), the first in the low
// half. Errors on an address that is not 16-byte aligned or not inside shared memory.
void load_matrices_x4(const void* row_address, bool transposed, uint32_t (&r)[4]);

// cp.async.cg.shared.global of 16 bytes, commit_group and wait_group. A copy poisons its
// destination (with the block's poison byte) when issued, and is done (its source read
// then) when a wait_group lets its group complete: a read of the destination after the
// issue and before the wait (or, from another thread, before the barrier after it) sees
// the poison, as does a read by another thread that should have finished before the
// issue. Errors on a misaligned address or a destination outside shared memory.
void copy_async(void* dst, const void* src);
void copy_async_commit();
void copy_async_wait(int pending_groups);

// The launch's dynamic shared memory (`extern __shared__ T name[]` in a kernel).
template <typename T>
T* dynamic_shared() {
  return reinterpret_cast<T*>(g_dynamic_shared);
}

// Storage of `bytes` for the __shared__ variable identified by `key`, poisoned
// before every block like the dynamic shared memory (one block runs at a time).
void* static_shared(const void* key, size_t bytes);

// `__shared__ T name;` in a kernel becomes `T& name = shared_variable<T>(&key)`.
template <typename T>
T& shared_variable(const void* key) {
  static_assert(std::is_trivially_destructible_v<T>);
  return *static_cast<T*>(static_shared(key, sizeof(T)));
}

// Runs `body` for every thread of every block.
void launch_blocks(const void* kernel, dim3 grid, dim3 block, size_t shared_bytes,
                   const std::function<void()>& body);

// kernel<<<grid, block, shared, stream>>>(args...) is rewritten to
// gaze_sim::Launch(grid, block, shared, stream).run(kernel, args...).
struct Launch {
  dim3 grid, block;
  size_t shared_bytes;
  Launch(dim3 grid_, dim3 block_, size_t shared_ = 0, cudaStream_t = nullptr)
      : grid(grid_), block(block_), shared_bytes(shared_) {}

  template <typename... Params, typename... Args>
  void run(void (*kernel)(Params...), Args&&... args) const {
    // Converted to the kernel's parameter types once, as a launch does; each thread
    // then gets its own copy.
    const std::tuple<std::decay_t<Params>...> params(std::forward<Args>(args)...);
    launch_blocks(reinterpret_cast<const void*>(kernel), grid, block, shared_bytes,
                  [&] { std::apply(kernel, params); });
  }
};

}  // namespace gaze_sim

// CUDA's built-in variables and device functions.
#define threadIdx (::gaze_sim::g_current->thread)
#define blockIdx (::gaze_sim::g_block_idx)
#define blockDim (::gaze_sim::g_block_dim)
#define gridDim (::gaze_sim::g_grid_dim)

inline void __syncthreads() { ::gaze_sim::syncthreads_or(0); }
inline int __syncthreads_or(int predicate) { return ::gaze_sim::syncthreads_or(predicate); }
[[noreturn]] inline void __trap() { ::gaze_sim::trap(); }

template <typename T>
T __shfl_xor_sync(unsigned mask, T value, int lane_mask, int width = 32) {
  const int lane = ::gaze_sim::lane_id();
  int source = lane ^ lane_mask;
  if (source / width != lane / width) source = lane;  // outside this lane's segment
  return ::gaze_sim::shfl_from(mask, value, source);
}

template <typename T>
T __shfl_up_sync(unsigned mask, T value, unsigned delta, int width = 32) {
  const int lane = ::gaze_sim::lane_id();
  const int source = lane - int(delta);
  return ::gaze_sim::shfl_from(mask, value, source < (lane / width) * width ? lane : source);
}

inline unsigned __ballot_sync(unsigned mask, int predicate) {
  const unsigned char* slots = ::gaze_sim::warp_exchange(mask, &predicate, sizeof(int));
  unsigned bits = 0;
  for (int lane = 0; lane < 32; ++lane) {
    int p;
    std::memcpy(&p, slots + 32 * lane, sizeof(p));
    bits |= (p != 0 ? 1u : 0u) << lane;
  }
  return bits;
}

// A warp barrier: the lanes of mask meet, checked like the other warp collectives.
inline void __syncwarp(unsigned mask = 0xFFFFFFFFu) {
  int unused = 0;
  ::gaze_sim::warp_exchange(mask, &unused, sizeof(unused));
}

inline int __popc(unsigned x) { return __builtin_popcount(x); }
inline int __ffs(int x) { return __builtin_ffs(x); }

template <typename T>
T __ldg(const T* p) {
  return *p;
}

template <typename T>
T atomicAdd(T* address, T value) {  // threads never interleave inside a statement here
  const T old = *address;
  *address = old + value;
  return old;
}

template <typename T>
T atomicOr(T* address, T value) {
  const T old = *address;
  *address = old | value;
  return old;
}

template <typename A, typename B,
          std::enable_if_t<std::is_arithmetic_v<A> && std::is_arithmetic_v<B>, int> = 0>
std::common_type_t<A, B> min(A a, B b) {
  using C = std::common_type_t<A, B>;
  return C(b) < C(a) ? C(b) : C(a);
}

template <typename A, typename B,
          std::enable_if_t<std::is_arithmetic_v<A> && std::is_arithmetic_v<B>, int> = 0>
std::common_type_t<A, B> max(A a, B b) {
  using C = std::common_type_t<A, B>;
  return C(a) < C(b) ? C(b) : C(a);
}
