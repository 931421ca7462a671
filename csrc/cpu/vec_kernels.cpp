// Inner loops of the CPU kernels, written as plain loops that GCC vectorizes
// (`omp simd`), cloned per x86-64 level and dispatched once at load time
// through an ifunc (`target_clones`). Other compilers and architectures build
// the same loops once, for the baseline target.
#include "vec_kernels.h"

#include <cmath>
#include <cstring>

#if defined(__GNUC__) && !defined(__clang__) && defined(__x86_64__) && defined(__linux__)
#define GAZE_SIMD_CLONES \
  __attribute__((target_clones("arch=x86-64-v4", "arch=x86-64-v3", "default")))
#else
#define GAZE_SIMD_CLONES
#endif

#define GAZE_ALWAYS_INLINE inline __attribute__((always_inline))

namespace gaze::cpu {
namespace {

// Rows converted from 16-bit types at a time; the scratch buffers hold this many rows.
constexpr int kConvertRows = 4;

// ----------------------------------------------------------------------------
// Element conversions. _Float16 lets the compiler use F16C / AVX512-FP16 where
// the clone's target has them; without it, c10's scalar conversion.
// ----------------------------------------------------------------------------
GAZE_ALWAYS_INLINE float load_float(const float* p, int i) { return p[i]; }

GAZE_ALWAYS_INLINE float load_float(const c10::Half* p, int i) {
#if defined(__FLT16_MAX__)
  return static_cast<float>(reinterpret_cast<const _Float16*>(p)[i]);
#else
  return static_cast<float>(p[i]);
#endif
}

GAZE_ALWAYS_INLINE float load_float(const c10::BFloat16* p, int i) {
  uint32_t bits = static_cast<uint32_t>(reinterpret_cast<const uint16_t*>(p)[i]) << 16;
  float f;
  std::memcpy(&f, &bits, sizeof(f));
  return f;
}

GAZE_ALWAYS_INLINE void store_float(float* p, int i, float x) { p[i] = x; }

GAZE_ALWAYS_INLINE void store_float(c10::Half* p, int i, float x) {
#if defined(__FLT16_MAX__)
  reinterpret_cast<_Float16*>(p)[i] = static_cast<_Float16>(x);
#else
  p[i] = static_cast<c10::Half>(x);
#endif
}

// Round to nearest even, NaN kept quiet (as c10::BFloat16 does).
GAZE_ALWAYS_INLINE void store_float(c10::BFloat16* p, int i, float x) {
  uint32_t u;
  std::memcpy(&u, &x, sizeof(u));
  uint32_t rounded = (u + 0x7FFFu + ((u >> 16) & 1u)) >> 16;
  reinterpret_cast<uint16_t*>(p)[i] = static_cast<uint16_t>(x != x ? 0x7FC0u : rounded);
}

template <typename T>
GAZE_ALWAYS_INLINE void convert_row(const T* src, int D, float* dst) {
#pragma omp simd
  for (int d = 0; d < D; ++d) dst[d] = load_float(src, d);
}

// ----------------------------------------------------------------------------
// Dot products: four independent accumulators per inner loop (four queries
// against one row, or one query against four rows) so the FMA chains overlap
// and each loaded row or query is used four times.
// ----------------------------------------------------------------------------
template <typename Acc>
GAZE_ALWAYS_INLINE void dot_rows_impl(const Acc* Q, int G, const Acc* const* rows, int n, int D,
                                      Acc* dst, int ds) {
  int g = 0;
  for (; g + 4 <= G; g += 4) {
    const Acc* q0 = Q + static_cast<int64_t>(g) * D;
    const Acc* q1 = q0 + D;
    const Acc* q2 = q1 + D;
    const Acc* q3 = q2 + D;
    for (int j = 0; j < n; ++j) {
      const Acc* r = rows[j];
      Acc s0 = 0, s1 = 0, s2 = 0, s3 = 0;
#pragma omp simd reduction(+ : s0, s1, s2, s3)
      for (int d = 0; d < D; ++d) {
        const Acc x = r[d];
        s0 += q0[d] * x;
        s1 += q1[d] * x;
        s2 += q2[d] * x;
        s3 += q3[d] * x;
      }
      dst[(g + 0) * ds + j] = s0;
      dst[(g + 1) * ds + j] = s1;
      dst[(g + 2) * ds + j] = s2;
      dst[(g + 3) * ds + j] = s3;
    }
  }
  for (; g < G; ++g) {
    const Acc* q = Q + static_cast<int64_t>(g) * D;
    int j = 0;
    for (; j + 4 <= n; j += 4) {
      const Acc *r0 = rows[j], *r1 = rows[j + 1], *r2 = rows[j + 2], *r3 = rows[j + 3];
      Acc s0 = 0, s1 = 0, s2 = 0, s3 = 0;
#pragma omp simd reduction(+ : s0, s1, s2, s3)
      for (int d = 0; d < D; ++d) {
        const Acc x = q[d];
        s0 += r0[d] * x;
        s1 += r1[d] * x;
        s2 += r2[d] * x;
        s3 += r3[d] * x;
      }
      dst[g * ds + j + 0] = s0;
      dst[g * ds + j + 1] = s1;
      dst[g * ds + j + 2] = s2;
      dst[g * ds + j + 3] = s3;
    }
    for (; j < n; ++j) {
      const Acc* r = rows[j];
      Acc s = 0;
#pragma omp simd reduction(+ : s)
      for (int d = 0; d < D; ++d) s += r[d] * q[d];
      dst[g * ds + j] = s;
    }
  }
}

// acc[g] += sum_j w[g][j] * rows[j], four rows per pass over each accumulator.
template <typename Acc>
GAZE_ALWAYS_INLINE void accumulate_rows_impl(const Acc* W, int ws, int G, const Acc* const* rows,
                                             int n, int D, Acc* acc) {
  int j = 0;
  for (; j + 4 <= n; j += 4) {
    const Acc *r0 = rows[j], *r1 = rows[j + 1], *r2 = rows[j + 2], *r3 = rows[j + 3];
    for (int g = 0; g < G; ++g) {
      const Acc* w = W + g * ws + j;
      const Acc w0 = w[0], w1 = w[1], w2 = w[2], w3 = w[3];
      Acc* a = acc + static_cast<int64_t>(g) * D;
#pragma omp simd
      for (int d = 0; d < D; ++d) a[d] += w0 * r0[d] + w1 * r1[d] + w2 * r2[d] + w3 * r3[d];
    }
  }
  for (; j < n; ++j) {
    const Acc* r = rows[j];
    for (int g = 0; g < G; ++g) {
      const Acc w = W[g * ws + j];
      Acc* a = acc + static_cast<int64_t>(g) * D;
#pragma omp simd
      for (int d = 0; d < D; ++d) a[d] += w * r[d];
    }
  }
}

// rows[j] += sum_g w[g][j] * vecs[g], four vectors per pass over each row.
template <typename Acc>
GAZE_ALWAYS_INLINE void scatter_rows_impl(const Acc* W, int ws, int G, const Acc* vecs,
                                          Acc* const* rows, int n, int D) {
  for (int j = 0; j < n; ++j) {
    Acc* r = rows[j];
    int g = 0;
    for (; g + 4 <= G; g += 4) {
      const Acc w0 = W[(g + 0) * ws + j], w1 = W[(g + 1) * ws + j];
      const Acc w2 = W[(g + 2) * ws + j], w3 = W[(g + 3) * ws + j];
      const Acc* v0 = vecs + static_cast<int64_t>(g) * D;
      const Acc *v1 = v0 + D, *v2 = v1 + D, *v3 = v2 + D;
#pragma omp simd
      for (int d = 0; d < D; ++d) r[d] += w0 * v0[d] + w1 * v1[d] + w2 * v2[d] + w3 * v3[d];
    }
    for (; g < G; ++g) {
      const Acc w = W[g * ws + j];
      const Acc* v = vecs + static_cast<int64_t>(g) * D;
#pragma omp simd
      for (int d = 0; d < D; ++d) r[d] += w * v[d];
    }
  }
}

// 16-bit rows: convert kConvertRows rows into float scratch, then the float loop.
template <typename T, typename Body>
GAZE_ALWAYS_INLINE void for_converted_rows(const T* const* rows, int n, int D, float* scratch,
                                           Body&& body) {
  const float* converted[kConvertRows];
  for (int j0 = 0; j0 < n; j0 += kConvertRows) {
    const int m = n - j0 < kConvertRows ? n - j0 : kConvertRows;
    for (int j = 0; j < m; ++j) {
      float* dst = scratch + static_cast<int64_t>(j) * D;
      convert_row(rows[j0 + j], D, dst);
      converted[j] = dst;
    }
    body(j0, converted, m);
  }
}

template <typename T>
GAZE_ALWAYS_INLINE void dot_rows_16(const float* Q, int G, const T* const* rows, int n, int D,
                                    float* dst, int ds, float* scratch) {
  for_converted_rows(rows, n, D, scratch, [&](int j0, const float* const* conv, int m) {
    dot_rows_impl(Q, G, conv, m, D, dst + j0, ds);
  });
}

template <typename T>
GAZE_ALWAYS_INLINE void accumulate_rows_16(const float* W, int ws, int G, const T* const* rows,
                                           int n, int D, float* acc, float* scratch) {
  for_converted_rows(rows, n, D, scratch, [&](int j0, const float* const* conv, int m) {
    accumulate_rows_impl(W + j0, ws, G, conv, m, D, acc);
  });
}

// 2^x for x <= 0 (softmax arguments), relative error ~2e-7: x = n + f with
// f in [-0.5, 0.5], 2^f from a degree-6 polynomial, 2^n built in the exponent.
GAZE_ALWAYS_INLINE float exp2_poly(float x) {
  x = x < -127.0f ? -127.0f : (x > 127.0f ? 127.0f : x);
  const float n = __builtin_roundevenf(x);
  const float f = x - n;
  float p = 1.535336188319500e-4f;
  p = p * f + 1.339887440266574e-3f;
  p = p * f + 9.618437357674640e-3f;
  p = p * f + 5.550332471162809e-2f;
  p = p * f + 2.402264791363012e-1f;
  p = p * f + 6.931472028550421e-1f;
  p = p * f + 1.0f;
  const int32_t bits = (static_cast<int32_t>(n) + 127) << 23;
  float two_n;
  std::memcpy(&two_n, &bits, sizeof(two_n));
  return p * two_n;
}

template <typename T>
GAZE_ALWAYS_INLINE void store_row_impl(const float* src, int n, float factor, T* dst) {
#pragma omp simd
  for (int j = 0; j < n; ++j) store_float(dst, j, src[j] * factor);
}

}  // namespace

GAZE_SIMD_CLONES
void dot_rows(const float* Q, int G, const float* const* rows, int n, int D, float* dst,
              int ds) {
  dot_rows_impl(Q, G, rows, n, D, dst, ds);
}

GAZE_SIMD_CLONES
void dot_rows(const float* Q, int G, const c10::Half* const* rows, int n, int D, float* dst,
              int ds, float* scratch) {
  dot_rows_16(Q, G, rows, n, D, dst, ds, scratch);
}

GAZE_SIMD_CLONES
void dot_rows(const float* Q, int G, const c10::BFloat16* const* rows, int n, int D,
              float* dst, int ds, float* scratch) {
  dot_rows_16(Q, G, rows, n, D, dst, ds, scratch);
}

GAZE_SIMD_CLONES
void accumulate_rows(const float* W, int ws, int G, const float* const* rows, int n, int D,
                     float* acc) {
  accumulate_rows_impl(W, ws, G, rows, n, D, acc);
}

GAZE_SIMD_CLONES
void accumulate_rows(const float* W, int ws, int G, const c10::Half* const* rows, int n, int D,
                     float* acc, float* scratch) {
  accumulate_rows_16(W, ws, G, rows, n, D, acc, scratch);
}

GAZE_SIMD_CLONES
void accumulate_rows(const float* W, int ws, int G, const c10::BFloat16* const* rows, int n,
                     int D, float* acc, float* scratch) {
  accumulate_rows_16(W, ws, G, rows, n, D, acc, scratch);
}

GAZE_SIMD_CLONES
void scatter_rows(const float* W, int ws, int G, const float* vecs, float* const* rows, int n,
                  int D) {
  scatter_rows_impl(W, ws, G, vecs, rows, n, D);
}

void dot_rows(const double* Q, int G, const double* const* rows, int n, int D, double* dst,
              int ds) {
  dot_rows_impl(Q, G, rows, n, D, dst, ds);
}

void accumulate_rows(const double* W, int ws, int G, const double* const* rows, int n, int D,
                     double* acc) {
  accumulate_rows_impl(W, ws, G, rows, n, D, acc);
}

void scatter_rows(const double* W, int ws, int G, const double* vecs, double* const* rows,
                  int n, int D) {
  scatter_rows_impl(W, ws, G, vecs, rows, n, D);
}

double exp2_shifted(double* x, int n, double shift) {
  double sum = 0;
  for (int j = 0; j < n; ++j) {
    x[j] = std::exp2(x[j] - shift);
    sum += x[j];
  }
  return sum;
}

void scale(double* dst, int n, double factor) {
  for (int j = 0; j < n; ++j) dst[j] *= factor;
}

GAZE_SIMD_CLONES
float exp2_shifted(float* x, int n, float shift) {
  float sum = 0.f;
#pragma omp simd reduction(+ : sum)
  for (int j = 0; j < n; ++j) {
    const float e = exp2_poly(x[j] - shift);
    x[j] = e;
    sum += e;
  }
  return sum;
}

GAZE_SIMD_CLONES
void scale(float* dst, int n, float factor) {
#pragma omp simd
  for (int j = 0; j < n; ++j) dst[j] *= factor;
}

GAZE_SIMD_CLONES
void load_row(const c10::Half* src, int n, float* dst) { convert_row(src, n, dst); }

GAZE_SIMD_CLONES
void load_row(const c10::BFloat16* src, int n, float* dst) { convert_row(src, n, dst); }

GAZE_SIMD_CLONES
void store_row(const float* src, int n, float factor, float* dst) {
  store_row_impl(src, n, factor, dst);
}

GAZE_SIMD_CLONES
void store_row(const float* src, int n, float factor, c10::Half* dst) {
  store_row_impl(src, n, factor, dst);
}

GAZE_SIMD_CLONES
void store_row(const float* src, int n, float factor, c10::BFloat16* dst) {
  store_row_impl(src, n, factor, dst);
}

}  // namespace gaze::cpu
