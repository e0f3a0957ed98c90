// File: CastToBf16 on the GPU: out[i] = bf16(x[i]), round to nearest even.
#pragma once

#include <cuda_runtime.h>

#include "absl/status/status.h"
#include "cuda/ops.h"

namespace kvgate::ops {

constexpr int kCastToBf16BlockSize = 256;

// All pointers in args are device memory. Returns INVALID_ARGUMENT for a negative n;
// n == 0 is a no-op.
absl::Status LaunchCastToBf16(const CastToBf16Args& args, cudaStream_t stream);

}  // namespace kvgate::ops
