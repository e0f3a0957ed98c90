// File: PagePool, the id allocator of the head-paged KV pool. Ids only: it knows
// nothing of backend memory, layers or sequences (kv_pool.h owns the memory,
// sequence_layout.h decides which ids go where), so it is tested without hardware.
//
// Allocation is deterministic: the lowest free ids first. Every batch operation is
// all-or-nothing, so a failed call leaves the pool exactly as it was.
#pragma once

#include <cstdint>
#include <functional>
#include <queue>
#include <vector>

#include "absl/status/status.h"
#include "absl/status/statusor.h"
#include "absl/types/span.h"

namespace kvgate::kv {

class PagePool {
 public:
  // Ids [0, num_pages). num_pages >= 0.
  explicit PagePool(int32_t num_pages);

  PagePool(const PagePool&) = delete;
  PagePool& operator=(const PagePool&) = delete;

  // The `count` lowest free ids, ascending. count == 0 returns an empty list;
  // count < 0 is INVALID_ARGUMENT; fewer than `count` free is RESOURCE_EXHAUSTED and
  // allocates nothing.
  absl::StatusOr<std::vector<int32_t>> Allocate(int32_t count);

  // Returns `ids` to the pool. An id out of range, not allocated (a double free) or
  // repeated within `ids` is FAILED_PRECONDITION and frees nothing of the batch.
  absl::Status Free(absl::Span<const int32_t> ids);

  // True when `id` is in range and allocated.
  bool IsAllocated(int32_t id) const;

  int32_t num_total() const { return static_cast<int32_t>(allocated_.size()); }
  int32_t num_free() const { return static_cast<int32_t>(free_.size()); }
  int32_t num_used() const { return num_total() - num_free(); }

 private:
  // Min-heap of free ids (4 bytes a page: pools hold millions of pages), so top() is
  // the lowest free id.
  std::priority_queue<int32_t, std::vector<int32_t>, std::greater<int32_t>> free_;
  std::vector<uint8_t> allocated_;  // [num_pages], 1 = handed out
};

}  // namespace kvgate::kv
