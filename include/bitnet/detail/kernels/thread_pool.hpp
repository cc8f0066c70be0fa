// The kernels' worker threads: started on first need and kept parked for later calls, so a
// multi-threaded kernel call costs a wake-up (microseconds) rather than a thread start (tens of
// microseconds, a large share of a batch-1 layer).
#pragma once

#include <algorithm>
#include <atomic>
#include <condition_variable>
#include <cstddef>
#include <mutex>
#include <thread>
#include <vector>

#include <Eigen/Core>

namespace bitnet::detail {

class thread_pool {
 public:
  /// The process-wide pool. Never destroyed: parked workers simply end with the process, and a
  /// kernel call made while static objects are destroyed still finds its pool.
  static thread_pool& instance() {
    static thread_pool* const pool = new thread_pool;
    return *pool;
  }

  /// Calls task(context, part) for every part in [0, parts) and returns once all have returned.
  /// The calling thread runs parts too, and up to parts - 1 workers help: a call completes even
  /// when every worker is busy with other calls or none could be started. task must not throw.
  void run(Eigen::Index parts, void (*task)(const void*, Eigen::Index), const void* context) {
    if (parts <= 1) {
      if (parts == 1) task(context, 0);
      return;
    }
    job j{task, context, parts};
    {
      const std::lock_guard<std::mutex> lock(mutex_);
      start_workers(std::size_t(parts - 1));
      push(&j);
    }
    work_ready_.notify_all();
    Eigen::Index done_here = 0;
    for (Eigen::Index part; (part = j.next.fetch_add(1)) < parts; ++done_here) task(context, part);
    std::unique_lock<std::mutex> lock(mutex_);
    unlink(&j);
    j.done += done_here;
    // Workers that claimed a part count it under the lock; none touches j after that.
    part_done_.wait(lock, [&] { return j.done == parts; });
  }

 private:
  struct job {
    void (*task)(const void*, Eigen::Index);
    const void* context;
    Eigen::Index parts;
    std::atomic<Eigen::Index> next{0};  // the next unclaimed part
    Eigen::Index done = 0;              // parts finished; guarded by mutex_
    job* later = nullptr;               // the next queued job; guarded by mutex_
    bool queued = false;                // guarded by mutex_
  };

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

  thread_pool() = default;

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
      work_ready_.wait(lock, [&] { return head_ != nullptr; });
      job* const j = head_;
      const Eigen::Index part = j->next.fetch_add(1);
      if (part >= j->parts) {  // every part is claimed: this job needs no more help
        unlink(j);
        continue;
      }
      lock.unlock();
      j->task(j->context, part);
      lock.lock();
      if (++j->done == j->parts) part_done_.notify_all();
    }
  }

  std::mutex mutex_;
  std::condition_variable work_ready_, part_done_;
  job* head_ = nullptr;
  std::vector<std::thread> workers_;
};

}  // namespace bitnet::detail
