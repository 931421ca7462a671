// dtype dispatch: calls body(scalar_t{}) with the element type of the tensor.
// float64 is a CPU-only extension (gradcheck); the CUDA kernels instantiate
// the three dtypes of the contract alone.
#pragma once

#include <c10/core/ScalarType.h>
#include <c10/util/BFloat16.h>
#include <c10/util/Exception.h>
#include <c10/util/Half.h>

namespace gaze {

template <typename Body>
void dispatch_float_types(c10::ScalarType dtype, const char* op, Body&& body) {
  switch (dtype) {
    case c10::ScalarType::Float: body(float{}); break;
    case c10::ScalarType::Half: body(c10::Half{}); break;
    case c10::ScalarType::BFloat16: body(c10::BFloat16{}); break;
    default: TORCH_CHECK(false, "gaze.", op, ": unsupported dtype ", dtype);
  }
}

template <typename Body>
void dispatch_cpu_float_types(c10::ScalarType dtype, const char* op, Body&& body) {
  if (dtype == c10::ScalarType::Double) {
    body(double{});
  } else {
    dispatch_float_types(dtype, op, body);
  }
}

}  // namespace gaze
