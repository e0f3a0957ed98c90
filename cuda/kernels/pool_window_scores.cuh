// File: PoolWindowScores on the GPU: SnapKV's pooling and group mean of the window means,
// one thread per (layer, kv head, row), in double and in the reference's order (the same
// bits as the CPU).
#pragma once

#include <cuda_runtime.h>

#include "absl/status/status.h"
#include "cuda/ops.h"

namespace kvgate::ops {

// Device pointers. INVALID_ARGUMENT for args PoolWindowScoresArgsError refuses.
absl::Status LaunchPoolWindowScores(const PoolWindowScoresArgs& args, cudaStream_t stream);

}  // namespace kvgate::ops
