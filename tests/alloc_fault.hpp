// A counter of heap allocations that can make the n-th one fail, for tests of exception safety.
// Counts the global operator new (replaced in alloc_fault.cpp) and, when a test includes this header
// before Eigen, every Eigen heap allocation: with EIGEN_RUNTIME_NO_MALLOC, Eigen checks each one with
// eigen_assert, which is defined here to report the allocation instead of asserting. It includes
// doctest: a test's main file defines DOCTEST_CONFIG_IMPLEMENT_WITH_MAIN before including it.
#pragma once

namespace alloc_fault {

extern long allocations;  // allocations seen while armed
extern long fail_at;      // 1-based allocation that throws std::bad_alloc; 0: none
extern bool armed;

void on_allocation();  // throws std::bad_alloc on the fail_at-th allocation while armed
void eigen_assertion(bool ok, const char* expression, const char* file, int line);

}  // namespace alloc_fault

#define EIGEN_RUNTIME_NO_MALLOC
#define eigen_assert(x) ::alloc_fault::eigen_assertion(bool(x), #x, __FILE__, __LINE__)

#include <new>

#include <Eigen/Core>
#include <doctest/doctest.h>

namespace alloc_fault {

/// Counts allocations, and fails the fail-th one (0: none), while it lives.
struct armed_scope {
  explicit armed_scope(long fail) {
    allocations = 0;
    fail_at = fail;
    armed = true;
    Eigen::internal::set_is_malloc_allowed(false);
  }
  ~armed_scope() {
    armed = false;
    Eigen::internal::set_is_malloc_allowed(true);
  }
};

/// Runs run(graph) on fresh graphs from make(), failing allocation 1, 2, ... until a run succeeds.
/// After each failure state(graph) must be what it was before the run; after the run that succeeds
/// it must differ, unless !changes (a dry run). Returns how many failure points were exercised.
template <class Make, class Run, class State>
long fail_every_allocation(Make make, Run run, State state, bool changes = true) {
  // A first, unarmed run leaves what a process keeps between calls in its steady state (the
  // kernels' per-thread scratch grows once and is reused), so every run below allocates the same.
  {
    auto graph = make();
    run(*graph);
  }
  long total = 0;
  {
    auto graph = make();
    armed_scope counting(0);
    run(*graph);
    total = allocations;
  }
  REQUIRE(total > 0);
  for (long n = 1; n <= total + 1; ++n) {
    CAPTURE(n);
    auto graph = make();
    const auto before = state(*graph);
    bool failed = false;
    try {
      armed_scope failing(n);
      run(*graph);
    } catch (const std::bad_alloc&) {
      failed = true;
    }
    CHECK(failed == (n <= total));
    if (failed || !changes)
      CHECK(state(*graph) == before);
    else
      CHECK(state(*graph) != before);
  }
  return total;
}

}  // namespace alloc_fault
