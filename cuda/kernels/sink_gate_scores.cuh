// File: SinkGateScores on the GPU: Fast KVzip's gate where the layer's input already is.
// The two projections are fp32 cuBLAS GEMMs into a workspace; one thread per (token, kv
// head) then normalises, scores against the sinks and averages the group.
#pragma once

#include <cublas_v2.h>
#include <cuda_runtime.h>

#include <cstdint>

#include "absl/status/status.h"
#include "cuda/ops.h"

namespace kvgate::ops {

// Floats of workspace a launch needs: the projections of `args.n` tokens.
int64_t SinkGateScoresWorkspaceFloats(const SinkGateScoresArgs& args);

// Device pointers; `cublas` runs on `stream` with fp32 math. INVALID_ARGUMENT for args that
// SinkGateScoresArgsError refuses.
absl::Status LaunchSinkGateScores(const SinkGateScoresArgs& args, cublasHandle_t cublas, float* workspace,
                                  cudaStream_t stream);

}  // namespace kvgate::ops
