// Per-channel sums for BatchNorm on CPU, as an XLA FFI custom call:
//   mobilenet_channel_sums(a, b, center) -> (sum a, sum a * (b - center))
// per channel (the last axis), over every other axis. BatchNorm's forward statistics are
// (sum x, sum x^2) = channel_sums(x, x, 0); its backward needs (sum dy, sum dy * (x - mean)) =
// channel_sums(dy, x, mean). Both are one pass over the activation(s), where
// XLA:CPU runs two column reductions (and, in the backward, materialises dy * x first).
//
// Rows are split into a fixed number of chunks spread over XLA's intra-op thread pool; each
// chunk accumulates 128 rows at a time in the input's precision (in registers, a channel block at a time),
// then into double; the chunks' double sums are added in order, so the result does not depend
// on the thread count or timing.

#include <algorithm>
#include <cstdint>
#include <vector>

#include "dtypes.h"
#include "parallel.h"
#include "vec.h"
#include "xla/ffi/api/ffi.h"

namespace ffi = xla::ffi;

namespace {

using mobilenet_jax::ForChannelBlocks;
using mobilenet_jax::ForFloatType;
using mobilenet_jax::ParallelFor;

constexpr int64_t kChunks = 32;    // fixed: the summation order is the same on every machine
constexpr int64_t kRowBlock = 128;  // rows summed in T before they are added in double

// One chunk's sums over rows [begin, end) of a (rows, channels) pair: blocks of kRowBlock rows summed
// in T, then added in double. The rows are read in order, four at a time: for each channel block (a
// GCC vector), the block's running sums are loaded, the four rows added, and stored back.
// kMasked: a[r, c] counts only where 0 < y = (b[r, c] - center[c]) * mul[c] + bias[c] < upper
// (the mask of a ReLU/ReLU6 of y).
template <typename T, bool kMasked>
void SumRows(const T* a, const T* b, const T* center, const T* mul, const T* bias, T upper, int64_t channels,
             int64_t begin, int64_t end, double* sum_a, double* sum_ab) {
  std::vector<T> block_a(channels), block_ab(channels);
  for (int64_t start = begin; start < end; start += kRowBlock) {
    const int64_t stop = std::min(end, start + kRowBlock);
    std::fill(block_a.begin(), block_a.end(), T(0));
    std::fill(block_ab.begin(), block_ab.end(), T(0));
    for (int64_t row = start; row < stop; row += 4) {
      const int64_t count = std::min<int64_t>(4, stop - row);
      ForChannelBlocks<T>(channels, [&](auto vec, int64_t c) {
        using V = decltype(vec);
        using Type = typename V::type;
        const Type zero = {}, ce = V::Load(center + c);
        Type acc_a = V::Load(block_a.data() + c), acc_ab = V::Load(block_ab.data() + c);
        for (int64_t r = 0; r < count; ++r) {
          Type av = V::Load(a + (row + r) * channels + c);
          const Type centered = V::Load(b + (row + r) * channels + c) - ce;
          if constexpr (kMasked) {
            const Type y = centered * V::Load(mul + c) + V::Load(bias + c);
            av = (y > zero) & (y < zero + upper) ? av : zero;
          }
          acc_a += av;
          acc_ab += av * centered;
        }
        V::Store(block_a.data() + c, acc_a);
        V::Store(block_ab.data() + c, acc_ab);
      });
    }
    for (int64_t c = 0; c < channels; ++c) {
      sum_a[c] += block_a[c];
      sum_ab[c] += block_ab[c];
    }
  }
}

// Sums over rows in kChunks fixed chunks: rows(first, last, sum_a, sum_ab) adds one chunk's.
template <typename T, typename Rows>
void ChunkedSums(ffi::ThreadPool& pool, Rows rows_fn, T* out_a, T* out_ab, int64_t rows, int64_t channels) {
  const int64_t grain = std::max<int64_t>(1, (rows + kChunks - 1) / kChunks);
  const int64_t chunks = (rows + grain - 1) / grain;
  std::vector<double> partial(2 * chunks * channels, 0.0);
  ParallelFor(pool, chunks, 1, [&](int64_t first, int64_t last) {
    for (int64_t chunk = first; chunk < last; ++chunk) {
      double* sums = partial.data() + 2 * chunk * channels;
      rows_fn(chunk * grain, std::min(rows, (chunk + 1) * grain), sums, sums + channels);
    }
  });
  for (int64_t c = 0; c < channels; ++c) {
    double total_a = 0, total_ab = 0;
    for (int64_t chunk = 0; chunk < chunks; ++chunk) {
      total_a += partial[2 * chunk * channels + c];
      total_ab += partial[(2 * chunk + 1) * channels + c];
    }
    out_a[c] = static_cast<T>(total_a);
    out_ab[c] = static_cast<T>(total_ab);
  }
}

template <typename T>
void ChannelSums(ffi::ThreadPool& pool, const T* a, const T* b, const T* center, T* out_a, T* out_ab, int64_t rows,
                 int64_t channels) {
  ChunkedSums(
      pool,
      [&](int64_t first, int64_t last, double* sa, double* sab) {
        SumRows<T, false>(a, b, center, nullptr, nullptr, T(0), channels, first, last, sa, sab);
      },
      out_a, out_ab, rows, channels);
}

template <typename T>
void MaskedChannelSums(ffi::ThreadPool& pool, const T* a, const T* b, const T* center, const T* mul, const T* bias,
                       T upper, T* out_a, T* out_ab, int64_t rows, int64_t channels) {
  ChunkedSums(
      pool,
      [&](int64_t first, int64_t last, double* sa, double* sab) {
        SumRows<T, true>(a, b, center, mul, bias, upper, channels, first, last, sa, sab);
      },
      out_a, out_ab, rows, channels);
}

ffi::Error ChannelSumsImpl(ffi::ThreadPool pool, ffi::AnyBuffer a, ffi::AnyBuffer b, ffi::AnyBuffer center,
                           ffi::Result<ffi::AnyBuffer> sum_a,
                           ffi::Result<ffi::AnyBuffer> sum_ab) {
  auto dims = a.dimensions();
  auto b_dims = b.dimensions();
  if (dims.size() < 1 || b_dims.size() != dims.size() || !std::equal(dims.begin(), dims.end(), b_dims.begin()))
    return ffi::Error::InvalidArgument("channel_sums: a and b must have the same shape, channels last");
  const int64_t channels = dims[dims.size() - 1];
  if (a.element_type() != b.element_type() || a.element_type() != center.element_type())
    return ffi::Error::InvalidArgument("channel_sums: a, b and center dtypes differ");
  if (center.dimensions().size() != 1 || center.dimensions()[0] != channels)
    return ffi::Error::InvalidArgument("channel_sums: center must be one value per channel");
  const int64_t rows = channels == 0 ? 0 : static_cast<int64_t>(a.element_count()) / channels;
  return ForFloatType(a.element_type(), "channel_sums", [&](auto zero) {
    using T = decltype(zero);
    ChannelSums(pool, a.typed_data<T>(), b.typed_data<T>(), center.typed_data<T>(), sum_a->typed_data<T>(),
                sum_ab->typed_data<T>(), rows, channels);
  });
}

ffi::Error MaskedChannelSumsImpl(ffi::ThreadPool pool, ffi::AnyBuffer a, ffi::AnyBuffer b, ffi::AnyBuffer center,
                                 ffi::AnyBuffer mul, ffi::AnyBuffer bias, ffi::Result<ffi::AnyBuffer> sum_a,
                                 ffi::Result<ffi::AnyBuffer> sum_ab, double upper) {
  auto dims = a.dimensions();
  auto b_dims = b.dimensions();
  if (dims.size() < 1 || b_dims.size() != dims.size() || !std::equal(dims.begin(), dims.end(), b_dims.begin()))
    return ffi::Error::InvalidArgument("masked_channel_sums: a and b must have the same shape, channels last");
  const int64_t channels = dims[dims.size() - 1];
  for (const ffi::AnyBuffer* v : {&center, &mul, &bias}) {
    if (v->element_type() != a.element_type() || v->dimensions().size() != 1 || v->dimensions()[0] != channels)
      return ffi::Error::InvalidArgument("masked_channel_sums: center, mul and bias must be one value per channel");
  }
  if (a.element_type() != b.element_type()) return ffi::Error::InvalidArgument("masked_channel_sums: dtypes differ");
  const int64_t rows = channels == 0 ? 0 : static_cast<int64_t>(a.element_count()) / channels;
  return ForFloatType(a.element_type(), "masked_channel_sums", [&](auto zero) {
    using T = decltype(zero);
    MaskedChannelSums(pool, a.typed_data<T>(), b.typed_data<T>(), center.typed_data<T>(), mul.typed_data<T>(),
                      bias.typed_data<T>(), static_cast<T>(upper), sum_a->typed_data<T>(), sum_ab->typed_data<T>(),
                      rows, channels);
  });
}

}  // namespace

XLA_FFI_DEFINE_HANDLER_SYMBOL(MobilenetChannelSums, ChannelSumsImpl,
                              ffi::Ffi::Bind()
                                  .Ctx<ffi::ThreadPool>()
                                  .Arg<ffi::AnyBuffer>()
                                  .Arg<ffi::AnyBuffer>()
                                  .Arg<ffi::AnyBuffer>()
                                  .Ret<ffi::AnyBuffer>()
                                  .Ret<ffi::AnyBuffer>());

XLA_FFI_DEFINE_HANDLER_SYMBOL(MobilenetMaskedChannelSums, MaskedChannelSumsImpl,
                              ffi::Ffi::Bind()
                                  .Ctx<ffi::ThreadPool>()
                                  .Arg<ffi::AnyBuffer>()
                                  .Arg<ffi::AnyBuffer>()
                                  .Arg<ffi::AnyBuffer>()
                                  .Arg<ffi::AnyBuffer>()
                                  .Arg<ffi::AnyBuffer>()
                                  .Ret<ffi::AnyBuffer>()
                                  .Ret<ffi::AnyBuffer>()
                                  .Attr<double>("upper"));
