// File: ArgMaxRows on the GPU: greedy sampling of a decode step's logits on the device,
// so only one token id per sequence crosses to the host.
#pragma once

#include <cuda_runtime.h>

#include "absl/status/status.h"
#include "cuda/ops.h"

namespace kvgate::ops {

constexpr int kArgMaxRowsBlockSize = 256;  // one block per row

// All pointers in args are device memory. INVALID_ARGUMENT for rows < 0, cols < 1 or
// more than 2^31 - 1 rows of blocks; rows == 0 is a no-op.
absl::Status LaunchArgMaxRows(const ArgMaxRowsArgs& args, cudaStream_t stream);

}  // namespace kvgate::ops
