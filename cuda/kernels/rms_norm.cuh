// File: RmsNorm on the GPU: out[r, :] = x[r, :] / sqrt(mean(x[r, :]^2) + eps) * weight[:].
#pragma once

#include <cuda_runtime.h>

#include "absl/status/status.h"
#include "cuda/ops.h"

namespace kvgate::ops {

constexpr int kRmsNormBlockSize = 256;  // a multiple of 32

// All pointers in args are device memory; out may alias x. Float accumulation.
// Returns INVALID_ARGUMENT for negative sizes; 0 rows or dim 0 is a no-op.
absl::Status LaunchRmsNorm(const RmsNormArgs& args, cudaStream_t stream);

}  // namespace kvgate::ops
