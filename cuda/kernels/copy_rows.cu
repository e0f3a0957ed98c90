#include <algorithm>
#include <cstdint>

#include "cuda/kernels/copy_rows.cuh"
#include "cuda/kernels/cuda_check.h"

namespace kvgate::ops {

constexpr int kCopyRowsWarps = kCopyRowsBlockSize / 32;

// Warp-stride over the rows: warp w of the grid copies rows w, w + total warps, ...;
// its lanes stride over the row's row_units elements of type T (float or float4). src
// and dst are not __restrict__: compaction copies within one buffer.
template <typename T>
static __global__ void CopyRowsKernel(const T* src, T* dst,
                                      const int32_t* __restrict__ src_rows,
                                      const int32_t* __restrict__ dst_rows, int32_t num_rows,
                                      int32_t row_units) {
  const int lane = threadIdx.x % 32;
  const int64_t first_warp =
      static_cast<int64_t>(blockIdx.x) * kCopyRowsWarps + threadIdx.x / 32;
  for (int64_t i = first_warp; i < num_rows; i += static_cast<int64_t>(gridDim.x) * kCopyRowsWarps) {
    const T* from = src + static_cast<int64_t>(src_rows[i]) * row_units;
    T* to = dst + static_cast<int64_t>(dst_rows[i]) * row_units;
    for (int32_t e = lane; e < row_units; e += 32) to[e] = from[e];
  }
}

absl::Status LaunchCopyRows(const CopyRowsArgs& args, cudaStream_t stream) {
  if (args.num_rows < 0 || args.row_elements < 0) {
    return absl::InvalidArgumentError("CopyRows: negative size");
  }
  if (args.num_rows == 0 || args.row_elements == 0) return absl::OkStatus();
  const int64_t blocks =
      std::min<int64_t>((args.num_rows + kCopyRowsWarps - 1) / kCopyRowsWarps, 65536);
  const bool vec4 = args.row_elements % 4 == 0 &&
                    reinterpret_cast<uintptr_t>(args.src) % sizeof(float4) == 0 &&
                    reinterpret_cast<uintptr_t>(args.dst) % sizeof(float4) == 0;
  if (vec4) {
    CopyRowsKernel<float4><<<static_cast<unsigned>(blocks), kCopyRowsBlockSize, 0, stream>>>(
        reinterpret_cast<const float4*>(args.src), reinterpret_cast<float4*>(args.dst),
        args.src_rows, args.dst_rows, args.num_rows, args.row_elements / 4);
  } else {
    CopyRowsKernel<float><<<static_cast<unsigned>(blocks), kCopyRowsBlockSize, 0, stream>>>(
        args.src, args.dst, args.src_rows, args.dst_rows, args.num_rows, args.row_elements);
  }
  KVGATE_CUDA_RETURN_IF_ERROR(cudaGetLastError());
  return absl::OkStatus();
}

}  // namespace kvgate::ops
