#include "cuda/slab_ranges.h"

#include <algorithm>
#include <iterator>

namespace kvgate::ops {

SlabRanges::SlabRanges(uint64_t alignment, uint64_t min_slab_bytes)
    : alignment_(alignment), min_slab_bytes_(std::max(alignment, min_slab_bytes)) {}

std::optional<SlabRanges::Range> SlabRanges::Take(uint64_t bytes) {
  if (bytes == 0) return std::nullopt;
  const uint64_t need = RoundUp(bytes);
  for (size_t s = 0; s < slabs_.size(); ++s) {
    std::map<uint64_t, uint64_t>& free = slabs_[s].free;
    for (auto it = free.begin(); it != free.end(); ++it) {
      if (it->second < need) continue;
      Range range{static_cast<int32_t>(s), it->first, need};
      const uint64_t rest = it->second - need;
      const uint64_t rest_offset = it->first + need;
      free.erase(it);
      if (rest > 0) free.emplace(rest_offset, rest);
      return range;
    }
  }
  return std::nullopt;
}

uint64_t SlabRanges::NewSlabBytes(uint64_t bytes) const { return std::max(min_slab_bytes_, RoundUp(bytes)); }

int32_t SlabRanges::AddSlab(uint64_t bytes) {
  Slab slab;
  slab.bytes = bytes;
  slab.free.emplace(0, bytes);
  slabs_.push_back(std::move(slab));
  return static_cast<int32_t>(slabs_.size()) - 1;
}

void SlabRanges::Give(const Range& range) {
  std::map<uint64_t, uint64_t>& free = slabs_[static_cast<size_t>(range.slab)].free;
  uint64_t offset = range.offset, bytes = range.bytes;
  auto next = free.lower_bound(offset);
  if (next != free.begin()) {
    auto prev = std::prev(next);
    if (prev->first + prev->second == offset) {
      offset = prev->first;
      bytes += prev->second;
      free.erase(prev);
    }
  }
  if (next != free.end() && offset + bytes == next->first) {
    bytes += next->second;
    free.erase(next);
  }
  free.emplace(offset, bytes);
}

uint64_t SlabRanges::free_bytes() const {
  uint64_t total = 0;
  for (const Slab& slab : slabs_) {
    for (const auto& [offset, bytes] : slab.free) total += bytes;
  }
  return total;
}

}  // namespace kvgate::ops
