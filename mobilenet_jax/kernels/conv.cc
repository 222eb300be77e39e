// Dense k x k convolution with few input channels (a network's stem: 3x3, stride 2, RGB in) on CPU,
// NHWC input, HWIO kernel, as XLA FFI custom calls:
//   mobilenet_conv_forward          y[n, oh, ow, o] = sum_{i, j, c} x[n, oh*s + i - top, ow*s + j - left, c] * w[i, j, c, o]
//   mobilenet_conv_kernel_gradient  dw[i, j, c, o]  = sum_{n, oh, ow} x[n, oh*s + i - top, ow*s + j - left, c] * dy[n, oh, ow, o]
// Zero padding `top`/`left` before the image (the output size, from the result's shape, sets the rest).
//
// XLA runs this layer as a matrix product over k*k*C patches that it writes out in full (at 224 px,
// batch 32: 43 MB for the stem, more than its output) and, for the kernel gradient, transposes
// again. Here each pixel's taps are read where they are (a local copy with zeros only at the
// border): the forward pass accumulates a block of output channels over the taps for 4 pixels at
// once, the kernel gradient keeps a block of taps x output channels in registers over a chunk of
// rows. The input gradient is left to XLA (it is not needed for an image input, and XLA drops it then).

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
using mobilenet_jax::Vec;

struct ConvGeometry {
  int64_t batch, height, width, in_channels, k, out_channels, out_h, out_w, stride, top, left;
  int64_t taps() const { return k * k * in_channels; }
};

constexpr int64_t kMaxTaps = 64;   // the Python side sends at most conv.MAX_TAPS

// The k*k*C input values of output pixel (n, oh, ow) in tap order t = (i * k + j) * C + c, with zeros
// outside the image, copied to dst: per kernel row one contiguous run of k*C values where the window
// lies inside the image's width.
template <typename T>
void CopyPatch(const T* x, const ConvGeometry& g, int64_t n, int64_t oh, int64_t ow, T* dst) {
  const int64_t C = g.in_channels, k = g.k, run = k * C;
  const int64_t ih0 = oh * g.stride - g.top, iw0 = ow * g.stride - g.left;
  const T* image = x + n * g.height * g.width * C;
  const bool columns_inside = iw0 >= 0 && iw0 + k <= g.width;
  for (int64_t i = 0; i < k; ++i) {
    const int64_t ih = ih0 + i;
    T* out = dst + i * run;
    if (ih < 0 || ih >= g.height) {
      for (int64_t m = 0; m < run; ++m) out[m] = T(0);
    } else if (columns_inside) {
      const T* in = image + (ih * g.width + iw0) * C;
      for (int64_t m = 0; m < run; ++m) out[m] = in[m];
    } else {
      for (int64_t j = 0; j < k; ++j) {
        const int64_t iw = iw0 + j;
        const bool in = iw >= 0 && iw < g.width;
        for (int64_t c = 0; c < C; ++c) out[j * C + c] = in ? image[(ih * g.width + iw) * C + c] : T(0);
      }
    }
  }
}

// Output pixels per forward register block: one accumulator register per pixel and channel block,
// with the weight vector and the broadcast value beside them (12 + 2 of 16 ymm, 24 + 2 of 32 zmm).
constexpr int64_t kPixels = mobilenet_jax::kBlockBytes == 64 ? 24 : 12;

// The forward pass of pixels [ow, ow + pixels) of one output row is a small matrix product of their
// patches and the kernel. Pixel q's value of tap (i, m), m < k * C, is at rows[i] + q * step + m: in
// the image itself when the block's windows lie inside it (step = stride * C), else in `patch`
// (copied, zeros outside the image and past the row's end; step = kMaxTaps).
template <typename T>
void ForwardBlock(const T* x, const T* w, T* y_row, const ConvGeometry& g, int64_t n, int64_t oh, int64_t ow,
                  int64_t pixels, T* patch) {
  const int64_t C = g.in_channels, k = g.k, run = k * C, O = g.out_channels;
  const int64_t ih0 = oh * g.stride - g.top, iw0 = ow * g.stride - g.left;
  const T* rows[kMaxTaps];
  int64_t step;
  if (pixels == kPixels && ih0 >= 0 && ih0 + k <= g.height && iw0 >= 0 &&
      iw0 + (kPixels - 1) * g.stride + k <= g.width) {
    step = g.stride * C;
    for (int64_t i = 0; i < k; ++i) rows[i] = x + ((n * g.height + ih0 + i) * g.width + iw0) * C;
  } else {
    step = kMaxTaps;
    for (int64_t q = 0; q < kPixels; ++q) {
      if (q < pixels) {
        CopyPatch<T>(x, g, n, oh, ow + q, patch + q * kMaxTaps);
      } else {
        for (int64_t t = 0; t < g.taps(); ++t) patch[q * kMaxTaps + t] = T(0);
      }
    }
    for (int64_t i = 0; i < k; ++i) rows[i] = patch + i * run;
  }
  ForChannelBlocks<T>(O, [&](auto vec, int64_t o) {
    using V = decltype(vec);
    typename V::type acc[kPixels] = {};
    for (int64_t i = 0; i < k; ++i) {
      for (int64_t m = 0; m < run; ++m) {
        const typename V::type wv = V::Load(w + (i * run + m) * O + o);
        const T* p = rows[i] + m;
        MOBILENET_UNROLL for (int64_t q = 0; q < kPixels; ++q) acc[q] += p[q * step] * wv;
      }
    }
    for (int64_t q = 0; q < pixels; ++q) V::Store(y_row + (ow + q) * O + o, acc[q]);
  });
}

template <typename T>
void ForwardRows(const T* x, const T* w, T* y, const ConvGeometry& g, int64_t begin, int64_t end) {
  alignas(64) T patch[kPixels * kMaxTaps];
  for (int64_t row = begin; row < end; ++row) {
    const int64_t n = row / g.out_h, oh = row % g.out_h;
    T* y_row = y + row * g.out_w * g.out_channels;
    for (int64_t ow = 0; ow < g.out_w; ow += kPixels)
      ForwardBlock<T>(x, w, y_row, g, n, oh, ow, std::min(kPixels, g.out_w - ow), patch);
  }
}

// Taps per kernel-gradient register block: one accumulator register per tap, with the output
// gradient vector and the broadcast value beside them (12 + 2 of 16 ymm, 28 + 2 of 32 zmm).
constexpr int64_t kTapBlock = mobilenet_jax::kBlockBytes == 64 ? 28 : 12;
constexpr int64_t kGradPixels = 32;  // pixels whose patches are copied out at once in the kernel gradient
// A pixel's patch in the kernel gradient: kMaxTaps rounded up to whole tap blocks, zeros past its taps.
constexpr int64_t kGradStride = (kMaxTaps + kTapBlock - 1) / kTapBlock * kTapBlock;

// Adds the kernel gradient of pixels [ow, ow + pixels) of one output row to dw_partial (taps x O): for
// each block of output channels and of taps, the accumulators stay in registers over the pixels.
template <typename T>
void KernelGradBlock(const T* x, const T* dy_row, T* dw_partial, const ConvGeometry& g, int64_t n, int64_t oh,
                     int64_t ow, int64_t pixels, T* patch) {
  const int64_t taps = g.taps(), O = g.out_channels;
  for (int64_t q = 0; q < pixels; ++q) CopyPatch<T>(x, g, n, oh, ow + q, patch + q * kGradStride);
  ForChannelBlocks<T>(O, [&](auto vec, int64_t o) {
    using V = decltype(vec);
    for (int64_t t0 = 0; t0 < taps; t0 += kTapBlock) {
      const int64_t count = std::min(kTapBlock, taps - t0);
      typename V::type acc[kTapBlock] = {};
      for (int64_t q = 0; q < pixels; ++q) {  // a short last block adds the patch's zeros past its taps
        const typename V::type d = V::Load(dy_row + (ow + q) * O + o);
        const T* p = patch + q * kGradStride + t0;
        MOBILENET_UNROLL for (int64_t t = 0; t < kTapBlock; ++t) acc[t] += p[t] * d;
      }
      for (int64_t t = 0; t < count; ++t) {
        T* out = dw_partial + (t0 + t) * O + o;
        V::Store(out, V::Load(out) + acc[t]);
      }
    }
  });
}

// Adds the kernel gradient of output rows [begin, end) to dw_partial (taps x O).
template <typename T>
void KernelGradRows(const T* x, const T* dy, T* dw_partial, const ConvGeometry& g, int64_t begin, int64_t end) {
  alignas(64) T patch[kGradPixels * kGradStride] = {};  // the zeros past each pixel's taps stay
  for (int64_t row = begin; row < end; ++row) {
    const int64_t n = row / g.out_h, oh = row % g.out_h;
    const T* dy_row = dy + row * g.out_w * g.out_channels;
    for (int64_t ow = 0; ow < g.out_w; ow += kGradPixels)
      KernelGradBlock<T>(x, dy_row, dw_partial, g, n, oh, ow, std::min(kGradPixels, g.out_w - ow), patch);
  }
}

ffi::Error CheckShapes(const ffi::AnyBuffer& x, const ffi::AnyBuffer& w, int64_t out_h, int64_t out_w, int64_t stride,
                       int64_t top, int64_t left, ConvGeometry* g) {
  auto xd = x.dimensions();
  auto wd = w.dimensions();
  if (xd.size() != 4 || wd.size() != 4 || wd[0] != wd[1] || wd[2] != xd[3])
    return ffi::Error::InvalidArgument("conv: x must be (N, H, W, C) and the kernel (k, k, C, O)");
  if (x.element_type() != w.element_type()) return ffi::Error::InvalidArgument("conv: x and kernel dtypes differ");
  if (stride < 1 || top < 0 || left < 0 || out_h < 1 || out_w < 1)
    return ffi::Error::InvalidArgument("conv: stride must be >= 1, padding >= 0 and the output non-empty");
  *g = ConvGeometry{xd[0], xd[1], xd[2], xd[3], wd[0], wd[3], out_h, out_w, stride, top, left};
  if ((out_h - 1) * stride - top >= g->height || (out_w - 1) * stride - left >= g->width)
    return ffi::Error::InvalidArgument("conv: the output is larger than the padded input allows");
  if (g->taps() > kMaxTaps) return ffi::Error::InvalidArgument("conv: k * k * C_in up to 64 is implemented");
  return ffi::Error::Success();
}

ffi::Error ForwardImpl(ffi::ThreadPool pool, ffi::AnyBuffer x, ffi::AnyBuffer w, ffi::Result<ffi::AnyBuffer> y,
                       int64_t stride, int64_t top, int64_t left) {
  auto yd = y->dimensions();
  ConvGeometry g;
  if (ffi::Error error = CheckShapes(x, w, yd[1], yd[2], stride, top, left, &g); error.failure()) return error;
  if (yd[0] != g.batch || yd[3] != g.out_channels)
    return ffi::Error::InvalidArgument("conv: the result must be (N, out_h, out_w, O)");
  return ForFloatType(x.element_type(), "conv", [&](auto zero) {
    using T = decltype(zero);
    const T* xs = x.typed_data<T>();
    const T* ws = w.typed_data<T>();
    T* ys = y->typed_data<T>();
    const int64_t grain = std::max<int64_t>(1, 16384 / std::max<int64_t>(1, g.out_w * g.out_channels));
    ParallelFor(pool, g.batch * g.out_h, grain, [&](int64_t b, int64_t e) { ForwardRows<T>(xs, ws, ys, g, b, e); });
  });
}

ffi::Error KernelGradientImpl(ffi::ThreadPool pool, ffi::AnyBuffer x, ffi::AnyBuffer w, ffi::AnyBuffer dy,
                              ffi::Result<ffi::AnyBuffer> dw, int64_t stride, int64_t top, int64_t left) {
  auto dyd = dy.dimensions();
  if (dyd.size() != 4) return ffi::Error::InvalidArgument("conv: the output gradient must be (N, out_h, out_w, O)");
  ConvGeometry g;
  if (ffi::Error error = CheckShapes(x, w, dyd[1], dyd[2], stride, top, left, &g); error.failure()) return error;
  if (dyd[0] != g.batch || dyd[3] != g.out_channels || dy.element_type() != x.element_type())
    return ffi::Error::InvalidArgument("conv: the output gradient does not match the output");
  return ForFloatType(x.element_type(), "conv", [&](auto zero) {
    using T = decltype(zero);
    // A partial sum per fixed chunk of output rows, added in order: deterministic whatever the threads.
    const int64_t rows = g.batch * g.out_h, size = g.taps() * g.out_channels;
    const int64_t grain = std::max<int64_t>(1, (rows + 15) / 16);
    const int64_t chunks = (rows + grain - 1) / grain;
    std::vector<T> partial(chunks * size, T(0));
    const T* xs = x.typed_data<T>();
    const T* dys = dy.typed_data<T>();
    ParallelFor(pool, chunks, 1, [&](int64_t b, int64_t e) {
      for (int64_t chunk = b; chunk < e; ++chunk)
        KernelGradRows<T>(xs, dys, partial.data() + chunk * size, g, chunk * grain, std::min(rows, (chunk + 1) * grain));
    });
    T* out = dw->typed_data<T>();
    std::fill(out, out + size, T(0));
    for (int64_t chunk = 0; chunk < chunks; ++chunk)
      for (int64_t t = 0; t < size; ++t) out[t] += partial[chunk * size + t];
  });
}

}  // namespace

XLA_FFI_DEFINE_HANDLER_SYMBOL(MobilenetConvForward, ForwardImpl,
                              ffi::Ffi::Bind()
                                  .Ctx<ffi::ThreadPool>()
                                  .Arg<ffi::AnyBuffer>()  // x
                                  .Arg<ffi::AnyBuffer>()  // kernel
                                  .Ret<ffi::AnyBuffer>()
                                  .Attr<int64_t>("stride")
                                  .Attr<int64_t>("top")
                                  .Attr<int64_t>("left"));

XLA_FFI_DEFINE_HANDLER_SYMBOL(MobilenetConvKernelGradient, KernelGradientImpl,
                              ffi::Ffi::Bind()
                                  .Ctx<ffi::ThreadPool>()
                                  .Arg<ffi::AnyBuffer>()  // x
                                  .Arg<ffi::AnyBuffer>()  // kernel (its shape)
                                  .Arg<ffi::AnyBuffer>()  // output gradient
                                  .Ret<ffi::AnyBuffer>()
                                  .Attr<int64_t>("stride")
                                  .Attr<int64_t>("top")
                                  .Attr<int64_t>("left"));
