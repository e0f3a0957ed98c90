// File: a byte channel between GPUs over NCCL point-to-point (the nccl KV transport's
// data path): one communicator of `nranks` ranks, each process holding one rank on one
// GPU, created non-blocking so that a stuck peer can be aborted. A transfer is a group of
// sends and receives of device buffers to and from peer ranks; it returns when they are
// done on this rank, or aborts the communicator at its deadline (the channel is then
// broken and must be connected again). A rank may send to itself (one-rank communicator:
// what a one-GPU machine can test). Built with NCCL when KVGATE_WITH_NCCL; otherwise
// every call answers UNIMPLEMENTED. Every process must run with NCCL_NVLS_ENABLE=0 on our
// machines (NVLink multicast stays off); Connect sets it when unset.
#pragma once

#include <cstddef>
#include <cstdint>
#include <memory>
#include <string>
#include <string_view>
#include <vector>

#include "absl/status/status.h"
#include "absl/status/statusor.h"
#include "absl/time/time.h"

namespace kvgate::ops {

class NcclChannel {
 public:
  // One send or receive of a transfer: `bytes` of device memory of this rank's GPU.
  struct Op {
    enum Kind { kSend, kRecv } kind = kSend;
    int32_t peer = 0;
    void* data = nullptr;  // const for kSend
    size_t bytes = 0;
  };

  // ncclGetUniqueId: the opaque id every rank of one communicator passes to Connect
  // (the KV manager hands it to a prefill/decode pair).
  static absl::StatusOr<std::string> NewUniqueId();
  // Joins the communicator `unique_id` as `rank` of `nranks` on GPU `device`. Blocks
  // until every rank joined or `deadline` (DEADLINE_EXCEEDED, after aborting).
  // INVALID_ARGUMENT for a malformed id or rank; UNAVAILABLE when NCCL fails.
  static absl::StatusOr<std::unique_ptr<NcclChannel>> Connect(std::string_view unique_id, int32_t nranks,
                                                              int32_t rank, int32_t device, absl::Time deadline);

  virtual ~NcclChannel() = default;
  virtual int32_t rank() const = 0;
  virtual int32_t nranks() const = 0;
  // Runs `ops` as one group and waits for them. Buffers must stay untouched until it
  // returns. INVALID_ARGUMENT for a peer outside [0, nranks) or a null buffer;
  // DEADLINE_EXCEEDED at `deadline` (the communicator is aborted: the peer's transfer
  // fails too); FAILED_PRECONDITION once broken; UNAVAILABLE for an NCCL error.
  virtual absl::Status Transfer(const std::vector<Op>& ops, absl::Time deadline) = 0;
  // Aborts the communicator (a peer died, a lease expired): any transfer in progress on
  // either side fails, and this channel is broken.
  virtual void Abort() = 0;
  virtual bool broken() const = 0;
};

}  // namespace kvgate::ops
