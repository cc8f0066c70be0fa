// The kernels' worker threads: started on first need and kept for later calls. A worker that runs
// out of work spins for a short while (spin_before_parking) before it parks on a condition
// variable, and so does a caller waiting for the workers' last parts: back-to-back kernel calls
// (the layers of a model) then hand work over in well under a microsecond instead of paying a
// futex wake-up (tens of microseconds on a virtual machine: measured, docs/kernels.md), which
// would cost a batch-1 layer more than the second thread saves.
//
// The hand-off itself takes no lock: a call is posted in one of the pool's job slots and its bit
// set in one word the spinning workers watch, and parts are claimed with a compare-and-swap on the
// slot's counter. A 640 x 2560 layer at batch 1 is about 4 us a thread, so every cache line that
// crosses between the cores on the way counts; the mutex is only taken to park and to wake.
#pragma once

#include <atomic>
#include <bit>
#include <chrono>
#include <condition_variable>
#include <cstddef>
#include <cstdint>
#include <mutex>
#include <thread>
#include <vector>

#include <Eigen/Core>

namespace bitnet::detail {

inline void cpu_relax() noexcept {
#if defined(__x86_64__) || defined(__i386__)
  __builtin_ia32_pause();
#elif defined(__aarch64__)
  __asm__ volatile("yield");
#endif
}

class thread_pool {
 public:
  /// How long an idle worker, or a caller waiting for workers, polls before it parks.
  static constexpr std::chrono::microseconds spin_before_parking{200};
  /// Calls in flight that workers can help at once; a call beyond them runs all its parts itself.
  static constexpr int slot_count = 32;

  /// The process-wide pool. Never destroyed: parked workers simply end with the process, and a
  /// kernel call made while static objects are destroyed still finds its pool.
  static thread_pool& instance() {
    static thread_pool* const pool = new thread_pool;
    return *pool;
  }

  /// Calls task(context, part) for every part in [0, parts) and returns once all have returned.
  /// The calling thread runs parts too, and up to parts - 1 workers help: a call completes even
  /// when every worker is busy with other calls or none could be started. task must not throw.
  /// Allocates nothing once the workers exist. Calls may come from several threads at once, and
  /// from inside a task.
  void run(Eigen::Index parts, void (*task)(const void*, Eigen::Index), const void* context) {
    const int index = parts > 1 && parts < Eigen::Index(all_claimed) ? take_slot() : -1;
    if (index < 0) {  // one part, or every slot in use: no one else can help anyway
      for (Eigen::Index part = 0; part < parts; ++part) task(context, part);
      return;
    }
    start_workers(std::size_t(parts - 1));
    slot& s = slots_[index];
    const std::uint32_t bit = std::uint32_t{1} << index;
    // A worker that read the slot's previous call may still try to claim from it: the new
    // generation fails its compare-and-swap before `parts` changes (acquire / release pair).
    const std::uint64_t generation = (s.claim.load(std::memory_order_relaxed) >> 32) + 1;
    s.claim.store(generation << 32 | all_claimed, std::memory_order_relaxed);
    s.task = task;
    s.context = context;
    s.done.store(0, std::memory_order_relaxed);
    s.parts.store(parts, std::memory_order_release);
    s.claim.store(generation << 32 | 1, std::memory_order_release);  // part 0 is the caller's
    open_.fetch_or(bit, std::memory_order_seq_cst);
    if (parked_workers_.load(std::memory_order_seq_cst) > 0) {  // see work(): one of the two sees the other
      const std::lock_guard<std::mutex> lock(mutex_);
      work_ready_.notify_all();
    }
    Eigen::Index done_here = 0;
    for (Eigen::Index part = 0; part >= 0; part = claim(s, bit), ++done_here) task(context, part);
    if (s.done.fetch_add(done_here, std::memory_order_seq_cst) + done_here != parts) {
      // Workers still run parts: poll, then park. A worker that finishes the last part notifies
      // if a caller is parked (seq_cst both ways, so the wait below cannot miss it).
      const auto finished = [&] { return s.done.load(std::memory_order_seq_cst) == parts; };
      if (!spin_until(finished)) {
        std::unique_lock<std::mutex> lock(mutex_);
        parked_callers_.fetch_add(1, std::memory_order_seq_cst);
        part_done_.wait(lock, finished);
        parked_callers_.fetch_sub(1, std::memory_order_relaxed);
      }
    }
    busy_.fetch_and(~bit, std::memory_order_release);  // no worker holds an unfinished part of it
  }

 private:
  // One posted call. claim packs the generation (high 32 bits: a count of the slot's calls) and
  // the next unclaimed part (low 32 bits): a claim only succeeds for the call it read.
  struct alignas(64) slot {
    std::atomic<std::uint64_t> claim{all_claimed};
    std::atomic<Eigen::Index> parts{0};
    std::atomic<Eigen::Index> done{0};  // parts finished
    // Written by the owning caller before the claim word publishes them; read only by a thread
    // holding a claimed, unfinished part, so the caller cannot rewrite them meanwhile.
    void (*task)(const void*, Eigen::Index) = nullptr;
    const void* context = nullptr;
  };
  static constexpr std::uint64_t all_claimed = 0xffffffffu;  // a next part no call reaches

  thread_pool() = default;

  template <class Ready>
  static bool spin_until(Ready ready) noexcept {
    const auto until = std::chrono::steady_clock::now() + spin_before_parking;
    for (int polls = 0;; ++polls) {
      if (ready()) return true;
      cpu_relax();
      if (polls % 64 == 63 && std::chrono::steady_clock::now() > until) return ready();
    }
  }

  /// A free slot for the calling thread, or -1. Only callers touch busy_, so a single caller
  /// finds its line in its own cache.
  int take_slot() noexcept {
    std::uint32_t busy = busy_.load(std::memory_order_relaxed);
    for (;;) {
      if (busy == ~std::uint32_t{0}) return -1;
      const int index = std::countr_one(busy);
      if (busy_.compare_exchange_weak(busy, busy | std::uint32_t{1} << index, std::memory_order_acquire,
                                      std::memory_order_relaxed))
        return index;
    }
  }

  /// The next part of slot s's call for the calling thread, or -1 when all are claimed. Whoever
  /// claims the last part closes the slot's bit in open_, before running it: the caller cannot
  /// then reuse the slot (and reopen the bit) until that part is done.
  Eigen::Index claim(slot& s, std::uint32_t bit) noexcept {
    std::uint64_t seen = s.claim.load(std::memory_order_acquire);
    for (;;) {
      const auto next = Eigen::Index(seen & all_claimed);
      const Eigen::Index parts = s.parts.load(std::memory_order_acquire);
      if (next >= parts) return -1;
      if (s.claim.compare_exchange_weak(seen, seen + 1, std::memory_order_acq_rel, std::memory_order_acquire)) {
        if (next + 1 == parts) open_.fetch_and(~bit, std::memory_order_relaxed);
        return next;
      }
    }
  }

  /// Grows the pool to `count` workers if it can; with fewer, callers do more parts themselves.
  void start_workers(std::size_t count) noexcept {
    if (started_.load(std::memory_order_acquire) >= count) return;
    const std::lock_guard<std::mutex> lock(mutex_);
    try {
      workers_.reserve(count);
      while (workers_.size() < count) {
        workers_.emplace_back([this] { work(); });
        started_.store(workers_.size(), std::memory_order_release);
      }
    } catch (...) {  // no thread or no memory: run with the workers there are
    }
  }

  void work() {
    for (;;) {
      const std::uint32_t open = open_.load(std::memory_order_acquire);
      if (open == 0) {
        if (spin_until([&] { return open_.load(std::memory_order_acquire) != 0; })) continue;
        std::unique_lock<std::mutex> lock(mutex_);
        parked_workers_.fetch_add(1, std::memory_order_seq_cst);
        work_ready_.wait(lock, [&] { return open_.load(std::memory_order_seq_cst) != 0; });
        parked_workers_.fetch_sub(1, std::memory_order_relaxed);
        continue;
      }
      const int index = std::countr_zero(open);
      slot& s = slots_[index];
      Eigen::Index part = claim(s, std::uint32_t{1} << index);
      if (part < 0) cpu_relax();  // its last part is being claimed: its bit closes next
      for (; part >= 0; part = claim(s, std::uint32_t{1} << index)) {
        const Eigen::Index parts = s.parts.load(std::memory_order_relaxed);  // once done reaches it, s may be reused
        s.task(s.context, part);
        if (s.done.fetch_add(1, std::memory_order_seq_cst) + 1 == parts &&
            parked_callers_.load(std::memory_order_seq_cst) > 0) {
          const std::lock_guard<std::mutex> lock(mutex_);  // the caller checks under the lock: no lost wake-up
          part_done_.notify_all();
        }
      }
    }
  }

  slot slots_[slot_count];
  alignas(64) std::atomic<std::uint32_t> open_{0};  // slots with unclaimed parts: what idle workers watch
  alignas(64) std::atomic<std::uint32_t> busy_{0};  // slots owned by a caller
  alignas(64) std::mutex mutex_;                    // parking, waking and starting workers
  std::condition_variable work_ready_, part_done_;
  std::atomic<int> parked_workers_{0}, parked_callers_{0};
  std::atomic<std::size_t> started_{0};
  std::vector<std::thread> workers_;  // guarded by mutex_
};

}  // namespace bitnet::detail
