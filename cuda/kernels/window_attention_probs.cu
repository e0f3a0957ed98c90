#include "cuda/kernels/window_attention_probs.cuh"

#include <algorithm>
#include <cmath>
#include <string>

#include "absl/status/status.h"
#include "cuda/cpu/reference_ops.h"
#include "cuda/kernels/cuda_check.h"

namespace kvgate::ops {
namespace {

constexpr int kThreads = 256;
// Logits of one chunk of kv heads: at most 256 MiB (every kv head of an 8B-shaped model
// with a 64-query window at 32k tokens; longer prompts take their kv heads in turn).
constexpr int64_t kWindowLogitsMaxFloats = int64_t{1} << 26;

int64_t LogitsFloatsPerKvHead(const WindowAttentionProbsArgs& a) {
  return int64_t{a.num_q_heads / a.num_kv_heads} * a.window * a.length;
}

int32_t KvHeadsPerChunk(const WindowAttentionProbsArgs& a) {
  const int64_t fit = kWindowLogitsMaxFloats / std::max<int64_t>(1, LogitsFloatsPerKvHead(a));
  return static_cast<int32_t>(std::clamp<int64_t>(fit, 1, a.num_kv_heads));
}

// One block per logits row (a query head of the chunk, window query i): the softmax max and
// denominator over the keys it sees, [0, pos_i]. Each thread keeps a running (max, sum) over
// a fixed stride of keys; the block merges them in thread order.
__global__ void __launch_bounds__(kThreads)
    WindowRowStatsKernel(const float* logits, int32_t window, int32_t length, int32_t first_q_head, float* stats) {
  const int64_t row = blockIdx.x;  // (local query head) * window + i
  const int i = static_cast<int>(row % window);
  const int pos = length - window + i;
  const float* l = logits + row * length;
  float max_logit = -INFINITY, sum = 0.0f;
  for (int j = threadIdx.x; j <= pos; j += kThreads) {
    const float x = l[j];
    if (x > max_logit) {
      sum = sum * expf(max_logit - x) + 1.0f;
      max_logit = x;
    } else {
      sum += expf(x - max_logit);
    }
  }
  __shared__ float thread_max[kThreads], thread_sum[kThreads];
  thread_max[threadIdx.x] = max_logit;
  thread_sum[threadIdx.x] = sum;
  __syncthreads();
  if (threadIdx.x == 0) {
    float m = -INFINITY;
    for (int t = 0; t < kThreads; ++t) m = fmaxf(m, thread_max[t]);
    float s = 0.0f;
    for (int t = 0; t < kThreads; ++t) {
      if (thread_sum[t] > 0.0f) s += thread_sum[t] * expf(thread_max[t] - m);
    }
    float* out = stats + (static_cast<int64_t>(first_q_head) * window + row) * 2;
    out[0] = m;
    out[1] = s;
  }
}

// One thread per (query head of the chunk, key j): the key's probabilities (or logits)
// summed over the window queries that see it, in window order.
__global__ void __launch_bounds__(kThreads) WindowColumnSumKernel(WindowAttentionProbsArgs a, const float* logits,
                                                                 int32_t first_q_head, const float* stats) {
  const int j = blockIdx.x * kThreads + threadIdx.x;
  const int local_head = blockIdx.y;
  if (j >= a.length) return;
  const int h = first_q_head + local_head;
  const float* l = logits + static_cast<int64_t>(local_head) * a.window * a.length;
  const float* st = stats + static_cast<int64_t>(h) * a.window * 2;
  float acc = 0.0f;
  for (int i = max(0, j - (a.length - a.window)); i < a.window; ++i) {  // queries with pos_i >= j
    const float x = l[static_cast<int64_t>(i) * a.length + j];
    acc += a.logits ? x : expf(x - st[2 * i]) / st[2 * i + 1];
  }
  a.out[static_cast<int64_t>(h) * a.length + j] = a.logits ? acc : acc / a.window;
}

}  // namespace

int64_t WindowAttentionProbsWorkspaceFloats(const WindowAttentionProbsArgs& args) {
  if (!WindowAttentionProbsArgsError(args).empty()) return 0;
  return int64_t{2} * args.num_q_heads * args.window + LogitsFloatsPerKvHead(args) * KvHeadsPerChunk(args);
}

absl::Status LaunchWindowAttentionProbs(const WindowAttentionProbsArgs& args, cublasHandle_t cublas,
                                        float* workspace, cudaStream_t stream) {
  if (std::string error = WindowAttentionProbsArgsError(args); !error.empty()) {
    return absl::InvalidArgumentError(error);
  }
  const int32_t group = args.num_q_heads / args.num_kv_heads, d = args.head_dim;
  const int32_t w = args.window, n = args.length;
  if (static_cast<int64_t>(args.num_q_heads) * w > 0x7fffffff || args.num_q_heads > 65535) {
    return absl::InvalidArgumentError("WindowAttentionProbs: too many window rows for one launch");
  }
  float* stats = workspace;
  float* logits = workspace + int64_t{2} * args.num_q_heads * w;
  const int32_t chunk = KvHeadsPerChunk(args);
  const float zero = 0.0f;
  for (int32_t kv0 = 0; kv0 < args.num_kv_heads; kv0 += chunk) {
    const int32_t kv_heads = std::min(chunk, args.num_kv_heads - kv0);
    // Column-major view: logits^T of query head (kv, g), [n keys, w queries] with ld n, is
    // K_kv^T-as-stored (d x n, ld d) transposed times Q (d x w, ld num_q_heads * d).
    for (int32_t g = 0; g < group; ++g) {
      KVGATE_CUBLAS_RETURN_IF_ERROR(cublasSgemmStridedBatched(
          cublas, CUBLAS_OP_T, CUBLAS_OP_N, n, w, d, &args.scale,
          args.k_cache + static_cast<int64_t>(kv0) * args.capacity_tokens * d, d,
          static_cast<long long>(args.capacity_tokens) * d,
          args.q + static_cast<int64_t>(kv0 * group + g) * d, args.num_q_heads * d, static_cast<long long>(group) * d,
          &zero, logits + static_cast<int64_t>(g) * w * n, n, static_cast<long long>(group) * w * n, kv_heads));
    }
    const int32_t first_q_head = kv0 * group, q_heads = kv_heads * group;
    if (!args.logits) {
      WindowRowStatsKernel<<<static_cast<unsigned>(q_heads * w), kThreads, 0, stream>>>(logits, w, n, first_q_head,
                                                                                      stats);
    }
    const dim3 columns(static_cast<unsigned>((n + kThreads - 1) / kThreads), static_cast<unsigned>(q_heads));
    WindowColumnSumKernel<<<columns, kThreads, 0, stream>>>(args, logits, first_q_head, stats);
    KVGATE_CUDA_RETURN_IF_ERROR(cudaGetLastError());
  }
  return absl::OkStatus();
}

}  // namespace kvgate::ops
