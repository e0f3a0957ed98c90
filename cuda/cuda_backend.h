// File: factory of the CUDA backend. Built from cuda/kernels/cuda_backend.cc when
// KVGATE_WITH_CUDA is ON, else from cuda/cuda_backend_unavailable.cc, so callers link
// either way (CMake picks the file; no #ifdef chain).
#pragma once

#include <memory>

#include "absl/status/statusor.h"
#include "cuda/backend.h"

namespace kvgate::ops {

// UNIMPLEMENTED when built without CUDA; UNAVAILABLE when no such GPU is present.
absl::StatusOr<std::unique_ptr<Backend>> CreateCudaBackend(int device_ordinal);

// Number of visible CUDA devices; 0 without CUDA or without a GPU.
int CudaDeviceCount();

}  // namespace kvgate::ops
