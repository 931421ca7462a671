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
// Dot products: four at a time (four queries against one row, or one query
// against four rows), each with a 16-lane accumulator, so the FMA chains
// overlap and each loaded vector is used four times. The four accumulators are
// then reduced together by a shuffle tree: a scalar reduction per dot product
// would cost more than the products (D = 128 is 8 FMAs per dot).
// ----------------------------------------------------------------------------
typedef float vfloat16 __attribute__((vector_size(64)));
constexpr int kLanes = 16;

GAZE_ALWAYS_INLINE vfloat16 load16(const float* p) {
  vfloat16 v;
  std::memcpy(&v, p, sizeof(v));
  return v;
}

// Returns {sum(a), sum(b), sum(c), sum(d)}.
GAZE_ALWAYS_INLINE void reduce4(vfloat16 a, vfloat16 b, vfloat16 c, vfloat16 d, float* out) {
  // 16 -> 8 lanes each, two values per vector.
  vfloat16 ab = __builtin_shufflevector(a, b, 0, 1, 2, 3, 4, 5, 6, 7, 16, 17, 18, 19, 20, 21, 22, 23) +
                __builtin_shufflevector(a, b, 8, 9, 10, 11, 12, 13, 14, 15, 24, 25, 26, 27, 28, 29, 30, 31);
  vfloat16 cd = __builtin_shufflevector(c, d, 0, 1, 2, 3, 4, 5, 6, 7, 16, 17, 18, 19, 20, 21, 22, 23) +
                __builtin_shufflevector(c, d, 8, 9, 10, 11, 12, 13, 14, 15, 24, 25, 26, 27, 28, 29, 30, 31);
  // 8 -> 4 lanes each, four values per vector.
  vfloat16 x = __builtin_shufflevector(ab, cd, 0, 1, 2, 3, 8, 9, 10, 11, 16, 17, 18, 19, 24, 25, 26, 27) +
               __builtin_shufflevector(ab, cd, 4, 5, 6, 7, 12, 13, 14, 15, 20, 21, 22, 23, 28, 29, 30, 31);
  // 4 -> 1 lane within each group of four.
  x += __builtin_shufflevector(x, x, 2, 3, 0, 1, 6, 7, 4, 5, 10, 11, 8, 9, 14, 15, 12, 13);
  x += __builtin_shufflevector(x, x, 1, 0, 3, 2, 5, 4, 7, 6, 9, 8, 11, 10, 13, 12, 15, 14);
  out[0] = x[0];
  out[1] = x[4];
  out[2] = x[8];
  out[3] = x[12];
}

// sums[k] = dot(x[k], y[k]) for k < 4, over D elements.
GAZE_ALWAYS_INLINE void dot4(const float* x0, const float* x1, const float* x2, const float* x3,
                             const float* y0, const float* y1, const float* y2, const float* y3,
                             int D, float* sums) {
  vfloat16 a0 = {}, a1 = {}, a2 = {}, a3 = {};
  int d = 0;
  for (; d + kLanes <= D; d += kLanes) {
    a0 += load16(x0 + d) * load16(y0 + d);
    a1 += load16(x1 + d) * load16(y1 + d);
    a2 += load16(x2 + d) * load16(y2 + d);
    a3 += load16(x3 + d) * load16(y3 + d);
  }
  reduce4(a0, a1, a2, a3, sums);
  for (; d < D; ++d) {
    sums[0] += x0[d] * y0[d];
    sums[1] += x1[d] * y1[d];
    sums[2] += x2[d] * y2[d];
    sums[3] += x3[d] * y3[d];
  }
}

GAZE_ALWAYS_INLINE void dot_rows_impl(const float* Q, int G, const float* const* rows, int n,
                                      int D, float* dst, int ds) {
  float sums[4];
  int g = 0;
  for (; g + 4 <= G; g += 4) {
    const float* q0 = Q + static_cast<int64_t>(g) * D;
    for (int j = 0; j < n; ++j) {
      const float* r = rows[j];
      dot4(q0, q0 + D, q0 + 2 * D, q0 + 3 * D, r, r, r, r, D, sums);
      for (int t = 0; t < 4; ++t) dst[(g + t) * ds + j] = sums[t];
    }
  }
  for (; g < G; ++g) {
    const float* q = Q + static_cast<int64_t>(g) * D;
    int j = 0;
    for (; j + 4 <= n; j += 4) {
      dot4(rows[j], rows[j + 1], rows[j + 2], rows[j + 3], q, q, q, q, D, sums);
      for (int t = 0; t < 4; ++t) dst[g * ds + j + t] = sums[t];
    }
    for (; j < n; ++j) {
      const float* r = rows[j];
      float s = 0.f;
#pragma omp simd reduction(+ : s)
      for (int d = 0; d < D; ++d) s += r[d] * q[d];
      dst[g * ds + j] = s;
    }
  }
}

// float64 (gradcheck only): plain loops.
GAZE_ALWAYS_INLINE void dot_rows_impl(const double* Q, int G, const double* const* rows, int n,
                                      int D, double* dst, int ds) {
  for (int g = 0; g < G; ++g) {
    for (int j = 0; j < n; ++j) {
      double s = 0;
      for (int d = 0; d < D; ++d) s += Q[static_cast<int64_t>(g) * D + d] * rows[j][d];
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

// 2^x for softmax arguments (x <= 0), relative error ~2e-7: x = n + f with
// f in [-0.5, 0.5], 2^f from a degree-6 polynomial, 2^n built in the exponent
// bits; x <= -127 gives 0. Written on whole vectors: GCC does not vectorize
// the clamps and the rounding of a scalar version.
typedef int32_t vint16 __attribute__((vector_size(64)));

GAZE_ALWAYS_INLINE vfloat16 exp2_vec(vfloat16 x) {
  const vfloat16 lo = vfloat16{} - 127.0f, hi = vfloat16{} + 127.0f;
  x = x < lo ? lo : x;
  x = x > hi ? hi : x;
  const vfloat16 round_magic = vfloat16{} + 12582912.0f;  // 1.5 * 2^23: rounds to nearest even
  const vfloat16 n = (x + round_magic) - round_magic;
  const vfloat16 f = x - n;
  vfloat16 p = vfloat16{} + 1.535336188319500e-4f;
  p = p * f + 1.339887440266574e-3f;
  p = p * f + 9.618437357674640e-3f;
  p = p * f + 5.550332471162809e-2f;
  p = p * f + 2.402264791363012e-1f;
  p = p * f + 6.931472028550421e-1f;
  p = p * f + 1.0f;
  const vint16 exponent = (__builtin_convertvector(n, vint16) + 127) << 23;
  return p * reinterpret_cast<const vfloat16&>(exponent);
}

GAZE_ALWAYS_INLINE float horizontal_sum(vfloat16 v) {
  float lanes[kLanes];
  std::memcpy(lanes, &v, sizeof(v));
  float s = 0.f;
  for (int j = 0; j < kLanes; ++j) s += lanes[j];
  return s;
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
  vfloat16 sum = {};
  int j = 0;
  for (; j + kLanes <= n; j += kLanes) {
    const vfloat16 e = exp2_vec(load16(x + j) - shift);
    std::memcpy(x + j, &e, sizeof(e));
    sum += e;
  }
  if (j < n) {  // tail: pad with -inf, whose 2^x is 0
    float tail[kLanes];
    for (int t = 0; t < kLanes; ++t) tail[t] = j + t < n ? x[j + t] : -__builtin_inff();
    const vfloat16 e = exp2_vec(load16(tail) - shift);
    std::memcpy(tail, &e, sizeof(e));
    for (int t = 0; j + t < n; ++t) x[j + t] = tail[t];
    sum += e;
  }
  return horizontal_sum(sum);
}

GAZE_SIMD_CLONES
float max_value(const float* x, int n) {
  float m = -__builtin_inff();
#pragma omp simd reduction(max : m)
  for (int j = 0; j < n; ++j) m = x[j] > m ? x[j] : m;
  return m;
}

double max_value(const double* x, int n) {
  double m = -__builtin_inf();
  for (int j = 0; j < n; ++j) m = x[j] > m ? x[j] : m;
  return m;
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
