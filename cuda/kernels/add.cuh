// File: Add on the GPU: x[i] += y[i] (residual connections).
#pragma once

#include <cuda_runtime.h>

#include "absl/status/status.h"
#include "cuda/ops.h"

namespace kvgate::ops {

constexpr int kAddBlockSize = 256;

// All pointers in args are device memory. Returns INVALID_ARGUMENT for a negative n;
// n == 0 is a no-op.
absl::Status LaunchAdd(const AddArgs& args, cudaStream_t stream);

}  // namespace kvgate::ops
