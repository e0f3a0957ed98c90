// File: SelectTop on the GPU: the policies' exact top-count selection by radix select (four
// 8-bit histogram passes find the threshold score, one ordered pass ranks its ties), one
// block per selection or per merged output row, or, for a few selections of many entries,
// each pass spread over many blocks; only keep bytes reach the host.
#pragma once

#include <cuda_runtime.h>

#include <cstddef>
#include <cstdint>

#include "absl/status/status.h"
#include "cuda/ops.h"

namespace kvgate::ops {

// Bytes of workspace a launch needs: 0 when one block per selection does it; else (a few
// selections of many entries) the state of the multi-block passes.
int64_t SelectTopWorkspaceBytes(const SelectTopArgs& args);

// Device pointers. INVALID_ARGUMENT for args SelectTopArgsError refuses or a workspace
// smaller than SelectTopWorkspaceBytes.
absl::Status LaunchSelectTop(const SelectTopArgs& args, void* workspace, size_t workspace_bytes, cudaStream_t stream);

}  // namespace kvgate::ops
