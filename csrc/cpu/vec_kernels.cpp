// Inner loops of the CPU kernels on GCC vector types. On x86-64 each is built
// three times: 16-lane vectors with AVX-512, 8 lanes with AVX2+FMA+F16C, 4 for
// the baseline; the widest the CPU supports is picked once, at first use.
// Other architectures build the 4-lane version alone.
#include "vec_kernels.h"

#include <cmath>
#include <cstdlib>
#include <cstring>
#include <string>
#include <type_traits>

#if defined(__GNUC__) && defined(__x86_64__)
#define GAZE_X86_LEVELS 1
// GCC 12's AVX-512 conversion intrinsics start from an "undefined" register
// (`__m512i __Y = __Y;`), which -Wmaybe-uninitialized reports, once per inlining,
// inside the header: a false positive that filled the build log.
#pragma GCC diagnostic push
#pragma GCC diagnostic ignored "-Wmaybe-uninitialized"
#include <immintrin.h>
#pragma GCC diagnostic pop
#endif

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
  typedef uint16_t u16 __attribute__((vector_size(8)));
};
template <>
struct Vec<8> {
  typedef float f __attribute__((vector_size(32)));
  typedef int32_t i __attribute__((vector_size(32)));
  typedef uint16_t u16 __attribute__((vector_size(16)));
};
template <>
struct Vec<16> {
  typedef float f __attribute__((vector_size(64)));
  typedef int32_t i __attribute__((vector_size(64)));
  typedef uint16_t u16 __attribute__((vector_size(32)));
};
template <int W>
using vf = typename Vec<W>::f;
template <int W>
using vi = typename Vec<W>::i;
template <int W>
using vu16 = typename Vec<W>::u16;  // the bits of W 16-bit elements

// ----------------------------------------------------------------------------
// One table of kernels per instruction set, picked once at first use from the
// CPU's features; GAZE_CPU_ISA=baseline|avx2 asks for a lower one (the tests
// run every table that way).
// ----------------------------------------------------------------------------
struct VecKernels {
  const char* name;
  void (*dot_f32)(const float*, int, const float* const*, int, int, float*, int);
  void (*dot_f16)(const float*, int, const c10::Half* const*, int, int, float*, int);
  void (*dot_bf16)(const float*, int, const c10::BFloat16* const*, int, int, float*, int);
  void (*acc_f32)(const float*, int, int, const float* const*, int, int, float*);
  void (*acc_f16)(const float*, int, int, const c10::Half* const*, int, int, float*);
  void (*acc_bf16)(const float*, int, int, const c10::BFloat16* const*, int, int, float*);
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

#ifdef GAZE_X86_LEVELS
namespace avx512 {
#pragma GCC push_options
#pragma GCC target("avx512f,avx512bw,avx512cd,avx512dq,avx512vl,avx2,fma,f16c,bmi,bmi2,lzcnt,movbe")
constexpr int kWidth = 16;
constexpr const char* kName = "avx512";
#include "vec_kernels_isa.inc"
#pragma GCC pop_options
}  // namespace avx512
namespace avx2 {
#pragma GCC push_options
#pragma GCC target("avx2,fma,f16c,bmi,bmi2,lzcnt,movbe")
constexpr int kWidth = 8;
constexpr const char* kName = "avx2";
#include "vec_kernels_isa.inc"
#pragma GCC pop_options
}  // namespace avx2
#endif
namespace baseline {
constexpr int kWidth = 4;
constexpr const char* kName = "baseline";
#include "vec_kernels_isa.inc"
}  // namespace baseline

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
              int ds) {
  kernels().dot_f16(Q, G, rows, n, D, dst, ds);
}
void dot_rows(const float* Q, int G, const c10::BFloat16* const* rows, int n, int D,
              float* dst, int ds) {
  kernels().dot_bf16(Q, G, rows, n, D, dst, ds);
}
void accumulate_rows(const float* Wt, int ws, int G, const float* const* rows, int n, int D,
                     float* acc) {
  kernels().acc_f32(Wt, ws, G, rows, n, D, acc);
}
void accumulate_rows(const float* Wt, int ws, int G, const c10::Half* const* rows, int n,
                     int D, float* acc) {
  kernels().acc_f16(Wt, ws, G, rows, n, D, acc);
}
void accumulate_rows(const float* Wt, int ws, int G, const c10::BFloat16* const* rows, int n,
                     int D, float* acc) {
  kernels().acc_bf16(Wt, ws, G, rows, n, D, acc);
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
  for (int j = 0; j < n; ++j) {
    for (int g = 0; g < G; ++g) {
      for (int d = 0; d < D; ++d) rows[j][d] += Wt[g * ws + j] * vecs[int64_t(g) * D + d];
    }
  }
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
