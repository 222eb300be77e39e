// Channel blocks as GCC/Clang vector types, shared by the kernels here.
#ifndef MOBILENET_JAX_KERNELS_VEC_H_
#define MOBILENET_JAX_KERNELS_VEC_H_

#include <cstdint>

// Before a loop over a register block's accumulators (a compile-time count): unrolled early, so
// GCC keeps the block in registers; without it the array lived on the stack, zeroed with rep stos
// for every block (measured on AVX2: the depthwise forward 25-30% slower). The count must cover the
// largest block: at "GCC unroll 16" the AVX-512 stem's 24 pixels and 28 taps stayed a loop over
// accumulators on the stack (measured on AVX-512, batch 32: the stem forward 13.6 ms, 8.2 at 32).
#define MOBILENET_UNROLL _Pragma("GCC unroll 32")

namespace mobilenet_jax {

// A GCC/Clang vector of Bytes bytes of T (one zmm register with AVX-512, one ymm with AVX2 at 32);
// the compiler keeps arrays of them in registers where plain loops over a channel block spill.
template <typename T, int Bytes>
struct Vec {
  typedef T type __attribute__((vector_size(Bytes)));
  // The same vector at the alignment of T: loads and stores of it are single unaligned moves. (GCC
  // 12 for Zen 3 copied a 32-byte __builtin_memcpy as two 16-byte stores plus an extract.)
  typedef T unaligned __attribute__((vector_size(Bytes), aligned(sizeof(T))));
  static constexpr int64_t kLanes = Bytes / sizeof(T);
  static inline type Load(const T* p) { return *reinterpret_cast<const unaligned*>(p); }
  static inline void Store(T* p, const type& v) { *reinterpret_cast<unaligned*>(p) = v; }
};

// The widest block: one register of this CPU. Wider GCC vectors than the target has are lowered
// into pieces through memory (measured on an AVX2 Zen 3: 64-byte blocks made the depthwise forward
// 2-4x slower than 32-byte ones).
#if defined(__AVX512F__)
constexpr int kBlockBytes = 64;
#else
constexpr int kBlockBytes = 32;
#endif

// Calls block(Vec<T, bytes>{}, c) over channels [0, C): blocks of kBlockBytes, then at most one
// block of each narrower power of two down to 16 bytes, then single channels.
template <typename T, typename Block>
inline void ForChannelBlocks(int64_t C, Block&& block) {
  int64_t c = 0;
  for (; c + Vec<T, kBlockBytes>::kLanes <= C; c += Vec<T, kBlockBytes>::kLanes) block(Vec<T, kBlockBytes>{}, c);
  if constexpr (kBlockBytes > 32) {
    if (c + Vec<T, 32>::kLanes <= C) {
      block(Vec<T, 32>{}, c);
      c += Vec<T, 32>::kLanes;
    }
  }
  if (c + Vec<T, 16>::kLanes <= C) {
    block(Vec<T, 16>{}, c);
    c += Vec<T, 16>::kLanes;
  }
  for (; c < C; ++c) block(Vec<T, sizeof(T)>{}, c);
}

}  // namespace mobilenet_jax

#endif  // MOBILENET_JAX_KERNELS_VEC_H_
