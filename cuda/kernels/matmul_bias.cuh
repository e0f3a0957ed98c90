// File: the bias step of MatMul on the GPU: y[r, c] += bias[c]. The product itself is
// one cublasSgemm in cuda_backend.cc; this kernel runs after it on the same stream.
#pragma once

#include <cuda_runtime.h>

#include "absl/status/status.h"
#include "cuda/ops.h"

namespace kvgate::ops {

constexpr int kMatMulBiasBlockSize = 256;

// Adds args.bias[n] to every row of args.y[m, n] (device memory); a no-op when
// args.bias is null or y is empty. Returns INVALID_ARGUMENT for negative sizes.
absl::Status LaunchMatMulBias(const MatMulArgs& args, cudaStream_t stream);

}  // namespace kvgate::ops
