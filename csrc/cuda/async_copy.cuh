// Asynchronous copies from global to shared memory (cp.async, sm_80 and later): the
// loads of the next tile fly while the kernel works on this one, without passing
// through registers. A thread waits for its own copies (copy_async_wait); a barrier
// after the wait makes every thread's copies visible to the block. Before sm_80 the
// copies are plain loads and stores, done when issued.
#pragma once

#include <cstdint>

#include "mma.cuh"  // GAZE_HAS_MMA: the same architectures

namespace gaze::cuda {

// 16 bytes from `src` (global, 16-byte aligned) to `dst` (shared, 16-byte aligned).
// Cached in L2 only (.cg): the tiles are read once per block.
__device__ __forceinline__ void copy_async_16(void* dst, const void* src) {
#if GAZE_HAS_MMA
  const uint32_t address = static_cast<uint32_t>(__cvta_generic_to_shared(dst));
  asm volatile("cp.async.cg.shared.global [%0], [%1], 16;\n" ::"r"(address), "l"(src));
#elif defined(GAZE_CUDA_SIM)
  ::gaze_sim::copy_async(dst, src);
#else
  *reinterpret_cast<uint4*>(dst) = *reinterpret_cast<const uint4*>(src);  // before sm_80: at once
#endif
}

// Closes the group of this thread's copies issued since the last commit.
__device__ __forceinline__ void copy_async_commit() {
#if GAZE_HAS_MMA
  asm volatile("cp.async.commit_group;\n" ::);
#elif defined(GAZE_CUDA_SIM)
  ::gaze_sim::copy_async_commit();
#endif
}

// Waits until at most kPending of this thread's committed groups are still in flight.
template <int kPending>
__device__ __forceinline__ void copy_async_wait() {
#if GAZE_HAS_MMA
  asm volatile("cp.async.wait_group %0;\n" ::"n"(kPending) : "memory");
#elif defined(GAZE_CUDA_SIM)
  ::gaze_sim::copy_async_wait(kPending);
#endif
}

}  // namespace gaze::cuda
