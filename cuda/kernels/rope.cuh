// File: rotary embedding on the GPU, Hugging Face "rotate_half" layout, in place.
#pragma once

#include <cuda_runtime.h>

#include "absl/status/status.h"
#include "cuda/ops.h"

namespace kvgate::ops {

constexpr int kRopeBlockSize = 256;

// All pointers in args are device memory. head_dim must be even. One thread per
// (token, head, i < head_dim / 2) pair. Returns INVALID_ARGUMENT for negative sizes or
// an odd head_dim; an empty tensor is a no-op.
absl::Status LaunchRope(const RopeArgs& args, cudaStream_t stream);

}  // namespace kvgate::ops
