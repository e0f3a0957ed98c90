#include <cuda_bf16.h>

#include <cmath>
#include <cstdint>

#include "cuda/kernels/cuda_check.h"
#include "cuda/kernels/embed_bf16.cuh"

namespace kvgate::ops {

// One block per token; threads stride over the row.
static __global__ void EmbedBf16Kernel(const int32_t* token_ids, const __nv_bfloat16* table,
                                       float* out, int dim, int vocab_size) {
  const int64_t t = blockIdx.x;
  const int32_t id = token_ids[t];
  float* dst = out + t * dim;
  if (id < 0 || id >= vocab_size) {
    for (int i = threadIdx.x; i < dim; i += blockDim.x) dst[i] = NAN;
    return;
  }
  const __nv_bfloat16* src = table + static_cast<int64_t>(id) * dim;
  for (int i = threadIdx.x; i < dim; i += blockDim.x) dst[i] = __bfloat162float(src[i]);
}

absl::Status LaunchEmbedBf16(const EmbedBf16Args& args, cudaStream_t stream) {
  if (args.num_tokens < 0 || args.dim < 0 || args.vocab_size < 0) {
    return absl::InvalidArgumentError("EmbedBf16: negative size");
  }
  if (args.num_tokens == 0 || args.dim == 0) return absl::OkStatus();
  EmbedBf16Kernel<<<args.num_tokens, kEmbedBf16BlockSize, 0, stream>>>(
      args.token_ids, reinterpret_cast<const __nv_bfloat16*>(args.table), args.out, args.dim,
      args.vocab_size);
  KVGATE_CUDA_RETURN_IF_ERROR(cudaGetLastError());
  return absl::OkStatus();
}

}  // namespace kvgate::ops
