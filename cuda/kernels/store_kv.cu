#include <algorithm>
#include <cstdint>

#include "absl/strings/str_cat.h"
#include "cuda/kernels/cuda_check.h"
#include "cuda/kernels/store_kv.cuh"

namespace kvgate::ops {

// Grid-stride over the num_tokens * num_kv_heads * head_dim source elements; K and V
// share the index arithmetic.
static __global__ void StoreKvKernel(const float* k, const float* v, float* k_cache, float* v_cache,
                                     int num_kv_heads, int head_dim, int capacity_tokens,
                                     int start_row, int64_t num_elements) {
  for (int64_t idx = blockIdx.x * static_cast<int64_t>(blockDim.x) + threadIdx.x;
       idx < num_elements; idx += static_cast<int64_t>(gridDim.x) * blockDim.x) {
    const int64_t d = idx % head_dim;
    const int64_t token_head = idx / head_dim;
    const int64_t h = token_head % num_kv_heads;
    const int64_t t = token_head / num_kv_heads;
    const int64_t dst = (h * capacity_tokens + start_row + t) * head_dim + d;
    k_cache[dst] = k[idx];
    v_cache[dst] = v[idx];
  }
}

absl::Status LaunchStoreKv(const StoreKvArgs& args, cudaStream_t stream) {
  if (args.num_tokens < 0 || args.num_kv_heads < 0 || args.head_dim < 0 ||
      args.capacity_tokens < 0) {
    return absl::InvalidArgumentError("StoreKv: negative size");
  }
  if (args.start_row < 0 ||
      static_cast<int64_t>(args.start_row) + args.num_tokens > args.capacity_tokens) {
    return absl::InvalidArgumentError(
        absl::StrCat("StoreKv: rows [", args.start_row, ", ",
                     static_cast<int64_t>(args.start_row) + args.num_tokens,
                     ") do not fit a cache of ", args.capacity_tokens, " rows"));
  }
  const int64_t num_elements =
      static_cast<int64_t>(args.num_tokens) * args.num_kv_heads * args.head_dim;
  if (num_elements == 0) return absl::OkStatus();
  const int64_t blocks =
      std::min<int64_t>((num_elements + kStoreKvBlockSize - 1) / kStoreKvBlockSize, 65536);
  StoreKvKernel<<<static_cast<unsigned>(blocks), kStoreKvBlockSize, 0, stream>>>(
      args.k, args.v, args.k_cache, args.v_cache, args.num_kv_heads, args.head_dim,
      args.capacity_tokens, args.start_row, num_elements);
  KVGATE_CUDA_RETURN_IF_ERROR(cudaGetLastError());
  return absl::OkStatus();
}

}  // namespace kvgate::ops
