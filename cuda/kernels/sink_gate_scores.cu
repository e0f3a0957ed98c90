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
  const int64_t threads = int64_t{args.n} * args.kv_heads;
  const int64_t blocks = (threads + kThreads - 1) / kThreads;
  if (blocks > 0x7fffffff) return absl::InvalidArgumentError("SinkGateScores: too many tokens for one launch");
  SinkGateKernel<<<static_cast<unsigned>(blocks), kThreads, 0, stream>>>(args, q, k);
  KVGATE_CUDA_RETURN_IF_ERROR(cudaGetLastError());
  return absl::OkStatus();
}

}  // namespace kvgate::ops
