#include "cuda/kernels/pinned_upload_ring.h"

#include <cstring>

#include "absl/strings/str_cat.h"
#include "cuda/kernels/cuda_check.h"

namespace kvgate::ops {

PinnedUploadRing::~PinnedUploadRing() {
  // Best effort: a slot still in flight is waited for before its memory goes.
  for (Slot& slot : slots_) {
    if (slot.done != nullptr) {
      if (slot.in_flight) (void)cudaEventSynchronize(slot.done);
      (void)cudaEventDestroy(slot.done);
    }
    if (slot.host != nullptr) (void)cudaFreeHost(slot.host);
  }
  (void)cudaGetLastError();
}

absl::Status PinnedUploadRing::Init(size_t slots, size_t slot_bytes) {
  if (slots == 0 || slot_bytes == 0) return absl::InvalidArgumentError("PinnedUploadRing of no slots or bytes");
  slot_bytes_ = slot_bytes;
  slots_.resize(slots);
  for (Slot& slot : slots_) {
    KVGATE_CUDA_RETURN_IF_ERROR(cudaHostAlloc(&slot.host, slot_bytes, cudaHostAllocDefault));
    KVGATE_CUDA_RETURN_IF_ERROR(cudaEventCreateWithFlags(&slot.done, cudaEventDisableTiming));
  }
  return absl::OkStatus();
}

absl::Status PinnedUploadRing::Upload(void* device_dst, const void* host_src, size_t bytes, cudaStream_t stream) {
  if (bytes > slot_bytes_) {
    return absl::InvalidArgumentError(absl::StrCat("pinned upload of ", bytes, " bytes into slots of ", slot_bytes_));
  }
  std::lock_guard<std::mutex> lock(mu_);
  Slot& slot = slots_[next_];
  next_ = (next_ + 1) % slots_.size();
  // Normally long done: a slot comes round again only after slots_.size() - 1 uploads.
  if (slot.in_flight) KVGATE_CUDA_RETURN_IF_ERROR(cudaEventSynchronize(slot.done));
  slot.in_flight = false;
  std::memcpy(slot.host, host_src, bytes);
  KVGATE_CUDA_RETURN_IF_ERROR(cudaMemcpyAsync(device_dst, slot.host, bytes, cudaMemcpyHostToDevice, stream));
  KVGATE_CUDA_RETURN_IF_ERROR(cudaEventRecord(slot.done, stream));
  slot.in_flight = true;
  return absl::OkStatus();
}

}  // namespace kvgate::ops
