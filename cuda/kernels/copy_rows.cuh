// File: CopyRows on the GPU: dst[dst_rows[i], :] = src[src_rows[i], :] (KV rows from the
// contiguous prefill cache into pages, and between pages in compaction).
#pragma once

#include <cuda_runtime.h>

#include "absl/status/status.h"
#include "cuda/ops.h"

namespace kvgate::ops {

constexpr int kCopyRowsBlockSize = 256;  // one warp per row, 8 rows per block

// All pointers in args are device memory; row indices are validated by the caller.
// Rows are copied as float4 when row_elements % 4 == 0 and src, dst are 16-byte
// aligned, else as floats. Returns INVALID_ARGUMENT for negative sizes; 0 rows or
// row_elements 0 is a no-op.
absl::Status LaunchCopyRows(const CopyRowsArgs& args, cudaStream_t stream);

}  // namespace kvgate::ops
