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
// A and B fragments come from shared memory with ldmatrix (load_a_fragment and the like).
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

// Four 8 x 8 matrices of 16-bit elements from shared memory in one instruction
// (ldmatrix.x4; the whole warp calls it): lane l gives the address of row l % 8 of
// matrix l / 8 (8 elements, 16-byte aligned). Register i receives matrix i, lane (g, t)
// holding (row g; cols 2t, 2t+1), or with kTransposed (rows 2t, 2t+1; col g).
template <bool kTransposed>
__device__ __forceinline__ void load_matrices_x4(const uint16_t* row_address, uint32_t (&r)[4]) {
#if GAZE_HAS_MMA
  const uint32_t address = static_cast<uint32_t>(__cvta_generic_to_shared(row_address));
  if constexpr (kTransposed) {
    asm volatile("ldmatrix.sync.aligned.m8n8.x4.trans.shared.b16 {%0,%1,%2,%3}, [%4];\n"
                 : "=r"(r[0]), "=r"(r[1]), "=r"(r[2]), "=r"(r[3])
                 : "r"(address));
  } else {
    asm volatile("ldmatrix.sync.aligned.m8n8.x4.shared.b16 {%0,%1,%2,%3}, [%4];\n"
                 : "=r"(r[0]), "=r"(r[1]), "=r"(r[2]), "=r"(r[3])
                 : "r"(address));
  }
#elif defined(GAZE_CUDA_SIM)
  ::gaze_sim::load_matrices_x4(row_address, kTransposed, r);
#else
  __trap();  // never launched: the host checks the binary's architecture
#endif
}

// The fragments below are 16 x 16 blocks of a shared tile with row stride `stride`
// (elements; 16-byte rows) starting at `base`, loaded as four 8 x 8 matrices: register i
// takes stored 8 x 8 block (i % 2, i / 2) (kDownFirst) or (i / 2, i % 2), transposed or not.
template <bool kTransposed, bool kDownFirst>
__device__ __forceinline__ void load_16x16(const uint16_t* base, int stride, uint32_t (&r)[4]) {
  const int i = threadIdx.x % 32 / 8;  // lane l gives row l % 8 of matrix l / 8
  const int block_row = kDownFirst ? i % 2 : i / 2, block_col = kDownFirst ? i / 2 : i % 2;
  load_matrices_x4<kTransposed>(base + (8 * block_row + threadIdx.x % 8) * stride + 8 * block_col, r);
}

// The A fragment of a 16 x 16 (m x k) block stored row-major: (m, k) at base[m * stride + k]
// (a[i]: rows +8 when i is odd, cols +8 when i >= 2).
__device__ __forceinline__ void load_a_fragment(const uint16_t* base, int stride, uint32_t (&a)[4]) {
  load_16x16</*kTransposed=*/false, /*kDownFirst=*/true>(base, stride, a);
}

// The A fragment of a 16 x 16 (m x k) block stored transposed: (m, k) at base[k * stride + m].
__device__ __forceinline__ void load_a_fragment_transposed(const uint16_t* base, int stride,
                                                           uint32_t (&a)[4]) {
  load_16x16</*kTransposed=*/true, /*kDownFirst=*/false>(base, stride, a);
}

// The B fragments of two adjacent 16 x 8 (k x n) blocks, columns [0, 8) into b[0], b[1]
// and [8, 16) into b[2], b[3], stored k-major: (k, n) at base[k * stride + n].
__device__ __forceinline__ void load_b_fragments_k_major(const uint16_t* base, int stride,
                                                         uint32_t (&b)[4]) {
  load_16x16</*kTransposed=*/true, /*kDownFirst=*/true>(base, stride, b);
}

// The same, stored n-major: (k, n) at base[n * stride + k] (keys' rows for Q K^T).
__device__ __forceinline__ void load_b_fragments_n_major(const uint16_t* base, int stride,
                                                         uint32_t (&b)[4]) {
  load_16x16</*kTransposed=*/false, /*kDownFirst=*/false>(base, stride, b);
}

}  // namespace gaze::cuda
