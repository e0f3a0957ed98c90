// File: the bookkeeping of memory carved from a few large slabs (first fit, neighbours
// merged on release). The CUDA backend's shareable memory (cuda/kernels/shareable_memory.h)
// uses it so that a KV transfer's buffers come from slabs allocated and IPC-named once;
// it is plain host code so that the CPU build tests it.
#pragma once

#include <cstdint>
#include <map>
#include <optional>
#include <vector>

namespace kvgate::ops {

class SlabRanges {
 public:
  struct Range {
    int32_t slab = -1;
    uint64_t offset = 0;  // bytes from the slab's start, a multiple of the alignment
    uint64_t bytes = 0;   // the request rounded up to the alignment
  };

  // alignment: a power of two; min_slab_bytes: the smallest slab NewSlabBytes proposes.
  SlabRanges(uint64_t alignment, uint64_t min_slab_bytes);

  // A free range of at least `bytes` (> 0) in a slab already added, the lowest address of
  // the first slab that has one; nullopt when none has room (add a slab, then ask again).
  std::optional<Range> Take(uint64_t bytes);
  // The size of a slab to add for a request that Take could not place.
  uint64_t NewSlabBytes(uint64_t bytes) const;
  // Registers a slab of `bytes` (a multiple of the alignment), wholly free; its index.
  int32_t AddSlab(uint64_t bytes);
  // Returns a range of Take; it merges with free neighbours.
  void Give(const Range& range);

  int32_t num_slabs() const { return static_cast<int32_t>(slabs_.size()); }
  uint64_t slab_bytes(int32_t slab) const { return slabs_[static_cast<size_t>(slab)].bytes; }
  uint64_t free_bytes() const;

 private:
  struct Slab {
    uint64_t bytes = 0;
    std::map<uint64_t, uint64_t> free;  // offset -> length, disjoint and never adjacent
  };
  uint64_t RoundUp(uint64_t bytes) const { return (bytes + alignment_ - 1) & ~(alignment_ - 1); }

  const uint64_t alignment_;
  const uint64_t min_slab_bytes_;
  std::vector<Slab> slabs_;
};

}  // namespace kvgate::ops
