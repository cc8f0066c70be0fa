// Kept out of the test's translation unit so the replaced operator new/delete are never inlined
// into standard-library code (GCC then reports a false -Wmismatched-new-delete).
#include "alloc_fault.hpp"

#include <cstdio>
#include <cstdlib>
#include <cstring>
#include <new>

namespace alloc_fault {

long allocations = 0;
long fail_at = 0;
bool armed = false;

void on_allocation() {
  if (!armed) return;
  if (++allocations == fail_at) throw std::bad_alloc();
}

void eigen_assertion(bool ok, const char* expression, const char* file, int line) {
  if (ok) return;
  if (std::strstr(expression, "heap allocation is forbidden") != nullptr) return on_allocation();
  std::fprintf(stderr, "%s:%d: Eigen assertion failed: %s\n", file, line, expression);
  std::abort();
}

}  // namespace alloc_fault

void* operator new(std::size_t size) {
  alloc_fault::on_allocation();
  if (void* p = std::malloc(size ? size : 1)) return p;
  throw std::bad_alloc();
}
void operator delete(void* p) noexcept { std::free(p); }
void operator delete(void* p, std::size_t) noexcept { std::free(p); }
// The packed ternary weights and the kernels' scratch use the aligned forms (cache-line aligned).
void* operator new(std::size_t size, std::align_val_t alignment) {
  alloc_fault::on_allocation();
  const std::size_t align = static_cast<std::size_t>(alignment);
  if (void* p = std::aligned_alloc(align, (size + align - 1) / align * align + (size ? 0 : align))) return p;
  throw std::bad_alloc();
}
void operator delete(void* p, std::align_val_t) noexcept { std::free(p); }
void operator delete(void* p, std::size_t, std::align_val_t) noexcept { std::free(p); }
// std::stable_sort's temporary buffer uses the nothrow form: it must come from the same heap as
// the operator delete above (ASan reports the mismatch otherwise); an injected failure returns null.
void* operator new(std::size_t size, const std::nothrow_t&) noexcept {
  try {
    alloc_fault::on_allocation();
  } catch (const std::bad_alloc&) {
    return nullptr;
  }
  return std::malloc(size ? size : 1);
}
