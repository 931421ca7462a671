// Warp-level tensor-core multiply (mma.sync m16n8k16, fp16/bf16 in, fp32
// accumulate; sm_80 and later) and the register layout of its fragments.
//
// Lane l of the warp is (g, t) = (l / 4, l % 4). Its registers hold:
//   A (16 x 16, row-major), 4 x 32 bits, two elements each (low half first):
//     a[0]: (row g,     cols 2t, 2t+1)      a[1]: (row g + 8, cols 2t, 2t+1)
//     a[2]: (row g,     cols 2t+8, 2t+9)    a[3]: (row g + 8, cols 2t+8, 2t+9)
//   B (16 x 8, k x n), 2 x 32 bits:
//     b[0]: (k 2t, 2t+1; col g)             b[1]: (k 2t+8, 2t+9; col g)
//   C/D (16 x 8, fp32), 4 floats:
//     c[0], c[1]: (row g, cols 2t, 2t+1)     c[2], c[3]: (row g + 8, cols 2t, 2t+1)
// So the C fragments of two adjacent n-blocks, rounded to 16 bits, are the A
// fragment of the next product (as in FlashAttention-2): P never leaves registers.
#pragma once

#include <cuda_bf16.h>
#include <cuda_fp16.h>

#include <cstdint>
#include <type_traits>

namespace gaze::cuda {

// Whether this compilation targets a GPU with bf16/fp16 mma.sync (sm_80+). The
// host checks the kernel's binary version before it launches one.
#if defined(__CUDA_ARCH__) && __CUDA_ARCH__ >= 800
#define GAZE_HAS_MMA 1
#else
#define GAZE_HAS_MMA 0
#endif

// d += a * b for one 16 x 8 x 16 block.
template <typename T>
__device__ __forceinline__ void mma_16x8x16(float (&d)[4], const uint32_t (&a)[4],
                                            const uint32_t (&b)[2]) {
#if GAZE_HAS_MMA
  if constexpr (std::is_same_v<T, __nv_bfloat16>) {
    asm volatile(
        "mma.sync.aligned.m16n8k16.row.col.f32.bf16.bf16.f32 {%0,%1,%2,%3}, {%4,%5,%6,%7}, "
        "{%8,%9}, {%0,%1,%2,%3};\n"
        : "+f"(d[0]), "+f"(d[1]), "+f"(d[2]), "+f"(d[3])
        : "r"(a[0]), "r"(a[1]), "r"(a[2]), "r"(a[3]), "r"(b[0]), "r"(b[1]));
  } else {
    static_assert(std::is_same_v<T, __half>, "mma_16x8x16: fp16 or bf16 operands");
    asm volatile(
        "mma.sync.aligned.m16n8k16.row.col.f32.f16.f16.f32 {%0,%1,%2,%3}, {%4,%5,%6,%7}, "
        "{%8,%9}, {%0,%1,%2,%3};\n"
        : "+f"(d[0]), "+f"(d[1]), "+f"(d[2]), "+f"(d[3])
        : "r"(a[0]), "r"(a[1]), "r"(a[2]), "r"(a[3]), "r"(b[0]), "r"(b[1]));
  }
#elif defined(GAZE_CUDA_SIM)
  ::gaze_sim::mma_16x8x16<T>(d, a, b);  // the CPU emulator of the tests
#else
  __trap();  // never launched: the host checks the binary's architecture
#endif
}

// Two floats rounded to T, `lo` in the low 16 bits.
template <typename T>
__device__ __forceinline__ uint32_t pack_pair(float lo, float hi) {
  if constexpr (std::is_same_v<T, __nv_bfloat16>) {
    const __nv_bfloat162 v = __floats2bfloat162_rn(lo, hi);
    return *reinterpret_cast<const uint32_t*>(&v);
  } else {
    const __half2 v = __floats2half2_rn(lo, hi);
    return *reinterpret_cast<const uint32_t*>(&v);
  }
}

// Two 16-bit elements (raw bits), `lo` in the low 16 bits.
__device__ __forceinline__ uint32_t pack_raw_pair(uint16_t lo, uint16_t hi) {
  return uint32_t(lo) | (uint32_t(hi) << 16);
}

// The B fragment of a 16 x 8 (k x n) block stored k-major in shared memory: element
// (k, n) at base[k * stride + n]. Lane (g, t) takes column g, rows 2t, 2t+1 and 2t+8, 2t+9.
// (An A fragment of a block stored transposed, element (m, k) at base[k * stride + m], is
// two of these: columns m and m + 8.)
__device__ __forceinline__ void b_fragment_k_major(const uint16_t* base, int stride,
                                                   uint32_t (&b)[2]) {
  const int lane = threadIdx.x % 32;
  const uint16_t* p = base + (2 * (lane % 4)) * stride + lane / 4;
  b[0] = pack_raw_pair(p[0], p[stride]);
  b[1] = pack_raw_pair(p[8 * stride], p[9 * stride]);
}

}  // namespace gaze::cuda
