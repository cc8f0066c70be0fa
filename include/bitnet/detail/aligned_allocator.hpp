// Allocators for the kernels' buffers. aligned_allocator aligns every block to a cache line, so the
// kernels' vector loads never split lines. weight_allocator (packed weights) also puts them on huge
// pages: a model's packed weights are streamed from DRAM once per token, and with 4 KiB pages that
// stream crosses a page (a TLB miss, a hardware prefetcher stopping) every 4 KiB.
//
// Huge pages (Linux): blocks of weight_arena::min_block and more are carved one after the other out
// of 64 MiB chunks of address space, 2 MiB aligned and advised as transparent huge pages
// (madvise MADV_HUGEPAGE before the first touch; effective when
// /sys/kernel/mm/transparent_hugepage/enabled is [always] or [madvise]). A model's layers then
// share huge pages end to end, whatever their sizes: a block of its own would leave the tail
// beyond its last whole 2 MiB on small pages (measured: 31% of a 2B-4T stack's 2-bit bytes, 57% of
// its base-3 bytes), and a layer smaller than 2 MiB none at all. Where the advice is refused, the
// chunk keeps small pages: the bytes and results are the same either way. Elsewhere every block
// comes from the heap, cache-line aligned.
//
// Both allocators are stateless (the arena is one per process), so containers using them stay
// copyable and nothrow-movable.
#pragma once

#include <cstddef>
#include <cstdint>
#include <limits>
#include <new>
#include <vector>

#if defined(__linux__)
#include <sys/mman.h>
#endif

#if defined(__linux__) && defined(MADV_HUGEPAGE)
#define BITNET_WEIGHT_ARENA 1
#include <atomic>
#include <mutex>
#if defined(__SANITIZE_ADDRESS__)
#define BITNET_ARENA_ASAN 1
#elif defined(__has_feature)
#if __has_feature(address_sanitizer)
#define BITNET_ARENA_ASAN 1
#endif
#endif
#ifdef BITNET_ARENA_ASAN
#include <sanitizer/asan_interface.h>
#endif
#endif

namespace bitnet::detail {

inline constexpr std::size_t cache_line = 64;
inline constexpr std::size_t huge_page = std::size_t{2} << 20;

#ifdef BITNET_WEIGHT_ARENA

/// The process's packed-weight memory: chunks of address space on huge pages, each carved from its
/// start into blocks (a cache line of header, then the block), never reused within a chunk. A chunk
/// is unmapped when its last block is freed and the arena has moved on to a newer chunk; until then
/// a freed block gives its whole small pages back to the system (MADV_DONTNEED), so a long-lived
/// neighbour pins at most the two partial pages at a freed block's ends. Blocks larger than half a
/// chunk get a chunk of their own. Allocation takes a mutex (it runs when a layer is packed, never
/// in forward()); deallocation is one atomic decrement and needs no arena at all, so a block may be
/// freed by any thread and any shared object of the process.
class weight_arena {
 public:
  static constexpr std::size_t chunk_bytes = std::size_t{64} << 20;
  /// Smaller blocks come from the heap: their pages would be a small share of a chunk's TLB reach,
  /// and a freed one would give nothing back to the system until its chunk died.
  static constexpr std::size_t min_block = std::size_t{64} << 10;

  /// One per process, never destroyed: blocks may outlive every static object.
  static weight_arena& instance() {
    static weight_arena* const arena = new weight_arena;
    return *arena;
  }

  /// A cache-line aligned block of `bytes` (>= min_block); throws std::bad_alloc when no chunk can
  /// be mapped, before anything changes.
  void* allocate(std::size_t bytes) {
    const std::size_t span = cache_line + round_up(bytes, cache_line);  // header + block
    const std::lock_guard<std::mutex> lock(mutex_);
    if (span > chunk_bytes / 2) {  // a chunk of its own, the current one kept
      chunk* const own = map_chunk(round_up(cache_line + span, huge_page), 0);
      return carve(own, cache_line, bytes);
    }
    if (current_ == nullptr || current_->bytes - used_ < span) {
      chunk* const fresh = map_chunk(chunk_bytes, 1);  // the arena's own reference
      if (current_ != nullptr) release(current_);
      current_ = fresh;
      used_ = cache_line;
    }
    void* const block = carve(current_, used_, bytes);
    used_ += span;
    return block;
  }

  /// Frees a block of `bytes` from allocate().
  static void deallocate(void* block, std::size_t bytes) noexcept {
    auto* const header = static_cast<unsigned char*>(block) - cache_line;
    unpoison(header, cache_line);
    chunk* const owner = reinterpret_cast<block_header*>(header)->owner;
    poison(header, cache_line);
    poison(block, bytes);
    // Only the small pages wholly inside the block: the partial ones at its ends may be shared.
    const auto begin = reinterpret_cast<std::uintptr_t>(block), end = begin + bytes;
    const std::uintptr_t first = round_up(begin, small_page), last = end / small_page * small_page;
    if (first < last) ::madvise(reinterpret_cast<void*>(first), last - first, MADV_DONTNEED);
    release(owner);
  }

 private:
  static constexpr std::size_t small_page = 4096;

  static constexpr std::size_t round_up(std::size_t n, std::size_t multiple) noexcept {
    return (n + multiple - 1) / multiple * multiple;
  }

  struct chunk {  // the first cache line of each chunk
    std::atomic<std::size_t> references;  // live blocks, plus one while it is the arena's current chunk
    std::size_t bytes;
  };
  struct block_header {  // the cache line before each block
    chunk* owner;
  };

  weight_arena() = default;

  /// `bytes` (a multiple of 2 MiB) of address space, 2 MiB aligned, advised as huge pages.
  static chunk* map_chunk(std::size_t bytes, std::size_t references) {
    // Over-allocate by one huge page and trim, for the alignment.
    void* const raw = ::mmap(nullptr, bytes + huge_page, PROT_READ | PROT_WRITE, MAP_PRIVATE | MAP_ANONYMOUS, -1, 0);
    if (raw == MAP_FAILED) throw std::bad_alloc();
    const auto start = reinterpret_cast<std::uintptr_t>(raw);
    const std::uintptr_t aligned = round_up(start, huge_page);
    if (aligned != start) ::munmap(raw, aligned - start);
    if (const std::uintptr_t tail = start + huge_page - aligned; tail != 0)
      ::munmap(reinterpret_cast<void*>(aligned + bytes), tail);
    void* const base = reinterpret_cast<void*>(aligned);
    ::madvise(base, bytes, MADV_HUGEPAGE);  // refused: small pages, the same bytes
    chunk* const c = ::new (base) chunk{{references}, bytes};
    poison(reinterpret_cast<unsigned char*>(base) + cache_line, bytes - cache_line);
    return c;
  }

  /// The block after the header at `offset` in chunk c, which gains a reference.
  static void* carve(chunk* c, std::size_t offset, std::size_t bytes) noexcept {
    auto* const header = reinterpret_cast<unsigned char*>(c) + offset;
    unpoison(header, cache_line);
    ::new (header) block_header{c};
    poison(header, cache_line);
    c->references.fetch_add(1, std::memory_order_relaxed);
    unpoison(header + cache_line, bytes);
    return header + cache_line;
  }

  static void release(chunk* c) noexcept {
    if (c->references.fetch_sub(1, std::memory_order_acq_rel) != 1) return;
    const std::size_t bytes = c->bytes;
    unpoison(c, bytes);  // the next mapping at these addresses starts clean
    ::munmap(c, bytes);
  }

  static void poison([[maybe_unused]] const void* p, [[maybe_unused]] std::size_t bytes) noexcept {
#ifdef BITNET_ARENA_ASAN
    ASAN_POISON_MEMORY_REGION(p, bytes);
#endif
  }
  static void unpoison([[maybe_unused]] const void* p, [[maybe_unused]] std::size_t bytes) noexcept {
#ifdef BITNET_ARENA_ASAN
    ASAN_UNPOISON_MEMORY_REGION(p, bytes);
#endif
  }

  std::mutex mutex_;
  chunk* current_ = nullptr;
  std::size_t used_ = 0;  // bytes of current_ carved (headers included)
};

#endif

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
#ifdef BITNET_WEIGHT_ARENA
    if (in_arena(bytes)) return static_cast<T*>(weight_arena::instance().allocate(bytes));
#endif
    return static_cast<T*>(::operator new(bytes, std::align_val_t{cache_line}));
  }
  void deallocate(T* p, std::size_t n) noexcept {
#ifdef BITNET_WEIGHT_ARENA
    if (in_arena(n * sizeof(T))) return weight_arena::deallocate(p, n * sizeof(T));
#endif
    ::operator delete(p, std::align_val_t{cache_line});
  }

  template <class U>
  friend bool operator==(const basic_aligned_allocator&, const basic_aligned_allocator<U, HugePages>&) noexcept {
    return true;
  }

#ifdef BITNET_WEIGHT_ARENA
 private:
  static constexpr bool in_arena(std::size_t bytes) noexcept { return HugePages && bytes >= weight_arena::min_block; }
#endif
};

template <class T>
using aligned_allocator = basic_aligned_allocator<T, false>;
template <class T>
using weight_allocator = basic_aligned_allocator<T, true>;

template <class T>
using aligned_vector = std::vector<T, aligned_allocator<T>>;
/// Packed weights: cache-line aligned, on the huge pages of weight_arena from its min_block up.
template <class T>
using weight_vector = std::vector<T, weight_allocator<T>>;

}  // namespace bitnet::detail
