#include <cmath>
#include <cstdint>

#include "absl/strings/str_cat.h"
#include "cuda/kernels/argmax_rows.cuh"
#include "cuda/kernels/cuda_check.h"

namespace kvgate::ops {
namespace {

// A candidate (value, column); column -1 = none yet. engine::ArgMax's order: a larger
// value wins, an equal value the lower column, NaN never (the NaN-at-column-0 case is
// settled after the reduction).
struct Best {
  float value;
  int32_t column;
};

__device__ __forceinline__ Best Better(Best a, Best b) {
  if (b.column < 0) return a;
  if (a.column < 0) return b;
  if (b.value > a.value || (b.value == a.value && b.column < a.column)) return b;
  return a;
}

__global__ void __launch_bounds__(kArgMaxRowsBlockSize) ArgMaxRowsKernel(ArgMaxRowsArgs args) {
  const float* x = args.x + static_cast<int64_t>(blockIdx.x) * args.cols;
  Best best{0.0f, -1};
  for (int32_t i = threadIdx.x; i < args.cols; i += blockDim.x) {
    const float v = x[i];
    if (!isnan(v)) best = Better(best, Best{v, i});
  }
  for (int offset = 16; offset > 0; offset /= 2) {
    const Best other{__shfl_xor_sync(0xffffffffu, best.value, offset),
                     __shfl_xor_sync(0xffffffffu, best.column, offset)};
    best = Better(best, other);
  }
  __shared__ Best warp_best[kArgMaxRowsBlockSize / 32];
  const int lane = threadIdx.x % 32, warp = threadIdx.x / 32;
  if (lane == 0) warp_best[warp] = best;
  __syncthreads();
  if (threadIdx.x == 0) {
    Best all = warp_best[0];
    for (int w = 1; w < kArgMaxRowsBlockSize / 32; ++w) all = Better(all, warp_best[w]);
    // Column 0 NaN: nothing is greater than the first best. No value at all: column 0.
    args.out[blockIdx.x] = isnan(x[0]) || all.column < 0 ? 0 : all.column;
  }
}

}  // namespace

absl::Status LaunchArgMaxRows(const ArgMaxRowsArgs& args, cudaStream_t stream) {
  if (args.rows < 0 || args.cols < 1) {
    return absl::InvalidArgumentError(absl::StrCat("ArgMaxRows of ", args.rows, " rows x ", args.cols, " columns"));
  }
  if (args.rows == 0) return absl::OkStatus();
  ArgMaxRowsKernel<<<static_cast<unsigned>(args.rows), kArgMaxRowsBlockSize, 0, stream>>>(args);
  KVGATE_CUDA_RETURN_IF_ERROR(cudaGetLastError());
  return absl::OkStatus();
}

}  // namespace kvgate::ops
