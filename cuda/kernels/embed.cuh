// File: Embed on the GPU: out[t, :] = table[token_ids[t], :].
#pragma once

#include <cuda_runtime.h>

#include "absl/status/status.h"
#include "cuda/ops.h"

namespace kvgate::ops {

constexpr int kEmbedBlockSize = 256;

// All pointers in args are device memory. Ids are validated by the caller (engine); an
// id outside [0, vocab_size) writes a row of NaN rather than reading out of bounds.
// Returns INVALID_ARGUMENT for negative sizes; 0 tokens or dim 0 is a no-op.
absl::Status LaunchEmbed(const EmbedArgs& args, cudaStream_t stream);

}  // namespace kvgate::ops
