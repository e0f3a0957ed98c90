#include <cuda_bf16.h>

#include <algorithm>
#include <cstdint>

#include "absl/strings/str_cat.h"
#include "cuda/kernels/copy_rows.cuh"
#include "cuda/kernels/cuda_check.h"

namespace kvgate::ops {
namespace {

constexpr int kCopyRowsWarps = kCopyRowsBlockSize / 32;

// Warp-stride over the rows: warp w of the grid copies rows w, w + total warps, ...;
// its lanes stride over the row's row_units units of type T (raw words of 2 to 16
// bytes). src and dst are not __restrict__: compaction copies within one buffer.
// With run_lengths, entry i is a run of run_lengths[i] rows, contiguous on both sides,
// so the warp copies run_lengths[i] * row_units units in one stride.
template <typename T>
__global__ void CopyRowsKernel(const T* src, T* dst, const int32_t* __restrict__ src_rows,
                               const int32_t* __restrict__ dst_rows, const int32_t* __restrict__ run_lengths,
                               int32_t num_rows, int32_t row_units) {
  const int lane = threadIdx.x % 32;
  const int64_t first_warp = static_cast<int64_t>(blockIdx.x) * kCopyRowsWarps + threadIdx.x / 32;
  for (int64_t i = first_warp; i < num_rows; i += static_cast<int64_t>(gridDim.x) * kCopyRowsWarps) {
    const T* from = src + static_cast<int64_t>(src_rows[i]) * row_units;
    T* to = dst + static_cast<int64_t>(dst_rows[i]) * row_units;
    const int64_t units = static_cast<int64_t>(row_units) * (run_lengths != nullptr ? run_lengths[i] : 1);
    for (int64_t e = lane; e < units; e += 32) to[e] = from[e];
  }
}

__device__ __forceinline__ float Widen(float x) { return x; }
__device__ __forceinline__ float Widen(__nv_bfloat16 x) { return __bfloat162float(x); }
template <typename T>
__device__ __forceinline__ T Narrow(float x);
template <>
__device__ __forceinline__ float Narrow<float>(float x) { return x; }
template <>
__device__ __forceinline__ __nv_bfloat16 Narrow<__nv_bfloat16>(float x) { return __float2bfloat16_rn(x); }

// A converting copy (float32 <-> bf16), element by element through float.
template <typename Src, typename Dst>
__global__ void ConvertRowsKernel(const Src* __restrict__ src, Dst* __restrict__ dst,
                                  const int32_t* __restrict__ src_rows, const int32_t* __restrict__ dst_rows,
                                  const int32_t* __restrict__ run_lengths, int32_t num_rows, int32_t row_elements) {
  const int lane = threadIdx.x % 32;
  const int64_t first_warp = static_cast<int64_t>(blockIdx.x) * kCopyRowsWarps + threadIdx.x / 32;
  for (int64_t i = first_warp; i < num_rows; i += static_cast<int64_t>(gridDim.x) * kCopyRowsWarps) {
    const Src* from = src + static_cast<int64_t>(src_rows[i]) * row_elements;
    Dst* to = dst + static_cast<int64_t>(dst_rows[i]) * row_elements;
    const int64_t elements = static_cast<int64_t>(row_elements) * (run_lengths != nullptr ? run_lengths[i] : 1);
    for (int64_t e = lane; e < elements; e += 32) to[e] = Narrow<Dst>(Widen(from[e]));
  }
}

bool KnownKvDtype(KvDtype dtype) { return dtype == KvDtype::kFloat32 || dtype == KvDtype::kBf16; }

}  // namespace

absl::Status LaunchCopyRows(const CopyRowsArgs& args, cudaStream_t stream) {
  if (args.num_rows < 0 || args.row_elements < 0) {
    return absl::InvalidArgumentError("CopyRows: negative size");
  }
  if (!KnownKvDtype(args.src_dtype) || !KnownKvDtype(args.dst_dtype)) {
    return absl::InvalidArgumentError(absl::StrCat("CopyRows: unknown dtype ", static_cast<int>(args.src_dtype),
                                                   " -> ", static_cast<int>(args.dst_dtype)));
  }
  if (args.num_rows == 0 || args.row_elements == 0) return absl::OkStatus();
  if (args.src_dtype != args.dst_dtype && args.src == args.dst) {
    return absl::InvalidArgumentError("CopyRows: a converting copy within one buffer");
  }
  const unsigned blocks =
      static_cast<unsigned>(std::min<int64_t>((args.num_rows + kCopyRowsWarps - 1) / kCopyRowsWarps, 65536));
  if (args.src_dtype == args.dst_dtype) {
    // Same type: raw words, as wide as the row length and both pointers allow.
    const int64_t row_bytes = static_cast<int64_t>(args.row_elements) * KvDtypeBytes(args.src_dtype);
    const auto fits = [&](int64_t unit) {
      return row_bytes % unit == 0 && reinterpret_cast<uintptr_t>(args.src) % unit == 0 &&
             reinterpret_cast<uintptr_t>(args.dst) % unit == 0;
    };
    if (fits(16)) {
      CopyRowsKernel<uint4><<<blocks, kCopyRowsBlockSize, 0, stream>>>(
          static_cast<const uint4*>(args.src), static_cast<uint4*>(args.dst), args.src_rows, args.dst_rows,
          args.run_lengths, args.num_rows, static_cast<int32_t>(row_bytes / 16));
    } else if (fits(4)) {
      CopyRowsKernel<uint32_t><<<blocks, kCopyRowsBlockSize, 0, stream>>>(
          static_cast<const uint32_t*>(args.src), static_cast<uint32_t*>(args.dst), args.src_rows, args.dst_rows,
          args.run_lengths, args.num_rows, static_cast<int32_t>(row_bytes / 4));
    } else {
      CopyRowsKernel<uint16_t><<<blocks, kCopyRowsBlockSize, 0, stream>>>(
          static_cast<const uint16_t*>(args.src), static_cast<uint16_t*>(args.dst), args.src_rows, args.dst_rows,
          args.run_lengths, args.num_rows, static_cast<int32_t>(row_bytes / 2));
    }
  } else if (args.dst_dtype == KvDtype::kBf16) {
    ConvertRowsKernel<float, __nv_bfloat16><<<blocks, kCopyRowsBlockSize, 0, stream>>>(
        static_cast<const float*>(args.src), static_cast<__nv_bfloat16*>(args.dst), args.src_rows, args.dst_rows,
        args.run_lengths, args.num_rows, args.row_elements);
  } else {
    ConvertRowsKernel<__nv_bfloat16, float><<<blocks, kCopyRowsBlockSize, 0, stream>>>(
        static_cast<const __nv_bfloat16*>(args.src), static_cast<float*>(args.dst), args.src_rows, args.dst_rows,
        args.run_lengths, args.num_rows, args.row_elements);
  }
  KVGATE_CUDA_RETURN_IF_ERROR(cudaGetLastError());
  return absl::OkStatus();
}

}  // namespace kvgate::ops
