// File: RmsNormBf16 on the GPU: RmsNorm of fp32 rows with a bf16 output (the input of
// the next bf16 GEMM), one pass over x for the sum of squares and one to scale.
#pragma once

#include <cuda_runtime.h>

#include "absl/status/status.h"
#include "cuda/ops.h"

namespace kvgate::ops {

constexpr int kRmsNormBf16BlockSize = 256;  // a multiple of 32

// All pointers in args are device memory. Float accumulation; the same arithmetic as
// LaunchRmsNorm, then one rounding to bf16. Returns INVALID_ARGUMENT for negative
// sizes; 0 rows or dim 0 is a no-op.
absl::Status LaunchRmsNormBf16(const RmsNormBf16Args& args, cudaStream_t stream);

}  // namespace kvgate::ops
