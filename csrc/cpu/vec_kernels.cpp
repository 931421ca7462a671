// Inner loops of the CPU kernels on GCC vector types. On x86-64 each is built
// three times: 16-lane vectors with AVX-512, 8 lanes with AVX2+FMA+F16C, 4 for
// the baseline; the widest the CPU supports is picked once, at first use.
// Other architectures build the 4-lane version alone.
#include "vec_kernels.h"

#include <cmath>
#include <cstdlib>
#include <cstring>
#include <string>

// Vector arguments of always-inline helpers never cross an ABI boundary.
#pragma GCC diagnostic ignored "-Wpsabi"

#define GAZE_ALWAYS_INLINE inline __attribute__((always_inline))

namespace gaze::cpu {
namespace {

// ----------------------------------------------------------------------------
// Vectors of W floats.
// ----------------------------------------------------------------------------
template <int W>
struct Vec;
template <>
struct Vec<4> {
  typedef float f __attribute__((vector_size(16)));
  typedef int32_t i __attribute__((vector_size(16)));
};
template <>
struct Vec<8> {
  typedef float f __attribute__((vector_size(32)));
  typedef int32_t i __attribute__((vector_size(32)));
};
template <>
struct Vec<16> {
  typedef float f __attribute__((vector_size(64)));
  typedef int32_t i __attribute__((vector_size(64)));
};
template <int W>
using vf = typename Vec<W>::f;
template <int W>
using vi = typename Vec<W>::i;

template <int W>
GAZE_ALWAYS_INLINE vf<W> load(const float* p) {
  vf<W> v;
  std::memcpy(&v, p, sizeof(v));
  return v;
}

template <int W>
GAZE_ALWAYS_INLINE void store(float* p, vf<W> v) {
  std::memcpy(p, &v, sizeof(v));
}

template <int W>
GAZE_ALWAYS_INLINE vf<W> splat(float x) {
  return vf<W>{} + x;
}

// Sums of adjacent lane pairs: lanes [0, W/2) from a, [W/2, W) from b. Applied
// level by level it reduces many accumulators at once, keeping them apart.
GAZE_ALWAYS_INLINE vf<4> pair_sum(vf<4> a, vf<4> b) {
  return __builtin_shufflevector(a, b, 0, 2, 4, 6) + __builtin_shufflevector(a, b, 1, 3, 5, 7);
}
GAZE_ALWAYS_INLINE vf<8> pair_sum(vf<8> a, vf<8> b) {
  return __builtin_shufflevector(a, b, 0, 2, 4, 6, 8, 10, 12, 14) +
         __builtin_shufflevector(a, b, 1, 3, 5, 7, 9, 11, 13, 15);
}
GAZE_ALWAYS_INLINE vf<16> pair_sum(vf<16> a, vf<16> b) {
  return __builtin_shufflevector(a, b, 0, 2, 4, 6, 8, 10, 12, 14, 16, 18, 20, 22, 24, 26, 28, 30) +
         __builtin_shufflevector(a, b, 1, 3, 5, 7, 9, 11, 13, 15, 17, 19, 21, 23, 25, 27, 29, 31);
}

// out[m] = sum of the lanes of acc[m], for M a power of two.
template <int W, int M>
GAZE_ALWAYS_INLINE void reduce(vf<W> (&acc)[M], float* out) {
  int count = M, lanes = W;  // vectors left, lanes per value
  while (count > 1 && lanes > 1) {
    for (int m = 0; m < count / 2; ++m) acc[m] = pair_sum(acc[2 * m], acc[2 * m + 1]);
    count /= 2;
    lanes /= 2;
  }
  while (lanes > 1) {  // fewer values than lanes: fold the last vector onto itself
    acc[0] = pair_sum(acc[0], acc[0]);
    lanes /= 2;
  }
  for (int m = 0; m < M; ++m) out[m] = acc[m / W][m % W];
}

// ----------------------------------------------------------------------------
// Element conversions. _Float16 lets the compiler use F16C / AVX512-FP16 where
// the target has them.
// ----------------------------------------------------------------------------
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
GAZE_ALWAYS_INLINE void convert_row(const T* src, int n, float* dst) {
#pragma omp simd
  for (int d = 0; d < n; ++d) dst[d] = load_float(src, d);
}

template <typename T>
GAZE_ALWAYS_INLINE void store_row_impl(const float* src, int n, float factor, T* dst) {
#pragma omp simd
  for (int j = 0; j < n; ++j) store_float(dst, j, src[j] * factor);
}

// ----------------------------------------------------------------------------
// Dot products. A 4x4 tile (four queries against four rows) keeps 16
// accumulators: each loaded vector feeds four FMAs, and one shuffle tree
// reduces all 16 sums (a reduction per dot product would cost more than the
// products). Fewer queries fall back to one query against four rows.
// ----------------------------------------------------------------------------
template <int W>
GAZE_ALWAYS_INLINE void dot_4x4(const float* const* q, const float* const* r, int D,
                                float* out /*[4 queries][4 rows]*/) {
  vf<W> acc[16] = {};
  int d = 0;
  for (; d + W <= D; d += W) {
    const vf<W> r0 = load<W>(r[0] + d), r1 = load<W>(r[1] + d);
    const vf<W> r2 = load<W>(r[2] + d), r3 = load<W>(r[3] + d);
    for (int g = 0; g < 4; ++g) {
      const vf<W> x = load<W>(q[g] + d);
      acc[4 * g + 0] += x * r0;
      acc[4 * g + 1] += x * r1;
      acc[4 * g + 2] += x * r2;
      acc[4 * g + 3] += x * r3;
    }
  }
  reduce<W, 16>(acc, out);
  for (; d < D; ++d) {
    for (int t = 0; t < 16; ++t) out[t] += q[t / 4][d] * r[t % 4][d];
  }
}

// out[t] = dot(x[t], y[t]) for four pairs.
template <int W>
GAZE_ALWAYS_INLINE void dot_4(const float* const* x, const float* const* y, int D, float* out) {
  vf<W> acc[4] = {};
  int d = 0;
  for (; d + W <= D; d += W) {
    for (int t = 0; t < 4; ++t) acc[t] += load<W>(x[t] + d) * load<W>(y[t] + d);
  }
  reduce<W, 4>(acc, out);
  for (; d < D; ++d) {
    for (int t = 0; t < 4; ++t) out[t] += x[t][d] * y[t][d];
  }
}

GAZE_ALWAYS_INLINE float dot_1(const float* x, const float* y, int D) {
  float s = 0.f;
#pragma omp simd reduction(+ : s)
  for (int d = 0; d < D; ++d) s += x[d] * y[d];
  return s;
}

template <int W>
GAZE_ALWAYS_INLINE void dot_rows_impl(const float* Q, int G, const float* const* rows, int n,
                                      int D, float* dst, int ds) {
  float sums[16];
  int g = 0;
  for (; g + 4 <= G; g += 4) {
    const float* q[4] = {Q + int64_t(g) * D, Q + int64_t(g + 1) * D, Q + int64_t(g + 2) * D,
                         Q + int64_t(g + 3) * D};
    int j = 0;
    for (; j + 4 <= n; j += 4) {
      dot_4x4<W>(q, rows + j, D, sums);
      for (int t = 0; t < 16; ++t) dst[(g + t / 4) * ds + j + t % 4] = sums[t];
    }
    for (; j < n; ++j) {
      const float* r[4] = {rows[j], rows[j], rows[j], rows[j]};
      dot_4<W>(q, r, D, sums);
      for (int t = 0; t < 4; ++t) dst[(g + t) * ds + j] = sums[t];
    }
  }
  for (; g < G; ++g) {
    const float* q = Q + int64_t(g) * D;
    const float* qs[4] = {q, q, q, q};
    int j = 0;
    for (; j + 4 <= n; j += 4) {
      dot_4<W>(qs, rows + j, D, sums);
      for (int t = 0; t < 4; ++t) dst[g * ds + j + t] = sums[t];
    }
    for (; j < n; ++j) dst[g * ds + j] = dot_1(q, rows[j], D);
  }
}

// ----------------------------------------------------------------------------
// Weighted row sums: acc[g] += sum_j w[g][j] * rows[j]. The accumulators of a
// slice of D stay in registers for the whole block of rows (four heads x two
// vectors, or one head x four vectors), so acc is read and written once per block.
// ----------------------------------------------------------------------------
template <int W, int HEADS, int VECS>
GAZE_ALWAYS_INLINE void accumulate_slice(const float* Wt, int ws, const float* const* rows, int n,
                                         int d, float* const* acc) {
  vf<W> a[HEADS][VECS];
  for (int h = 0; h < HEADS; ++h)
    for (int c = 0; c < VECS; ++c) a[h][c] = load<W>(acc[h] + d + c * W);
  for (int j = 0; j < n; ++j) {
    vf<W> x[VECS];
    for (int c = 0; c < VECS; ++c) x[c] = load<W>(rows[j] + d + c * W);
    for (int h = 0; h < HEADS; ++h) {
      const vf<W> w = splat<W>(Wt[h * ws + j]);
      for (int c = 0; c < VECS; ++c) a[h][c] += w * x[c];
    }
  }
  for (int h = 0; h < HEADS; ++h)
    for (int c = 0; c < VECS; ++c) store<W>(acc[h] + d + c * W, a[h][c]);
}

template <int W, int HEADS, int VECS>
GAZE_ALWAYS_INLINE void accumulate_heads(const float* Wt, int ws, const float* const* rows, int n,
                                         int D, float* const* acc) {
  int d = 0;
  for (; d + VECS * W <= D; d += VECS * W) accumulate_slice<W, HEADS, VECS>(Wt, ws, rows, n, d, acc);
  for (; d + W <= D; d += W) accumulate_slice<W, HEADS, 1>(Wt, ws, rows, n, d, acc);
  for (; d < D; ++d) {
    for (int h = 0; h < HEADS; ++h) {
      float s = acc[h][d];
      for (int j = 0; j < n; ++j) s += Wt[h * ws + j] * rows[j][d];
      acc[h][d] = s;
    }
  }
}

template <int W>
GAZE_ALWAYS_INLINE void accumulate_rows_impl(const float* Wt, int ws, int G,
                                             const float* const* rows, int n, int D, float* acc) {
  int g = 0;
  for (; g + 4 <= G; g += 4) {
    float* heads[4] = {acc + int64_t(g) * D, acc + int64_t(g + 1) * D, acc + int64_t(g + 2) * D,
                       acc + int64_t(g + 3) * D};
    accumulate_heads<W, 4, 2>(Wt + g * ws, ws, rows, n, D, heads);
  }
  for (; g < G; ++g) {
    float* head[1] = {acc + int64_t(g) * D};
    accumulate_heads<W, 1, 4>(Wt + g * ws, ws, rows, n, D, head);
  }
}

// rows[j] += sum_g w[g][j] * vecs[g]: the scatter of a backward pass.
template <typename Acc>
GAZE_ALWAYS_INLINE void scatter_rows_impl(const Acc* Wt, int ws, int G, const Acc* vecs,
                                          Acc* const* rows, int n, int D) {
  for (int j = 0; j < n; ++j) {
    Acc* r = rows[j];
    int g = 0;
    for (; g + 4 <= G; g += 4) {
      const Acc w0 = Wt[(g + 0) * ws + j], w1 = Wt[(g + 1) * ws + j];
      const Acc w2 = Wt[(g + 2) * ws + j], w3 = Wt[(g + 3) * ws + j];
      const Acc* v0 = vecs + int64_t(g) * D;
      const Acc *v1 = v0 + D, *v2 = v1 + D, *v3 = v2 + D;
#pragma omp simd
      for (int d = 0; d < D; ++d) r[d] += w0 * v0[d] + w1 * v1[d] + w2 * v2[d] + w3 * v3[d];
    }
    for (; g < G; ++g) {
      const Acc w = Wt[g * ws + j];
      const Acc* v = vecs + int64_t(g) * D;
#pragma omp simd
      for (int d = 0; d < D; ++d) r[d] += w * v[d];
    }
  }
}

// 16-bit rows: convert kConvertRows rows into float scratch, then the float loop.
constexpr int kConvertRows = 4;

template <typename T, typename Body>
GAZE_ALWAYS_INLINE void for_converted_rows(const T* const* rows, int n, int D, float* scratch,
                                           Body&& body) {
  const float* converted[kConvertRows];
  for (int j0 = 0; j0 < n; j0 += kConvertRows) {
    const int m = n - j0 < kConvertRows ? n - j0 : kConvertRows;
    for (int j = 0; j < m; ++j) {
      float* dst = scratch + int64_t(j) * D;
      convert_row(rows[j0 + j], D, dst);
      converted[j] = dst;
    }
    body(j0, converted, m);
  }
}

template <int W, typename T>
GAZE_ALWAYS_INLINE void dot_rows_16(const float* Q, int G, const T* const* rows, int n, int D,
                                    float* dst, int ds, float* scratch) {
  for_converted_rows(rows, n, D, scratch, [&](int j0, const float* const* conv, int m) {
    dot_rows_impl<W>(Q, G, conv, m, D, dst + j0, ds);
  });
}

template <int W, typename T>
GAZE_ALWAYS_INLINE void accumulate_rows_16(const float* Wt, int ws, int G, const T* const* rows,
                                           int n, int D, float* acc, float* scratch) {
  for_converted_rows(rows, n, D, scratch, [&](int j0, const float* const* conv, int m) {
    accumulate_rows_impl<W>(Wt + j0, ws, G, conv, m, D, acc);
  });
}

// ----------------------------------------------------------------------------
// Softmax pieces.
// ----------------------------------------------------------------------------

// 2^x for softmax arguments (x <= 0), relative error ~2e-7: x = n + f with
// f in [-0.5, 0.5], 2^f from a degree-6 polynomial, 2^n built in the exponent
// bits; x <= -127 gives 0. On whole vectors: GCC leaves the clamps and the
// rounding of a scalar version unvectorized.
template <int W>
GAZE_ALWAYS_INLINE vf<W> exp2_vec(vf<W> x) {
  x = x < splat<W>(-127.0f) ? splat<W>(-127.0f) : x;
  x = x > splat<W>(127.0f) ? splat<W>(127.0f) : x;
  const vf<W> round_magic = splat<W>(12582912.0f);  // 1.5 * 2^23: rounds to nearest even
  const vf<W> n = (x + round_magic) - round_magic;
  const vf<W> f = x - n;
  vf<W> p = splat<W>(1.535336188319500e-4f);
  p = p * f + 1.339887440266574e-3f;
  p = p * f + 9.618437357674640e-3f;
  p = p * f + 5.550332471162809e-2f;
  p = p * f + 2.402264791363012e-1f;
  p = p * f + 6.931472028550421e-1f;
  p = p * f + 1.0f;
  const vi<W> exponent = (__builtin_convertvector(n, vi<W>) + 127) << 23;
  vf<W> scale;
  std::memcpy(&scale, &exponent, sizeof(scale));
  return p * scale;
}

template <int W>
GAZE_ALWAYS_INLINE float exp2_shifted_impl(float* x, int n, float shift) {
  vf<W> sum = {};
  int j = 0;
  for (; j + W <= n; j += W) {
    const vf<W> e = exp2_vec<W>(load<W>(x + j) - shift);
    store<W>(x + j, e);
    sum += e;
  }
  if (j < n) {  // tail: pad with -inf, whose 2^x is 0
    float tail[W];
    for (int t = 0; t < W; ++t) tail[t] = j + t < n ? x[j + t] : -__builtin_inff();
    const vf<W> e = exp2_vec<W>(load<W>(tail) - shift);
    store<W>(tail, e);
    for (int t = 0; j + t < n; ++t) x[j + t] = tail[t];
    sum += e;
  }
  vf<W> total[1] = {sum};
  float out;
  reduce<W, 1>(total, &out);
  return out;
}

GAZE_ALWAYS_INLINE float max_value_impl(const float* x, int n) {
  float m = -__builtin_inff();
#pragma omp simd reduction(max : m)
  for (int j = 0; j < n; ++j) m = x[j] > m ? x[j] : m;
  return m;
}

GAZE_ALWAYS_INLINE void scale_impl(float* dst, int n, float factor) {
#pragma omp simd
  for (int j = 0; j < n; ++j) dst[j] *= factor;
}

// ----------------------------------------------------------------------------
// One table of kernels per instruction set, picked once at first use from the
// CPU's features; GAZE_CPU_ISA=baseline|avx2 asks for a lower one (the tests
// run every table that way).
// ----------------------------------------------------------------------------
struct VecKernels {
  const char* name;
  void (*dot_f32)(const float*, int, const float* const*, int, int, float*, int);
  void (*dot_f16)(const float*, int, const c10::Half* const*, int, int, float*, int, float*);
  void (*dot_bf16)(const float*, int, const c10::BFloat16* const*, int, int, float*, int,
                   float*);
  void (*acc_f32)(const float*, int, int, const float* const*, int, int, float*);
  void (*acc_f16)(const float*, int, int, const c10::Half* const*, int, int, float*, float*);
  void (*acc_bf16)(const float*, int, int, const c10::BFloat16* const*, int, int, float*,
                   float*);
  void (*scatter)(const float*, int, int, const float*, float* const*, int, int);
  float (*exp2_shifted)(float*, int, float);
  float (*max_value)(const float*, int);
  void (*scale)(float*, int, float);
  void (*load_f16)(const c10::Half*, int, float*);
  void (*load_bf16)(const c10::BFloat16*, int, float*);
  void (*store_f32)(const float*, int, float, float*);
  void (*store_f16)(const float*, int, float, c10::Half*);
  void (*store_bf16)(const float*, int, float, c10::BFloat16*);
};

#define GAZE_DEFINE_VEC_KERNELS(ISA, TARGET, W)                                                 \
  namespace ISA {                                                                              \
  TARGET void dot_f32(const float* Q, int G, const float* const* rows, int n, int D,           \
                      float* dst, int ds) {                                                    \
    dot_rows_impl<W>(Q, G, rows, n, D, dst, ds);                                               \
  }                                                                                            \
  template <typename T>                                                                        \
  TARGET void dot_16(const float* Q, int G, const T* const* rows, int n, int D, float* dst,    \
                     int ds, float* scratch) {                                                 \
    dot_rows_16<W>(Q, G, rows, n, D, dst, ds, scratch);                                        \
  }                                                                                            \
  TARGET void acc_f32(const float* Wt, int ws, int G, const float* const* rows, int n, int D,  \
                      float* acc) {                                                            \
    accumulate_rows_impl<W>(Wt, ws, G, rows, n, D, acc);                                       \
  }                                                                                            \
  template <typename T>                                                                        \
  TARGET void acc_16(const float* Wt, int ws, int G, const T* const* rows, int n, int D,       \
                     float* acc, float* scratch) {                                             \
    accumulate_rows_16<W>(Wt, ws, G, rows, n, D, acc, scratch);                                \
  }                                                                                            \
  TARGET void scatter(const float* Wt, int ws, int G, const float* vecs, float* const* rows,   \
                      int n, int D) {                                                          \
    scatter_rows_impl(Wt, ws, G, vecs, rows, n, D);                                            \
  }                                                                                            \
  TARGET float exp2_shifted(float* x, int n, float shift) {                                    \
    return exp2_shifted_impl<W>(x, n, shift);                                                  \
  }                                                                                            \
  TARGET float max_value(const float* x, int n) { return max_value_impl(x, n); }               \
  TARGET void scale(float* dst, int n, float factor) { scale_impl(dst, n, factor); }           \
  template <typename T>                                                                        \
  TARGET void load(const T* src, int n, float* dst) { convert_row(src, n, dst); }              \
  template <typename T>                                                                        \
  TARGET void store(const float* src, int n, float factor, T* dst) {                           \
    store_row_impl(src, n, factor, dst);                                                       \
  }                                                                                            \
  const VecKernels table = {#ISA, dot_f32, dot_16<c10::Half>, dot_16<c10::BFloat16>, acc_f32, \
                            acc_16<c10::Half>, acc_16<c10::BFloat16>, scatter, exp2_shifted,    \
                            max_value, scale, load<c10::Half>, load<c10::BFloat16>,            \
                            store<float>, store<c10::Half>, store<c10::BFloat16>};             \
  }

#if defined(__GNUC__) && defined(__x86_64__)
#define GAZE_X86_LEVELS 1
GAZE_DEFINE_VEC_KERNELS(baseline, , 4)
GAZE_DEFINE_VEC_KERNELS(avx2, __attribute__((target("avx2,fma,f16c,bmi,bmi2,lzcnt,movbe"))), 8)
GAZE_DEFINE_VEC_KERNELS(avx512, __attribute__((target(
    "avx512f,avx512bw,avx512cd,avx512dq,avx512vl,avx2,fma,f16c,bmi,bmi2,lzcnt,movbe"))), 16)
#else
GAZE_DEFINE_VEC_KERNELS(baseline, , 4)
#endif

const VecKernels& pick_kernels() {
  const char* env = std::getenv("GAZE_CPU_ISA");
  const std::string want = env ? env : "";
#ifdef GAZE_X86_LEVELS
  __builtin_cpu_init();
  const bool has_avx2 = __builtin_cpu_supports("avx2") && __builtin_cpu_supports("fma") &&
                        __builtin_cpu_supports("f16c") && __builtin_cpu_supports("bmi2");
  const bool has_avx512 = has_avx2 && __builtin_cpu_supports("avx512f") &&
                          __builtin_cpu_supports("avx512bw") &&
                          __builtin_cpu_supports("avx512dq") && __builtin_cpu_supports("avx512vl");
  if (want != "baseline" && want != "avx2" && has_avx512) return avx512::table;
  if (want != "baseline" && has_avx2) return avx2::table;
#endif
  return baseline::table;
}

const VecKernels& kernels() {
  static const VecKernels& chosen = pick_kernels();
  return chosen;
}

}  // namespace

const char* simd_level() { return kernels().name; }

void dot_rows(const float* Q, int G, const float* const* rows, int n, int D, float* dst,
              int ds) {
  kernels().dot_f32(Q, G, rows, n, D, dst, ds);
}
void dot_rows(const float* Q, int G, const c10::Half* const* rows, int n, int D, float* dst,
              int ds, float* scratch) {
  kernels().dot_f16(Q, G, rows, n, D, dst, ds, scratch);
}
void dot_rows(const float* Q, int G, const c10::BFloat16* const* rows, int n, int D,
              float* dst, int ds, float* scratch) {
  kernels().dot_bf16(Q, G, rows, n, D, dst, ds, scratch);
}
void accumulate_rows(const float* Wt, int ws, int G, const float* const* rows, int n, int D,
                     float* acc) {
  kernels().acc_f32(Wt, ws, G, rows, n, D, acc);
}
void accumulate_rows(const float* Wt, int ws, int G, const c10::Half* const* rows, int n,
                     int D, float* acc, float* scratch) {
  kernels().acc_f16(Wt, ws, G, rows, n, D, acc, scratch);
}
void accumulate_rows(const float* Wt, int ws, int G, const c10::BFloat16* const* rows, int n,
                     int D, float* acc, float* scratch) {
  kernels().acc_bf16(Wt, ws, G, rows, n, D, acc, scratch);
}
void scatter_rows(const float* Wt, int ws, int G, const float* vecs, float* const* rows, int n,
                  int D) {
  kernels().scatter(Wt, ws, G, vecs, rows, n, D);
}
float exp2_shifted(float* x, int n, float shift) { return kernels().exp2_shifted(x, n, shift); }
float max_value(const float* x, int n) { return kernels().max_value(x, n); }
void scale(float* dst, int n, float factor) { kernels().scale(dst, n, factor); }
void load_row(const c10::Half* src, int n, float* dst) { kernels().load_f16(src, n, dst); }
void load_row(const c10::BFloat16* src, int n, float* dst) { kernels().load_bf16(src, n, dst); }
void store_row(const float* src, int n, float factor, float* dst) {
  kernels().store_f32(src, n, factor, dst);
}
void store_row(const float* src, int n, float factor, c10::Half* dst) {
  kernels().store_f16(src, n, factor, dst);
}
void store_row(const float* src, int n, float factor, c10::BFloat16* dst) {
  kernels().store_bf16(src, n, factor, dst);
}

// float64 (CPU only, for gradcheck): plain loops, one target.
void dot_rows(const double* Q, int G, const double* const* rows, int n, int D, double* dst,
              int ds) {
  for (int g = 0; g < G; ++g) {
    for (int j = 0; j < n; ++j) {
      double s = 0;
      for (int d = 0; d < D; ++d) s += Q[int64_t(g) * D + d] * rows[j][d];
      dst[g * ds + j] = s;
    }
  }
}

void accumulate_rows(const double* Wt, int ws, int G, const double* const* rows, int n, int D,
                     double* acc) {
  for (int g = 0; g < G; ++g) {
    for (int j = 0; j < n; ++j) {
      for (int d = 0; d < D; ++d) acc[int64_t(g) * D + d] += Wt[g * ws + j] * rows[j][d];
    }
  }
}

void scatter_rows(const double* Wt, int ws, int G, const double* vecs, double* const* rows,
                  int n, int D) {
  scatter_rows_impl(Wt, ws, G, vecs, rows, n, D);
}

double exp2_shifted(double* x, int n, double shift) {
  double sum = 0;
  for (int j = 0; j < n; ++j) {
    x[j] = std::exp2(x[j] - shift);
    sum += x[j];
  }
  return sum;
}

double max_value(const double* x, int n) {
  double m = -__builtin_inf();
  for (int j = 0; j < n; ++j) m = x[j] > m ? x[j] : m;
  return m;
}

void scale(double* dst, int n, double factor) {
  for (int j = 0; j < n; ++j) dst[j] *= factor;
}

}  // namespace gaze::cpu
