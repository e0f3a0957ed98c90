// File: SinkGateScores on the GPU: Fast KVzip's gate where the layer's input already is.
// The projections are fp32 cuBLAS GEMMs (or, for a bf16 input, the backend's one bf16 GEMM)
// into a workspace; one thread per (token, kv head, group member) then normalises, scores
// against the sinks, and the group's lanes average their shares.
#pragma once

#include <cublas_v2.h>
#include <cuda_runtime.h>

#include <cstdint>

#include "absl/status/status.h"
#include "cuda/ops.h"

namespace kvgate::ops {

// Floats of workspace a launch needs: the projections of `args.n` tokens.
int64_t SinkGateScoresWorkspaceFloats(const SinkGateScoresArgs& args);

// The fp32 form (args.x): device pointers; `cublas` runs on `stream` with fp32 math.
// INVALID_ARGUMENT for args that SinkGateScoresArgsError refuses.
absl::Status LaunchSinkGateScores(const SinkGateScoresArgs& args, cublasHandle_t cublas, float* workspace,
                                  cudaStream_t stream);

// The scores from projections made elsewhere (the bf16 form's one GEMM): row t of q
// (without q_bias, [kv_heads * group * rank]) at q + t * q_stride, of k ([kv_heads * rank])
// at k + t * k_stride; args.x, the weights and the workspace are not read.
absl::Status LaunchSinkGateScoresOfProjections(const SinkGateScoresArgs& args, const float* q, int64_t q_stride,
                                               const float* k, int64_t k_stride, cudaStream_t stream);

}  // namespace kvgate::ops
