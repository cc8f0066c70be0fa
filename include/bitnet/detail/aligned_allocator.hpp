// Allocators for the kernels' buffers. aligned_allocator aligns every block to a cache line, so the
// kernels' vector loads never split lines. weight_allocator (packed weights) also asks for huge
// pages: a model's packed weights are streamed from DRAM once per token, and with 4 KiB pages that
// stream crosses a page (a TLB miss, a hardware prefetcher stopping) every 4 KiB; a block of at
// least 2 MiB is aligned to 2 MiB and advised as transparent huge pages (Linux madvise
// MADV_HUGEPAGE: effective when /sys/kernel/mm/transparent_hugepage/enabled is [always] or
// [madvise]). Where the advice is refused or unknown the block simply keeps small pages: the bytes
// and results are the same either way. Both are stateless, so containers using them stay copyable
// and nothrow-movable.
#pragma once

#include <cstddef>
#include <limits>
#include <new>
#include <vector>

#if defined(__linux__)
#include <sys/mman.h>
#endif

namespace bitnet::detail {

inline constexpr std::size_t cache_line = 64;
inline constexpr std::size_t huge_page = std::size_t{2} << 20;

template <class T, bool HugePages>
struct basic_aligned_allocator {
  using value_type = T;
  template <class U>
  struct rebind {
    using other = basic_aligned_allocator<U, HugePages>;
  };

  basic_aligned_allocator() noexcept = default;
  template <class U>
  basic_aligned_allocator(const basic_aligned_allocator<U, HugePages>&) noexcept {}

  T* allocate(std::size_t n) {
    if (n > std::numeric_limits<std::size_t>::max() / sizeof(T)) throw std::bad_array_new_length();
    const std::size_t bytes = n * sizeof(T);
    void* const p = ::operator new(bytes, std::align_val_t{alignment(bytes)});
#if defined(__linux__) && defined(MADV_HUGEPAGE)
    // Before the first touch, so the pages are faulted in huge. The whole 2 MiB pages only: the
    // tail's page is shared with whatever the heap puts after the block.
    if (HugePages && bytes >= huge_page) ::madvise(p, bytes / huge_page * huge_page, MADV_HUGEPAGE);
#endif
    return static_cast<T*>(p);
  }
  void deallocate(T* p, std::size_t n) noexcept { ::operator delete(p, std::align_val_t{alignment(n * sizeof(T))}); }

  template <class U>
  friend bool operator==(const basic_aligned_allocator&, const basic_aligned_allocator<U, HugePages>&) noexcept {
    return true;
  }

 private:
  /// 2 MiB for a huge-page block of 2 MiB and more, else a cache line.
  static constexpr std::size_t alignment(std::size_t bytes) noexcept {
    return HugePages && bytes >= huge_page ? huge_page : cache_line;
  }
};

template <class T>
using aligned_allocator = basic_aligned_allocator<T, false>;
template <class T>
using weight_allocator = basic_aligned_allocator<T, true>;

template <class T>
using aligned_vector = std::vector<T, aligned_allocator<T>>;
/// Packed weights: cache-line aligned, huge pages from 2 MiB up (see above).
template <class T>
using weight_vector = std::vector<T, weight_allocator<T>>;

}  // namespace bitnet::detail
