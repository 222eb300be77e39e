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

constexpr int64_t kPixels = 4;    // output pixels per register block in the forward pass
constexpr int64_t kTapBlock = 28;  // taps per register block in the kernel gradient (28 + 2 of 32 zmm)
constexpr int64_t kMaxTaps = 64;   // the Python side sends at most conv.MAX_TAPS

// Where a pixel's k*k*C input values are: base[offset[t]] for tap t = (i * k + j) * C + c. Inside the
// image, base is the window's top-left input value and offset the taps' distances from it; at the
// border, base is a local copy of the patch with zeros outside the image and offset the identity.
template <typename T>
class Patches {
 public:
  Patches(const T* x, const ConvGeometry& g) : x_(x), g_(g) {
    const int64_t C = g.in_channels;
    for (int64_t i = 0; i < g.k; ++i)
      for (int64_t j = 0; j < g.k; ++j)
        for (int64_t c = 0; c < C; ++c) {
          const int64_t t = (i * g.k + j) * C + c;
          inside_[t] = (i * g.width + j) * C + c;
          local_[t] = t;
        }
  }

  // The pixel (n, oh, ow): its base (written into `copy`, kMaxTaps values, at the border) and offsets.
  const T* Pixel(int64_t n, int64_t oh, int64_t ow, T* copy, const int64_t** offsets) const {
    const int64_t C = g_.in_channels, ih0 = oh * g_.stride - g_.top, iw0 = ow * g_.stride - g_.left;
    const T* image = x_ + n * g_.height * g_.width * C;
    if (ih0 >= 0 && iw0 >= 0 && ih0 + g_.k <= g_.height && iw0 + g_.k <= g_.width) {
      *offsets = inside_;
      return image + (ih0 * g_.width + iw0) * C;
    }
    for (int64_t i = 0; i < g_.k; ++i)
      for (int64_t j = 0; j < g_.k; ++j) {
        const int64_t ih = ih0 + i, iw = iw0 + j;
        const bool in = ih >= 0 && ih < g_.height && iw >= 0 && iw < g_.width;
        for (int64_t c = 0; c < C; ++c) copy[(i * g_.k + j) * C + c] = in ? image[(ih * g_.width + iw) * C + c] : T(0);
      }
    *offsets = local_;
    return copy;
  }

 private:
  const T* x_;
  const ConvGeometry& g_;
  int64_t inside_[kMaxTaps];
  int64_t local_[kMaxTaps];
};

template <typename T>
void ForwardRows(const T* x, const T* w, T* y, const ConvGeometry& g, int64_t begin, int64_t end) {
  const int64_t taps = g.taps(), O = g.out_channels;
  const Patches<T> patches(x, g);
  T copies[kPixels][kMaxTaps];
  for (int64_t row = begin; row < end; ++row) {
    const int64_t n = row / g.out_h, oh = row % g.out_h;
    T* y_row = y + row * g.out_w * O;
    for (int64_t ow = 0; ow < g.out_w; ow += kPixels) {
      const int64_t pixels = std::min(kPixels, g.out_w - ow);
      const T* base[kPixels];
      const int64_t* offset[kPixels];
      for (int64_t q = 0; q < kPixels; ++q)  // a short last block repeats its first pixel (not stored)
        base[q] = patches.Pixel(n, oh, ow + (q < pixels ? q : 0), copies[q], &offset[q]);
      ForChannelBlocks<T>(O, [&](auto vec, int64_t o) {
        using V = decltype(vec);
        typename V::type acc[kPixels] = {};
        for (int64_t t = 0; t < taps; ++t) {
          const typename V::type wv = V::Load(w + t * O + o);
          MOBILENET_UNROLL for (int64_t q = 0; q < kPixels; ++q) acc[q] += base[q][offset[q][t]] * wv;
        }
        for (int64_t q = 0; q < pixels; ++q) V::Store(y_row + (ow + q) * O + o, acc[q]);
      });
    }
  }
}

// Adds the kernel gradient of output rows [begin, end) to dw_partial (taps x O).
template <typename T>
void KernelGradRows(const T* x, const T* dy, T* dw_partial, const ConvGeometry& g, int64_t begin, int64_t end) {
  const int64_t taps = g.taps(), O = g.out_channels;
  const Patches<T> patches(x, g);
  T copy[kMaxTaps];
  ForChannelBlocks<T>(O, [&](auto vec, int64_t o) {
    using V = decltype(vec);
    for (int64_t t0 = 0; t0 < taps; t0 += kTapBlock) {
      const int64_t count = std::min(kTapBlock, taps - t0);
      typename V::type acc[kTapBlock] = {};
      for (int64_t row = begin; row < end; ++row) {
        const int64_t n = row / g.out_h, oh = row % g.out_h;
        const T* dy_row = dy + row * g.out_w * O + o;
        for (int64_t ow = 0; ow < g.out_w; ++ow) {
          const int64_t* offset;
          const T* base = patches.Pixel(n, oh, ow, copy, &offset);
          const typename V::type d = V::Load(dy_row + ow * O);
          for (int64_t t = 0; t < kTapBlock; ++t)
            if (t < count) acc[t] += base[offset[t0 + t]] * d;
        }
      }
      for (int64_t t = 0; t < count; ++t) {
        T* out = dw_partial + (t0 + t) * O + o;
        V::Store(out, V::Load(out) + acc[t]);
      }
    }
  });
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
