// NcclChannel over NCCL 2.x: non-blocking communicators (ncclConfig_t::blocking = 0)
// polled with ncclCommGetAsyncError, one stream per channel.
#include "cuda/nccl/nccl_channel.h"

#include <cuda_runtime.h>
#include <nccl.h>

#include <cstdlib>
#include <cstring>
#include <mutex>
#include <thread>
#include <utility>

#include "absl/strings/str_cat.h"
#include "absl/time/clock.h"

namespace kvgate::ops {
namespace {

absl::Status CudaError(const char* what, cudaError_t err) {
  (void)cudaGetLastError();
  return absl::UnavailableError(absl::StrCat(what, ": ", cudaGetErrorString(err)));
}

absl::Status NcclError(const char* what, ncclResult_t r, ncclComm_t comm = nullptr) {
  std::string detail = ncclGetErrorString(r);
  if (comm != nullptr) {
    if (const char* last = ncclGetLastError(comm); last != nullptr && *last != '\0') detail += std::string(": ") + last;
  }
  return absl::UnavailableError(absl::StrCat(what, ": ", detail));
}

// Waits until the communicator's pending NCCL call finished (ncclSuccess) or failed.
absl::Status WaitComm(ncclComm_t comm, absl::Time deadline, const char* what) {
  while (true) {
    ncclResult_t state = ncclSuccess;
    const ncclResult_t r = ncclCommGetAsyncError(comm, &state);
    if (r != ncclSuccess) return NcclError(what, r, comm);
    if (state == ncclSuccess) return absl::OkStatus();
    if (state != ncclInProgress) return NcclError(what, state, comm);
    if (absl::Now() >= deadline) return absl::DeadlineExceededError(absl::StrCat(what, ": deadline passed"));
    std::this_thread::yield();
  }
}

class NcclChannelImpl final : public NcclChannel {
 public:
  NcclChannelImpl(ncclComm_t comm, cudaStream_t stream, int32_t nranks, int32_t rank, int32_t device)
      : comm_(comm), stream_(stream), nranks_(nranks), rank_(rank), device_(device) {}
  ~NcclChannelImpl() override {
    (void)cudaSetDevice(device_);
    if (comm_ != nullptr) {
      if (broken_) {
        (void)ncclCommAbort(comm_);
      } else {
        // Non-blocking finalize, then destroy; a peer that vanished leaves abort.
        if (ncclCommFinalize(comm_) != ncclSuccess ||
            !WaitComm(comm_, absl::Now() + absl::Seconds(2), "ncclCommFinalize").ok()) {
          (void)ncclCommAbort(comm_);
        } else {
          (void)ncclCommDestroy(comm_);
        }
      }
    }
    if (stream_ != nullptr) (void)cudaStreamDestroy(stream_);
    (void)cudaGetLastError();
  }

  int32_t rank() const override { return rank_; }
  int32_t nranks() const override { return nranks_; }
  bool broken() const override {
    std::lock_guard<std::mutex> lock(mu_);
    return broken_;
  }

  void Abort() override {
    std::lock_guard<std::mutex> lock(mu_);
    AbortLocked();
  }

  absl::Status Transfer(const std::vector<Op>& ops, absl::Time deadline) override {
    std::lock_guard<std::mutex> lock(mu_);
    if (broken_) return absl::FailedPreconditionError("nccl channel: broken (aborted); connect again");
    for (const Op& op : ops) {
      if (op.peer < 0 || op.peer >= nranks_ || (op.data == nullptr && op.bytes > 0)) {
        return absl::InvalidArgumentError(absl::StrCat("nccl channel: ", op.kind == Op::kSend ? "send to" : "recv from",
                                                       " peer ", op.peer, " of ", nranks_, " ranks, ", op.bytes,
                                                       " bytes at ", op.data == nullptr ? "null" : "a buffer"));
      }
    }
    if (cudaError_t err = cudaSetDevice(device_); err != cudaSuccess) return CudaError("cudaSetDevice", err);
    ncclResult_t r = ncclGroupStart();
    for (const Op& op : ops) {
      if (r != ncclSuccess && r != ncclInProgress) break;
      if (op.bytes == 0) continue;
      r = op.kind == Op::kSend ? ncclSend(op.data, op.bytes, ncclUint8, op.peer, comm_, stream_)
                               : ncclRecv(op.data, op.bytes, ncclUint8, op.peer, comm_, stream_);
    }
    const ncclResult_t end = ncclGroupEnd();
    if (r != ncclSuccess && r != ncclInProgress) {
      AbortLocked();
      return NcclError("nccl channel: send/recv", r, comm_);
    }
    if (end != ncclSuccess && end != ncclInProgress) {
      AbortLocked();
      return NcclError("nccl channel: ncclGroupEnd", end, comm_);
    }
    if (absl::Status s = WaitComm(comm_, deadline, "nccl channel: enqueue"); !s.ok()) {
      AbortLocked();
      return s;
    }
    // The kernels run; wait for them without blocking past the deadline.
    while (true) {
      const cudaError_t q = cudaStreamQuery(stream_);
      if (q == cudaSuccess) break;
      if (q != cudaErrorNotReady) {
        AbortLocked();
        return CudaError("nccl channel: stream", q);
      }
      ncclResult_t state = ncclSuccess;
      if (ncclCommGetAsyncError(comm_, &state) == ncclSuccess && state != ncclSuccess && state != ncclInProgress) {
        AbortLocked();
        return NcclError("nccl channel: transfer", state, comm_);
      }
      if (absl::Now() >= deadline) {
        AbortLocked();
        return absl::DeadlineExceededError("nccl channel: the transfer did not finish by its deadline (aborted)");
      }
      std::this_thread::yield();
    }
    return absl::OkStatus();
  }

 private:
  void AbortLocked() {
    if (broken_ || comm_ == nullptr) return;
    (void)cudaSetDevice(device_);
    (void)ncclCommAbort(comm_);
    comm_ = nullptr;
    broken_ = true;
  }

  mutable std::mutex mu_;
  ncclComm_t comm_;
  cudaStream_t stream_;
  const int32_t nranks_, rank_, device_;
  bool broken_ = false;
};

}  // namespace

absl::StatusOr<std::string> NcclChannel::NewUniqueId() {
  ncclUniqueId id;
  if (ncclResult_t r = ncclGetUniqueId(&id); r != ncclSuccess) return NcclError("ncclGetUniqueId", r);
  return std::string(id.internal, sizeof(id.internal));
}

absl::StatusOr<std::unique_ptr<NcclChannel>> NcclChannel::Connect(std::string_view unique_id, int32_t nranks,
                                                                  int32_t rank, int32_t device, absl::Time deadline) {
  ncclUniqueId id;
  if (unique_id.size() != sizeof(id.internal)) {
    return absl::InvalidArgumentError(
        absl::StrCat("nccl channel: a unique id of ", unique_id.size(), " bytes (", sizeof(id.internal), " expected)"));
  }
  if (nranks < 1 || rank < 0 || rank >= nranks || device < 0) {
    return absl::InvalidArgumentError(absl::StrCat("nccl channel: rank ", rank, " of ", nranks, " on GPU ", device));
  }
  setenv("NCCL_NVLS_ENABLE", "0", /*overwrite=*/0);
  std::memcpy(id.internal, unique_id.data(), sizeof(id.internal));
  if (cudaError_t err = cudaSetDevice(device); err != cudaSuccess) return CudaError("cudaSetDevice", err);
  cudaStream_t stream = nullptr;
  if (cudaError_t err = cudaStreamCreateWithFlags(&stream, cudaStreamNonBlocking); err != cudaSuccess) {
    return CudaError("cudaStreamCreate", err);
  }
  ncclConfig_t config = NCCL_CONFIG_INITIALIZER;
  config.blocking = 0;
  ncclComm_t comm = nullptr;
  const ncclResult_t r = ncclCommInitRankConfig(&comm, nranks, id, rank, &config);
  absl::Status status = r == ncclSuccess || r == ncclInProgress ? absl::OkStatus() : NcclError("ncclCommInitRank", r);
  if (status.ok()) status = WaitComm(comm, deadline, "ncclCommInitRank");
  if (!status.ok()) {
    if (comm != nullptr) (void)ncclCommAbort(comm);
    (void)cudaStreamDestroy(stream);
    return status;
  }
  return std::unique_ptr<NcclChannel>(new NcclChannelImpl(comm, stream, nranks, rank, device));
}

}  // namespace kvgate::ops
