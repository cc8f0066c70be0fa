// A std::allocator replacement that aligns every block to a cache line, so the kernels' vector
// loads never split lines. Stateless, so containers using it stay copyable and nothrow-movable.
#pragma once

#include <cstddef>
#include <limits>
#include <new>
#include <vector>

namespace bitnet::detail {

inline constexpr std::size_t cache_line = 64;

template <class T>
struct aligned_allocator {
  using value_type = T;

  aligned_allocator() noexcept = default;
  template <class U>
  aligned_allocator(const aligned_allocator<U>&) noexcept {}

  T* allocate(std::size_t n) {
    if (n > std::numeric_limits<std::size_t>::max() / sizeof(T)) throw std::bad_array_new_length();
    return static_cast<T*>(::operator new(n * sizeof(T), std::align_val_t{cache_line}));
  }
  void deallocate(T* p, std::size_t) noexcept { ::operator delete(p, std::align_val_t{cache_line}); }

  template <class U>
  friend bool operator==(const aligned_allocator&, const aligned_allocator<U>&) noexcept {
    return true;
  }
};

template <class T>
using aligned_vector = std::vector<T, aligned_allocator<T>>;

}  // namespace bitnet::detail
