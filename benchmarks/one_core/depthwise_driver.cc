// One core, one small batch held in cache: the 3x3 depthwise kernels' row functions called directly,
// microseconds per image, best of 30 runs. Built and run by benchmarks/kernels_one_core.py.
#include <chrono>
#include <cstdio>
#include <random>

#include "depthwise.cc"

namespace {

template <typename Fn>
double BestMicroseconds(Fn&& fn) {
  double best = 1e30;
  for (int run = 0; run < 30; ++run) {
    const auto start = std::chrono::steady_clock::now();
    fn();
    best = std::min(best, std::chrono::duration<double, std::micro>(std::chrono::steady_clock::now() - start).count());
  }
  return best;
}

void Shape(int64_t size, int64_t channels, int64_t stride) {
  const int64_t n = 2, out = (size + 2 - 3) / stride + 1;
  const Geometry g{n, size, size, channels, 3, out, out, stride, 1, ffi::DataType::F32};
  std::vector<float> x(n * size * size * channels), w(9 * channels), y(n * out * out * channels);
  std::vector<float> dx(x.size()), dw(w.size());
  std::mt19937 random(0);
  std::uniform_real_distribution<float> uniform(-1.f, 1.f);
  for (float& v : x) v = uniform(random);
  for (float& v : w) v = uniform(random);
  const Affine<float> none;
  const double forward = BestMicroseconds([&] {
    if (stride == 1) ForwardRowsInRegisters<float, 3, 1>(x.data(), w.data(), y.data(), g, none, none, 0, n * out);
    else ForwardRowsInRegisters<float, 3, 2>(x.data(), w.data(), y.data(), g, none, none, 0, n * out);
  });
  const double input_grad = BestMicroseconds([&] {
    if (stride == 1) InputGradRowsInRegisters<float, 3>(y.data(), w.data(), dx.data(), g, 0, n * size);
    else InputGradRows<float>(y.data(), w.data(), dx.data(), g, 0, n * size);
  });
  const double kernel_grad = BestMicroseconds([&] {
    std::fill(dw.begin(), dw.end(), 0.f);
    KernelGradRowsInRegisters<float, 3>(x.data(), y.data(), dw.data(), g, none, 0, n * out);
  });
  std::printf("depthwise 3x3 %4ldx%-4ld x %4ld, stride %ld: forward %6.0f  input gradient %6.0f  kernel gradient %6.0f us/image\n",
              size, size, channels, stride, forward / n, input_grad / n, kernel_grad / n);
}

}  // namespace

int main() {
  const int64_t shapes[][3] = {{112, 32, 1}, {56, 128, 1}, {14, 512, 1}, {112, 64, 2}, {56, 144, 1}, {112, 96, 2}};
  for (const auto& s : shapes) Shape(s[0], s[1], s[2]);
}
