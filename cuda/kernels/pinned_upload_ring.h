// File: PinnedUploadRing, the CUDA backend's path for small host-to-device copies. A
// cudaMemcpyAsync from pageable memory may wait for the stream before it stages the
// bytes, so every small upload of a decode step (token ids, positions, page tables, row
// lists) would stall the host until the GPU caught up, and the GPU would then idle while
// the host launched the next kernels. The ring copies the bytes into one of a few pinned
// slots on the host and enqueues a truly asynchronous copy from there; an event per slot
// says when the slot may be written again.
#pragma once

#include <cuda_runtime.h>

#include <cstddef>
#include <mutex>
#include <vector>

#include "absl/status/status.h"

namespace kvgate::ops {

class PinnedUploadRing {
 public:
  // Uploads of at most slot_bytes go through `slots` pinned slots; larger ones are the
  // caller's (plain cudaMemcpyAsync).
  // 32 MiB of pinned host memory per backend; a decode step's page tables at batch 64 and
  // 8k context fit one slot.
  static constexpr size_t kDefaultSlots = 8;
  static constexpr size_t kDefaultSlotBytes = size_t{4} << 20;

  PinnedUploadRing() = default;
  PinnedUploadRing(const PinnedUploadRing&) = delete;
  PinnedUploadRing& operator=(const PinnedUploadRing&) = delete;
  ~PinnedUploadRing();

  // Allocates the pinned slots and their events on the current device.
  absl::Status Init(size_t slots = kDefaultSlots, size_t slot_bytes = kDefaultSlotBytes);

  size_t slot_bytes() const { return slot_bytes_; }

  // Copies `bytes` (<= slot_bytes()) of `host_src` into the next slot (waiting for that
  // slot's previous copy if it is still in flight) and enqueues slot -> `device_dst` on
  // `stream`. `host_src` may be reused as soon as this returns.
  absl::Status Upload(void* device_dst, const void* host_src, size_t bytes, cudaStream_t stream);

 private:
  struct Slot {
    void* host = nullptr;
    cudaEvent_t done = nullptr;
    bool in_flight = false;
  };
  std::mutex mu_;
  std::vector<Slot> slots_;
  size_t slot_bytes_ = 0;
  size_t next_ = 0;
};

}  // namespace kvgate::ops
