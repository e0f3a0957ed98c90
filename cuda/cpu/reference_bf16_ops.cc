#include "cuda/cpu/reference_bf16_ops.h"

#include <cmath>
#include <cstdint>
#include <vector>

#include "cuda/bf16.h"
#include "cuda/cpu/reference_ops.h"

namespace kvgate::ops {

void EmbedBf16Ref(const EmbedBf16Args& a) {
  for (int32_t t = 0; t < a.num_tokens; ++t) {
    const Bf16* row = a.table + static_cast<int64_t>(a.token_ids[t]) * a.dim;
    for (int32_t i = 0; i < a.dim; ++i) a.out[static_cast<int64_t>(t) * a.dim + i] = Bf16ToF32(row[i]);
  }
}

void GemmBf16Ref(const GemmBf16Args& a) {
  for (int32_t r = 0; r < a.m; ++r) {
    for (int32_t c = 0; c < a.n; ++c) {
      double sum = 0.0;
      for (int32_t i = 0; i < a.k; ++i) {
        sum += static_cast<double>(Bf16ToF32(a.x[static_cast<int64_t>(r) * a.k + i])) *
               Bf16ToF32(a.w[static_cast<int64_t>(c) * a.k + i]);
      }
      if (a.bias != nullptr) sum += a.bias[c];
      const int64_t at = static_cast<int64_t>(r) * a.n + c;
      if (a.y_bf16) {
        static_cast<Bf16*>(a.y)[at] = F32ToBf16(static_cast<float>(sum));
      } else if (a.accumulate) {
        float* y = static_cast<float*>(a.y);
        y[at] = static_cast<float>(y[at] + sum);
      } else {
        static_cast<float*>(a.y)[at] = static_cast<float>(sum);
      }
    }
  }
}

void RmsNormBf16Ref(const RmsNormBf16Args& a) {
  std::vector<float> row(a.dim);
  for (int32_t r = 0; r < a.rows; ++r) {
    const RmsNormArgs fp32{a.x + static_cast<int64_t>(r) * a.dim, a.weight, row.data(), 1, a.dim, a.eps};
    RmsNormRef(fp32);
    for (int32_t i = 0; i < a.dim; ++i) a.out[static_cast<int64_t>(r) * a.dim + i] = F32ToBf16(row[i]);
  }
}

void SiluMulBf16Ref(const SiluMulBf16Args& a) {
  for (int64_t i = 0; i < a.n; ++i) {
    const double g = Bf16ToF32(a.gate[i]);
    const double u = Bf16ToF32(a.up[i]);
    a.out[i] = F32ToBf16(static_cast<float>(g / (1.0 + std::exp(-g)) * u));
  }
}

void CastToBf16Ref(const CastToBf16Args& a) {
  for (int64_t i = 0; i < a.n; ++i) a.out[i] = F32ToBf16(a.x[i]);
}

void AttentionBf16Ref(const AttentionArgs& a) {
  const auto rounded = [](const float* x, int64_t n) {
    std::vector<float> out(x, x + n);
    for (float& v : out) v = RoundToBf16(v);
    return out;
  };
  const int64_t q_elems = static_cast<int64_t>(a.num_tokens) * a.num_q_heads * a.head_dim;
  const int64_t cache_elems = static_cast<int64_t>(a.num_kv_heads) * a.capacity_tokens * a.head_dim;
  const std::vector<float> q = rounded(a.q, q_elems);
  const std::vector<float> k = rounded(a.k_cache, cache_elems);
  const std::vector<float> v = rounded(a.v_cache, cache_elems);
  AttentionArgs args = a;
  args.q = q.data();
  args.k_cache = k.data();
  args.v_cache = v.data();
  AttentionRef(args);
}

}  // namespace kvgate::ops
