// File: CopyRows on the GPU: dst[dst_rows[i], :] = src[src_rows[i], :] (KV rows from the
// contiguous prefill cache into pages, and between pages in compaction), converting
// float32 <-> bf16 where the dtypes differ.
#pragma once

#include <cuda_runtime.h>

#include "absl/status/status.h"
#include "cuda/ops.h"

namespace kvgate::ops {

constexpr int kCopyRowsBlockSize = 256;  // one warp per row, 8 rows per block

// All pointers in args are device memory; row indices are validated by the caller.
// Same-dtype rows are copied as 16-byte words when the row's bytes and both pointers
// allow, else as 4- or 2-byte words. Returns INVALID_ARGUMENT for negative sizes, an
// unknown dtype, or a converting copy within one buffer; 0 rows or row_elements 0 is a
// no-op.
absl::Status LaunchCopyRows(const CopyRowsArgs& args, cudaStream_t stream);

}  // namespace kvgate::ops
