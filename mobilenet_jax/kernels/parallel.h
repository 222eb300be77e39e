// Splitting a custom call's work over XLA's intra-op thread pool (shared by the kernels here).
#ifndef MOBILENET_JAX_KERNELS_PARALLEL_H_
#define MOBILENET_JAX_KERNELS_PARALLEL_H_

#include <algorithm>
#include <atomic>
#include <condition_variable>
#include <cstdint>
#include <memory>
#include <mutex>

#include "xla/ffi/api/ffi.h"

namespace mobilenet_jax {

// Runs body(begin, end) over [0, total) in chunks, on the pool's threads and the caller's.
template <typename Body>
inline void ParallelFor(xla::ffi::ThreadPool& pool, int64_t total, int64_t grain, Body body) {
  const int64_t chunks = std::max<int64_t>(1, (total + grain - 1) / grain);
  const int64_t threads = std::min<int64_t>(std::max<int64_t>(pool.num_threads(), 1), chunks);
  if (threads <= 1) {
    body(0, total);
    return;
  }
  struct State {
    std::atomic<int64_t> next{0};
    std::atomic<int64_t> done{0};
    std::mutex mutex;
    std::condition_variable finished;
  };
  auto state = std::make_shared<State>();
  // Claims chunks until none is left. A helper that starts after every chunk is taken claims
  // none and touches only `state`, which it shares; `body` is used only for claimed chunks, and
  // every claimed chunk finishes before this call returns.
  auto work = [state, chunks, total, grain, body_ptr = &body]() {
    for (int64_t chunk; (chunk = state->next.fetch_add(1)) < chunks;) {
      (*body_ptr)(chunk * grain, std::min(total, (chunk + 1) * grain));
      if (state->done.fetch_add(1) + 1 == chunks) {
        std::lock_guard<std::mutex> lock(state->mutex);
        state->finished.notify_all();
      }
    }
  };
  for (int64_t t = 1; t < threads; ++t) {
    auto task = work;
    pool.Schedule(std::move(task));
  }
  work();
  std::unique_lock<std::mutex> lock(state->mutex);
  state->finished.wait(lock, [&] { return state->done.load() == chunks; });
}

}  // namespace mobilenet_jax

#endif  // MOBILENET_JAX_KERNELS_PARALLEL_H_
