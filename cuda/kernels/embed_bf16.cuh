// File: EmbedBf16 on the GPU: out[t, :] = float(table[token_ids[t], :]), a bf16 table.
#pragma once

#include <cuda_runtime.h>

#include "absl/status/status.h"
#include "cuda/ops.h"

namespace kvgate::ops {

constexpr int kEmbedBf16BlockSize = 256;

// All pointers in args are device memory. An id outside [0, vocab) writes a row of NaN
// (the engine validates ids first). Returns INVALID_ARGUMENT for negative sizes.
absl::Status LaunchEmbedBf16(const EmbedBf16Args& args, cudaStream_t stream);

}  // namespace kvgate::ops
