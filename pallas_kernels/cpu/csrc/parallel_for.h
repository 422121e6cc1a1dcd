// parallel_for over XLA's intra-op thread pool, for the CPU FFI kernels.
//
// Items are claimed from a shared counter by the calling thread and by tasks
// scheduled on the pool; the caller waits only for items already claimed, so
// a pool that never runs our tasks (all its threads busy) cannot deadlock us.
// The state lives in a shared_ptr because a late task may start after the
// call has returned (it then finds no items and exits).

#pragma once

#include <algorithm>
#include <atomic>
#include <cstdint>
#include <functional>
#include <memory>
#include <thread>

#include "xla/ffi/api/ffi.h"

namespace jax_serve {

inline void parallel_for(xla::ffi::ThreadPool& pool, int64_t num_items,
                         std::function<void(int64_t)> body) {
  struct State {
    std::function<void(int64_t)> body;
    int64_t num_items;
    std::atomic<int64_t> next{0};
    std::atomic<int64_t> done{0};
    void drain() {
      int64_t i;
      while ((i = next.fetch_add(1)) < num_items) {
        body(i);
        done.fetch_add(1, std::memory_order_release);
      }
    }
  };
  if (num_items <= 0) return;
  auto state = std::make_shared<State>();
  state->body = std::move(body);
  state->num_items = num_items;
  const int64_t helpers = std::min<int64_t>(std::max<int64_t>(1, pool.num_threads()),
                                            num_items) - 1;
  for (int64_t i = 0; i < helpers; ++i) pool.Schedule([state] { state->drain(); });
  state->drain();
  while (state->done.load(std::memory_order_acquire) < num_items) std::this_thread::yield();
}

}  // namespace jax_serve
