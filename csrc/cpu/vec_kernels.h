// SIMD building blocks of the CPU kernels. Each is compiled for several x86-64
// levels (AVX-512, AVX2+FMA+F16C, baseline) and picked at first use, so one
// build runs everywhere and uses the widest vectors the machine has.
#pragma once

#include <c10/util/BFloat16.h>
#include <c10/util/Half.h>

#include <cstdint>

namespace gaze::cpu {

// The instruction set of the kernels in use: "avx512", "avx2" or "baseline".
const char* simd_level();

// Rows of a block are gathered through pointers: keys at arbitrary positions.
// dst[g * dst_stride + j] = dot(queries[g], rows[j]) for g < G, j < n.
// queries: [G, D] float32 contiguous. 16-bit rows are converted in registers.
void dot_rows(const float* queries, int G, const float* const* rows, int n, int D, float* dst,
              int dst_stride);
void dot_rows(const float* queries, int G, const c10::Half* const* rows, int n, int D,
              float* dst, int dst_stride);
void dot_rows(const float* queries, int G, const c10::BFloat16* const* rows, int n, int D,
              float* dst, int dst_stride);

// acc[g] += sum_j weights[g * w_stride + j] * rows[j] for g < G. acc: [G, D] float32.
void accumulate_rows(const float* weights, int w_stride, int G, const float* const* rows, int n,
                     int D, float* acc);
void accumulate_rows(const float* weights, int w_stride, int G, const c10::Half* const* rows,
                     int n, int D, float* acc);
void accumulate_rows(const float* weights, int w_stride, int G,
                     const c10::BFloat16* const* rows, int n, int D, float* acc);

// rows[j] += sum_g weights[g * w_stride + j] * vecs[g] for j < n: the scatter of
// a backward pass. vecs: [G, D] float32; rows: float32 accumulators.
void scatter_rows(const float* weights, int w_stride, int G, const float* vecs,
                  float* const* rows, int n, int D);

// float64 (CPU only, for gradcheck): the same operations in float64.
void dot_rows(const double* queries, int G, const double* const* rows, int n, int D,
              double* dst, int dst_stride);
void accumulate_rows(const double* weights, int w_stride, int G, const double* const* rows,
                     int n, int D, double* acc);
void scatter_rows(const double* weights, int w_stride, int G, const double* vecs,
                  double* const* rows, int n, int D);
double exp2_shifted(double* x, int n, double shift);
void scale(double* dst, int n, double factor);

// x[j] = 2^(x[j] - shift); returns the sum of the results.
float exp2_shifted(float* x, int n, float shift);

// dst[j] *= factor
void scale(float* dst, int n, float factor);

// max_j x[j] (-inf for n = 0; NaN entries are passed over)
float max_value(const float* x, int n);
double max_value(const double* x, int n);

// dst[j] = src[j] converted to the accumulation type.
void load_row(const c10::Half* src, int n, float* dst);
void load_row(const c10::BFloat16* src, int n, float* dst);
inline void load_row(const float* src, int n, float* dst) {
  for (int j = 0; j < n; ++j) dst[j] = src[j];
}
inline void load_row(const double* src, int n, double* dst) {
  for (int j = 0; j < n; ++j) dst[j] = src[j];
}

// dst[j] = src[j] * factor, rounded to the destination type.
void store_row(const float* src, int n, float factor, float* dst);
void store_row(const float* src, int n, float factor, c10::Half* dst);
void store_row(const float* src, int n, float factor, c10::BFloat16* dst);
inline void store_row(const double* src, int n, double factor, double* dst) {
  for (int j = 0; j < n; ++j) dst[j] = src[j] * factor;
}

// Accumulation type of an element type: float64 for float64, float32 otherwise.
template <typename T>
struct AccType {
  using type = float;
};
template <>
struct AccType<double> {
  using type = double;
};
template <typename T>
using acc_t = typename AccType<T>::type;

}  // namespace gaze::cpu
