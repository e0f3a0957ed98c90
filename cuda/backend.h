// File: the compute backend interface. The engine runs the model only through this
// interface, so the CPU backend (OpenBLAS + threads) and the CUDA backend (cuBLAS +
// own kernels) are interchangeable, and each op has a plain reference twin
// (cuda/cpu/reference_ops.h) that both are tested against.
//
// One backend instance runs its ops in submission order on one implicit stream; ops
// may return before the work is done, and Synchronize() or a copy to the host waits.
#pragma once

#include <cstddef>
#include <functional>
#include <memory>
#include <string>
#include <string_view>
#include <vector>

#include "absl/status/status.h"
#include "absl/status/statusor.h"
#include "cuda/ops.h"

namespace kvgate::ops {

// Owns a block of backend memory; move-only. Freed by the deleter of the backend that
// made it, so the backend must outlive its buffers.
class DeviceBuffer {
 public:
  DeviceBuffer() = default;
  DeviceBuffer(void* data, size_t bytes, std::function<void(void*)> deleter)
      : data_(data), bytes_(bytes), deleter_(std::move(deleter)) {}
  DeviceBuffer(DeviceBuffer&& other) noexcept { *this = std::move(other); }
  DeviceBuffer& operator=(DeviceBuffer&& other) noexcept {
    if (this != &other) {
      Reset();
      data_ = other.data_;
      bytes_ = other.bytes_;
      deleter_ = std::move(other.deleter_);
      other.data_ = nullptr;
      other.bytes_ = 0;
    }
    return *this;
  }
  DeviceBuffer(const DeviceBuffer&) = delete;
  DeviceBuffer& operator=(const DeviceBuffer&) = delete;
  ~DeviceBuffer() { Reset(); }

  void* data() const { return data_; }
  size_t bytes() const { return bytes_; }
  template <typename T>
  T* as() const { return static_cast<T*>(data_); }

 private:
  void Reset() {
    if (data_ != nullptr && deleter_) deleter_(data_);
    data_ = nullptr;
    bytes_ = 0;
  }
  void* data_ = nullptr;
  size_t bytes_ = 0;
  std::function<void(void*)> deleter_;
};

// Ops recorded once by Backend::RecordGraph and replayed many times (a CUDA graph): one
// launch instead of one per op. Opaque; owned by the caller, freed before its backend.
class OpGraph {
 public:
  virtual ~OpGraph() = default;
};

class Backend {
 public:
  virtual ~Backend() = default;

  // "cpu" or "cuda:N".
  virtual std::string_view Name() const = 0;

  // Uninitialised backend memory of `bytes` bytes (> 0).
  virtual absl::StatusOr<DeviceBuffer> Alloc(size_t bytes) = 0;
  virtual absl::Status CopyToBackend(void* dst, const void* host_src, size_t bytes) = 0;
  virtual absl::Status CopyToHost(void* host_dst, const void* src, size_t bytes) = 0;

  virtual absl::Status Embed(const EmbedArgs& args) = 0;
  virtual absl::Status MatMul(const MatMulArgs& args) = 0;
  virtual absl::Status RmsNorm(const RmsNormArgs& args) = 0;
  virtual absl::Status Rope(const RopeArgs& args) = 0;
  virtual absl::Status StoreKv(const StoreKvArgs& args) = 0;
  virtual absl::Status Attention(const AttentionArgs& args) = 0;
  virtual absl::Status SiluMul(const SiluMulArgs& args) = 0;
  virtual absl::Status Add(const AddArgs& args) = 0;
  virtual absl::Status CopyRows(const CopyRowsArgs& args) = 0;
  virtual absl::Status HeadPagedDecodeAttention(const HeadPagedDecodeAttentionArgs& args) = 0;
  virtual absl::Status ArgMaxRows(const ArgMaxRowsArgs& args) = 0;
  virtual absl::Status WindowAttentionProbs(const WindowAttentionProbsArgs& args) = 0;
  virtual absl::Status PoolWindowScores(const PoolWindowScoresArgs& args) = 0;
  virtual absl::Status SelectTop(const SelectTopArgs& args) = 0;
  virtual absl::Status SinkGateScores(const SinkGateScoresArgs& args) = 0;

  // Host data that ops read for the life of the backend (a policy's gate weights), made
  // backend memory once: the first call for (owner, key) copies `bytes` from `host`, later
  // calls return the same memory. `owner` is a process-unique id (NewConstantOwner()); a
  // repeated (owner, key) with another size is INVALID_ARGUMENT. Freed with the backend.
  // The CPU backend answers `host` itself, which must then outlive its uses.
  virtual absl::StatusOr<const void*> ConstantOnBackend(uint64_t owner, int32_t key, const void* host,
                                                        size_t bytes) = 0;

  // Waits for every op submitted so far; reports an asynchronous fault.
  virtual absl::Status Synchronize() = 0;

  // Graphs (optional; the CPU backend answers UNIMPLEMENTED and callers run ops one by
  // one). RecordGraph calls `record`, whose ops are recorded instead of run, arguments
  // (device addresses, sizes) frozen as given. While recording, the backend refuses
  // (FAILED_PRECONDITION) anything a graph cannot hold: copies to or from the host,
  // allocation, Synchronize, a workspace that would have to grow. An error of `record`
  // is returned and nothing is recorded or run.
  virtual absl::StatusOr<std::unique_ptr<OpGraph>> RecordGraph(const std::function<absl::Status()>& record) {
    return absl::UnimplementedError(std::string(Name()) + ": no graphs");
  }
  // Runs a recorded graph in submission order. FAILED_PRECONDITION when a workspace of
  // the backend's own moved since the recording (record again).
  virtual absl::Status ReplayGraph(const OpGraph& graph) {
    return absl::UnimplementedError(std::string(Name()) + ": no graphs");
  }

  // Memory shared with another process of this host (optional; the cuda_ipc KV transport).
  // AllocShareable makes a buffer that ExportIpc can name: the CUDA backend carves it from
  // slabs allocated and IPC-named once, so a transfer pays neither an allocation nor a new
  // handle, and an importer maps each slab once (its release waits for the device, as
  // cudaFree does). Elsewhere it is Alloc.
  // ExportIpc names `buffer`, an allocation of AllocShareable (FAILED_PRECONDITION for any
  // other), in opaque bytes that
  // another process passes to OpenIpc; the exporter keeps ownership and must keep the
  // buffer alive until the importer is done with it. OpenIpc maps such a name here: the
  // returned buffer (`bytes` long, at most the rest of the exporter's slab) unmaps nothing
  // when destroyed (the slab stays mapped while its exporter lives, at most a bounded number
  // of slabs) and never frees the exporter's memory. INVALID_ARGUMENT for bytes that are
  // no such name, FAILED_PRECONDITION for a name this backend cannot map (another device
  // it cannot reach, or this very process). The CPU backend answers UNIMPLEMENTED.
  virtual absl::StatusOr<DeviceBuffer> AllocShareable(size_t bytes) { return Alloc(bytes); }
  virtual absl::StatusOr<std::string> ExportIpc(const DeviceBuffer& buffer) {
    return absl::UnimplementedError(std::string(Name()) + ": no inter-process memory");
  }
  virtual absl::StatusOr<DeviceBuffer> OpenIpc(std::string_view name, size_t bytes) {
    return absl::UnimplementedError(std::string(Name()) + ": no inter-process memory");
  }
  // Copies `bytes` between two buffers of this backend (in submission order, like an op).
  virtual absl::Status CopyWithinBackend(void* dst, const void* src, size_t bytes) = 0;

  // The bf16 ops (cuda/ops.h; references in cuda/cpu/reference_bf16_ops.h). Optional: a
  // backend that has them answers true here, and the engine then keeps its weights in
  // bf16 (one copy) and runs its GEMMs and prefill attention through them. The CPU
  // backend keeps fp32 and leaves them UNIMPLEMENTED.
  virtual bool SupportsBf16() const { return false; }
  virtual absl::Status EmbedBf16(const EmbedBf16Args& args) { return Bf16Unimplemented("EmbedBf16"); }
  virtual absl::Status GemmBf16(const GemmBf16Args& args) { return Bf16Unimplemented("GemmBf16"); }
  virtual absl::Status RmsNormBf16(const RmsNormBf16Args& args) { return Bf16Unimplemented("RmsNormBf16"); }
  virtual absl::Status SiluMulBf16(const SiluMulBf16Args& args) { return Bf16Unimplemented("SiluMulBf16"); }
  virtual absl::Status CastToBf16(const CastToBf16Args& args) { return Bf16Unimplemented("CastToBf16"); }
  virtual absl::Status AttentionBf16(const AttentionArgs& args) { return Bf16Unimplemented("AttentionBf16"); }

 private:
  absl::Status Bf16Unimplemented(std::string_view op) const {
    return absl::UnimplementedError(std::string(Name()) + ": no bf16 op " + std::string(op));
  }
};

// A process-unique owner id for Backend::ConstantOnBackend (never 0).
uint64_t NewConstantOwner();

// Makes a backend by name: "cpu", "cuda" (= "cuda:0") or "cuda:N". A build without
// CUDA answers UNIMPLEMENTED for cuda names; a machine without a GPU, UNAVAILABLE.
absl::StatusOr<std::unique_ptr<Backend>> CreateBackend(std::string_view name);

}  // namespace kvgate::ops
