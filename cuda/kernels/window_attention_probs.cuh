// File: WindowAttentionProbs on the GPU (SnapKV's observation-window scores without a
// host copy of the keys). The window's logits come from one fp32 cuBLAS GEMM per query
// head of a group (batched over kv heads), so the scoring runs at GEMM speed instead of
// one warp reduction per (query, key). Then one pass finds each (query head, window
// query)'s softmax max and denominator, and one sums every key's probabilities over the
// window queries in window order (no atomics: the same bits on every run).
#pragma once

#include <cublas_v2.h>
#include <cuda_runtime.h>

#include <cstdint>

#include "absl/status/status.h"
#include "cuda/ops.h"

namespace kvgate::ops {

// Floats of the workspace the launch needs: the statistics [num_q_heads, window, 2] and
// the logits of as many kv heads at once as fit kWindowLogitsMaxFloats (at least one).
int64_t WindowAttentionProbsWorkspaceFloats(const WindowAttentionProbsArgs& args);

// Device pointers; `workspace` holds WindowAttentionProbsWorkspaceFloats floats; `cublas`
// runs on `stream` with fp32 math (no TF32). INVALID_ARGUMENT for args that
// WindowAttentionProbsArgsError refuses.
absl::Status LaunchWindowAttentionProbs(const WindowAttentionProbsArgs& args, cublasHandle_t cublas,
                                        float* workspace, cudaStream_t stream);

}  // namespace kvgate::ops
