// The CUDA backend's factory in a build without CUDA: it links, and says why it
// cannot run.
#include "cuda/cuda_backend.h"

#include "absl/status/status.h"

namespace kvgate::ops {

absl::StatusOr<std::unique_ptr<Backend>> CreateCudaBackend(int device_ordinal) {
  return absl::UnimplementedError(
      "backend 'cuda' is not built: this kvgate was configured with KVGATE_WITH_CUDA=OFF "
      "(no nvcc found); use --backend cpu or rebuild on a machine with the CUDA toolkit");
}

int CudaDeviceCount() { return 0; }

}  // namespace kvgate::ops
