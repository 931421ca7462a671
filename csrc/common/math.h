// Arithmetic shared by the CPU and CUDA kernels: selection order, online softmax,
// log-sum-exp merging. Everything here compiles for host and device, so the CPU
// tests exercise the same rules the GPU runs.
#pragma once

#include <cmath>
#include <cstdint>
#include <limits>

#if defined(__CUDACC__) || defined(__HIPCC__)
#define GAZE_HD __host__ __device__ __forceinline__
#else
#define GAZE_HD inline
#endif

namespace gaze {

constexpr float kLog2e = 1.4426950408889634f;

// log2(e) in the working precision (float64 kernels must not see a float-rounded one).
template <typename T>
GAZE_HD constexpr T log2e() {
  return T(1.4426950408889634);
}
constexpr float kNegInf = -std::numeric_limits<float>::infinity();

GAZE_HD uint32_t float_bits(float x) {
#if defined(__CUDA_ARCH__)
  return __float_as_uint(x);
#else
  uint32_t u;
  __builtin_memcpy(&u, &x, sizeof(u));
  return u;
#endif
}

GAZE_HD float exp2_approx(float x) {
#if defined(__CUDA_ARCH__)
  return exp2f(x);
#else
  return std::exp2(x);
#endif
}

// float64 runs on the CPU only (for gradcheck); it keeps float64 throughout.
GAZE_HD double exp2_approx(double x) { return exp2(x); }

GAZE_HD float log2_approx(float x) {
#if defined(__CUDA_ARCH__)
  return log2f(x);
#else
  return std::log2(x);
#endif
}

GAZE_HD double log2_approx(double x) { return log2(x); }

// ---------------------------------------------------------------------------
// Top-k order: descending score, ties to the lower region index, NaN last.
// The 64-bit key is larger for the better region and unique per region, so
// any selection algorithm (sort, nth_element, radix select) yields the same set
// in the same order.
// ---------------------------------------------------------------------------

// Monotone map float -> uint32 (larger float, larger key). -0 and +0 map to one
// key (they tie); NaN maps to 1, below -inf (0x007FFFFF). 0 is never a score's
// key: the GPU selection uses it for "not selectable".
GAZE_HD uint32_t score_order_key(float score) {
  if (score != score) return 1u;
  uint32_t u = float_bits(score == 0.0f ? 0.0f : score);
  return (u & 0x80000000u) ? ~u : (u | 0x80000000u);
}

// Inverse of score_order_key (NaN for the NaN key).
GAZE_HD float score_from_order_key(uint32_t key) {
  const uint32_t u = (key & 0x80000000u) ? (key ^ 0x80000000u) : ~key;
  float f;
#if defined(__CUDA_ARCH__)
  f = __uint_as_float(u);
#else
  __builtin_memcpy(&f, &u, sizeof(f));
#endif
  return key == 1u ? std::numeric_limits<float>::quiet_NaN() : f;
}

GAZE_HD uint64_t selection_key(float score, int32_t region) {
  return (static_cast<uint64_t>(score_order_key(score)) << 32) |
         static_cast<uint64_t>(0xFFFFFFFFu - static_cast<uint32_t>(region));
}

GAZE_HD int32_t region_of_selection_key(uint64_t key) {
  return static_cast<int32_t>(0xFFFFFFFFu - static_cast<uint32_t>(key & 0xFFFFFFFFu));
}

// ---------------------------------------------------------------------------
// Online softmax in base 2: scores are pre-multiplied by scale * log2(e), so
// p = 2^(s - max). `max` is -inf until a finite score arrives.
// ---------------------------------------------------------------------------

// Factor that rescales a running sum from old_max to new_max (new_max >= old_max).
template <typename T>
GAZE_HD T softmax_rescale(T old_max, T new_max) {
  return old_max == new_max ? T(1) : exp2_approx(old_max - new_max);
}

// The max to subtract from scores: 0 while nothing finite was seen, so that
// 2^(-inf - max) gives 0 instead of NaN.
template <typename T>
GAZE_HD T softmax_safe_max(T running_max) {
  return running_max == -std::numeric_limits<T>::infinity() ? T(0) : running_max;
}

// Natural-log log-sum-exp from a base-2 running (max, sum); -inf for no keys. A NaN sum (a
// NaN or +inf score) gives NaN, as in SDPA, not the -inf that would tell the backward the
// row saw no key and hide the NaN from its gradients.
template <typename T>
GAZE_HD T softmax_lse(T max2, T sum) {
  if (sum == T(0)) return -std::numeric_limits<T>::infinity();
  return (max2 + log2_approx(sum)) * T(0.6931471805599453);
}

// 1 / sum; 0 for no keys (the output row is then 0), NaN for a NaN sum.
template <typename T>
GAZE_HD T softmax_normalizer(T sum) {
  return sum != T(0) ? T(1) / sum : T(0);
}

// Weight of one split's partial (max, sum, accumulator) when the splits of a key list are
// merged: 2^(split_max - safe_max), where safe_max is softmax_safe_max of the largest split
// max; 0 for a split that saw no key.
template <typename T>
GAZE_HD T softmax_split_weight(T split_max, T safe_max) {
  return exp2_approx(split_max - safe_max);
}

// ---------------------------------------------------------------------------
// Region descriptors.
// ---------------------------------------------------------------------------

// Multiplier turning a region's key sum into its mean; 0 for an empty region.
template <typename T>
GAZE_HD T region_mean_scale(int32_t num_tokens) {
  return num_tokens > 0 ? T(1) / static_cast<T>(num_tokens) : T(0);
}

}  // namespace gaze
