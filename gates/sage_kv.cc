#include "gates/sage_kv.h"

#include <algorithm>
#include <cmath>

#include "absl/strings/str_cat.h"
#include "common/status_macros.h"
#include "gates/backend_selection.h"
#include "gates/internal/select_util.h"

namespace kvgate::gates {

absl::StatusOr<QueryHeadScores> SageKvScores(const PrefillCapture& capture) {
  const ModelShape& s = capture.shape;
  KVGATE_RETURN_IF_ERROR(ValidateModelShape(s));
  const int32_t n = capture.prompt_tokens, d = s.head_dim, group = s.group_size();
  if (n > 0 && capture.window_logits && capture.num_window_queries == 1 &&
      static_cast<int32_t>(capture.window_probs.size()) == s.num_layers) {
    // The backend scored the last query (CaptureRequest::window_logits): [num_q_heads, n] a layer.
    QueryHeadScores out;
    out.num_layers = s.num_layers;
    out.num_q_heads = s.num_q_heads;
    out.prompt_tokens = n;
    out.scores.reserve(static_cast<size_t>(s.num_layers) * s.num_q_heads * n);
    for (int32_t l = 0; l < s.num_layers; ++l) {
      if (capture.window_probs[l].size() != static_cast<size_t>(s.num_q_heads) * n) {
        return absl::InvalidArgumentError(absl::StrCat("sage_kv: layer ", l, " window logits have the wrong size"));
      }
      out.scores.insert(out.scores.end(), capture.window_probs[l].begin(), capture.window_probs[l].end());
    }
    return out;
  }
  if (n > 0 && capture.num_last_queries < 1) {
    return absl::InvalidArgumentError("sage_kv: the capture needs the last prompt token's query");
  }
  if (static_cast<int32_t>(capture.keys.size()) != s.num_layers ||
      static_cast<int32_t>(capture.last_queries.size()) != s.num_layers) {
    return absl::InvalidArgumentError("sage_kv: the capture needs keys and last_queries for every layer");
  }
  QueryHeadScores out;
  out.num_layers = s.num_layers;
  out.num_q_heads = s.num_q_heads;
  out.prompt_tokens = n;
  out.scores.assign(static_cast<size_t>(s.num_layers) * s.num_q_heads * n, 0.0f);
  const double scale = 1.0 / std::sqrt(static_cast<double>(d));
  const size_t keys_size = static_cast<size_t>(s.num_kv_heads) * n * d;
  const size_t queries_size = static_cast<size_t>(capture.num_last_queries) * s.num_q_heads * d;
  for (int32_t l = 0; l < s.num_layers; ++l) {
    if (capture.keys[l].size() != keys_size || capture.last_queries[l].size() != queries_size) {
      return absl::InvalidArgumentError(absl::StrCat("sage_kv: layer ", l, " keys/last_queries have the wrong size"));
    }
    if (n == 0) continue;
    const float* last = capture.last_queries[l].data() +
                        static_cast<size_t>(capture.num_last_queries - 1) * s.num_q_heads * d;
    for (int32_t qh = 0; qh < s.num_q_heads; ++qh) {
      const float* q = last + static_cast<size_t>(qh) * d;
      const float* keys = capture.keys[l].data() + static_cast<size_t>(qh / group) * n * d;
      float* row = out.scores.data() + (static_cast<size_t>(l) * s.num_q_heads + qh) * n;
      for (int32_t j = 0; j < n; ++j) {
        const float* k = keys + static_cast<size_t>(j) * d;
        double dot = 0.0;
        for (int32_t c = 0; c < d; ++c) dot += static_cast<double>(q[c]) * k[c];
        row[j] = static_cast<float>(dot * scale);
      }
    }
  }
  return out;
}

absl::StatusOr<KeepPlan> SageKvSelect(const QueryHeadScores& scores, int32_t group_size,
                                      const ResolvedBudget& budget) {
  const int32_t n = budget.prompt_tokens;
  if (group_size < 1 || group_size > 8 || scores.num_q_heads % group_size != 0) {
    return absl::InvalidArgumentError(absl::StrCat(
        "sage_kv: group size must be in [1, 8] (one query_mask byte per row) and divide the ",
        scores.num_q_heads, " query heads, got ", group_size));
  }
  if (scores.prompt_tokens != n || static_cast<int32_t>(budget.protected_mask.size()) != n ||
      scores.scores.size() != static_cast<size_t>(scores.num_layers) * scores.num_q_heads * n) {
    return absl::InvalidArgumentError("sage_kv: scores and budget describe different prompts");
  }
  const int32_t kv_heads = scores.num_q_heads / group_size;
  if (budget.keep_per_head >= n) return KeepPlan::KeepAll(scores.num_layers, kv_heads, n);

  std::vector<uint8_t> shared = budget.protected_mask;
  if (n > 0) shared[n - 1] = 1;  // the last token P_N
  const int64_t shared_rows = std::count_if(shared.begin(), shared.end(), [](uint8_t b) { return b != 0; });
  const int64_t k = std::max<int64_t>(0, budget.keep_per_head - shared_rows) / group_size;
  const uint8_t all_bits = static_cast<uint8_t>((1u << group_size) - 1u);

  KeepPlan plan;
  plan.num_layers = scores.num_layers;
  plan.num_kv_heads = kv_heads;
  plan.prompt_tokens = n;
  plan.heads.resize(static_cast<size_t>(scores.num_layers) * kv_heads);
  std::vector<uint8_t> bits(static_cast<size_t>(n));
  for (int32_t l = 0; l < scores.num_layers; ++l) {
    for (int32_t h = 0; h < kv_heads; ++h) {
      for (int32_t p = 0; p < n; ++p) bits[p] = shared[p] ? all_bits : 0;
      for (int32_t g = 0; g < group_size; ++g) {
        const float* row = scores.scores.data() + (static_cast<size_t>(l) * scores.num_q_heads + h * group_size + g) * n;
        const internal::Cut cut = internal::FindCut(k, [&](auto&& f) {
          for (int32_t p = 0; p < n; ++p) {
            if (!shared[p]) f(internal::ScoreKey(row[p]), static_cast<uint64_t>(p));
          }
        });
        for (int32_t p = 0; p < n; ++p) {
          if (!shared[p] && cut.Keeps(internal::ScoreKey(row[p]), static_cast<uint64_t>(p))) {
            bits[p] |= static_cast<uint8_t>(1u << g);
          }
        }
      }
      HeadKeep& out = plan.at(l, h);
      for (int32_t p = 0; p < n; ++p) {
        if (bits[p] != 0) {
          out.positions.push_back(p);
          out.query_mask.push_back(bits[p]);
        }
      }
    }
  }
  return plan;
}

namespace {

constexpr char kName[] = "sage_kv";

// The decode-time ring of the recent window: rows at positions >= ring_begin keep their
// `capacity` most recent; the sink and the selected middle stay frozen.
class RecentRingEvictor final : public DecodeEvictor {
 public:
  RecentRingEvictor(int32_t ring_begin, int32_t capacity) : ring_begin_(ring_begin), capacity_(capacity) {}
  std::string_view policy() const override { return kName; }
  absl::StatusOr<RowsToDrop> AfterStep(const DecodeRows& rows) override {
    return internal::DropRingOverflow(rows, ring_begin_, [this](int32_t) { return capacity_; });
  }
  std::string SaveState() const override { return internal::PackState(kName, {ring_begin_, capacity_}); }

 private:
  int32_t ring_begin_;
  int32_t capacity_;
};

class SageKvRequest final : public PolicyRequest {
 public:
  using PolicyRequest::PolicyRequest;
  // The last query's logits, scored on the backend (no host copy of every key).
  CaptureRequest capture_request() const override {
    if (budget_.keep_per_head >= budget_.prompt_tokens) return {};  // keeps everything
    CaptureRequest r;
    r.window_probs = 1;
    r.window_logits = true;
    return r;
  }
  absl::StatusOr<std::unique_ptr<DecodeEvictor>> TakeDecodeEvictor() override {
    if (budget_.keep_per_head >= budget_.prompt_tokens) return nullptr;  // keeping all stays keeping all
    const int32_t capacity = std::max(1, budget_.recent_tokens);
    return std::make_unique<RecentRingEvictor>(std::max(0, budget_.prompt_tokens - capacity), capacity);
  }
};

class SageKvPolicy final : public Policy {
 public:
  explicit SageKvPolicy(const ModelShape& shape) : shape_(shape) {}
  std::string_view name() const override { return "sage_kv"; }
  CaptureRequest needs() const override {
    CaptureRequest r;
    r.keys = true;
    r.last_queries = 1;
    return r;
  }
  int32_t default_sink() const override { return kDefaultQuarterOfBudget; }
  int32_t default_recent() const override { return kDefaultQuarterOfBudget; }
  absl::StatusOr<KeepPlan> Plan(const PrefillCapture& capture, const PolicyInputs& inputs,
                                const ResolvedBudget& budget, HeadBudget head_budget) const override {
    if (head_budget == HeadBudget::kAdaptive) {
      return absl::InvalidArgumentError("sage_kv: head_budget ADAPTIVE is not supported (top-k is per query head)");
    }
    KVGATE_RETURN_IF_ERROR(CheckBudgetAndCapture(capture, budget, shape_));
    if (budget.keep_per_head >= budget.prompt_tokens) {
      return KeepPlan::KeepAll(shape_.num_layers, shape_.num_kv_heads, budget.prompt_tokens);
    }
    if (capture.backend_window_probs != nullptr && capture.window_logits && capture.num_window_queries == 1) {
      return PlanOnBackend(capture, budget);
    }
    KVGATE_ASSIGN_OR_RETURN(QueryHeadScores scores, SageKvScores(capture));
    return SageKvSelect(scores, shape_.group_size(), budget);
  }
  std::unique_ptr<PolicyRequest> StartRequest(const ResolvedBudget& budget) const override {
    return std::make_unique<SageKvRequest>(*this, budget);
  }
  absl::StatusOr<std::unique_ptr<DecodeEvictor>> RestoreDecodeEvictor(std::string_view state) const override {
    KVGATE_ASSIGN_OR_RETURN(internal::PackedState packed, internal::UnpackState(state, kName, 2));
    const int32_t ring_begin = packed.values[0], capacity = packed.values[1];
    if (ring_begin < 0 || capacity < 1 || !packed.tail.empty()) {
      return absl::InvalidArgumentError(absl::StrCat("sage_kv decode ring with ring_begin ", ring_begin, ", capacity ",
                                                     capacity, " and ", packed.tail.size(), " trailing bytes"));
    }
    return std::make_unique<RecentRingEvictor>(ring_begin, capacity);
  }

 private:
  // SageKvSelect on the logits the backend left in its memory: each query head's top-k runs
  // there, and the kv head's byte of query-head bits comes back.
  absl::StatusOr<KeepPlan> PlanOnBackend(const PrefillCapture& capture, const ResolvedBudget& budget) const {
    const int32_t n = budget.prompt_tokens, group = shape_.group_size();
    if (group > 8) {
      return absl::InvalidArgumentError(absl::StrCat("sage_kv: group size must be in [1, 8] (one query_mask byte per row), got ", group));
    }
    if (capture.backend_window_probs->bytes() < sizeof(float) * shape_.num_layers * shape_.num_q_heads * n) {
      return absl::InvalidArgumentError("sage_kv: the backend window logits are smaller than the model's");
    }
    std::vector<uint8_t> shared = budget.protected_mask;
    if (n > 0) shared[n - 1] = 1;  // the last token P_N
    BackendSelection selection;
    selection.scores = capture.backend_window_probs->as<const float>();
    selection.rows = shape_.num_layers * shape_.num_q_heads;
    selection.n = n;
    selection.merge_rows = group;
    const int64_t shared_rows = SetCandidatesOutside(shared, &selection);
    selection.need = std::max<int64_t>(0, budget.keep_per_head - shared_rows) / group;
    KVGATE_ASSIGN_OR_RETURN(std::vector<uint8_t> bits, gates::SelectOnBackend(*capture.backend, selection));
    const uint8_t all_bits = static_cast<uint8_t>((1u << group) - 1u);
    KeepPlan plan;
    plan.num_layers = shape_.num_layers;
    plan.num_kv_heads = shape_.num_kv_heads;
    plan.prompt_tokens = n;
    plan.heads.resize(static_cast<size_t>(shape_.num_layers) * shape_.num_kv_heads);
    for (size_t head = 0; head < plan.heads.size(); ++head) {
      const uint8_t* row = bits.data() + head * n;
      HeadKeep& out = plan.heads[head];
      for (int32_t p = 0; p < n; ++p) {
        const uint8_t b = shared[p] ? all_bits : row[p];
        if (b != 0) {
          out.positions.push_back(p);
          out.query_mask.push_back(b);
        }
      }
    }
    return plan;
  }

  ModelShape shape_;
};

}  // namespace

std::unique_ptr<Policy> MakeSageKvPolicy(const ModelShape& shape) {
  return std::make_unique<SageKvPolicy>(shape);
}

}  // namespace kvgate::gates
