#include "kv/page_pool.h"

#include <cassert>
#include <utility>

#include "absl/strings/str_cat.h"

namespace kvgate::kv {

PagePool::PagePool(int32_t num_pages) {
  assert(num_pages >= 0);
  if (num_pages < 0) num_pages = 0;
  allocated_.assign(static_cast<size_t>(num_pages), 0);
  std::vector<int32_t> ids(static_cast<size_t>(num_pages));
  for (int32_t id = 0; id < num_pages; ++id) ids[id] = id;  // ascending: already a min-heap
  free_ = decltype(free_)(std::greater<int32_t>(), std::move(ids));
}

absl::StatusOr<std::vector<int32_t>> PagePool::Allocate(int32_t count) {
  if (count < 0) {
    return absl::InvalidArgumentError(absl::StrCat("PagePool::Allocate: negative count ", count));
  }
  if (count > num_free()) {
    return absl::ResourceExhaustedError(absl::StrCat("KV page pool exhausted: ", count,
                                                     " pages requested, ", num_free(), " free of ",
                                                     num_total()));
  }
  std::vector<int32_t> ids;
  ids.reserve(static_cast<size_t>(count));
  for (int32_t i = 0; i < count; ++i) {
    ids.push_back(free_.top());
    free_.pop();
    allocated_[ids.back()] = 1;
  }
  return ids;
}

absl::Status PagePool::Free(absl::Span<const int32_t> ids) {
  // Validate the whole batch before applying it: a bad id frees nothing. Marking each id
  // as it is checked also catches an id repeated within the batch; the marks are undone
  // on failure.
  absl::Status status;
  size_t checked = 0;
  for (; checked < ids.size(); ++checked) {
    const int32_t id = ids[checked];
    if (id < 0 || id >= num_total()) {
      status = absl::FailedPreconditionError(
          absl::StrCat("PagePool::Free: page id ", id, " outside [0, ", num_total(), ")"));
      break;
    }
    if (!allocated_[id]) {
      status = absl::FailedPreconditionError(
          absl::StrCat("PagePool::Free: page ", id, " is not allocated (double free)"));
      break;
    }
    allocated_[id] = 0;
  }
  if (!status.ok()) {
    for (size_t i = 0; i < checked; ++i) allocated_[ids[i]] = 1;
    return status;
  }
  for (int32_t id : ids) free_.push(id);
  return absl::OkStatus();
}

bool PagePool::IsAllocated(int32_t id) const {
  return id >= 0 && id < num_total() && allocated_[id] != 0;
}

}  // namespace kvgate::kv
