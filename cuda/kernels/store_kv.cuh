// File: StoreKv on the GPU: writes the K and V rows of new tokens into a head-major
// contiguous cache, cache[h, start_row + t, :] = k[t, h, :].
#pragma once

#include <cuda_runtime.h>

#include "absl/status/status.h"
#include "cuda/ops.h"

namespace kvgate::ops {

constexpr int kStoreKvBlockSize = 256;

// All pointers in args are device memory. Returns INVALID_ARGUMENT for negative sizes or
// rows outside [0, capacity_tokens) (nothing is written then); 0 tokens is a no-op.
absl::Status LaunchStoreKv(const StoreKvArgs& args, cudaStream_t stream);

}  // namespace kvgate::ops
