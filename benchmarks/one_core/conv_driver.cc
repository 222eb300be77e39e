// One core: the stem kernel's row functions (3x3, 3 -> 32 channels, stride 2, 224 px) called directly,
// milliseconds per image, best of 20 runs. Built and run by benchmarks/kernels_one_core.py.
#include <chrono>
#include <cstdio>
#include <random>

#include "conv.cc"

int main() {
  const int64_t n = 2, size = 224, in = 3, out_channels = 32, out = 112;
  const ConvGeometry g{n, size, size, in, 3, out_channels, out, out, 2, 0, 0};  // TF 'SAME': padding after
  std::vector<float> x(n * size * size * in), w(27 * out_channels), y(n * out * out * out_channels), dw(w.size());
  std::mt19937 random(0);
  std::uniform_real_distribution<float> uniform(-1.f, 1.f);
  for (float& v : x) v = uniform(random);
  for (float& v : w) v = uniform(random);
  double forward = 1e30, kernel_grad = 1e30;
  for (int run = 0; run < 20; ++run) {
    const auto t0 = std::chrono::steady_clock::now();
    ForwardRows<float>(x.data(), w.data(), y.data(), g, 0, n * out);
    const auto t1 = std::chrono::steady_clock::now();
    std::fill(dw.begin(), dw.end(), 0.f);
    KernelGradRows<float>(x.data(), y.data(), dw.data(), g, 0, n * out);
    const auto t2 = std::chrono::steady_clock::now();
    forward = std::min(forward, std::chrono::duration<double, std::milli>(t1 - t0).count());
    kernel_grad = std::min(kernel_grad, std::chrono::duration<double, std::milli>(t2 - t1).count());
  }
  std::printf("stem 3x3 224x224x3 -> 32, stride 2: forward %.3f  kernel gradient %.3f ms/image\n", forward / n,
              kernel_grad / n);
}
