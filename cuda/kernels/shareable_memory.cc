#include "cuda/kernels/shareable_memory.h"

#include <signal.h>
#include <unistd.h>

#include <cerrno>
#include <cstring>
#include <vector>

#include "absl/strings/str_cat.h"
#include "cuda/kernels/cuda_check.h"
#include "cuda/slab_ranges.h"

namespace kvgate::ops {
namespace {

// Runs `body` with `device` current and restores the caller's device.
template <typename Body>
void OnDevice(int device, Body body) {
  int previous = -1;
  const bool switch_device = cudaGetDevice(&previous) == cudaSuccess && previous != device;
  if (switch_device) (void)cudaSetDevice(device);
  body();
  if (switch_device) (void)cudaSetDevice(previous);
  (void)cudaGetLastError();
}

// 256 bytes: cudaMalloc's own alignment, enough for every row type.
constexpr uint64_t kSlabAlignment = 256;

bool ProcessAlive(int64_t pid) { return kill(static_cast<pid_t>(pid), 0) == 0 || errno == EPERM; }

}  // namespace

struct ShareableSlabs::State {
  int device = 0;
  char uuid[16] = {};
  std::mutex mu;
  SlabRanges ranges;
  struct Slab {
    char* base = nullptr;
    uint64_t bytes = 0;
    bool named = false;
    cudaIpcMemHandle_t handle{};
  };
  std::vector<Slab> slabs;

  State(int d, const char u[16], uint64_t min_slab_bytes) : device(d), ranges(kSlabAlignment, min_slab_bytes) {
    std::memcpy(uuid, u, sizeof(uuid));
  }
  ~State() {
    OnDevice(device, [&] {
      for (const Slab& slab : slabs) (void)cudaFree(slab.base);
    });
  }
};

ShareableSlabs::ShareableSlabs(int device, const char device_uuid[16], uint64_t min_slab_bytes)
    : state_(std::make_shared<State>(device, device_uuid, min_slab_bytes)) {}

ShareableSlabs::~ShareableSlabs() = default;

absl::StatusOr<DeviceBuffer> ShareableSlabs::Alloc(size_t bytes) {
  if (bytes == 0) return absl::InvalidArgumentError("shareable Alloc of 0 bytes");
  std::lock_guard<std::mutex> lock(state_->mu);
  std::optional<SlabRanges::Range> range = state_->ranges.Take(bytes);
  if (!range) {
    const uint64_t slab_bytes = state_->ranges.NewSlabBytes(bytes);
    void* base = nullptr;
    KVGATE_CUDA_RETURN_IF_ERROR(cudaSetDevice(state_->device));
    const cudaError_t err = cudaMalloc(&base, slab_bytes);
    if (err != cudaSuccess) {
      (void)cudaGetLastError();
      const std::string message =
          absl::StrCat("cudaMalloc of a shareable slab of ", slab_bytes, " bytes: ", cudaGetErrorString(err));
      if (err == cudaErrorMemoryAllocation) return absl::ResourceExhaustedError(message);
      return absl::InternalError(message);
    }
    state_->slabs.push_back(State::Slab{static_cast<char*>(base), slab_bytes, false, {}});
    state_->ranges.AddSlab(slab_bytes);
    range = state_->ranges.Take(bytes);
    if (!range) return absl::InternalError("a fresh shareable slab has no room for its own request");
  }
  char* data = state_->slabs[static_cast<size_t>(range->slab)].base + range->offset;
  std::shared_ptr<State> state = state_;
  const SlabRanges::Range taken = *range;
  return DeviceBuffer(data, bytes, [state, taken](void*) {
    OnDevice(state->device, [] { (void)cudaDeviceSynchronize(); });
    std::lock_guard<std::mutex> lock(state->mu);
    state->ranges.Give(taken);
  });
}

absl::StatusOr<IpcName> ShareableSlabs::NameOf(const void* data, size_t bytes) {
  const char* p = static_cast<const char*>(data);
  std::lock_guard<std::mutex> lock(state_->mu);
  for (State::Slab& slab : state_->slabs) {
    if (p < slab.base || p + bytes > slab.base + slab.bytes) continue;
    if (!slab.named) {
      KVGATE_CUDA_RETURN_IF_ERROR(cudaSetDevice(state_->device));
      KVGATE_CUDA_RETURN_IF_ERROR(cudaIpcGetMemHandle(&slab.handle, slab.base));
      slab.named = true;
    }
    IpcName name;
    std::memcpy(name.magic, kIpcMagic, sizeof(name.magic));
    std::memcpy(name.device_uuid, state_->uuid, sizeof(name.device_uuid));
    name.slab_bytes = slab.bytes;
    name.offset = static_cast<uint64_t>(p - slab.base);
    name.exporter_pid = static_cast<int64_t>(getpid());
    name.handle = slab.handle;
    return name;
  }
  return absl::NotFoundError("the buffer is not in a shareable slab");
}

int32_t ShareableSlabs::num_slabs() const {
  std::lock_guard<std::mutex> lock(state_->mu);
  return static_cast<int32_t>(state_->slabs.size());
}

struct IpcMappings::Mapping {
  int device = 0;
  int64_t pid = 0;
  cudaIpcMemHandle_t handle{};
  uint64_t bytes = 0;
  char* base = nullptr;
  ~Mapping() {
    if (base != nullptr) OnDevice(device, [&] { (void)cudaIpcCloseMemHandle(base); });
  }
};

IpcMappings::IpcMappings(int device, size_t max_mapped) : device_(device), max_mapped_(max_mapped) {}

IpcMappings::~IpcMappings() = default;

absl::StatusOr<DeviceBuffer> IpcMappings::Open(const IpcName& name, size_t bytes) {
  // One lock over the lookup and the open: CUDA maps a handle once per process, so two
  // streams' first transfers from one slab must not both open it.
  std::lock_guard<std::mutex> lock(mu_);
  auto same = [&](const Mapping& m) {
    return m.pid == name.exporter_pid && m.bytes == name.slab_bytes &&
           std::memcmp(&m.handle, &name.handle, sizeof(name.handle)) == 0;
  };
  std::shared_ptr<Mapping> mapping;
  // An exporter that exited cannot send again; its slabs are released here (a buffer of
  // Open still in use keeps its mapping until it goes).
  for (auto it = mapped_.begin(); it != mapped_.end();) {
    if (mapping == nullptr && same(**it)) {
      mapping = *it;
      it = mapped_.erase(it);
      continue;
    }
    it = ProcessAlive((*it)->pid) ? std::next(it) : mapped_.erase(it);
  }
  // A slab pushed out of the cache may still be mapped for a buffer in use.
  for (auto it = live_.begin(); mapping == nullptr && it != live_.end();) {
    std::shared_ptr<Mapping> alive = it->lock();
    if (alive == nullptr) {
      it = live_.erase(it);
      continue;
    }
    if (same(*alive)) mapping = std::move(alive);
    ++it;
  }
  if (mapping == nullptr) {
    auto fresh = std::make_shared<Mapping>();
    fresh->device = device_;
    fresh->pid = name.exporter_pid;
    fresh->handle = name.handle;
    fresh->bytes = name.slab_bytes;
    void* base = nullptr;
    KVGATE_CUDA_RETURN_IF_ERROR(cudaSetDevice(device_));
    const cudaError_t err = cudaIpcOpenMemHandle(&base, name.handle, cudaIpcMemLazyEnablePeerAccess);
    if (err != cudaSuccess) {
      (void)cudaGetLastError();
      return absl::FailedPreconditionError(
          absl::StrCat("cudaIpcOpenMemHandle: ", cudaGetErrorString(err),
                       " (the exporter freed it, exited, or runs in another container)"));
    }
    fresh->base = static_cast<char*>(base);
    mapping = std::move(fresh);
    live_.push_back(mapping);
  }
  mapped_.push_front(mapping);
  while (mapped_.size() > max_mapped_) mapped_.pop_back();  // a buffer still in use holds its own reference
  return DeviceBuffer(mapping->base + name.offset, bytes, [mapping](void*) {});
}

size_t IpcMappings::num_mapped() const {
  std::lock_guard<std::mutex> lock(mu_);
  return mapped_.size();
}

}  // namespace kvgate::ops
