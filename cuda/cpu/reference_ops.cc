#include "cuda/cpu/reference_ops.h"

#include <algorithm>
#include <bit>
#include <cmath>
#include <utility>
#include <limits>
#include <string>
#include <vector>

#include "cuda/bf16.h"

namespace kvgate::ops {
namespace {

// Element e of a row of KV rows of `dtype`, widened to float.
float KvElement(const void* base, KvDtype dtype, int64_t e) {
  return dtype == KvDtype::kBf16 ? Bf16ToF32(static_cast<const Bf16*>(base)[e]) : static_cast<const float*>(base)[e];
}

}  // namespace

void EmbedRef(const EmbedArgs& a) {
  for (int32_t t = 0; t < a.num_tokens; ++t) {
    const float* row = a.table + static_cast<int64_t>(a.token_ids[t]) * a.dim;
    std::copy(row, row + a.dim, a.out + static_cast<int64_t>(t) * a.dim);
  }
}

void MatMulRef(const MatMulArgs& a) {
  for (int32_t i = 0; i < a.m; ++i) {
    for (int32_t j = 0; j < a.n; ++j) {
      double acc = a.bias != nullptr ? a.bias[j] : 0.0;
      const float* x = a.x + static_cast<int64_t>(i) * a.k;
      const float* w = a.w + static_cast<int64_t>(j) * a.k;
      for (int32_t p = 0; p < a.k; ++p) acc += static_cast<double>(x[p]) * w[p];
      a.y[static_cast<int64_t>(i) * a.n + j] = static_cast<float>(acc);
    }
  }
}

void RmsNormRef(const RmsNormArgs& a) {
  for (int32_t r = 0; r < a.rows; ++r) {
    const float* x = a.x + static_cast<int64_t>(r) * a.dim;
    float* out = a.out + static_cast<int64_t>(r) * a.dim;
    double sum_sq = 0.0;
    for (int32_t i = 0; i < a.dim; ++i) sum_sq += static_cast<double>(x[i]) * x[i];
    const float inv_rms = static_cast<float>(1.0 / std::sqrt(sum_sq / a.dim + a.eps));
    for (int32_t i = 0; i < a.dim; ++i) out[i] = a.weight[i] * (x[i] * inv_rms);
  }
}

void RopeRef(const RopeArgs& a) {
  const int32_t half = a.head_dim / 2;
  for (int32_t t = 0; t < a.num_tokens; ++t) {
    for (int32_t h = 0; h < a.num_heads; ++h) {
      float* x = a.x + (static_cast<int64_t>(t) * a.num_heads + h) * a.head_dim;
      for (int32_t i = 0; i < half; ++i) {
        // float32 product, as Hugging Face computes inv_freq @ positions in float32.
        const float angle = static_cast<float>(a.positions[t]) * a.inv_freq[i];
        const float c = std::cos(angle), s = std::sin(angle);
        const float x1 = x[i], x2 = x[i + half];
        x[i] = x1 * c - x2 * s;
        x[i + half] = x2 * c + x1 * s;
      }
    }
  }
}

void StoreKvRef(const StoreKvArgs& a) {
  for (int32_t t = 0; t < a.num_tokens; ++t) {
    for (int32_t h = 0; h < a.num_kv_heads; ++h) {
      const int64_t src = (static_cast<int64_t>(t) * a.num_kv_heads + h) * a.head_dim;
      const int64_t dst =
          (static_cast<int64_t>(h) * a.capacity_tokens + a.start_row + t) * a.head_dim;
      std::copy(a.k + src, a.k + src + a.head_dim, a.k_cache + dst);
      std::copy(a.v + src, a.v + src + a.head_dim, a.v_cache + dst);
    }
  }
}

void AttentionRef(const AttentionArgs& a) {
  const int32_t group = a.num_q_heads / a.num_kv_heads;
  std::vector<double> scores;
  std::vector<double> acc(a.head_dim);
  for (int32_t t = 0; t < a.num_tokens; ++t) {
    const int32_t last = a.q_start_row + t;
    const int32_t first = a.sliding_window > 0 ? std::max(0, last - a.sliding_window + 1) : 0;
    for (int32_t h = 0; h < a.num_q_heads; ++h) {
      const int32_t kv = h / group;
      const float* q = a.q + (static_cast<int64_t>(t) * a.num_q_heads + h) * a.head_dim;
      const float* k_head = a.k_cache + static_cast<int64_t>(kv) * a.capacity_tokens * a.head_dim;
      const float* v_head = a.v_cache + static_cast<int64_t>(kv) * a.capacity_tokens * a.head_dim;
      // Row r is visible unless key_mask evicts it; a query always sees its own row. The
      // mask row is the query head's own, or its kv head's.
      const int32_t mask_row = a.key_mask_per_query_head ? h : kv;
      const uint8_t* mask =
          a.key_mask != nullptr ? a.key_mask + static_cast<int64_t>(mask_row) * a.capacity_tokens : nullptr;
      const auto visible = [&](int32_t r) { return mask == nullptr || r == last || mask[r] != 0; };
      scores.assign(last - first + 1, 0.0);
      double max_score = -INFINITY;
      for (int32_t r = first; r <= last; ++r) {
        if (!visible(r)) continue;
        double dot = 0.0;
        for (int32_t i = 0; i < a.head_dim; ++i) {
          dot += static_cast<double>(q[i]) * k_head[static_cast<int64_t>(r) * a.head_dim + i];
        }
        scores[r - first] = dot * a.scale;
        max_score = std::max(max_score, scores[r - first]);
      }
      double denom = 0.0;
      for (int32_t r = first; r <= last; ++r) {
        double& s = scores[r - first];
        s = visible(r) ? std::exp(s - max_score) : 0.0;
        denom += s;
      }
      std::fill(acc.begin(), acc.end(), 0.0);
      for (int32_t r = first; r <= last; ++r) {
        if (!visible(r)) continue;  // an evicted row may hold anything, even NaN
        const double p = scores[r - first] / denom;
        for (int32_t i = 0; i < a.head_dim; ++i) {
          acc[i] += p * v_head[static_cast<int64_t>(r) * a.head_dim + i];
        }
      }
      float* out = a.out + (static_cast<int64_t>(t) * a.num_q_heads + h) * a.head_dim;
      for (int32_t i = 0; i < a.head_dim; ++i) out[i] = static_cast<float>(acc[i]);
    }
  }
}

void CopyRowsRef(const CopyRowsArgs& a) {
  for (int32_t i = 0; i < a.num_rows; ++i) {
    const int64_t src = static_cast<int64_t>(a.src_rows[i]) * a.row_elements;
    const int64_t dst = static_cast<int64_t>(a.dst_rows[i]) * a.row_elements;
    const int64_t elements = int64_t{a.row_elements} * (a.run_lengths != nullptr ? a.run_lengths[i] : 1);
    for (int64_t e = 0; e < elements; ++e) {
      if (a.src_dtype == KvDtype::kBf16 && a.dst_dtype == KvDtype::kBf16) {
        static_cast<Bf16*>(a.dst)[dst + e] = static_cast<const Bf16*>(a.src)[src + e];  // NaN bits too
        continue;
      }
      const float value = KvElement(a.src, a.src_dtype, src + e);
      if (a.dst_dtype == KvDtype::kBf16) {
        static_cast<Bf16*>(a.dst)[dst + e] = F32ToBf16(value);
      } else {
        static_cast<float*>(a.dst)[dst + e] = value;
      }
    }
  }
}

void HeadPagedDecodeAttentionRef(const HeadPagedDecodeAttentionArgs& a) {
  const HeadPagedKvView& kv = a.kv;
  const int32_t group = a.num_q_heads / a.num_kv_heads;
  std::vector<double> scores;
  std::vector<int64_t> rows;  // pool row (page * page_tokens + slot) of every visible row
  std::vector<double> acc(kv.head_dim);
  for (int32_t s = 0; s < a.num_seqs; ++s) {
    for (int32_t h = 0; h < a.num_q_heads; ++h) {
      const int64_t seq_head = static_cast<int64_t>(s) * a.num_kv_heads + h / group;
      const int32_t* pages = kv.page_ids + kv.page_indptr[seq_head];
      const float* q = a.q + (static_cast<int64_t>(s) * a.num_q_heads + h) * kv.head_dim;
      rows.clear();
      scores.clear();
      double max_score = -INFINITY;
      const int32_t first_slot = kv.first_slots != nullptr ? kv.first_slots[seq_head] : 0;
      const int32_t gap_row = kv.gap_rows != nullptr ? kv.gap_rows[seq_head] : 0;
      const int32_t gap_slots = kv.gap_slots != nullptr ? kv.gap_slots[seq_head] : 0;
      for (int32_t r = 0; r < kv.lengths[seq_head]; ++r) {
        const int32_t slot = first_slot + r + (r >= gap_row ? gap_slots : 0);
        const int64_t row =
            static_cast<int64_t>(pages[slot / kv.page_tokens]) * kv.page_tokens + slot % kv.page_tokens;
        if (kv.query_masks != nullptr && ((kv.query_masks[row] >> (h % group)) & 1) == 0) continue;
        double dot = 0.0;
        for (int32_t i = 0; i < kv.head_dim; ++i) {
          dot += static_cast<double>(q[i]) * KvElement(kv.k_pages, kv.dtype, row * kv.head_dim + i);
        }
        rows.push_back(row);
        scores.push_back(dot * a.scale);
        max_score = std::max(max_score, scores.back());
      }
      double denom = 0.0;
      for (double& score : scores) {
        score = std::exp(score - max_score);
        denom += score;
      }
      // No visible row (impossible in use: a head always sees its new token) gives zeros.
      std::fill(acc.begin(), acc.end(), 0.0);
      for (size_t j = 0; j < rows.size(); ++j) {
        const double p = scores[j] / denom;
        for (int32_t i = 0; i < kv.head_dim; ++i) {
          acc[i] += p * KvElement(kv.v_pages, kv.dtype, rows[j] * kv.head_dim + i);
        }
      }
      float* out = a.out + (static_cast<int64_t>(s) * a.num_q_heads + h) * kv.head_dim;
      for (int32_t i = 0; i < kv.head_dim; ++i) out[i] = static_cast<float>(acc[i]);
    }
  }
}

void ArgMaxRowsRef(const ArgMaxRowsArgs& a) {
  for (int32_t r = 0; r < a.rows; ++r) {
    const float* x = a.x + static_cast<int64_t>(r) * a.cols;
    int32_t best = 0;
    for (int32_t i = 1; i < a.cols; ++i) {
      if (x[i] > x[best]) best = i;
    }
    a.out[r] = best;
  }
}

void SiluMulRef(const SiluMulArgs& a) {
  for (int64_t i = 0; i < a.n; ++i) {
    const float g = a.gate[i];
    a.out[i] = (g / (1.0f + std::exp(-g))) * a.up[i];
  }
}

void AddRef(const AddArgs& a) {
  for (int64_t i = 0; i < a.n; ++i) a.x[i] += a.y[i];
}

}  // namespace kvgate::ops

namespace kvgate::ops {

std::string WindowAttentionProbsArgsError(const WindowAttentionProbsArgs& a) {
  if (a.window < 1 || a.length < a.window || a.length > a.capacity_tokens || a.num_q_heads < 1 ||
      a.num_kv_heads < 1 || a.num_q_heads % a.num_kv_heads != 0 || a.head_dim < 1 || a.head_dim > 512 ||
      (a.logits && a.window != 1)) {
    return "WindowAttentionProbs: window " + std::to_string(a.window) + ", length " + std::to_string(a.length) +
           ", capacity " + std::to_string(a.capacity_tokens) + ", heads " + std::to_string(a.num_q_heads) + "/" +
           std::to_string(a.num_kv_heads) + ", head_dim " + std::to_string(a.head_dim) +
           (a.logits ? ", logits" : "") +
           " (need 1 <= window <= length <= capacity, q heads a multiple of kv heads, head_dim in [1, 512], "
           "window 1 for logits)";
  }
  return "";
}

void WindowAttentionProbsRefHeads(const WindowAttentionProbsArgs& a, int32_t head_begin, int32_t head_end) {
  const int32_t group = a.num_q_heads / a.num_kv_heads, d = a.head_dim, n = a.length;
  std::vector<double> logits(static_cast<size_t>(n)), sum(static_cast<size_t>(n));
  for (int32_t h = head_begin; h < head_end; ++h) {
    const float* keys = a.k_cache + static_cast<size_t>(h / group) * a.capacity_tokens * d;
    std::fill(sum.begin(), sum.end(), 0.0);
    for (int32_t i = 0; i < a.window; ++i) {
      const int32_t pos = n - a.window + i;
      const float* q = a.q + (static_cast<size_t>(i) * a.num_q_heads + h) * d;
      double max_logit = -std::numeric_limits<double>::infinity();
      for (int32_t j = 0; j <= pos; ++j) {
        const float* k = keys + static_cast<size_t>(j) * d;
        double dot = 0.0;
        for (int32_t c = 0; c < d; ++c) dot += static_cast<double>(q[c]) * k[c];
        logits[j] = dot * a.scale;
        max_logit = std::max(max_logit, logits[j]);
      }
      if (a.logits) {
        for (int32_t j = 0; j <= pos; ++j) sum[j] = logits[j];
        continue;
      }
      double denom = 0.0;
      for (int32_t j = 0; j <= pos; ++j) {
        logits[j] = std::exp(logits[j] - max_logit);
        denom += logits[j];
      }
      for (int32_t j = 0; j <= pos; ++j) sum[j] += logits[j] / denom;
    }
    float* out = a.out + static_cast<size_t>(h) * n;
    for (int32_t j = 0; j < n; ++j) out[j] = static_cast<float>(a.logits ? sum[j] : sum[j] / a.window);
  }
}

void WindowAttentionProbsRef(const WindowAttentionProbsArgs& a) { WindowAttentionProbsRefHeads(a, 0, a.num_q_heads); }


std::string PoolWindowScoresArgsError(const PoolWindowScoresArgs& a) {
  if (a.num_layers < 1 || a.num_kv_heads < 1 || a.num_q_heads < 1 || a.num_q_heads % a.num_kv_heads != 0 ||
      a.n < 1 || a.window < 1 || a.window > a.n || a.kernel < 1 || a.kernel % 2 == 0) {
    return "PoolWindowScores: layers " + std::to_string(a.num_layers) + ", heads " + std::to_string(a.num_q_heads) +
           "/" + std::to_string(a.num_kv_heads) + ", n " + std::to_string(a.n) + ", window " +
           std::to_string(a.window) + ", kernel " + std::to_string(a.kernel) +
           " (need >= 1 layer, q heads a multiple of kv heads, 1 <= window <= n, an odd kernel)";
  }
  return "";
}

void PoolWindowScoresRef(const PoolWindowScoresArgs& a) {
  const int32_t group = a.num_q_heads / a.num_kv_heads, n = a.n, m = n - a.window, pad = a.kernel / 2;
  for (int32_t l = 0; l < a.num_layers; ++l) {
    for (int32_t h = 0; h < a.num_kv_heads; ++h) {
      float* out = a.out + (static_cast<int64_t>(l) * a.num_kv_heads + h) * n;
      for (int32_t j = 0; j < m; ++j) {
        double group_sum = 0.0;
        for (int32_t g = 0; g < group; ++g) {
          const float* mean = a.probs + (static_cast<int64_t>(l) * a.num_q_heads + h * group + g) * n;
          double pooled = 0.0;
          for (int32_t t = std::max(0, j - pad); t <= std::min(m - 1, j + pad); ++t) pooled += mean[t];
          group_sum += pooled / a.kernel;
        }
        out[j] = static_cast<float>(group_sum / group);
      }
      for (int32_t j = std::max(m, 0); j < n; ++j) out[j] = std::numeric_limits<float>::infinity();
    }
  }
}

std::string SelectTopArgsError(const SelectTopArgs& a) {
  if (a.rows < 1 || a.n < 1 || a.rows_per_selection < 1 || a.rows % a.rows_per_selection != 0 ||
      a.merge_rows < 1 || a.merge_rows > 8 || a.rows % a.merge_rows != 0 || (a.row_stride != 0 && a.row_stride < a.n) ||
      (a.merge_rows > 1 && a.rows_per_selection != 1) ||
      static_cast<int64_t>(a.rows_per_selection) * a.n > (int64_t{1} << 31) - 1) {
    return "SelectTop: rows " + std::to_string(a.rows) + ", n " + std::to_string(a.n) + ", rows_per_selection " +
           std::to_string(a.rows_per_selection) + ", merge_rows " + std::to_string(a.merge_rows) +
           " (need rows, n >= 1; rows_per_selection and merge_rows dividing rows; merge_rows in [1, 8] and only "
           "with rows_per_selection 1; row_stride 0 or >= n; fewer than 2^31 entries a selection)";
  }
  return "";
}

namespace {

// Order-preserving unsigned key of a score (NaN lowest, -0 == +0), as gates/ defines it.
uint32_t SelectionKey(float score) {
  if (std::isnan(score)) return 0;
  if (score == 0.0f) score = 0.0f;
  const uint32_t bits = std::bit_cast<uint32_t>(score);
  return (bits & 0x80000000u) != 0 ? ~bits : (bits | 0x80000000u);
}

int64_t ScoreRowStride(const SelectTopArgs& a) { return a.row_stride == 0 ? a.n : a.row_stride; }

// One selection over rows [first_row, first_row + rows): sets `bit` of the selected
// entries, row r of the selection in keep_rows[r * n + p].
void SelectOne(const SelectTopArgs& a, int32_t first_row, int32_t rows, uint8_t bit, uint8_t* keep_rows) {
  std::vector<std::pair<uint32_t, int64_t>> candidates;  // (key, order)
  for (int32_t p = 0; p < a.n; ++p) {
    if (a.candidates != nullptr && a.candidates[p] == 0) continue;
    for (int32_t r = 0; r < rows; ++r) {
      if (a.exclude != nullptr && a.exclude[static_cast<int64_t>(first_row + r) * a.n + p] != 0) continue;
      candidates.emplace_back(SelectionKey(a.scores[static_cast<int64_t>(first_row + r) * ScoreRowStride(a) + p]),
                              static_cast<int64_t>(p) * rows + r);
    }
  }
  const int64_t take = std::clamp<int64_t>(a.need, 0, static_cast<int64_t>(candidates.size()));
  auto better = [](const std::pair<uint32_t, int64_t>& x, const std::pair<uint32_t, int64_t>& y) {
    return x.first != y.first ? x.first > y.first : x.second < y.second;
  };
  if (take < static_cast<int64_t>(candidates.size())) {
    std::nth_element(candidates.begin(), candidates.begin() + take, candidates.end(), better);
  }
  for (int64_t c = 0; c < take; ++c) {
    const int64_t order = candidates[c].second;
    const int64_t p = order / rows, r = order % rows;
    keep_rows[r * a.n + p] |= bit;
  }
}

}  // namespace

void SelectTopRefGroups(const SelectTopArgs& a, int32_t group_begin, int32_t group_end) {
  for (int32_t u = group_begin; u < group_end; ++u) {
    if (a.merge_rows > 1) {
      uint8_t* keep = a.keep + static_cast<int64_t>(u) * a.n;
      std::fill(keep, keep + a.n, 0);
      for (int32_t g = 0; g < a.merge_rows; ++g) {
        SelectOne(a, u * a.merge_rows + g, 1, static_cast<uint8_t>(1u << g), keep);
      }
    } else {
      uint8_t* keep = a.keep + static_cast<int64_t>(u) * a.rows_per_selection * a.n;
      std::fill(keep, keep + static_cast<int64_t>(a.rows_per_selection) * a.n, 0);
      SelectOne(a, u * a.rows_per_selection, a.rows_per_selection, 1, keep);
    }
  }
}

void SelectTopRef(const SelectTopArgs& a) {
  SelectTopRefGroups(a, 0, a.merge_rows > 1 ? a.rows / a.merge_rows : a.rows / a.rows_per_selection);
}

}  // namespace kvgate::ops
