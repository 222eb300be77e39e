// The element types the kernels here implement, chosen from an XLA FFI buffer's type in one place.
#ifndef MOBILENET_JAX_KERNELS_DTYPES_H_
#define MOBILENET_JAX_KERNELS_DTYPES_H_

#include <string>

#include "xla/ffi/api/ffi.h"

namespace mobilenet_jax {

// Calls run(T{}) with T = float for F32 and double for F64, then returns success; any other type is
// an InvalidArgument error "<what>: only float32 and float64 are implemented".
template <typename Run>
inline xla::ffi::Error ForFloatType(xla::ffi::DataType type, const char* what, Run&& run) {
  switch (type) {
    case xla::ffi::DataType::F32:
      run(float{});
      return xla::ffi::Error::Success();
    case xla::ffi::DataType::F64:
      run(double{});
      return xla::ffi::Error::Success();
    default:
      return xla::ffi::Error::InvalidArgument(std::string(what) + ": only float32 and float64 are implemented");
  }
}

}  // namespace mobilenet_jax

#endif  // MOBILENET_JAX_KERNELS_DTYPES_H_
