// File: device memory that another process of this host maps (the cuda_ipc KV transport).
// Exporter: ShareableSlabs carves buffers from a few large cudaMalloc slabs, each named
// once by cudaIpcGetMemHandle, so a transfer pays neither an allocation nor a new handle.
// Importer: IpcMappings opens each slab once (cudaIpcOpenMemHandle costs milliseconds)
// and keeps it mapped while its exporter lives.
#pragma once

#include <cuda_runtime.h>

#include <cstdint>
#include <list>
#include <memory>
#include <mutex>
#include <string>
#include <string_view>
#include <vector>

#include "absl/status/statusor.h"
#include "cuda/backend.h"

namespace kvgate::ops {

// What ExportIpc hands another process: the slab's CUDA IPC handle, the buffer's place in
// it, and enough to refuse a handle that cannot work before CUDA is asked to map it.
inline constexpr char kIpcMagic[8] = {'k', 'v', 'g', 'I', 'P', 'C', '0', '2'};
struct IpcName {
  char magic[8];
  char device_uuid[16];    // cudaDeviceProp::uuid of the exporter's GPU
  uint64_t slab_bytes;     // the allocation's size
  uint64_t offset;         // the buffer's first byte within the allocation
  int64_t exporter_pid;
  cudaIpcMemHandle_t handle;  // of the allocation
};
static_assert(std::is_trivially_copyable_v<IpcName>);

class ShareableSlabs {
 public:
  // Slabs of at least `min_slab_bytes`; `device`'s memory.
  ShareableSlabs(int device, const char device_uuid[16], uint64_t min_slab_bytes);
  ~ShareableSlabs();

  // A buffer of `bytes` in a slab. Its release waits for the device (as cudaFree does),
  // so no queued work still touches the range when the next buffer gets it.
  absl::StatusOr<DeviceBuffer> Alloc(size_t bytes);
  // The IPC name of [data, data + bytes) when it lies in a slab; NOT_FOUND otherwise.
  absl::StatusOr<IpcName> NameOf(const void* data, size_t bytes);

  int32_t num_slabs() const;

 private:
  struct State;
  std::shared_ptr<State> state_;  // shared with the buffers' deleters
};

class IpcMappings {
 public:
  // At most `max_mapped` slabs stay mapped; the least recently used one is closed
  // first, once no buffer of Open uses it.
  IpcMappings(int device, size_t max_mapped);
  ~IpcMappings();

  // Maps [name.offset, name.offset + bytes) of the named slab (a checked name), reusing
  // the mapping of an earlier Open of the same slab. Mappings of exporters that have exited are
  // closed here. FAILED_PRECONDITION when CUDA refuses the handle.
  absl::StatusOr<DeviceBuffer> Open(const IpcName& name, size_t bytes);

  size_t num_mapped() const;

 private:
  struct Mapping;
  int device_;
  size_t max_mapped_;
  mutable std::mutex mu_;
  std::list<std::shared_ptr<Mapping>> mapped_;  // most recently used first
  std::vector<std::weak_ptr<Mapping>> live_;     // every mapping still open
};

}  // namespace kvgate::ops
