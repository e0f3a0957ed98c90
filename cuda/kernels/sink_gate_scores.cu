#include "cuda/kernels/sink_gate_scores.cuh"

#include <cmath>
#include <string>

#include "cuda/cpu/sink_gate_scores.h"
#include "cuda/kernels/cuda_check.h"

namespace kvgate::ops {
namespace {

constexpr int kThreads = 128;
constexpr int kMaxRank = 64;

__device__ __forceinline__ void RmsNormInPlace(float* v, const float* w, int size, float eps) {
  float sum_sq = 0.0f;
  for (int i = 0; i < size; ++i) sum_sq += v[i] * v[i];
  const float inv = 1.0f / sqrtf(sum_sq / static_cast<float>(size) + eps);
  for (int i = 0; i < size; ++i) v[i] = w[i] * (v[i] * inv);
}

// Row t of q (without the bias, [kv_heads * group * rank]) at q + t * q_stride, of k
// ([kv_heads * rank]) at k + t * k_stride.
__global__ void __launch_bounds__(kThreads)
    SinkGateKernel(SinkGateScoresArgs a, const float* q, int64_t q_stride, const float* k, int64_t k_stride) {
  const int64_t index = static_cast<int64_t>(blockIdx.x) * kThreads + threadIdx.x;
  if (index >= int64_t{a.n} * a.kv_heads) return;
  const int t = static_cast<int>(index / a.kv_heads), h = static_cast<int>(index % a.kv_heads);
  const int R = a.rank, G = a.group, S = a.sinks;
  const float inv_sqrt_rank = 1.0f / sqrtf(static_cast<float>(R));
  float kh[kMaxRank], qg[kMaxRank];
  const float* k_row = k + t * k_stride + static_cast<int64_t>(h) * R;
  for (int i = 0; i < R; ++i) kh[i] = k_row[i];
  RmsNormInPlace(kh, a.k_norm, R, a.eps);
  float sum = 0.0f;
  for (int g = 0; g < G; ++g) {
    const int64_t column = (static_cast<int64_t>(h) * G + g) * R;
    const float* q_row = q + t * q_stride + column;
    for (int i = 0; i < R; ++i) qg[i] = q_row[i] + a.q_bias[column + i];
    RmsNormInPlace(qg, a.q_norm, R, a.eps);
    float logit = 0.0f;
    for (int i = 0; i < R; ++i) logit += kh[i] * qg[i];
    logit = logit * inv_sqrt_rank + a.b[h * G + g];
    // Max over the own logit and the sinks, then the shifted softmax weight of the own key.
    float m = logit;
    for (int j = 0; j < S; ++j) {
      const float* base = a.k_base + (static_cast<int64_t>(h) * S + j) * R;
      float s = 0.0f;
      for (int i = 0; i < R; ++i) s += base[i] * qg[i];
      m = fmaxf(m, s * inv_sqrt_rank);
    }
    const float own = expf(logit - m);
    float denom = own;
    for (int j = 0; j < S; ++j) {
      const float* base = a.k_base + (static_cast<int64_t>(h) * S + j) * R;
      float s = 0.0f;
      for (int i = 0; i < R; ++i) s += base[i] * qg[i];
      denom += expf(s * inv_sqrt_rank - m);
    }
    sum += own / denom;
  }
  a.out[static_cast<int64_t>(h) * a.out_stride + t] = sum / static_cast<float>(G);
}

// The same scores with one thread per (token, kv head, group member) and the rank a
// compile-time constant, so q and k stay in registers; the group's lanes (a power of two,
// group <= padded <= 32) sum their shares by shuffles. A block serves one kv head
// (blockIdx.y), whose sink keys, q bias and norms every lane reads: they sit in shared
// memory. q and k rows are `q_stride` / `k_stride` floats apart, so one GEMM's [q ; k]
// rows serve as well as two GEMMs' outputs.
template <int R>
__global__ void __launch_bounds__(kThreads)
    SinkGateMemberKernel(SinkGateScoresArgs a, const float* q, int64_t q_stride, const float* k, int64_t k_stride,
                         int padded_log2) {
  extern __shared__ float4 shared4[];
  float* base = reinterpret_cast<float*>(shared4);  // [sinks, R]
  float* q_bias = base + a.sinks * R;                // [group, R]
  float* q_norm = q_bias + a.group * R;              // [R]
  float* k_norm = q_norm + R;                        // [R]
  const int h = blockIdx.y, G = a.group, S = a.sinks;
  for (int i = threadIdx.x; i < S * R; i += kThreads) base[i] = a.k_base[static_cast<int64_t>(h) * S * R + i];
  for (int i = threadIdx.x; i < G * R; i += kThreads) q_bias[i] = a.q_bias[static_cast<int64_t>(h) * G * R + i];
  for (int i = threadIdx.x; i < R; i += kThreads) q_norm[i] = a.q_norm[i], k_norm[i] = a.k_norm[i];
  __syncthreads();

  const int g = static_cast<int>(threadIdx.x & ((1u << padded_log2) - 1));
  const int64_t t = static_cast<int64_t>(blockIdx.x) * (kThreads >> padded_log2) + (threadIdx.x >> padded_log2);
  const bool live_token = t < a.n;
  float share = 0.0f;
  if (live_token && g < G) {
    const float inv_sqrt_rank = 1.0f / sqrtf(static_cast<float>(R));
    float kh[R], qg[R];
    const float4* k_row = reinterpret_cast<const float4*>(k + t * k_stride + static_cast<int64_t>(h) * R);
    const float4* q_row = reinterpret_cast<const float4*>(q + t * q_stride + (static_cast<int64_t>(h) * G + g) * R);
#pragma unroll
    for (int i = 0; i < R / 4; ++i) {
      const float4 kv = k_row[i], qv = q_row[i];
      kh[4 * i] = kv.x, kh[4 * i + 1] = kv.y, kh[4 * i + 2] = kv.z, kh[4 * i + 3] = kv.w;
      qg[4 * i] = qv.x, qg[4 * i + 1] = qv.y, qg[4 * i + 2] = qv.z, qg[4 * i + 3] = qv.w;
    }
    float k_sq = 0.0f, q_sq = 0.0f;
#pragma unroll
    for (int i = 0; i < R; ++i) {
      qg[i] += q_bias[g * R + i];
      k_sq += kh[i] * kh[i];
      q_sq += qg[i] * qg[i];
    }
    const float k_inv = 1.0f / sqrtf(k_sq / static_cast<float>(R) + a.eps);
    const float q_inv = 1.0f / sqrtf(q_sq / static_cast<float>(R) + a.eps);
    float logit = 0.0f;
#pragma unroll
    for (int i = 0; i < R; ++i) {
      kh[i] = k_norm[i] * (kh[i] * k_inv);
      qg[i] = q_norm[i] * (qg[i] * q_inv);
      logit += kh[i] * qg[i];
    }
    logit = logit * inv_sqrt_rank + a.b[h * G + g];
    // Max over the own logit and the sinks, then the shifted softmax weight of the own key:
    // two passes over the sinks, as the CPU twin sums them.
    const auto sink_logit = [&](int j) {
      const float4* row = reinterpret_cast<const float4*>(base + j * R);
      float dot = 0.0f;
#pragma unroll
      for (int i = 0; i < R / 4; ++i) {
        const float4 b4 = row[i];
        dot += b4.x * qg[4 * i];
        dot += b4.y * qg[4 * i + 1];
        dot += b4.z * qg[4 * i + 2];
        dot += b4.w * qg[4 * i + 3];
      }
      return dot * inv_sqrt_rank;
    };
    float m = logit;
    for (int j = 0; j < S; ++j) m = fmaxf(m, sink_logit(j));
    const float own = expf(logit - m);
    float denom = own;
    for (int j = 0; j < S; ++j) denom += expf(sink_logit(j) - m);
    share = own / denom;
  }
  for (int offset = (1 << padded_log2) / 2; offset > 0; offset /= 2) share += __shfl_xor_sync(0xffffffffu, share, offset);
  if (live_token && g == 0) a.out[static_cast<int64_t>(h) * a.out_stride + t] = share / static_cast<float>(G);
}

template <int R>
absl::Status LaunchMemberKernel(const SinkGateScoresArgs& args, const float* q, int64_t q_stride, const float* k,
                                int64_t k_stride, cudaStream_t stream) {
  int padded_log2 = 0;
  while ((1 << padded_log2) < args.group) ++padded_log2;
  const int64_t tokens_per_block = kThreads >> padded_log2;
  const int64_t blocks = (int64_t{args.n} + tokens_per_block - 1) / tokens_per_block;
  if (blocks > 0x7fffffff || args.kv_heads > 65535) {
    return absl::InvalidArgumentError("SinkGateScores: too many tokens or kv heads for one launch");
  }
  const size_t shared = sizeof(float) * (size_t{1} * args.sinks * R + size_t{1} * args.group * R + 2 * R);
  SinkGateMemberKernel<R><<<dim3(static_cast<unsigned>(blocks), static_cast<unsigned>(args.kv_heads)), kThreads,
                            shared, stream>>>(args, q, q_stride, k, k_stride, padded_log2);
  return absl::OkStatus();
}

}  // namespace

int64_t SinkGateScoresWorkspaceFloats(const SinkGateScoresArgs& args) {
  if (!SinkGateScoresArgsError(args).empty()) return 0;
  return int64_t{args.n} * args.kv_heads * args.rank * (args.group + 1);
}

absl::Status LaunchSinkGateScoresOfProjections(const SinkGateScoresArgs& args, const float* q, int64_t q_stride,
                                               const float* k, int64_t k_stride, cudaStream_t stream) {
  if (std::string error = SinkGateScoresArgsError(args); !error.empty()) return absl::InvalidArgumentError(error);
  if (args.n == 0) return absl::OkStatus();
  // A group's lanes must share a warp; a head's shared rows are then at most 25 KiB.
  const bool member_kernel = args.group <= 32 && (args.rank == 8 || args.rank == 16 || args.rank == 32 || args.rank == 64);
  if (member_kernel) {
    const absl::Status launched = args.rank == 8    ? LaunchMemberKernel<8>(args, q, q_stride, k, k_stride, stream)
                                  : args.rank == 16 ? LaunchMemberKernel<16>(args, q, q_stride, k, k_stride, stream)
                                  : args.rank == 32 ? LaunchMemberKernel<32>(args, q, q_stride, k, k_stride, stream)
                                                    : LaunchMemberKernel<64>(args, q, q_stride, k, k_stride, stream);
    if (!launched.ok()) return launched;
  } else {  // other ranks and groups: one thread per (token, kv head)
    const int64_t threads = int64_t{args.n} * args.kv_heads;
    const int64_t blocks = (threads + kThreads - 1) / kThreads;
    if (blocks > 0x7fffffff) return absl::InvalidArgumentError("SinkGateScores: too many tokens for one launch");
    SinkGateKernel<<<static_cast<unsigned>(blocks), kThreads, 0, stream>>>(args, q, q_stride, k, k_stride);
  }
  KVGATE_CUDA_RETURN_IF_ERROR(cudaGetLastError());
  return absl::OkStatus();
}

absl::Status LaunchSinkGateScores(const SinkGateScoresArgs& args, cublasHandle_t cublas, float* workspace,
                                  cudaStream_t stream) {
  if (std::string error = SinkGateScoresArgsError(args); !error.empty()) return absl::InvalidArgumentError(error);
  if (args.n == 0) return absl::OkStatus();
  if (args.x == nullptr) return absl::InvalidArgumentError("SinkGateScores: no fp32 input (x)");
  const int32_t q_width = args.kv_heads * args.group * args.rank, k_width = args.kv_heads * args.rank;
  float* q = workspace;
  float* k = workspace + int64_t{args.n} * q_width;
  const float one = 1.0f, zero = 0.0f;
  const cublasComputeType_t compute = args.allow_tf32 ? CUBLAS_COMPUTE_32F_FAST_TF32 : CUBLAS_COMPUTE_32F;
  // Row-major y[n, width] = x[n, hidden] w[width, hidden]^T, as column-major y^T = w x^T.
  const auto project = [&](const float* w, int32_t width, float* y) {
    return cublasGemmEx(cublas, CUBLAS_OP_T, CUBLAS_OP_N, width, args.n, args.hidden, &one, w, CUDA_R_32F, args.hidden,
                        args.x, CUDA_R_32F, args.hidden, &zero, y, CUDA_R_32F, width, compute, CUBLAS_GEMM_DEFAULT);
  };
  KVGATE_CUBLAS_RETURN_IF_ERROR(project(args.q_weight, q_width, q));
  KVGATE_CUBLAS_RETURN_IF_ERROR(project(args.k_weight, k_width, k));
  return LaunchSinkGateScoresOfProjections(args, q, q_width, k, k_width, stream);
}

}  // namespace kvgate::ops
