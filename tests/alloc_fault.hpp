// A counter of heap allocations that can make the n-th one fail, for tests of exception safety.
// Counts the global operator new (replaced in alloc_fault.cpp) and, when a test includes this header
// before Eigen, every Eigen heap allocation: with EIGEN_RUNTIME_NO_MALLOC, Eigen checks each one with
// eigen_assert, which is defined here to report the allocation instead of asserting.
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
