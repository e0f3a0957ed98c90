#include <cuda_bf16.h>

#include <cstdint>

#include "absl/strings/str_cat.h"
#include "cuda/kernels/cuda_check.h"
#include "cuda/kernels/gemv_bf16.cuh"

namespace kvgate::ops {
namespace {

constexpr int kWarps = kGemvBf16BlockSize / 32;

// Eight bf16 (one 16-byte vector) as floats.
__device__ __forceinline__ void Unpack8(const uint4& v, float (&f)[8]) {
  const uint32_t words[4] = {v.x, v.y, v.z, v.w};
#pragma unroll
  for (int i = 0; i < 4; ++i) {
    const float2 pair = __bfloat1622float2(*reinterpret_cast<const __nv_bfloat162*>(&words[i]));
    f[2 * i] = pair.x;
    f[2 * i + 1] = pair.y;
  }
}

// Block b computes y[:, b * kOut .. b * kOut + kOut) for all M rows of x. Thread t
// walks the k dimension in 16-byte vectors t, t + blockDim, ...: w is read once, with a
// streaming (evict-first) load since no other block reads these rows, while x (M * k
// bf16, shared by every block) stays in L1/L2. The partial sums meet by warp shuffles
// and one shared-memory pass; the first kOut * M threads write the epilogue.
template <int M>
__global__ void __launch_bounds__(kGemvBf16BlockSize) GemvBf16Kernel(const uint4* __restrict__ x,
                                                                     const uint4* __restrict__ w,
                                                                     const float* __restrict__ bias, void* y,
                                                                     int32_t n, int32_t k8, bool y_bf16,
                                                                     bool accumulate) {
  constexpr int kOut = kGemvBf16OutputsPerBlock;
  const int32_t row0 = blockIdx.x * kOut;
  float acc[kOut][M];
#pragma unroll
  for (int r = 0; r < kOut; ++r) {
#pragma unroll
    for (int m = 0; m < M; ++m) acc[r][m] = 0.0f;
  }
  // Rows past n re-read row n - 1 (never out of bounds); their sums are dropped.
  const uint4* w_rows[kOut];
#pragma unroll
  for (int r = 0; r < kOut; ++r) w_rows[r] = w + static_cast<int64_t>(min(row0 + r, n - 1)) * k8;
  for (int32_t i = threadIdx.x; i < k8; i += kGemvBf16BlockSize) {
    uint4 wv[kOut];
#pragma unroll
    for (int r = 0; r < kOut; ++r) wv[r] = __ldcs(w_rows[r] + i);
#pragma unroll
    for (int m = 0; m < M; ++m) {
      float xf[8];
      Unpack8(__ldg(x + static_cast<int64_t>(m) * k8 + i), xf);
#pragma unroll
      for (int r = 0; r < kOut; ++r) {
        float wf[8];
        Unpack8(wv[r], wf);
#pragma unroll
        for (int e = 0; e < 8; ++e) acc[r][m] = fmaf(xf[e], wf[e], acc[r][m]);
      }
    }
  }
  __shared__ float partial[kWarps][kOut * M];
  const int lane = threadIdx.x % 32, warp = threadIdx.x / 32;
#pragma unroll
  for (int r = 0; r < kOut; ++r) {
#pragma unroll
    for (int m = 0; m < M; ++m) {
      float v = acc[r][m];
#pragma unroll
      for (int offset = 16; offset > 0; offset /= 2) v += __shfl_xor_sync(0xffffffffu, v, offset);
      if (lane == 0) partial[warp][r * M + m] = v;
    }
  }
  __syncthreads();
  if (threadIdx.x >= kOut * M) return;
  const int r = threadIdx.x / M, m = threadIdx.x % M;
  const int32_t row = row0 + r;
  if (row >= n) return;
  float sum = 0.0f;
#pragma unroll
  for (int wi = 0; wi < kWarps; ++wi) sum += partial[wi][threadIdx.x];
  if (bias != nullptr) sum += bias[row];
  const int64_t at = static_cast<int64_t>(m) * n + row;
  if (y_bf16) {
    static_cast<__nv_bfloat16*>(y)[at] = __float2bfloat16_rn(sum);
  } else if (accumulate) {
    static_cast<float*>(y)[at] += sum;
  } else {
    static_cast<float*>(y)[at] = sum;
  }
}

template <int M>
void Launch(const GemmBf16Args& args, cudaStream_t stream) {
  const unsigned blocks = static_cast<unsigned>((args.n + kGemvBf16OutputsPerBlock - 1) / kGemvBf16OutputsPerBlock);
  GemvBf16Kernel<M><<<blocks, kGemvBf16BlockSize, 0, stream>>>(
      static_cast<const uint4*>(static_cast<const void*>(args.x)), static_cast<const uint4*>(static_cast<const void*>(args.w)),
      args.bias, args.y, args.n, args.k / 8, args.y_bf16, args.accumulate);
}

}  // namespace

bool GemvBf16Supported(const GemmBf16Args& args) {
  const auto aligned16 = [](const void* p) { return reinterpret_cast<uintptr_t>(p) % 16 == 0; };
  return args.m >= 1 && args.m <= kGemvBf16MaxRows && args.n >= 1 && args.k > 0 && args.k % 8 == 0 &&
         aligned16(args.x) && aligned16(args.w) && !(args.y_bf16 && (args.bias != nullptr || args.accumulate));
}

absl::Status LaunchGemvBf16(const GemmBf16Args& args, cudaStream_t stream) {
  if (!GemvBf16Supported(args)) {
    return absl::InvalidArgumentError(absl::StrCat("GemvBf16: m=", args.m, " n=", args.n, " k=", args.k,
                                                   " needs 1 <= m <= ", kGemvBf16MaxRows,
                                                   ", k a multiple of 8 and 16-byte aligned x and w"));
  }
  switch (args.m) {
    case 1: Launch<1>(args, stream); break;
    case 2: Launch<2>(args, stream); break;
    case 3: Launch<3>(args, stream); break;
    case 4: Launch<4>(args, stream); break;
    case 5: Launch<5>(args, stream); break;
    case 6: Launch<6>(args, stream); break;
    case 7: Launch<7>(args, stream); break;
    default: Launch<8>(args, stream); break;
  }
  KVGATE_CUDA_RETURN_IF_ERROR(cudaGetLastError());
  return absl::OkStatus();
}

}  // namespace kvgate::ops
