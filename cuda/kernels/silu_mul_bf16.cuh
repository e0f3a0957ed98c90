// File: SiluMulBf16 on the GPU (SwiGLU): out = bf16(silu(gate) * up), bf16 in and out,
// fp32 arithmetic.
#pragma once

#include <cuda_runtime.h>

#include "absl/status/status.h"
#include "cuda/ops.h"

namespace kvgate::ops {

constexpr int kSiluMulBf16BlockSize = 256;

// All pointers in args are device memory; out may alias gate or up. Returns
// INVALID_ARGUMENT for a negative n; n == 0 is a no-op.
absl::Status LaunchSiluMulBf16(const SiluMulBf16Args& args, cudaStream_t stream);

}  // namespace kvgate::ops
