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

// q: [n, kv_heads * group * rank] without the bias; k: [n, kv_heads * rank].
__global__ void __launch_bounds__(kThreads) SinkGateKernel(SinkGateScoresArgs a, const float* q, const float* k) {
  const int64_t index = static_cast<int64_t>(blockIdx.x) * kThreads + threadIdx.x;
  if (index >= int64_t{a.n} * a.kv_heads) return;
  const int t = static_cast<int>(index / a.kv_heads), h = static_cast<int>(index % a.kv_heads);
  const int R = a.rank, G = a.group, S = a.sinks;
  const float inv_sqrt_rank = 1.0f / sqrtf(static_cast<float>(R));
  float kh[kMaxRank], qg[kMaxRank];
  const float* k_row = k + (static_cast<int64_t>(t) * a.kv_heads + h) * R;
  for (int i = 0; i < R; ++i) kh[i] = k_row[i];
  RmsNormInPlace(kh, a.k_norm, R, a.eps);
  const int64_t q_width = static_cast<int64_t>(a.kv_heads) * G * R;
  float sum = 0.0f;
  for (int g = 0; g < G; ++g) {
    const int64_t column = (static_cast<int64_t>(h) * G + g) * R;
    const float* q_row = q + t * q_width + column;
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
// group <= padded <= 32) sum their shares by shuffles.
template <int R>
__global__ void __launch_bounds__(kThreads) SinkGateMemberKernel(SinkGateScoresArgs a, const float* q, const float* k,
                                                                  int padded_log2) {
  const int64_t index = static_cast<int64_t>(blockIdx.x) * kThreads + threadIdx.x;
  const int64_t pair = index >> padded_log2;  // t * kv_heads + h
  const int g = static_cast<int>(index & ((1 << padded_log2) - 1));
  const bool live_pair = pair < int64_t{a.n} * a.kv_heads;
  float share = 0.0f;
  if (live_pair && g < a.group) {
    const int t = static_cast<int>(pair / a.kv_heads), h = static_cast<int>(pair % a.kv_heads);
    const int G = a.group, S = a.sinks;
    const float inv_sqrt_rank = 1.0f / sqrtf(static_cast<float>(R));
    float kh[R], qg[R];
    const float4* k_row = reinterpret_cast<const float4*>(k + pair * R);
    const int64_t column = (static_cast<int64_t>(h) * G + g) * R;
    const float4* q_row = reinterpret_cast<const float4*>(q + t * (static_cast<int64_t>(a.kv_heads) * G * R) + column);
#pragma unroll
    for (int i = 0; i < R / 4; ++i) {
      const float4 kv = k_row[i], qv = q_row[i];
      kh[4 * i] = kv.x, kh[4 * i + 1] = kv.y, kh[4 * i + 2] = kv.z, kh[4 * i + 3] = kv.w;
      qg[4 * i] = qv.x, qg[4 * i + 1] = qv.y, qg[4 * i + 2] = qv.z, qg[4 * i + 3] = qv.w;
    }
    float k_sq = 0.0f, q_sq = 0.0f;
#pragma unroll
    for (int i = 0; i < R; ++i) {
      qg[i] += a.q_bias[column + i];
      k_sq += kh[i] * kh[i];
      q_sq += qg[i] * qg[i];
    }
    const float k_inv = 1.0f / sqrtf(k_sq / static_cast<float>(R) + a.eps);
    const float q_inv = 1.0f / sqrtf(q_sq / static_cast<float>(R) + a.eps);
    float logit = 0.0f;
#pragma unroll
    for (int i = 0; i < R; ++i) {
      kh[i] = a.k_norm[i] * (kh[i] * k_inv);
      qg[i] = a.q_norm[i] * (qg[i] * q_inv);
      logit += kh[i] * qg[i];
    }
    logit = logit * inv_sqrt_rank + a.b[h * G + g];
    const float* base = a.k_base + static_cast<int64_t>(h) * S * R;
    float m = logit;
    for (int j = 0; j < S; ++j) {
      float dot = 0.0f;
#pragma unroll
      for (int i = 0; i < R; ++i) dot += __ldg(base + j * R + i) * qg[i];
      m = fmaxf(m, dot * inv_sqrt_rank);
    }
    const float own = expf(logit - m);
    float denom = own;
    for (int j = 0; j < S; ++j) {
      float dot = 0.0f;
#pragma unroll
      for (int i = 0; i < R; ++i) dot += __ldg(base + j * R + i) * qg[i];
      denom += expf(dot * inv_sqrt_rank - m);
    }
    share = own / denom;
  }
  for (int offset = (1 << padded_log2) / 2; offset > 0; offset /= 2) share += __shfl_xor_sync(0xffffffffu, share, offset);
  if (live_pair && g == 0) {
    const int t = static_cast<int>(pair / a.kv_heads), h = static_cast<int>(pair % a.kv_heads);
    a.out[static_cast<int64_t>(h) * a.out_stride + t] = share / static_cast<float>(a.group);
  }
}

template <int R>
absl::Status LaunchMemberKernel(const SinkGateScoresArgs& args, const float* q, const float* k, cudaStream_t stream) {
  int padded_log2 = 0;
  while ((1 << padded_log2) < args.group) ++padded_log2;
  const int64_t threads = (int64_t{args.n} * args.kv_heads) << padded_log2;
  const int64_t blocks = (threads + kThreads - 1) / kThreads;
  if (blocks > 0x7fffffff) return absl::InvalidArgumentError("SinkGateScores: too many tokens for one launch");
  SinkGateMemberKernel<R><<<static_cast<unsigned>(blocks), kThreads, 0, stream>>>(args, q, k, padded_log2);
  return absl::OkStatus();
}

}  // namespace

int64_t SinkGateScoresWorkspaceFloats(const SinkGateScoresArgs& args) {
  if (!SinkGateScoresArgsError(args).empty()) return 0;
  return int64_t{args.n} * args.kv_heads * args.rank * (args.group + 1);
}

absl::Status LaunchSinkGateScores(const SinkGateScoresArgs& args, cublasHandle_t cublas, float* workspace,
                                  cudaStream_t stream) {
  if (std::string error = SinkGateScoresArgsError(args); !error.empty()) return absl::InvalidArgumentError(error);
  if (args.n == 0) return absl::OkStatus();
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
  if (args.group <= 32 && (args.rank == 8 || args.rank == 16 || args.rank == 32 || args.rank == 64)) {
    const absl::Status launched = args.rank == 8    ? LaunchMemberKernel<8>(args, q, k, stream)
                                  : args.rank == 16 ? LaunchMemberKernel<16>(args, q, k, stream)
                                  : args.rank == 32 ? LaunchMemberKernel<32>(args, q, k, stream)
                                                    : LaunchMemberKernel<64>(args, q, k, stream);
    if (!launched.ok()) return launched;
  } else {  // other ranks and groups: one thread per (token, kv head)
    const int64_t threads = int64_t{args.n} * args.kv_heads;
    const int64_t blocks = (threads + kThreads - 1) / kThreads;
    if (blocks > 0x7fffffff) return absl::InvalidArgumentError("SinkGateScores: too many tokens for one launch");
    SinkGateKernel<<<static_cast<unsigned>(blocks), kThreads, 0, stream>>>(args, q, k);
  }
  KVGATE_CUDA_RETURN_IF_ERROR(cudaGetLastError());
  return absl::OkStatus();
}

}  // namespace kvgate::ops
