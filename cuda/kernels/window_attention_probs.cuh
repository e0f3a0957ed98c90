// File: WindowAttentionProbs on the GPU (SnapKV's observation-window scores without a
// host copy of the keys). Two passes, so the sum over window queries runs in a fixed
// order (no atomics: the same bits on every run): the first finds each (query head,
// window query)'s softmax max and denominator, the second sums every key's probabilities
// over the window queries.
#pragma once

#include <cuda_runtime.h>

#include <cstdint>

#include "absl/status/status.h"
#include "cuda/ops.h"

namespace kvgate::ops {

// Floats of the workspace the launch needs: [num_q_heads, window, 2].
int64_t WindowAttentionProbsWorkspaceFloats(const WindowAttentionProbsArgs& args);

// Device pointers; `workspace` holds WindowAttentionProbsWorkspaceFloats floats.
// INVALID_ARGUMENT for args that WindowAttentionProbsArgsError refuses.
absl::Status LaunchWindowAttentionProbs(const WindowAttentionProbsArgs& args, float* workspace, cudaStream_t stream);

}  // namespace kvgate::ops
