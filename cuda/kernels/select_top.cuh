// File: SelectTop on the GPU: the policies' exact top-count selection by radix select (four
// 8-bit histogram passes find the threshold score, one ordered pass ranks its ties), one
// block per selection or per merged output row, so only keep bytes reach the host.
#pragma once

#include <cuda_runtime.h>

#include "absl/status/status.h"
#include "cuda/ops.h"

namespace kvgate::ops {

// Device pointers. INVALID_ARGUMENT for args SelectTopArgsError refuses.
absl::Status LaunchSelectTop(const SelectTopArgs& args, cudaStream_t stream);

}  // namespace kvgate::ops
