// The kernels' worker threads: started on first need and kept for later calls. A worker that runs
// out of work spins for a short while (spin_before_parking) before it parks on a condition
// variable, and so does a caller waiting for the workers' last parts: back-to-back kernel calls
// (the layers of a model) then hand work over in well under a microsecond instead of paying a
// futex wake-up (tens of microseconds on a virtual machine: measured, docs/kernels.md), which
// would cost a batch-1 layer more than the second thread saves.
#pragma once

#include <atomic>
#include <chrono>
#include <condition_variable>
#include <cstddef>
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

  /// The process-wide pool. Never destroyed: parked workers simply end with the process, and a
  /// kernel call made while static objects are destroyed still finds its pool.
  static thread_pool& instance() {
    static thread_pool* const pool = new thread_pool;
    return *pool;
  }

  /// Calls task(context, part) for every part in [0, parts) and returns once all have returned.
  /// The calling thread runs parts too, and up to parts - 1 workers help: a call completes even
  /// when every worker is busy with other calls or none could be started. task must not throw.
  /// Allocates nothing once the workers exist.
  void run(Eigen::Index parts, void (*task)(const void*, Eigen::Index), const void* context) {
    if (parts <= 1) {
      if (parts == 1) task(context, 0);
      return;
    }
    job j{task, context, parts};
    bool wake;
    {
      const std::lock_guard<std::mutex> lock(mutex_);
      start_workers(std::size_t(parts - 1));
      push(&j);
      posted_.fetch_add(1, std::memory_order_release);
      wake = parked_ > 0;
    }
    if (wake) work_ready_.notify_all();
    Eigen::Index done_here = 0;
    for (Eigen::Index part; (part = j.next.fetch_add(1)) < parts; ++done_here) task(context, part);
    {
      const std::lock_guard<std::mutex> lock(mutex_);
      unlink(&j);  // no worker finds j from now on
    }
    if (j.done.fetch_add(done_here, std::memory_order_acq_rel) + done_here == parts) return;
    // Workers still run parts of j: poll, then park. The worker that finishes the last part
    // notifies under the lock, so the wait below cannot miss it; no worker touches j after its
    // increment of j.done.
    if (spin_until([&] { return j.done.load(std::memory_order_acquire) == parts; })) return;
    std::unique_lock<std::mutex> lock(mutex_);
    part_done_.wait(lock, [&] { return j.done.load(std::memory_order_acquire) == parts; });
  }

 private:
  struct job {
    void (*task)(const void*, Eigen::Index);
    const void* context;
    Eigen::Index parts;
    std::atomic<Eigen::Index> next{0};  // the next unclaimed part
    std::atomic<Eigen::Index> done{0};  // parts finished
    job* later = nullptr;               // the next queued job; guarded by mutex_
    bool queued = false;                // guarded by mutex_
  };

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

  // The queue is a list threaded through the callers' own job objects, so queuing never allocates.
  void push(job* j) noexcept {
    job** tail = &head_;
    while (*tail != nullptr) tail = &(*tail)->later;
    *tail = j;
    j->queued = true;
  }
  void unlink(job* j) noexcept {
    if (!j->queued) return;
    job** at = &head_;
    while (*at != j) at = &(*at)->later;
    *at = j->later;
    j->queued = false;
  }

  /// Grows the pool to `count` workers if it can; with fewer, callers do more parts themselves.
  void start_workers(std::size_t count) noexcept {
    try {
      workers_.reserve(count);
      while (workers_.size() < count) workers_.emplace_back([this] { work(); });
    } catch (...) {  // no thread or no memory: run with the workers there are
    }
  }

  void work() {
    std::unique_lock<std::mutex> lock(mutex_);
    for (;;) {
      if (head_ == nullptr) {
        const std::uint64_t seen = posted_.load(std::memory_order_acquire);
        lock.unlock();
        spin_until([&] { return posted_.load(std::memory_order_acquire) != seen; });
        lock.lock();
        ++parked_;
        work_ready_.wait(lock, [&] { return head_ != nullptr; });
        --parked_;
      }
      job* const j = head_;
      const Eigen::Index part = j->next.fetch_add(1);
      if (part >= j->parts) {  // every part is claimed: this job needs no more help
        unlink(j);
        continue;
      }
      const Eigen::Index parts = j->parts;  // read first: once j->done reaches it, j may be gone
      lock.unlock();
      j->task(j->context, part);
      if (j->done.fetch_add(1, std::memory_order_acq_rel) + 1 == parts) {
        lock.lock();  // the caller may be about to park: notify under the lock
        part_done_.notify_all();
      } else {
        lock.lock();
      }
    }
  }

  std::mutex mutex_;
  std::condition_variable work_ready_, part_done_;
  job* head_ = nullptr;
  std::atomic<std::uint64_t> posted_{0};  // jobs ever queued: what spinning workers watch
  int parked_ = 0;                        // workers waiting on work_ready_; guarded by mutex_
  std::vector<std::thread> workers_;
};

}  // namespace bitnet::detail
