// Depthwise k x k convolution on CPU, NHWC, as XLA FFI custom calls:
//   mobilenet_depthwise_forward   y[n, oh, ow, c]  = sum_ij x[n, oh*s + i - p, ow*s + j - p, c] * w[i, j, c]
//   mobilenet_depthwise_backward  dx (the same sum gathered from dy with the kernel) and
//                                 dw[i, j, c] = sum_{n, oh, ow} x[n, oh*s + i - p, ow*s + j - p, c] * dy[n, oh, ow, c]
// Zero padding p on every side (asymmetric padding is applied before the call), stride s.
//
// Each pass reads its inputs once: the taps of a block of channels are accumulated in registers
// (a fixed-size array the compiler keeps in vector registers), never as activation-sized windows.
// Work is split into rows (image, output row) and spread over XLA's intra-op thread pool; the
// calling thread works too, so the call never waits on a task that has not started.
//
// Built on first use by mobilenet_jax.kernels.build with the machine's C++ compiler and the FFI
// headers from jax.ffi.include_dir().

#include <algorithm>
#include <cstdint>
#include <vector>

#include "parallel.h"
#include "xla/ffi/api/ffi.h"

namespace ffi = xla::ffi;

namespace {

using mobilenet_jax::ParallelFor;

#if defined(__AVX512F__)
constexpr int64_t kBlock = 16;  // channels per register block (one zmm of float32)
#else
constexpr int64_t kBlock = 8;  // one ymm of float32
#endif

struct Geometry {
  int64_t batch, height, width, channels, k, out_h, out_w, stride, pad;
};

// Output position o reads input positions o*s + t - p for taps t; the taps in range:
inline void TapRange(int64_t o, const Geometry& g, int64_t size, int64_t* first, int64_t* last) {
  const int64_t start = o * g.stride - g.pad;
  *first = std::max<int64_t>(0, -start);
  *last = std::min<int64_t>(g.k, size - start);  // exclusive
}

// y[row] for rows (n, oh) in [begin, end).
template <typename T, int64_t B>
void ForwardRows(const T* x, const T* w, T* y, const Geometry& g, int64_t begin, int64_t end) {
  const int64_t C = g.channels;
  for (int64_t row = begin; row < end; ++row) {
    const int64_t n = row / g.out_h, oh = row % g.out_h;
    int64_t i0, i1;
    TapRange(oh, g, g.height, &i0, &i1);
    const T* x_image = x + n * g.height * g.width * C;
    T* y_row = y + row * g.out_w * C;
    for (int64_t ow = 0; ow < g.out_w; ++ow) {
      int64_t j0, j1;
      TapRange(ow, g, g.width, &j0, &j1);
      const int64_t ih0 = oh * g.stride - g.pad, iw0 = ow * g.stride - g.pad;
      T* out = y_row + ow * C;
      int64_t c = 0;
      for (; c + B <= C; c += B) {
        T acc[B] = {};
        for (int64_t i = i0; i < i1; ++i) {
          const T* x_row = x_image + ((ih0 + i) * g.width + iw0) * C + c;
          const T* w_row = w + i * g.k * C + c;
          for (int64_t j = j0; j < j1; ++j)
            for (int64_t b = 0; b < B; ++b) acc[b] += x_row[j * C + b] * w_row[j * C + b];
        }
        for (int64_t b = 0; b < B; ++b) out[c + b] = acc[b];
      }
      for (; c < C; ++c) {
        T acc = 0;
        for (int64_t i = i0; i < i1; ++i)
          for (int64_t j = j0; j < j1; ++j)
            acc += x_image[((ih0 + i) * g.width + iw0 + j) * C + c] * w[(i * g.k + j) * C + c];
        out[c] = acc;
      }
    }
  }
}

// dx[row] for input rows (n, ih) in [begin, end): the output positions whose taps read (ih, iw).
template <typename T, int64_t B>
void InputGradRows(const T* dy, const T* w, T* dx, const Geometry& g, int64_t begin, int64_t end) {
  const int64_t C = g.channels;
  std::vector<int64_t> taps_i, rows_o, taps_j, cols_o;
  for (int64_t row = begin; row < end; ++row) {
    const int64_t n = row / g.height, ih = row % g.height;
    taps_i.clear();
    rows_o.clear();
    for (int64_t i = 0; i < g.k; ++i) {  // oh * s + i - p == ih
      const int64_t t = ih + g.pad - i;
      if (t >= 0 && t % g.stride == 0 && t / g.stride < g.out_h) {
        taps_i.push_back(i);
        rows_o.push_back(t / g.stride);
      }
    }
    const T* dy_image = dy + n * g.out_h * g.out_w * C;
    T* dx_row = dx + row * g.width * C;
    for (int64_t iw = 0; iw < g.width; ++iw) {
      taps_j.clear();
      cols_o.clear();
      for (int64_t j = 0; j < g.k; ++j) {
        const int64_t t = iw + g.pad - j;
        if (t >= 0 && t % g.stride == 0 && t / g.stride < g.out_w) {
          taps_j.push_back(j);
          cols_o.push_back(t / g.stride);
        }
      }
      T* out = dx_row + iw * C;
      const size_t ni = taps_i.size(), nj = taps_j.size();
      int64_t c = 0;
      for (; c + B <= C; c += B) {
        T acc[B] = {};
        for (size_t a = 0; a < ni; ++a)
          for (size_t bj = 0; bj < nj; ++bj) {
            const T* d = dy_image + (rows_o[a] * g.out_w + cols_o[bj]) * C + c;
            const T* k = w + (taps_i[a] * g.k + taps_j[bj]) * C + c;
            for (int64_t b = 0; b < B; ++b) acc[b] += d[b] * k[b];
          }
        for (int64_t b = 0; b < B; ++b) out[c + b] = acc[b];
      }
      for (; c < C; ++c) {
        T acc = 0;
        for (size_t a = 0; a < ni; ++a)
          for (size_t bj = 0; bj < nj; ++bj)
            acc += dy_image[(rows_o[a] * g.out_w + cols_o[bj]) * C + c] * w[(taps_i[a] * g.k + taps_j[bj]) * C + c];
        out[c] = acc;
      }
    }
  }
}

// Adds sum over output rows (n, oh) in [begin, end) of x-window * dy to dw_partial (k * k * C).
template <typename T, int64_t B>
void KernelGradRows(const T* x, const T* dy, T* dw_partial, const Geometry& g, int64_t begin, int64_t end) {
  const int64_t C = g.channels;
  for (int64_t row = begin; row < end; ++row) {
    const int64_t n = row / g.out_h, oh = row % g.out_h;
    int64_t i0, i1;
    TapRange(oh, g, g.height, &i0, &i1);
    const T* x_image = x + n * g.height * g.width * C;
    const T* dy_row = dy + row * g.out_w * C;
    const int64_t ih0 = oh * g.stride - g.pad;
    for (int64_t i = i0; i < i1; ++i) {
      const T* x_row = x_image + (ih0 + i) * g.width * C;
      for (int64_t j = 0; j < g.k; ++j) {
        T* dw = dw_partial + (i * g.k + j) * C;
        // Output columns whose tap j is inside the image: o * s + j - p in [0, width).
        const int64_t o0 = std::max<int64_t>(0, (g.pad - j + g.stride - 1) / g.stride);
        const int64_t o1 = std::min<int64_t>(g.out_w, (g.width + g.pad - j + g.stride - 1) / g.stride);
        int64_t c = 0;
        for (; c + B <= C; c += B) {
          T acc[B] = {};
          for (int64_t o = o0; o < o1; ++o) {
            const T* xv = x_row + (o * g.stride + j - g.pad) * C + c;
            const T* d = dy_row + o * C + c;
            for (int64_t b = 0; b < B; ++b) acc[b] += xv[b] * d[b];
          }
          for (int64_t b = 0; b < B; ++b) dw[c + b] += acc[b];
        }
        for (; c < C; ++c) {
          T acc = 0;
          for (int64_t o = o0; o < o1; ++o) acc += x_row[(o * g.stride + j - g.pad) * C + c] * dy_row[o * C + c];
          dw[c] += acc;
        }
      }
    }
  }
}

ffi::Error CheckShapes(const ffi::AnyBuffer& x, const ffi::AnyBuffer& w, int64_t stride, int64_t pad, Geometry* g) {
  auto xd = x.dimensions();
  auto wd = w.dimensions();
  if (xd.size() != 4 || wd.size() != 4 || wd[0] != wd[1] || wd[2] != 1 || wd[3] != xd[3])
    return ffi::Error::InvalidArgument("depthwise: x must be (N, H, W, C) and the kernel (k, k, 1, C)");
  if (stride < 1 || pad < 0) return ffi::Error::InvalidArgument("depthwise: stride must be >= 1 and padding >= 0");
  if (x.element_type() != w.element_type()) return ffi::Error::InvalidArgument("depthwise: x and kernel dtypes differ");
  g->batch = xd[0];
  g->height = xd[1];
  g->width = xd[2];
  g->channels = xd[3];
  g->k = wd[0];
  g->stride = stride;
  g->pad = pad;
  g->out_h = (g->height + 2 * pad - g->k) / stride + 1;
  g->out_w = (g->width + 2 * pad - g->k) / stride + 1;
  if (g->out_h < 1 || g->out_w < 1) return ffi::Error::InvalidArgument("depthwise: the kernel is larger than the padded input");
  return ffi::Error::Success();
}

// Rows per task: about 64 KiB of output per chunk, at least one row.
int64_t Grain(int64_t row_elements) { return std::max<int64_t>(1, 16384 / std::max<int64_t>(1, row_elements)); }

template <typename T>
void Forward(ffi::ThreadPool& pool, const T* x, const T* w, T* y, const Geometry& g) {
  ParallelFor(pool, g.batch * g.out_h, Grain(g.out_w * g.channels),
              [&](int64_t b, int64_t e) { ForwardRows<T, kBlock>(x, w, y, g, b, e); });
}

template <typename T>
void Backward(ffi::ThreadPool& pool, const T* x, const T* w, const T* dy, T* dx, T* dw, const Geometry& g) {
  ParallelFor(pool, g.batch * g.height, Grain(g.width * g.channels),
              [&](int64_t b, int64_t e) { InputGradRows<T, kBlock>(dy, w, dx, g, b, e); });
  // Kernel gradient: a partial sum per chunk of output rows (deterministic: chunks are fixed and
  // added in order, whichever thread ran them).
  const int64_t rows = g.batch * g.out_h, taps = g.k * g.k * g.channels;
  const int64_t grain = std::max<int64_t>(1, (rows + 15) / 16);
  const int64_t chunks = (rows + grain - 1) / grain;
  std::vector<T> partial(chunks * taps, T(0));
  ParallelFor(pool, chunks, 1, [&](int64_t b, int64_t e) {
    for (int64_t chunk = b; chunk < e; ++chunk)
      KernelGradRows<T, kBlock>(x, dy, partial.data() + chunk * taps, g, chunk * grain,
                                std::min(rows, (chunk + 1) * grain));
  });
  std::fill(dw, dw + taps, T(0));
  for (int64_t chunk = 0; chunk < chunks; ++chunk)
    for (int64_t t = 0; t < taps; ++t) dw[t] += partial[chunk * taps + t];
}

ffi::Error ForwardImpl(ffi::ThreadPool pool, ffi::AnyBuffer x, ffi::AnyBuffer w, ffi::Result<ffi::AnyBuffer> y,
                       int64_t stride, int64_t padding) {
  Geometry g;
  if (ffi::Error error = CheckShapes(x, w, stride, padding, &g); error.failure()) return error;
  switch (x.element_type()) {
    case ffi::DataType::F32:
      Forward(pool, x.typed_data<float>(), w.typed_data<float>(), y->typed_data<float>(), g);
      return ffi::Error::Success();
    case ffi::DataType::F64:
      Forward(pool, x.typed_data<double>(), w.typed_data<double>(), y->typed_data<double>(), g);
      return ffi::Error::Success();
    default:
      return ffi::Error::InvalidArgument("depthwise: only float32 and float64 are implemented");
  }
}

ffi::Error BackwardImpl(ffi::ThreadPool pool, ffi::AnyBuffer x, ffi::AnyBuffer w, ffi::AnyBuffer dy,
                        ffi::Result<ffi::AnyBuffer> dx, ffi::Result<ffi::AnyBuffer> dw, int64_t stride,
                        int64_t padding) {
  Geometry g;
  if (ffi::Error error = CheckShapes(x, w, stride, padding, &g); error.failure()) return error;
  auto dyd = dy.dimensions();
  if (dyd.size() != 4 || dyd[0] != g.batch || dyd[1] != g.out_h || dyd[2] != g.out_w || dyd[3] != g.channels)
    return ffi::Error::InvalidArgument("depthwise: the output gradient's shape does not match the output");
  switch (x.element_type()) {
    case ffi::DataType::F32:
      Backward(pool, x.typed_data<float>(), w.typed_data<float>(), dy.typed_data<float>(), dx->typed_data<float>(),
               dw->typed_data<float>(), g);
      return ffi::Error::Success();
    case ffi::DataType::F64:
      Backward(pool, x.typed_data<double>(), w.typed_data<double>(), dy.typed_data<double>(), dx->typed_data<double>(),
               dw->typed_data<double>(), g);
      return ffi::Error::Success();
    default:
      return ffi::Error::InvalidArgument("depthwise: only float32 and float64 are implemented");
  }
}

}  // namespace

XLA_FFI_DEFINE_HANDLER_SYMBOL(MobilenetDepthwiseForward, ForwardImpl,
                              ffi::Ffi::Bind()
                                  .Ctx<ffi::ThreadPool>()
                                  .Arg<ffi::AnyBuffer>()
                                  .Arg<ffi::AnyBuffer>()
                                  .Ret<ffi::AnyBuffer>()
                                  .Attr<int64_t>("stride")
                                  .Attr<int64_t>("padding"));

XLA_FFI_DEFINE_HANDLER_SYMBOL(MobilenetDepthwiseBackward, BackwardImpl,
                              ffi::Ffi::Bind()
                                  .Ctx<ffi::ThreadPool>()
                                  .Arg<ffi::AnyBuffer>()
                                  .Arg<ffi::AnyBuffer>()
                                  .Arg<ffi::AnyBuffer>()
                                  .Ret<ffi::AnyBuffer>()
                                  .Ret<ffi::AnyBuffer>()
                                  .Attr<int64_t>("stride")
                                  .Attr<int64_t>("padding"));
