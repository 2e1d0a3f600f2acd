// metafast::cpu_cache_*: a caching CPU allocator for the duration of a meta-step, the CPU
// counterpart of torch's CUDA caching allocator.
//
// A meta-step of a CNN allocates and frees the same multi-MB maps every step. glibc returns freed heap
// tops to the kernel once they exceed its adaptive trim threshold and serves large blocks by fresh
// mmaps, so each step faults tens of thousands of zeroed pages back in (Conv4, 32 tasks: 13-20k faults,
// ~15-25% of the step; bench/NOTES.md). While a scope is entered (cpu_cache_enter/exit, nested and
// counted), blocks of at least kMinBlock bytes come from, and return to, size-keyed free lists, so the
// next step reuses the pages the last one faulted in; blocks freed after the scope closed still return
// to the lists. Cached (free) bytes are capped (the limit; beyond it blocks go back to the system), and
// cpu_cache_empty() releases them all. The first scope installs this allocator as torch's CPU
// allocator (only over torch's default one) for the rest of the process; outside scopes, and for
// smaller blocks, it allocates and frees as the default allocator does (c10::alloc_cpu / free_cpu).
#include <c10/core/Allocator.h>
#include <c10/core/CPUAllocator.h>
#include <c10/core/impl/alloc_cpu.h>
#include <c10/util/Exception.h>
#include <pthread.h>
#include <torch/library.h>

#include <atomic>
#include <cstdint>
#include <map>
#include <mutex>
#include <unordered_map>
#include <vector>

namespace metafast {
namespace cpu_cache {
namespace {

constexpr size_t kMinBlock = 256 * 1024;
// A cached block serves a request up to this factor smaller (the rest of it idles until freed).
constexpr size_t kMaxWasteDiv = 4;  // request >= block - block / 4

void release(void* ptr);

class BlockCache final : public c10::Allocator {
 public:
  c10::DataPtr allocate(size_t n) override {
    if (n < kMinBlock || depth_.load(std::memory_order_relaxed) == 0) {  // what the default allocator does
      void* p = c10::alloc_cpu(n);
      return {p, p, &c10::free_cpu, c10::Device(c10::DeviceType::CPU)};
    }
    void* p = nullptr;
    {
      std::lock_guard<std::mutex> g(mu_);
      auto it = free_.lower_bound(n);
      if (it != free_.end() && n >= it->first - it->first / kMaxWasteDiv) {
        p = it->second;
        cached_bytes_ -= it->first;
        free_.erase(it);
        ++hits_;
      } else {
        ++misses_;
      }
    }
    if (p == nullptr) {
      p = c10::alloc_cpu(n);
      std::lock_guard<std::mutex> g(mu_);
      size_of_[p] = n;
    }
    return {p, p, &release, c10::Device(c10::DeviceType::CPU)};
  }

  void copy_data(void* dest, const void* src, std::size_t count) const override {
    default_copy_data(dest, src, count);
  }

  // raw_allocate / raw_deallocate users (oneDNN's scratch buffers) need one deleter for every block.
  c10::DeleterFnPtr raw_deleter() const override { return &release; }

  // Any block of c10::alloc_cpu: this cache's large ones are kept, the rest (small ones, and blocks the
  // default allocator made before a scope opened) go back to the system.
  void give_back(void* p) {
    std::unique_lock<std::mutex> g(mu_);
    auto found = size_of_.find(p);
    if (found == size_of_.end()) {
      g.unlock();
      c10::free_cpu(p);
      return;
    }
    const size_t n = found->second;
    if (cached_bytes_ + n <= limit_) {
      free_.emplace(n, p);
      cached_bytes_ += n;
      return;
    }
    size_of_.erase(found);
    g.unlock();
    c10::free_cpu(p);
  }

  void empty() {
    std::vector<void*> drop;
    {
      std::lock_guard<std::mutex> g(mu_);
      for (auto& kv : free_) {
        drop.push_back(kv.second);
        size_of_.erase(kv.second);
      }
      free_.clear();
      cached_bytes_ = 0;
    }
    for (void* p : drop) c10::free_cpu(p);
  }

  // Installed at the first scope and left installed: a block handed out by one allocator and raw-freed
  // through another's raw_deleter would otherwise escape the cache's bookkeeping.
  bool enter() {
    std::lock_guard<std::mutex> g(mu_);
    if (!installed_) {
      if (c10::GetCPUAllocator() != c10::GetDefaultCPUAllocator()) return false;  // someone else's: leave it
      c10::SetCPUAllocator(this, 0);
      if (c10::GetCPUAllocator() != this) return false;  // set at a higher priority elsewhere
      installed_ = true;
    } else if (c10::GetCPUAllocator() != this) {
      return false;  // replaced since
    }
    depth_.fetch_add(1);
    return true;
  }

  void exit() {
    std::lock_guard<std::mutex> g(mu_);
    TORCH_CHECK(depth_.load() > 0, "cpu_cache_exit without a matching cpu_cache_enter");
    depth_.fetch_sub(1);
  }

  void lock() { mu_.lock(); }
  void unlock() { mu_.unlock(); }

  std::vector<int64_t> stats() {
    std::lock_guard<std::mutex> g(mu_);
    return {static_cast<int64_t>(cached_bytes_), static_cast<int64_t>(free_.size()),
            static_cast<int64_t>(size_of_.size() - free_.size()), hits_, misses_, depth_.load(),
            static_cast<int64_t>(limit_), installed_ ? 1 : 0};
  }

  void set_limit(int64_t bytes) {
    TORCH_CHECK(bytes >= 0, "limit_bytes must be >= 0, got ", bytes);
    {
      std::lock_guard<std::mutex> g(mu_);
      limit_ = static_cast<size_t>(bytes);
    }
    empty();
  }

 private:
  std::mutex mu_;
  std::multimap<size_t, void*> free_;          // cached blocks by size
  std::unordered_map<void*, size_t> size_of_;  // every block of this cache, live or cached
  size_t cached_bytes_ = 0;
  size_t limit_ = size_t(1) << 30;
  int64_t hits_ = 0, misses_ = 0;
  std::atomic<int64_t> depth_{0};  // open scopes (read unlocked by allocate)
  bool installed_ = false;
};

// Never destroyed: blocks may be freed during interpreter shutdown, after static destructors ran.
// The lock is held across fork() (DataLoader workers), so a child never inherits it taken by a
// thread that does not exist in the child.
BlockCache& cache() {
  static BlockCache* c = [] {
    auto* made = new BlockCache();
    pthread_atfork([] { cache().lock(); }, [] { cache().unlock(); }, [] { cache().unlock(); });
    return made;
  }();
  return *c;
}

void release(void* ptr) { cache().give_back(ptr); }

bool enter() { return cache().enter(); }
void exit_scope() { cache().exit(); }
void empty() { cache().empty(); }
std::vector<int64_t> stats() { return cache().stats(); }
void set_limit(int64_t bytes) { cache().set_limit(bytes); }

}  // namespace
}  // namespace cpu_cache
}  // namespace metafast

TORCH_LIBRARY_FRAGMENT(metafast, m) {
  // Whether the cache is torch's CPU allocator now (False: another allocator is installed; nothing changed).
  m.def("cpu_cache_enter() -> bool", &metafast::cpu_cache::enter);
  m.def("cpu_cache_exit() -> ()", &metafast::cpu_cache::exit_scope);
  // Releases every cached (free) block to the system.
  m.def("cpu_cache_empty() -> ()", &metafast::cpu_cache::empty);
  // [cached bytes, cached blocks, live blocks, hits, misses, scope depth, limit bytes, installed]
  m.def("cpu_cache_stats() -> int[]", &metafast::cpu_cache::stats);
  m.def("cpu_cache_set_limit(int limit_bytes) -> ()", &metafast::cpu_cache::set_limit);
}
