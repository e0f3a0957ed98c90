// File: GemmBf16 for a few rows of x (decode: one row per sequence of the batch) as a
// weight-streaming kernel. With m <= kGemvBf16MaxRows the product is bound by reading w
// once from HBM; cuBLASLt's tensor-core tiles waste most of their rows there and its
// heuristics pick tiles that leave the memory system idle part of the time. Same contract
// and reference as GemmBf16 (GemmBf16Ref): bf16 operands, fp32 sums, bias and the
// residual add fused into the epilogue, fp32 or bf16 (rounded once) output.
#pragma once

#include <cuda_runtime.h>

#include "absl/status/status.h"
#include "cuda/ops.h"

namespace kvgate::ops {

constexpr int kGemvBf16MaxRows = 8;
constexpr int kGemvBf16BlockSize = 256;
// Outputs (rows of w) per block: each w element loaded serves every row of x in
// registers, and each x element loaded serves this many rows of w.
constexpr int kGemvBf16OutputsPerBlock = 4;

// True when LaunchGemvBf16 takes these arguments: 1 <= m <= kGemvBf16MaxRows, k a
// positive multiple of 8 and x, w 16-byte aligned (every row then starts on a 16-byte
// boundary and is read in 16-byte vectors), y_bf16 only without bias and accumulate.
bool GemvBf16Supported(const GemmBf16Args& args);

// INVALID_ARGUMENT when !GemvBf16Supported(args).
absl::Status LaunchGemvBf16(const GemmBf16Args& args, cudaStream_t stream);

}  // namespace kvgate::ops
