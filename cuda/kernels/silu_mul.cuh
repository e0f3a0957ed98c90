// File: SiluMul on the GPU: out[i] = silu(gate[i]) * up[i], silu(x) = x / (1 + exp(-x)).
#pragma once

#include <cuda_runtime.h>

#include "absl/status/status.h"
#include "cuda/ops.h"

namespace kvgate::ops {

constexpr int kSiluMulBlockSize = 256;

// All pointers in args are device memory; out may alias gate or up. Returns
// INVALID_ARGUMENT for a negative n; n == 0 is a no-op.
absl::Status LaunchSiluMul(const SiluMulArgs& args, cudaStream_t stream);

}  // namespace kvgate::ops
