#include "cuda/cpu/sink_gate_scores.h"

#include <cblas.h>

#include <algorithm>
#include <cmath>
#include <vector>

#include "cuda/bf16.h"

namespace kvgate::ops {
namespace {

// In place: v = w * v / sqrt(mean(v^2) + eps), fp32.
void RmsNorm(float* v, const float* w, int32_t size, float eps) {
  float sum_sq = 0.0f;
  for (int32_t i = 0; i < size; ++i) sum_sq += v[i] * v[i];
  const float inv = 1.0f / std::sqrt(sum_sq / static_cast<float>(size) + eps);
  for (int32_t i = 0; i < size; ++i) v[i] = w[i] * (v[i] * inv);
}

}  // namespace

std::string SinkGateScoresArgsError(const SinkGateScoresArgs& a) {
  if (a.n < 0 || a.hidden < 1 || a.kv_heads < 1 || a.group < 1 || a.rank < 1 || a.rank > 64 || a.sinks < 0 ||
      a.sinks > 64 || a.out_stride < a.n || !(a.eps >= 0.0f) || (a.x_bf16 != nullptr && a.qk_weight_bf16 == nullptr)) {
    return "SinkGateScores: n " + std::to_string(a.n) + ", hidden " + std::to_string(a.hidden) + ", kv heads " +
           std::to_string(a.kv_heads) + ", group " + std::to_string(a.group) + ", rank " + std::to_string(a.rank) +
           ", sinks " + std::to_string(a.sinks) + ", out_stride " + std::to_string(a.out_stride) +
           " (need n >= 0, hidden, kv heads and group >= 1, rank in [1, 64], sinks in [0, 64], out_stride >= n, eps >= 0, qk_weight_bf16 with x_bf16)";
  }
  return "";
}

void SinkGateScoresCpu(const SinkGateScoresArgs& a) {
  const int32_t D = a.hidden, H = a.kv_heads, G = a.group, R = a.rank, S = a.sinks, n = a.n;
  const float inv_sqrt_rank = 1.0f / std::sqrt(static_cast<float>(R));
  const int32_t q_width = H * G * R, k_width = H * R;
  std::vector<float> x(static_cast<size_t>(kSinkGateRowBlock) * D);
  std::vector<float> q(static_cast<size_t>(kSinkGateRowBlock) * q_width), k(static_cast<size_t>(kSinkGateRowBlock) * k_width);
  std::vector<float> sinks(S);
  // The bf16 form: its inputs and weights widened exactly, then the same fp32 math.
  std::vector<float> qk_weight;
  const float* q_weight = a.q_weight;
  const float* k_weight = a.k_weight;
  if (a.x_bf16 != nullptr) {
    qk_weight.resize(static_cast<size_t>(q_width + k_width) * D);
    for (size_t i = 0; i < qk_weight.size(); ++i) qk_weight[i] = Bf16ToF32(a.qk_weight_bf16[i]);
    q_weight = qk_weight.data();
    k_weight = qk_weight.data() + static_cast<size_t>(q_width) * D;
  }
  for (int32_t block = 0; block < n; block += kSinkGateRowBlock) {
    const int32_t rows = std::min(kSinkGateRowBlock, n - block);
    if (a.x_bf16 != nullptr) {
      const Bf16* from = a.x_bf16 + static_cast<size_t>(block) * D;
      for (size_t i = 0; i < static_cast<size_t>(rows) * D; ++i) x[i] = Bf16ToF32(from[i]);
    } else {
      std::copy_n(a.x + static_cast<size_t>(block) * D, static_cast<size_t>(rows) * D, x.begin());
    }
    std::fill(x.begin() + static_cast<size_t>(rows) * D, x.end(), 0.0f);
    cblas_sgemm(CblasRowMajor, CblasNoTrans, CblasTrans, kSinkGateRowBlock, q_width, D, 1.0f, x.data(), D,
                q_weight, D, 0.0f, q.data(), q_width);
    cblas_sgemm(CblasRowMajor, CblasNoTrans, CblasTrans, kSinkGateRowBlock, k_width, D, 1.0f, x.data(), D,
                k_weight, D, 0.0f, k.data(), k_width);
    for (int32_t r = 0; r < rows; ++r) {
      float* qt = q.data() + static_cast<size_t>(r) * q_width;
      float* kt = k.data() + static_cast<size_t>(r) * k_width;
      for (int32_t o = 0; o < q_width; ++o) qt[o] += a.q_bias[o];
      for (int32_t c = 0; c < H * G; ++c) RmsNorm(qt + static_cast<size_t>(c) * R, a.q_norm, R, a.eps);
      for (int32_t h = 0; h < H; ++h) RmsNorm(kt + static_cast<size_t>(h) * R, a.k_norm, R, a.eps);
      for (int32_t h = 0; h < H; ++h) {
        const float* kh = kt + static_cast<size_t>(h) * R;
        float sum = 0.0f;
        for (int32_t g = 0; g < G; ++g) {
          const float* qg = qt + (static_cast<size_t>(h) * G + g) * R;
          float logit = 0.0f;
          for (int32_t i = 0; i < R; ++i) logit += kh[i] * qg[i];
          logit = logit * inv_sqrt_rank + a.b[static_cast<size_t>(h) * G + g];
          float m = logit;
          for (int32_t j = 0; j < S; ++j) {
            const float* base = a.k_base + (static_cast<size_t>(h) * S + j) * R;
            float s = 0.0f;
            for (int32_t i = 0; i < R; ++i) s += base[i] * qg[i];
            sinks[j] = s * inv_sqrt_rank;
            m = std::max(m, sinks[j]);
          }
          // sigmoid(l - logsumexp_j s_j), as the softmax weight of the own key, shifted by m.
          const float own = std::exp(logit - m);
          float denom = own;
          for (int32_t j = 0; j < S; ++j) denom += std::exp(sinks[j] - m);
          sum += own / denom;
        }
        a.out[static_cast<size_t>(h) * a.out_stride + block + r] = sum / static_cast<float>(G);
      }
    }
  }
}

}  // namespace kvgate::ops
