// Depthwise k x k convolution on CPU, NHWC, as XLA FFI custom calls:
//   mobilenet_depthwise_forward   y[n, oh, ow, c]  = sum_ij x[n, oh*s + i - p, ow*s + j - p, c] * w[i, j, c]
//   mobilenet_depthwise_backward  dx (the same sum gathered from dy with the kernel) and
//                                 dw[i, j, c] = sum_{n, oh, ow} x[n, oh*s + i - p, ow*s + j - p, c] * dy[n, oh, ow, c]
//   mobilenet_depthwise_forward_affine  the forward pass with per-channel affine maps and ReLU/ReLU6,
//                                 act((v - center[c]) * scale[c] + offset[c]) (an inference-mode BatchNorm):
//                                 an epilogue on each output, applied in registers before the store (the
//                                 output is written once instead of written, read and written), and/or a
//                                 prologue on the input, applied once per input row as it is first read
//                                 (the BatchNorm before the convolution never writes its output)
//   mobilenet_depthwise_backward_prologue  the backward pass of a call with a prologue: input gradient with
//                                 respect to the prologue's output, kernel gradient from the prologue's
//                                 output recomputed row by row (it is never stored)
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
#include <cstring>
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

struct Geometry {
  int64_t batch, height, width, channels, k, out_h, out_w, stride, pad;
  ffi::DataType dtype;
};

constexpr int64_t kPixels = 4;  // output pixels per register block: independent accumulator chains
constexpr int64_t kMaxKernel = 16;

// Output position o reads input positions o*s + t - p for taps t; the taps in range:
inline void TapRange(int64_t o, const Geometry& g, int64_t size, int64_t* first, int64_t* last) {
  const int64_t start = o * g.stride - g.pad;
  *first = std::max<int64_t>(0, -start);
  *last = std::min<int64_t>(g.k, size - start);  // exclusive
}

// Output columns [lo, hi) whose k taps all fall inside the width.
inline void InteriorColumns(const Geometry& g, int64_t* lo, int64_t* hi) {
  *lo = std::min(g.out_w, (g.pad + g.stride - 1) / g.stride);
  const int64_t last_start = g.width - g.k + g.pad;  // the largest ow * s that still fits
  *hi = std::max(*lo, last_start < 0 ? 0 : std::min(g.out_w, last_start / g.stride + 1));
}

// A per-channel map applied to the input as it is read (prologue) or to each output before it is
// stored (epilogue): nothing (center == nullptr), or act((v - center) * scale + offset), act = none
// (0), ReLU (1) or ReLU6 (2).
template <typename T>
struct Affine {
  const T* center = nullptr;
  const T* scale = nullptr;
  const T* offset = nullptr;
  int64_t activation = 0;
  bool active() const { return center != nullptr; }
};

// The activation of one value; NaN stays NaN, as jnp.maximum/minimum keep it.
template <typename T>
inline T Activate(T v, int64_t activation) {
  if (activation == 0) return v;
  v = v < T(0) ? T(0) : v;
  return activation == 2 && v > T(6) ? T(6) : v;
}

// The same on a register block (vector selects, as Activate: NaN compares false and stays).
template <typename V, typename T>
inline void ApplyAffine(typename V::type* acc, int64_t count, const Affine<T>& e, int64_t c) {
  using Type = typename V::type;
  const Type center = V::Load(e.center + c), scale = V::Load(e.scale + c), offset = V::Load(e.offset + c);
  const Type zero = {}, six = zero + T(6);
  MOBILENET_UNROLL for (int64_t p = 0; p < count; ++p) {
    Type v = (acc[p] - center) * scale + offset;
    if (e.activation != 0) v = v < zero ? zero : v;
    if (e.activation == 2) v = v > six ? six : v;
    acc[p] = v;
  }
}

// The input rows (n, ih) as the forward and kernel-gradient passes read them: x's own, or with a
// prologue the mapped row, computed when first asked for into a ring of k rows (this thread's
// scratch). Rows are asked for k at a time, in increasing order, so each is mapped once per run
// of consecutive output rows; the k rows one output row reads are k consecutive ih, distinct mod k.
template <typename T>
class InputRows {
 public:
  InputRows(const T* x, const Geometry& g, const Affine<T>& prologue)
      : x_(x), g_(g), prologue_(prologue), row_size_(g.width * g.channels) {
    if (!prologue.active()) return;
    thread_local std::vector<T> scratch;
    if (scratch.size() < static_cast<size_t>(g.k * row_size_)) scratch.resize(g.k * row_size_);
    ring_ = scratch.data();
    std::fill(tag_, tag_ + kMaxKernel, int64_t{-1});
  }

  const T* Row(int64_t n, int64_t ih) {
    const int64_t index = n * g_.height + ih;
    const T* source = x_ + index * row_size_;
    if (!prologue_.active()) return source;
    const int64_t slot = ih % g_.k;
    T* mapped = ring_ + slot * row_size_;
    if (tag_[slot] != index) {
      Map(source, mapped);
      tag_[slot] = index;
    }
    return mapped;
  }

 private:
  void Map(const T* source, T* mapped) const {
    const int64_t C = g_.channels;
    for (int64_t w = 0; w < g_.width; ++w)
      ForChannelBlocks<T>(C, [&](auto vec, int64_t c) {
        using V = decltype(vec);
        typename V::type v[1] = {V::Load(source + w * C + c)};
        ApplyAffine<V, T>(v, 1, prologue_, c);
        V::Store(mapped + w * C + c, v[0]);
      });
  }

  const T* x_;
  const Geometry& g_;
  const Affine<T>& prologue_;
  const int64_t row_size_;
  T* ring_ = nullptr;
  int64_t tag_[kMaxKernel];
};

// y[row] for rows (n, oh) in [begin, end).
template <typename T>
void ForwardRows(const T* x, const T* w, T* y, const Geometry& g, const Affine<T>& prologue, const Affine<T>& e,
                 int64_t begin, int64_t end) {
  const int64_t C = g.channels, s = g.stride, k = g.k;
  int64_t lo, hi;
  InteriorColumns(g, &lo, &hi);
  InputRows<T> input(x, g, prologue);
  const T* in[kMaxKernel];  // in[i]: the input row of tap row i (for i in [i0, i1))
  for (int64_t row = begin; row < end; ++row) {
    const int64_t n = row / g.out_h, oh = row % g.out_h;
    int64_t i0, i1;
    TapRange(oh, g, g.height, &i0, &i1);
    const int64_t ih0 = oh * s - g.pad;
    for (int64_t i = i0; i < i1; ++i) in[i] = input.Row(n, ih0 + i);
    T* y_row = y + row * g.out_w * C;
    auto one_pixel = [&](int64_t ow) {  // any column, taps clipped at the border
      int64_t j0, j1;
      TapRange(ow, g, g.width, &j0, &j1);
      const int64_t iw0 = ow * s - g.pad;
      T* out = y_row + ow * C;
      std::fill(out, out + C, T(0));
      for (int64_t i = i0; i < i1; ++i)
        for (int64_t j = j0; j < j1; ++j) {
          const T* xv = in[i] + (iw0 + j) * C;
          const T* kv = w + (i * k + j) * C;
          for (int64_t c = 0; c < C; ++c) out[c] += xv[c] * kv[c];
        }
      if (e.center != nullptr)
        for (int64_t c = 0; c < C; ++c)
          out[c] = Activate<T>((out[c] - e.center[c]) * e.scale[c] + e.offset[c], e.activation);
    };
    int64_t ow = 0;
    for (; ow < lo; ++ow) one_pixel(ow);
    for (; ow + kPixels <= hi; ow += kPixels) {  // kPixels interior columns at once
      const int64_t iw0 = ow * s - g.pad;
      T* out = y_row + ow * C;
      ForChannelBlocks<T>(C, [&](auto vec, int64_t c) {
        using V = decltype(vec);
        typename V::type acc[kPixels] = {};
        for (int64_t i = i0; i < i1; ++i) {
          const T* x_row = in[i] + iw0 * C + c;
          const T* w_row = w + i * k * C + c;
          for (int64_t j = 0; j < k; ++j) {
            const typename V::type kv = V::Load(w_row + j * C);
            MOBILENET_UNROLL for (int64_t p = 0; p < kPixels; ++p) acc[p] += V::Load(x_row + (p * s + j) * C) * kv;
          }
        }
        if (e.center != nullptr) ApplyAffine<V, T>(acc, kPixels, e, c);
        MOBILENET_UNROLL for (int64_t p = 0; p < kPixels; ++p) V::Store(out + p * C + c, acc[p]);
      });
    }
    for (; ow < g.out_w; ++ow) one_pixel(ow);
  }
}

// A row of `size` zeros (this thread's; only ever zeros): what a tap row outside the image reads.
template <typename T>
const T* ZeroRow(int64_t size) {
  thread_local std::vector<T> zeros;
  if (zeros.size() < static_cast<size_t>(size)) zeros.assign(size, T(0));
  return zeros.data();
}

// The K input rows under output row `row` = (n, oh): rows[i] is input row oh * s - pad + i, or
// `zeros` where that is outside the image. Asked for in increasing order, as InputRows wants.
template <typename T, int K>
void WindowRows(InputRows<T>& input, const Geometry& g, int64_t row, const T* zeros, const T** rows) {
  const int64_t n = row / g.out_h, oh = row % g.out_h, ih0 = oh * g.stride - g.pad;
  int64_t i0, i1;
  TapRange(oh, g, g.height, &i0, &i1);
  for (int64_t i = 0; i < K; ++i) rows[i] = i >= i0 && i < i1 ? input.Row(n, ih0 + i) : zeros;
}

// Output pixels per register block of ForwardRowsInRegisters: independent accumulator chains beside
// a tap row's K weights and the input column being read. Measured on an AVX2 Zen 3, one core, 3x3
// stride 1: 6 pixels 174-179 us per 56x56x128 image, 4 pixels 280-300 us (latency-bound chains).
constexpr int kRegisterPixels = 6;

// acc[p] += the K x K taps of block pixel p, for kRegisterPixels pixels at stride S whose tap rows
// are rows[i] + at: block column m = p * S + j' is loaded once per tap row and used by every pixel
// it feeds, with tap j = j' (a forward pass) or K - 1 - j' (the input gradient: the kernel flipped).
template <typename V, typename T, int K, int S, bool kFlipped>
inline void AccumulateBlock(const T* const* rows, int64_t at, const T* w, int64_t C, int64_t c,
                            typename V::type* acc) {
  MOBILENET_UNROLL for (int i = 0; i < K; ++i) {
    const T* column = rows[i] + at + c;
    typename V::type wv[K];
    MOBILENET_UNROLL for (int j = 0; j < K; ++j) wv[j] = V::Load(w + (i * K + j) * C + c);
    MOBILENET_UNROLL for (int m = 0; m < (kRegisterPixels - 1) * S + K; ++m) {
      const typename V::type v = V::Load(column + m * C);
      MOBILENET_UNROLL for (int p = 0; p < kRegisterPixels; ++p) {
        const int tap = m - p * S;
        if (tap >= 0 && tap < K) acc[p] += v * wv[kFlipped ? K - 1 - tap : tap];
      }
    }
  }
}

// ForwardRows for a K x K kernel at stride S: interior columns kRegisterPixels at once (AccumulateBlock,
// for each channel block), the rest of the row one pixel at a time (taps clipped at the border).
// Tap rows outside the image read a row of zeros.
template <typename T, int K, int S>
void ForwardRowsInRegisters(const T* x, const T* w, T* y, const Geometry& g, const Affine<T>& prologue,
                            const Affine<T>& e, int64_t begin, int64_t end) {
  const int64_t C = g.channels;
  int64_t lo, hi;
  InteriorColumns(g, &lo, &hi);
  const int64_t blocks_end = lo + (hi - lo) / kRegisterPixels * kRegisterPixels;
  InputRows<T> input(x, g, prologue);
  const T* zeros = ZeroRow<T>(g.width * C);
  for (int64_t row = begin; row < end; ++row) {
    const T* x_rows[K];
    WindowRows<T, K>(input, g, row, zeros, x_rows);
    T* y_row = y + row * g.out_w * C;
    for (int64_t ow = lo; ow < blocks_end; ow += kRegisterPixels) {
      const int64_t at = (ow * S - g.pad) * C;
      ForChannelBlocks<T>(C, [&](auto vec, int64_t c) {
        using V = decltype(vec);
        typename V::type acc[kRegisterPixels] = {};
        AccumulateBlock<V, T, K, S, false>(x_rows, at, w, C, c, acc);
        if (e.center != nullptr) ApplyAffine<V, T>(acc, kRegisterPixels, e, c);
        MOBILENET_UNROLL for (int p = 0; p < kRegisterPixels; ++p) V::Store(y_row + (ow + p) * C + c, acc[p]);
      });
    }
    auto one_pixel = [&](int64_t ow) {  // taps clipped at the border
      int64_t j0, j1;
      TapRange(ow, g, g.width, &j0, &j1);
      ForChannelBlocks<T>(C, [&](auto vec, int64_t c) {
        using V = decltype(vec);
        typename V::type acc[1] = {};
        for (int64_t i = 0; i < K; ++i)
          for (int64_t j = j0; j < j1; ++j)
            acc[0] += V::Load(x_rows[i] + (ow * S + j - g.pad) * C + c) * V::Load(w + (i * K + j) * C + c);
        if (e.center != nullptr) ApplyAffine<V, T>(acc, 1, e, c);
        V::Store(y_row + ow * C + c, acc[0]);
      });
    };
    for (int64_t ow = 0; ow < lo; ++ow) one_pixel(ow);
    for (int64_t ow = blocks_end; ow < g.out_w; ++ow) one_pixel(ow);
  }
}

// The taps of input position t (a row or a column) in the backward pass: kernel offsets u with
// (t + p - u) divisible by s and output position (t + p - u) / s inside [0, out).
struct Taps {
  int64_t count = 0;
  int64_t tap[kMaxKernel];
  int64_t out[kMaxKernel];
};

inline Taps BackwardTaps(int64_t t, const Geometry& g, int64_t out_size) {
  Taps taps;
  for (int64_t u = (t + g.pad) % g.stride; u < g.k; u += g.stride) {
    const int64_t o = (t + g.pad - u) / g.stride;
    if (t + g.pad - u >= 0 && o < out_size) {
      taps.tap[taps.count] = u;
      taps.out[taps.count++] = o;
    }
  }
  return taps;
}

// dx[row] for input rows (n, ih) in [begin, end): the output positions whose taps read (ih, iw).
// Columns iw, iw + s, ..., iw + (kPixels - 1) s share their kernel taps (their output columns
// differ by 1), so kPixels of them are accumulated at once where all have every tap.
template <typename T>
void InputGradRows(const T* dy, const T* w, T* dx, const Geometry& g, int64_t begin, int64_t end) {
  const int64_t C = g.channels, s = g.stride, k = g.k;
  std::vector<Taps> columns(g.width);
  std::vector<char> complete(g.width);  // every tap of the column's residue class is in range
  for (int64_t iw = 0; iw < g.width; ++iw) {
    columns[iw] = BackwardTaps(iw, g, g.out_w);
    const int64_t residue = (iw + g.pad) % s;
    complete[iw] = columns[iw].count == (residue < k ? (k - residue + s - 1) / s : 0);
  }
  auto same_taps = [&](int64_t iw) {  // iw, iw + s, ..., iw + (kPixels - 1) s: one residue class, all complete
    if (iw + (kPixels - 1) * s >= g.width || columns[iw].count == 0) return false;
    MOBILENET_UNROLL for (int64_t p = 0; p < kPixels; ++p)
      if (!complete[iw + p * s]) return false;
    return true;
  };
  for (int64_t row = begin; row < end; ++row) {
    const int64_t n = row / g.height, ih = row % g.height;
    const Taps rows = BackwardTaps(ih, g, g.out_h);
    const T* dy_image = dy + n * g.out_h * g.out_w * C;
    T* dx_row = dx + row * g.width * C;
    auto one_pixel = [&](int64_t iw) {
      const Taps& cols = columns[iw];
      T* out = dx_row + iw * C;
      std::fill(out, out + C, T(0));
      for (int64_t a = 0; a < rows.count; ++a)
        for (int64_t e = 0; e < cols.count; ++e) {
          const T* d = dy_image + (rows.out[a] * g.out_w + cols.out[e]) * C;
          const T* kv = w + (rows.tap[a] * k + cols.tap[e]) * C;
          for (int64_t c = 0; c < C; ++c) out[c] += d[c] * kv[c];
        }
    };
    for (int64_t phase = 0; phase < s; ++phase) {
      int64_t iw = phase;
      while (iw < g.width) {
        if (!same_taps(iw)) {
          one_pixel(iw);
          iw += s;
          continue;
        }
        const Taps& cols = columns[iw];
        ForChannelBlocks<T>(C, [&](auto vec, int64_t c) {
          using V = decltype(vec);
          typename V::type acc[kPixels] = {};
          for (int64_t a = 0; a < rows.count; ++a) {
            const T* dy_row = dy_image + rows.out[a] * g.out_w * C + c;
            const T* w_row = w + rows.tap[a] * k * C + c;
            for (int64_t e = 0; e < cols.count; ++e) {
              const T* d = dy_row + cols.out[e] * C;
              const typename V::type kv = V::Load(w_row + cols.tap[e] * C);
              MOBILENET_UNROLL for (int64_t p = 0; p < kPixels; ++p) acc[p] += V::Load(d + p * C) * kv;
            }
          }
          MOBILENET_UNROLL for (int64_t p = 0; p < kPixels; ++p) V::Store(dx_row + (iw + p * s) * C + c, acc[p]);
        });
        iw += kPixels * s;
      }
    }
  }
}

// InputGradRows for a K x K kernel at stride 1: dx[ih, iw] = sum_ij dy[ih + p - i, iw + p - j] w[i, j],
// the forward pass's structure with the kernel flipped. Interior columns kRegisterPixels at once
// (each output-gradient column loaded once per tap row), the border one pixel at a time; tap rows
// outside the output read a row of zeros.
template <typename T, int K>
void InputGradRowsInRegisters(const T* dy, const T* w, T* dx, const Geometry& g, int64_t begin, int64_t end) {
  const int64_t C = g.channels, p = g.pad;
  const int64_t lo = std::min(g.width, std::max<int64_t>(0, K - 1 - p));
  const int64_t hi = std::max(lo, std::min(g.width, g.out_w - p));  // columns whose K taps are all inside
  const int64_t blocks_end = lo + (hi - lo) / kRegisterPixels * kRegisterPixels;
  const T* zeros = ZeroRow<T>(g.out_w * C);
  for (int64_t row = begin; row < end; ++row) {
    const int64_t n = row / g.height, ih = row % g.height;
    const T* dy_rows[K];
    for (int64_t i = 0; i < K; ++i) {
      const int64_t oh = ih + p - i;
      dy_rows[i] = oh >= 0 && oh < g.out_h ? dy + (n * g.out_h + oh) * g.out_w * C : zeros;
    }
    T* dx_row = dx + row * g.width * C;
    for (int64_t iw = lo; iw < blocks_end; iw += kRegisterPixels) {
      const int64_t at = (iw + p - (K - 1)) * C;  // column m of the block: iw + p - (K - 1) + m
      ForChannelBlocks<T>(C, [&](auto vec, int64_t c) {
        using V = decltype(vec);
        typename V::type acc[kRegisterPixels] = {};
        AccumulateBlock<V, T, K, 1, true>(dy_rows, at, w, C, c, acc);
        MOBILENET_UNROLL for (int q = 0; q < kRegisterPixels; ++q) V::Store(dx_row + (iw + q) * C + c, acc[q]);
      });
    }
    auto one_pixel = [&](int64_t iw) {  // the taps whose output column is inside
      ForChannelBlocks<T>(C, [&](auto vec, int64_t c) {
        using V = decltype(vec);
        typename V::type acc[1] = {};
        for (int64_t i = 0; i < K; ++i)
          for (int64_t j = 0; j < K; ++j) {
            const int64_t ow = iw + p - j;
            if (ow >= 0 && ow < g.out_w) acc[0] += V::Load(dy_rows[i] + ow * C + c) * V::Load(w + (i * K + j) * C + c);
          }
        V::Store(dx_row + iw * C + c, acc[0]);
      });
    };
    for (int64_t iw = 0; iw < lo; ++iw) one_pixel(iw);
    for (int64_t iw = blocks_end; iw < g.width; ++iw) one_pixel(iw);
  }
}

// Adds sum over output rows (n, oh) in [begin, end) of x-window * dy to dw_partial (k * k * C).
template <typename T>
void KernelGradRows(const T* x, const T* dy, T* dw_partial, const Geometry& g, const Affine<T>& prologue,
                    int64_t begin, int64_t end) {
  const int64_t C = g.channels, s = g.stride;
  InputRows<T> input(x, g, prologue);
  for (int64_t row = begin; row < end; ++row) {
    const int64_t n = row / g.out_h, oh = row % g.out_h;
    int64_t i0, i1;
    TapRange(oh, g, g.height, &i0, &i1);
    const T* dy_row = dy + row * g.out_w * C;
    const int64_t ih0 = oh * s - g.pad;
    for (int64_t i = i0; i < i1; ++i) {
      const T* x_row = input.Row(n, ih0 + i);
      for (int64_t j = 0; j < g.k; ++j) {
        T* dw = dw_partial + (i * g.k + j) * C;
        // Output columns whose tap j is inside the image: o * s + j - p in [0, width).
        const int64_t o0 = std::max<int64_t>(0, (g.pad - j + s - 1) / s);
        const int64_t o1 = std::min<int64_t>(g.out_w, (g.width + g.pad - j + s - 1) / s);
        ForChannelBlocks<T>(C, [&](auto vec, int64_t c) {
          using V = decltype(vec);
          typename V::type acc[kPixels] = {};  // kPixels partial sums: independent chains
          int64_t o = o0;
          for (; o + kPixels <= o1; o += kPixels)
            MOBILENET_UNROLL for (int64_t p = 0; p < kPixels; ++p)
              acc[p] += V::Load(x_row + ((o + p) * s + j - g.pad) * C + c) * V::Load(dy_row + (o + p) * C + c);
          for (; o < o1; ++o) acc[0] += V::Load(x_row + (o * s + j - g.pad) * C + c) * V::Load(dy_row + o * C + c);
          V::Store(dw + c, V::Load(dw + c) + ((acc[0] + acc[1]) + (acc[2] + acc[3])));
        });
      }
    }
  }
}

// KernelGradRows for a K x K kernel with all K * K taps of a channel block in registers: each
// interior output column loads its output gradient once and adds it, times the K * K input values
// under its window, to K * K independent accumulators, stored once per row. Tap rows outside the
// image read a row of zeros; the border columns add their in-range taps to dw_partial directly.
template <typename T, int K>
void KernelGradRowsInRegisters(const T* x, const T* dy, T* dw_partial, const Geometry& g, const Affine<T>& prologue,
                               int64_t begin, int64_t end) {
  const int64_t C = g.channels, s = g.stride;
  int64_t lo, hi;
  InteriorColumns(g, &lo, &hi);
  InputRows<T> input(x, g, prologue);
  const T* zeros = ZeroRow<T>(g.width * C);
  for (int64_t row = begin; row < end; ++row) {
    const T* x_rows[K];
    WindowRows<T, K>(input, g, row, zeros, x_rows);
    const T* dy_row = dy + row * g.out_w * C;
    ForChannelBlocks<T>(C, [&](auto vec, int64_t c) {
      using V = decltype(vec);
      typename V::type acc[K * K] = {};
      for (int64_t o = lo; o < hi; ++o) {
        const typename V::type d = V::Load(dy_row + o * C + c);
        const int64_t at = (o * s - g.pad) * C + c;
        MOBILENET_UNROLL for (int i = 0; i < K; ++i)
          MOBILENET_UNROLL for (int j = 0; j < K; ++j) acc[i * K + j] += V::Load(x_rows[i] + at + j * C) * d;
      }
      MOBILENET_UNROLL for (int t = 0; t < K * K; ++t) V::Store(dw_partial + t * C + c, V::Load(dw_partial + t * C + c) + acc[t]);
    });
    auto border_column = [&](int64_t o) {
      int64_t j0, j1;
      TapRange(o, g, g.width, &j0, &j1);
      for (int64_t i = 0; i < K; ++i)
        for (int64_t j = j0; j < j1; ++j) {
          const T* xv = x_rows[i] + (o * s + j - g.pad) * C;
          const T* d = dy_row + o * C;
          T* out = dw_partial + (i * K + j) * C;
          for (int64_t c = 0; c < C; ++c) out[c] += xv[c] * d[c];
        }
    };
    for (int64_t o = 0; o < lo; ++o) border_column(o);
    for (int64_t o = hi; o < g.out_w; ++o) border_column(o);
  }
}

ffi::Error CheckShapes(const ffi::AnyBuffer& x, const ffi::AnyBuffer& w, int64_t stride, int64_t pad, Geometry* g) {
  auto xd = x.dimensions();
  auto wd = w.dimensions();
  if (xd.size() != 4 || wd.size() != 4 || wd[0] != wd[1] || wd[2] != 1 || wd[3] != xd[3])
    return ffi::Error::InvalidArgument("depthwise: x must be (N, H, W, C) and the kernel (k, k, 1, C)");
  if (stride < 1 || pad < 0) return ffi::Error::InvalidArgument("depthwise: stride must be >= 1 and padding >= 0");
  if (x.element_type() != w.element_type()) return ffi::Error::InvalidArgument("depthwise: x and kernel dtypes differ");
  g->dtype = x.element_type();
  g->batch = xd[0];
  g->height = xd[1];
  g->width = xd[2];
  g->channels = xd[3];
  g->k = wd[0];
  g->stride = stride;
  g->pad = pad;
  g->out_h = (g->height + 2 * pad - g->k) / stride + 1;
  g->out_w = (g->width + 2 * pad - g->k) / stride + 1;
  if (g->k > kMaxKernel) return ffi::Error::InvalidArgument("depthwise: kernels up to 16 x 16 are implemented");
  if (g->out_h < 1 || g->out_w < 1) return ffi::Error::InvalidArgument("depthwise: the kernel is larger than the padded input");
  return ffi::Error::Success();
}

// Rows per task: about 64 KiB of output per chunk, at least one row; with a prologue at least 8 rows,
// so that the k - 1 input rows a chunk maps for its first output row are a small share of its work.
int64_t Grain(int64_t row_elements, bool prologue = false) {
  return std::max<int64_t>(prologue ? 8 : 1, 16384 / std::max<int64_t>(1, row_elements));
}

template <typename T>
void Forward(ffi::ThreadPool& pool, const T* x, const T* w, T* y, const Geometry& g, const Affine<T>& prologue,
             const Affine<T>& epilogue) {
  ParallelFor(pool, g.batch * g.out_h, Grain(g.out_w * g.channels, prologue.active()), [&](int64_t b, int64_t e) {
    if (g.k == 3 && g.stride == 1)
      ForwardRowsInRegisters<T, 3, 1>(x, w, y, g, prologue, epilogue, b, e);
    else if (g.k == 3 && g.stride == 2)
      ForwardRowsInRegisters<T, 3, 2>(x, w, y, g, prologue, epilogue, b, e);
    else
      ForwardRows<T>(x, w, y, g, prologue, epilogue, b, e);
  });
}

template <typename T>
void Backward(ffi::ThreadPool& pool, const T* x, const T* w, const T* dy, T* dx, T* dw, const Geometry& g,
              const Affine<T>& prologue) {
  ParallelFor(pool, g.batch * g.height, Grain(g.width * g.channels),
              [&](int64_t b, int64_t e) {
                if (g.k == 3 && g.stride == 1)
                  InputGradRowsInRegisters<T, 3>(dy, w, dx, g, b, e);
                else
                  InputGradRows<T>(dy, w, dx, g, b, e);
              });
  // Kernel gradient: a partial sum per chunk of output rows (deterministic: chunks are fixed and
  // added in order, whichever thread ran them).
  const int64_t rows = g.batch * g.out_h, taps = g.k * g.k * g.channels;
  const int64_t grain = std::max<int64_t>(1, (rows + 15) / 16);
  const int64_t chunks = (rows + grain - 1) / grain;
  std::vector<T> partial(chunks * taps, T(0));
  ParallelFor(pool, chunks, 1, [&](int64_t b, int64_t e) {
    for (int64_t chunk = b; chunk < e; ++chunk) {
      T* out = partial.data() + chunk * taps;
      const int64_t first = chunk * grain, last = std::min(rows, (chunk + 1) * grain);
      if (g.k == 3)
        KernelGradRowsInRegisters<T, 3>(x, dy, out, g, prologue, first, last);
      else
        KernelGradRows<T>(x, dy, out, g, prologue, first, last);
    }
  });
  std::fill(dw, dw + taps, T(0));
  for (int64_t chunk = 0; chunk < chunks; ++chunk)
    for (int64_t t = 0; t < taps; ++t) dw[t] += partial[chunk * taps + t];
}

ffi::Error CheckOutputGradient(const ffi::AnyBuffer& dy, const Geometry& g) {
  auto dyd = dy.dimensions();
  if (dyd.size() != 4 || dyd[0] != g.batch || dyd[1] != g.out_h || dyd[2] != g.out_w || dyd[3] != g.channels)
    return ffi::Error::InvalidArgument("depthwise: the output gradient's shape does not match the output");
  if (dy.element_type() != g.dtype) return ffi::Error::InvalidArgument("depthwise: x and the output gradient dtypes differ");
  return ffi::Error::Success();
}

// An Affine from its three (C,) buffers and its activation attribute (-1: none, the map is not applied).
template <typename T>
Affine<T> AffineOf(const ffi::AnyBuffer& center, const ffi::AnyBuffer& scale, const ffi::AnyBuffer& offset,
                   int64_t activation) {
  if (activation < 0) return Affine<T>{};
  return Affine<T>{center.typed_data<T>(), scale.typed_data<T>(), offset.typed_data<T>(), activation};
}

ffi::Error CheckAffine(const ffi::AnyBuffer& center, const ffi::AnyBuffer& scale, const ffi::AnyBuffer& offset,
                       int64_t activation, const Geometry& g) {
  if (activation < -1 || activation > 2)
    return ffi::Error::InvalidArgument("depthwise: an activation must be -1 (no map), 0 (none), 1 (ReLU) or 2 (ReLU6)");
  for (const ffi::AnyBuffer* v : {&center, &scale, &offset})
    if (v->dimensions().size() != 1 || v->dimensions()[0] != g.channels || v->element_type() != g.dtype)
      return ffi::Error::InvalidArgument("depthwise: center, scale and offset must be (C,) in x's dtype");
  return ffi::Error::Success();
}

ffi::Error ForwardImpl(ffi::ThreadPool pool, ffi::AnyBuffer x, ffi::AnyBuffer w, ffi::Result<ffi::AnyBuffer> y,
                       int64_t stride, int64_t padding) {
  Geometry g;
  if (ffi::Error error = CheckShapes(x, w, stride, padding, &g); error.failure()) return error;
  return ForFloatType(x.element_type(), "depthwise", [&](auto zero) {
    using T = decltype(zero);
    Forward(pool, x.typed_data<T>(), w.typed_data<T>(), y->typed_data<T>(), g, Affine<T>{}, Affine<T>{});
  });
}

ffi::Error ForwardAffineImpl(ffi::ThreadPool pool, ffi::AnyBuffer x, ffi::AnyBuffer w, ffi::AnyBuffer in_center,
                             ffi::AnyBuffer in_scale, ffi::AnyBuffer in_offset, ffi::AnyBuffer out_center,
                             ffi::AnyBuffer out_scale, ffi::AnyBuffer out_offset, ffi::Result<ffi::AnyBuffer> y,
                             int64_t stride, int64_t padding, int64_t prologue, int64_t epilogue) {
  Geometry g;
  if (ffi::Error error = CheckShapes(x, w, stride, padding, &g); error.failure()) return error;
  if (ffi::Error error = CheckAffine(in_center, in_scale, in_offset, prologue, g); error.failure()) return error;
  if (ffi::Error error = CheckAffine(out_center, out_scale, out_offset, epilogue, g); error.failure()) return error;
  return ForFloatType(x.element_type(), "depthwise", [&](auto zero) {
    using T = decltype(zero);
    Forward(pool, x.typed_data<T>(), w.typed_data<T>(), y->typed_data<T>(), g,
            AffineOf<T>(in_center, in_scale, in_offset, prologue),
            AffineOf<T>(out_center, out_scale, out_offset, epilogue));
  });
}

ffi::Error BackwardImpl(ffi::ThreadPool pool, ffi::AnyBuffer x, ffi::AnyBuffer w, ffi::AnyBuffer dy,
                        ffi::Result<ffi::AnyBuffer> dx, ffi::Result<ffi::AnyBuffer> dw, int64_t stride,
                        int64_t padding) {
  Geometry g;
  if (ffi::Error error = CheckShapes(x, w, stride, padding, &g); error.failure()) return error;
  if (ffi::Error error = CheckOutputGradient(dy, g); error.failure()) return error;
  return ForFloatType(x.element_type(), "depthwise", [&](auto zero) {
    using T = decltype(zero);
    Backward(pool, x.typed_data<T>(), w.typed_data<T>(), dy.typed_data<T>(), dx->typed_data<T>(), dw->typed_data<T>(),
             g, Affine<T>{});
  });
}

ffi::Error BackwardPrologueImpl(ffi::ThreadPool pool, ffi::AnyBuffer x, ffi::AnyBuffer w, ffi::AnyBuffer dy,
                                ffi::AnyBuffer in_center, ffi::AnyBuffer in_scale, ffi::AnyBuffer in_offset,
                                ffi::Result<ffi::AnyBuffer> dx, ffi::Result<ffi::AnyBuffer> dw, int64_t stride,
                                int64_t padding, int64_t prologue) {
  Geometry g;
  if (ffi::Error error = CheckShapes(x, w, stride, padding, &g); error.failure()) return error;
  if (ffi::Error error = CheckOutputGradient(dy, g); error.failure()) return error;
  if (ffi::Error error = CheckAffine(in_center, in_scale, in_offset, prologue, g); error.failure()) return error;
  return ForFloatType(x.element_type(), "depthwise", [&](auto zero) {
    using T = decltype(zero);
    Backward(pool, x.typed_data<T>(), w.typed_data<T>(), dy.typed_data<T>(), dx->typed_data<T>(), dw->typed_data<T>(),
             g, AffineOf<T>(in_center, in_scale, in_offset, prologue));
  });
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

XLA_FFI_DEFINE_HANDLER_SYMBOL(MobilenetDepthwiseForwardAffine, ForwardAffineImpl,
                              ffi::Ffi::Bind()
                                  .Ctx<ffi::ThreadPool>()
                                  .Arg<ffi::AnyBuffer>()  // x
                                  .Arg<ffi::AnyBuffer>()  // kernel
                                  .Arg<ffi::AnyBuffer>()  // prologue center, scale, offset
                                  .Arg<ffi::AnyBuffer>()
                                  .Arg<ffi::AnyBuffer>()
                                  .Arg<ffi::AnyBuffer>()  // epilogue center, scale, offset
                                  .Arg<ffi::AnyBuffer>()
                                  .Arg<ffi::AnyBuffer>()
                                  .Ret<ffi::AnyBuffer>()
                                  .Attr<int64_t>("stride")
                                  .Attr<int64_t>("padding")
                                  .Attr<int64_t>("prologue")
                                  .Attr<int64_t>("epilogue"));

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

XLA_FFI_DEFINE_HANDLER_SYMBOL(MobilenetDepthwiseBackwardPrologue, BackwardPrologueImpl,
                              ffi::Ffi::Bind()
                                  .Ctx<ffi::ThreadPool>()
                                  .Arg<ffi::AnyBuffer>()  // x
                                  .Arg<ffi::AnyBuffer>()  // kernel
                                  .Arg<ffi::AnyBuffer>()  // output gradient
                                  .Arg<ffi::AnyBuffer>()  // prologue center, scale, offset
                                  .Arg<ffi::AnyBuffer>()
                                  .Arg<ffi::AnyBuffer>()
                                  .Ret<ffi::AnyBuffer>()
                                  .Ret<ffi::AnyBuffer>()
                                  .Attr<int64_t>("stride")
                                  .Attr<int64_t>("padding")
                                  .Attr<int64_t>("prologue"));
