#include "gates/snapkv.h"

#include <algorithm>
#include <cmath>
#include <limits>
#include <memory>
#include <utility>
#include <vector>

#include "absl/strings/str_cat.h"
#include "common/status_macros.h"
#include "gates/backend_selection.h"

namespace kvgate::gates {

namespace {

// SnapKV's 1-D average pool (width `kernel`, clipped at the ends) of one query head's
// window means over rows [0, m), added to its kv head's group sum.
template <typename T>
void AddPooled(const T* mean, int32_t m, int32_t kernel, std::vector<double>* group_sum) {
  const int32_t pad = kernel / 2;
  for (int32_t j = 0; j < m; ++j) {
    double pooled = 0.0;
    for (int32_t t = std::max(0, j - pad); t <= std::min(m - 1, j + pad); ++t) pooled += mean[t];
    (*group_sum)[j] += pooled / kernel;
  }
}

// A kv head's scores: the group mean of rows [0, m); the window rows [m, n) score +inf.
void WriteHeadScores(const std::vector<double>& group_sum, int32_t group, int32_t m, int32_t n, float* out) {
  for (int32_t j = 0; j < m; ++j) out[j] = static_cast<float>(group_sum[j] / group);
  for (int32_t j = std::max(m, 0); j < n; ++j) out[j] = std::numeric_limits<float>::infinity();
}

// SnapKvScores from the backend's window means: pooling and the group mean as below.
absl::StatusOr<ScoreGrid> PooledGroupScores(const PrefillCapture& capture, int32_t w, int32_t kernel) {
  const ModelShape& s = capture.shape;
  const int32_t n = capture.prompt_tokens, group = s.group_size();
  const int32_t m = n - w;
  ScoreGrid grid;
  grid.num_layers = s.num_layers;
  grid.num_kv_heads = s.num_kv_heads;
  grid.prompt_tokens = n;
  grid.scores.assign(static_cast<size_t>(s.num_layers) * s.num_kv_heads * n, 0.0f);
  std::vector<double> group_sum(static_cast<size_t>(std::max(m, 0)));
  for (int32_t l = 0; l < s.num_layers; ++l) {
    const std::vector<float>& probs = capture.window_probs[l];
    if (probs.size() != static_cast<size_t>(s.num_q_heads) * n) {
      return absl::InvalidArgumentError(absl::StrCat("snapkv: layer ", l, " window_probs have the wrong size"));
    }
    for (int32_t h = 0; h < s.num_kv_heads; ++h) {
      std::fill(group_sum.begin(), group_sum.end(), 0.0);
      for (int32_t g = 0; g < group; ++g) {
        AddPooled(probs.data() + static_cast<size_t>(h * group + g) * n, m, kernel, &group_sum);
      }
      WriteHeadScores(group_sum, group, m, n,
                      grid.scores.data() + (static_cast<size_t>(l) * s.num_kv_heads + h) * n);
    }
  }
  return grid;
}

}  // namespace

absl::StatusOr<ScoreGrid> SnapKvScores(const PrefillCapture& capture, int32_t window, int32_t kernel) {
  const ModelShape& s = capture.shape;
  KVGATE_RETURN_IF_ERROR(ValidateModelShape(s));
  if (window < 1) return absl::InvalidArgumentError(absl::StrCat("snapkv: window must be >= 1, got ", window));
  if (kernel < 1 || kernel % 2 == 0) {
    return absl::InvalidArgumentError(absl::StrCat("snapkv: kernel must be odd and >= 1, got ", kernel));
  }
  const int32_t n = capture.prompt_tokens, d = s.head_dim, group = s.group_size();
  const int32_t w = std::min(window, n);
  if (capture.num_window_queries == w && static_cast<int32_t>(capture.window_probs.size()) == s.num_layers) {
    return PooledGroupScores(capture, w, kernel);
  }
  if (capture.num_last_queries < w) {
    return absl::InvalidArgumentError(absl::StrCat("snapkv: needs the last ", w,
                                                   " queries, the capture has ", capture.num_last_queries));
  }
  if (static_cast<int32_t>(capture.keys.size()) != s.num_layers ||
      static_cast<int32_t>(capture.last_queries.size()) != s.num_layers) {
    return absl::InvalidArgumentError("snapkv: the capture needs keys and last_queries for every layer");
  }
  const size_t keys_size = static_cast<size_t>(s.num_kv_heads) * n * d;
  const size_t queries_size = static_cast<size_t>(capture.num_last_queries) * s.num_q_heads * d;
  const int32_t m = n - w;
  const double scale = 1.0 / std::sqrt(static_cast<double>(d));

  ScoreGrid grid;
  grid.num_layers = s.num_layers;
  grid.num_kv_heads = s.num_kv_heads;
  grid.prompt_tokens = n;
  grid.scores.assign(static_cast<size_t>(s.num_layers) * s.num_kv_heads * n, 0.0f);
  std::vector<double> logits(static_cast<size_t>(n)), mean(static_cast<size_t>(std::max(m, 0)));
  std::vector<double> group_sum(static_cast<size_t>(std::max(m, 0)));
  for (int32_t l = 0; l < s.num_layers; ++l) {
    if (capture.keys[l].size() != keys_size || capture.last_queries[l].size() != queries_size) {
      return absl::InvalidArgumentError(absl::StrCat("snapkv: layer ", l, " keys/last_queries have the wrong size"));
    }
    for (int32_t h = 0; h < s.num_kv_heads; ++h) {
      const float* keys = capture.keys[l].data() + static_cast<size_t>(h) * n * d;
      std::fill(group_sum.begin(), group_sum.end(), 0.0);
      for (int32_t g = 0; g < group; ++g) {
        const int32_t qh = h * group + g;
        std::fill(mean.begin(), mean.end(), 0.0);
        for (int32_t i = 0; i < w; ++i) {
          const int32_t row = capture.num_last_queries - w + i;  // the last w captured rows
          const int32_t pos = n - w + i;
          const float* q = capture.last_queries[l].data() + (static_cast<size_t>(row) * s.num_q_heads + qh) * d;
          double max_logit = -std::numeric_limits<double>::infinity();
          for (int32_t j = 0; j <= pos; ++j) {
            const float* k = keys + static_cast<size_t>(j) * d;
            double dot = 0.0;
            for (int32_t c = 0; c < d; ++c) dot += static_cast<double>(q[c]) * k[c];
            logits[j] = dot * scale;
            max_logit = std::max(max_logit, logits[j]);
          }
          double denom = 0.0;
          for (int32_t j = 0; j <= pos; ++j) {
            logits[j] = std::exp(logits[j] - max_logit);
            denom += logits[j];
          }
          for (int32_t j = 0; j < m; ++j) mean[j] += logits[j] / denom;
        }
        for (int32_t j = 0; j < m; ++j) mean[j] /= w;
        AddPooled(mean.data(), m, kernel, &group_sum);
      }
      WriteHeadScores(group_sum, group, m, n,
                      grid.scores.data() + (static_cast<size_t>(l) * s.num_kv_heads + h) * n);
    }
  }
  return grid;
}

namespace {

class SnapKvPolicy final : public Policy {
 public:
  SnapKvPolicy(const ModelShape& shape, int32_t window, int32_t kernel, float safeguard)
      : shape_(shape), window_(window), kernel_(kernel), safeguard_(safeguard) {}
  std::string_view name() const override { return "snapkv"; }
  CaptureRequest needs() const override {
    CaptureRequest r;
    r.keys = true;
    r.last_queries = window_;
    return r;
  }
  int32_t default_sink() const override { return 0; }
  std::unique_ptr<PolicyRequest> StartRequest(const ResolvedBudget& budget) const override;
  // The observation window of a budget: at most half of it (see Plan).
  int32_t WindowFor(const ResolvedBudget& budget) const { return std::min(window_, std::max(1, budget.keep_per_head / 2)); }
  // The observation window is protected in Plan (capped at half the budget), not here.
  int32_t default_recent() const override { return 0; }
  absl::StatusOr<KeepPlan> Plan(const PrefillCapture& capture, const PolicyInputs& inputs,
                                const ResolvedBudget& budget, HeadBudget head_budget) const override {
    KVGATE_RETURN_IF_ERROR(CheckBudgetAndCapture(capture, budget, shape_));
    const int32_t n = budget.prompt_tokens;
    // The observation window is at most half the budget: with kvpress's fixed 64, a
    // budget at or below the window keeps only the window and selects nothing by
    // attention (TinyStories at keep 0.2-0.3: worse than streaming_llm; see
    // bench/results/quality-tinystories.md). Its rows score +inf and are kept.
    const int32_t window = WindowFor(budget);
    if (n <= window || budget.keep_per_head >= n) {
      return KeepPlan::KeepAll(shape_.num_layers, shape_.num_kv_heads, n);
    }
    std::vector<uint8_t> mask = budget.protected_mask;
    for (int32_t p = n - window; p < n; ++p) mask[p] = 1;
    if (capture.backend_window_probs != nullptr && capture.num_window_queries == window) {
      return PlanOnBackend(capture, budget, mask, window, head_budget);
    }
    KVGATE_ASSIGN_OR_RETURN(ScoreGrid grid, SnapKvScores(capture, window, kernel_));
    if (head_budget == HeadBudget::kAdaptive) return SelectAdaKv(grid, budget.keep_per_head, mask, safeguard_);
    return SelectPerHeadTopK(grid, budget.keep_per_head, mask);
  }

 private:
  // The same plan from the window means the backend left in its memory: pooled there, and
  // selected there (per head, or AdaKV's two stages); only keep bytes reach the host.
  absl::StatusOr<KeepPlan> PlanOnBackend(const PrefillCapture& capture, const ResolvedBudget& budget,
                                         const std::vector<uint8_t>& mask, int32_t window,
                                         HeadBudget head_budget) const {
    ops::Backend& backend = *capture.backend;
    const int32_t n = budget.prompt_tokens, heads = shape_.num_layers * shape_.num_kv_heads;
    if (capture.backend_window_probs->bytes() < sizeof(float) * shape_.num_layers * shape_.num_q_heads * n) {
      return absl::InvalidArgumentError("snapkv: the backend window scores are smaller than the model's");
    }
    KVGATE_ASSIGN_OR_RETURN(ops::DeviceBuffer scores, backend.Alloc(sizeof(float) * heads * n));
    ops::PoolWindowScoresArgs pool;
    pool.probs = capture.backend_window_probs->as<const float>();
    pool.out = scores.as<float>();
    pool.num_layers = shape_.num_layers;
    pool.num_q_heads = shape_.num_q_heads;
    pool.num_kv_heads = shape_.num_kv_heads;
    pool.n = n;
    pool.window = window;
    pool.kernel = kernel_;
    KVGATE_RETURN_IF_ERROR(backend.PoolWindowScores(pool));
    std::vector<uint8_t> keep;
    const int64_t protected_rows = std::count_if(mask.begin(), mask.end(), [](uint8_t m) { return m != 0; });
    if (head_budget == HeadBudget::kAdaptive) {
      KVGATE_ASSIGN_OR_RETURN(keep, SelectAdaKvOnBackend(backend, scores.as<float>(), shape_.num_layers,
                                                         shape_.num_kv_heads, n, budget.keep_per_head, mask, safeguard_));
    } else {
      BackendSelection selection;
      selection.scores = scores.as<float>();
      selection.rows = heads;
      selection.n = n;
      SetCandidatesOutside(mask, &selection);
      selection.need = std::max<int64_t>(0, std::clamp(budget.keep_per_head, 0, n) - protected_rows);
      KVGATE_ASSIGN_OR_RETURN(keep, SelectOnBackend(backend, selection));
    }
    KeepPlan plan;
    plan.num_layers = shape_.num_layers;
    plan.num_kv_heads = shape_.num_kv_heads;
    plan.prompt_tokens = n;
    plan.heads.resize(heads);
    for (int32_t head = 0; head < heads; ++head) {
      const uint8_t* row = keep.data() + static_cast<size_t>(head) * n;
      std::vector<int32_t>& positions = plan.heads[head].positions;
      positions.reserve(static_cast<size_t>(std::clamp(budget.keep_per_head, 0, n)) + protected_rows);
      for (int32_t p = 0; p < n; ++p) {
        if (mask[p] || row[p]) positions.push_back(p);
      }
    }
    return plan;
  }

  ModelShape shape_;
  int32_t window_, kernel_;
  float safeguard_;
};

// Asks the prefill for the budget's window scored on the backend instead of every key
// on the host.
class SnapKvRequest final : public PolicyRequest {
 public:
  SnapKvRequest(const SnapKvPolicy& policy, ResolvedBudget budget) : PolicyRequest(policy, std::move(budget)) {}
  CaptureRequest capture_request() const override {
    const auto& snapkv = static_cast<const SnapKvPolicy&>(policy_);
    const int32_t n = budget_.prompt_tokens, window = snapkv.WindowFor(budget_);
    if (n <= window || budget_.keep_per_head >= n) return {};  // keeps everything
    CaptureRequest r;
    r.window_probs = window;
    return r;
  }
};

std::unique_ptr<PolicyRequest> SnapKvPolicy::StartRequest(const ResolvedBudget& budget) const {
  return std::make_unique<SnapKvRequest>(*this, budget);
}

}  // namespace

std::unique_ptr<Policy> MakeSnapKvPolicy(const ModelShape& shape, int32_t window, int32_t kernel,
                                         float adakv_safeguard) {
  return std::make_unique<SnapKvPolicy>(shape, window, kernel, adakv_safeguard);
}

}  // namespace kvgate::gates
