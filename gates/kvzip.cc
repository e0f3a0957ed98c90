#include "gates/kvzip.h"

#include <algorithm>
#include <cmath>
#include <limits>

#include "absl/strings/str_cat.h"
#include "common/status_macros.h"
#include "gates/internal/select_util.h"

namespace kvgate::gates {

std::vector<float> KvzipScores(const KvzipLayerInput& in) {
  KVGATE_GATES_CHECK(in.num_kv_heads > 0 && in.num_q_heads % in.num_kv_heads == 0 && in.head_dim > 0,
                     "bad KvzipLayerInput head counts");
  KVGATE_GATES_CHECK(in.own_keys.rows == in.num_queries, "own_keys.rows must equal num_queries");
  const int32_t group = in.num_q_heads / in.num_kv_heads, d = in.head_dim;
  const int32_t s = in.sink_keys.rows, c = in.chunk_keys.rows, q_len = in.num_queries;
  const double scale = 1.0 / std::sqrt(static_cast<double>(d));
  std::vector<float> out(static_cast<size_t>(in.num_kv_heads) * c, 0.0f);
  std::vector<double> logits(static_cast<size_t>(s + c + q_len));
  auto dot = [d](const float* a, const float* b) {
    double acc = 0.0;
    for (int32_t i = 0; i < d; ++i) acc += static_cast<double>(a[i]) * b[i];
    return acc;
  };
  for (int32_t h = 0; h < in.num_kv_heads; ++h) {
    const float* sink = in.sink_keys.data + h * in.sink_keys.head_stride;
    const float* chunk = in.chunk_keys.data + h * in.chunk_keys.head_stride;
    const float* own = in.own_keys.data + h * in.own_keys.head_stride;
    float* best = out.data() + static_cast<size_t>(h) * c;
    for (int32_t g = 0; g < group; ++g) {
      const int32_t qh = h * group + g;
      for (int32_t i = 0; i < q_len; ++i) {
        const float* q = in.queries + (static_cast<size_t>(i) * in.num_q_heads + qh) * d;
        const int32_t visible = s + c + i + 1;
        double max_logit = -std::numeric_limits<double>::infinity();
        for (int32_t j = 0; j < s; ++j) logits[j] = dot(q, sink + static_cast<size_t>(j) * d) * scale;
        for (int32_t j = 0; j < c; ++j) logits[s + j] = dot(q, chunk + static_cast<size_t>(j) * d) * scale;
        for (int32_t j = 0; j <= i; ++j) logits[s + c + j] = dot(q, own + static_cast<size_t>(j) * d) * scale;
        for (int32_t j = 0; j < visible; ++j) max_logit = std::max(max_logit, logits[j]);
        double denom = 0.0;
        for (int32_t j = 0; j < visible; ++j) denom += std::exp(logits[j] - max_logit);
        for (int32_t j = 0; j < c; ++j) {
          const float prob = static_cast<float>(std::exp(logits[s + j] - max_logit) / denom);
          best[j] = std::max(best[j], prob);
        }
      }
    }
  }
  return out;
}

std::vector<TokenRange> KvzipChunkRanges(int32_t context_begin, int32_t prompt_tokens, int32_t chunk_tokens) {
  std::vector<TokenRange> out;
  if (chunk_tokens < 1) return out;
  for (int32_t b = std::max(context_begin, 0); b < prompt_tokens; b += chunk_tokens) {
    out.push_back({b, static_cast<int32_t>(std::min<int64_t>(static_cast<int64_t>(b) + chunk_tokens, prompt_tokens))});
  }
  return out;
}

absl::StatusOr<ScoreGrid> KvzipScoreGrid(const PrefillCapture& capture, const std::vector<KvzipChunk>& chunks) {
  const ModelShape& s = capture.shape;
  KVGATE_RETURN_IF_ERROR(ValidateModelShape(s));
  const int32_t n = capture.prompt_tokens, d = s.head_dim;
  if (static_cast<int32_t>(capture.keys.size()) != s.num_layers) {
    return absl::InvalidArgumentError("kvzip: the capture needs keys for every layer");
  }
  const size_t keys_size = static_cast<size_t>(s.num_kv_heads) * n * d;
  for (int32_t l = 0; l < s.num_layers; ++l) {
    if (capture.keys[l].size() != keys_size) {
      return absl::InvalidArgumentError(absl::StrCat("kvzip: layer ", l, " keys have the wrong size"));
    }
  }
  ScoreGrid grid;
  grid.num_layers = s.num_layers;
  grid.num_kv_heads = s.num_kv_heads;
  grid.prompt_tokens = n;
  grid.scores.assign(static_cast<size_t>(s.num_layers) * s.num_kv_heads * n, 1.0f);
  std::vector<uint8_t> covered(static_cast<size_t>(n), 0);
  for (size_t ci = 0; ci < chunks.size(); ++ci) {
    const KvzipChunk& ch = chunks[ci];
    const std::string where = absl::StrCat("kvzip: chunk ", ci, " [", ch.begin, ", ", ch.end, ")");
    if (ch.begin < 0 || ch.end > n || ch.begin >= ch.end) {
      return absl::InvalidArgumentError(absl::StrCat(where, " is not a non-empty range of the ", n, "-token prompt"));
    }
    if (ch.sink_keys < 0 || ch.sink_keys > ch.begin) {
      return absl::InvalidArgumentError(absl::StrCat(where, ": sink_keys ", ch.sink_keys, " must be in [0, begin]"));
    }
    if (ch.num_queries < 1 || static_cast<int32_t>(ch.queries.size()) != s.num_layers ||
        static_cast<int32_t>(ch.own_keys.size()) != s.num_layers) {
      return absl::InvalidArgumentError(absl::StrCat(where, ": needs num_queries >= 1 and queries/own_keys for every layer"));
    }
    for (int32_t p = ch.begin; p < ch.end; ++p) {
      if (!covered[p]) {
        covered[p] = 1;
        for (size_t head = 0; head < static_cast<size_t>(s.num_layers) * s.num_kv_heads; ++head) {
          grid.scores[head * n + p] = 0.0f;
        }
      }
    }
  }
  for (size_t ci = 0; ci < chunks.size(); ++ci) {
    const KvzipChunk& ch = chunks[ci];
    for (int32_t l = 0; l < s.num_layers; ++l) {
      if (ch.queries[l].size() != static_cast<size_t>(ch.num_queries) * s.num_q_heads * d ||
          ch.own_keys[l].size() != static_cast<size_t>(s.num_kv_heads) * ch.num_queries * d) {
        return absl::InvalidArgumentError(absl::StrCat("kvzip: chunk ", ci, " layer ", l,
                                                       ": queries/own_keys have the wrong size"));
      }
      const float* cache = capture.keys[l].data();
      KvzipLayerInput in;
      in.num_q_heads = s.num_q_heads;
      in.num_kv_heads = s.num_kv_heads;
      in.head_dim = d;
      in.num_queries = ch.num_queries;
      in.queries = ch.queries[l].data();
      in.sink_keys = {cache, static_cast<int64_t>(n) * d, ch.sink_keys};
      in.chunk_keys = {cache + static_cast<size_t>(ch.begin) * d, static_cast<int64_t>(n) * d, ch.end - ch.begin};
      in.own_keys = {ch.own_keys[l].data(), static_cast<int64_t>(ch.num_queries) * d, ch.num_queries};
      const std::vector<float> scores = KvzipScores(in);
      for (int32_t h = 0; h < s.num_kv_heads; ++h) {
        float* row = grid.scores.data() + (static_cast<size_t>(l) * s.num_kv_heads + h) * n;
        for (int32_t j = 0; j < ch.end - ch.begin; ++j) {
          row[ch.begin + j] = std::max(row[ch.begin + j], scores[static_cast<size_t>(h) * (ch.end - ch.begin) + j]);
        }
      }
    }
  }
  return grid;
}

namespace {

// KVzip's reconstruction prompts (KVzip model/wrapper.py self_task). Models without a
// chat template (TinyStories, base models) get the plain text, no assistant prefix.
constexpr char kKvzipRepeatAll[] = "\n\nRepeat the previous context exactly.";
constexpr char kKvzipRepeatFrom[] = "\n\nRepeat the part of the previous context exactly, starting with ";
constexpr int32_t kKvzipOverlapTokens = 8;

// KVzip (eviction-methods.md 4.1): before planning, one teacher-forced forward per context
// chunk of the reconstruction prompt + the chunk, on top of the full prompt; their queries
// and keys are recorded and their K/V discarded (a scratch cache: they never enter the
// request's).
class KvzipRequest final : public PolicyRequest {
 public:
  KvzipRequest(const Policy& policy, const ResolvedBudget& budget, const ModelShape& shape, int32_t chunk_tokens)
      : PolicyRequest(policy, budget), shape_(shape), chunk_tokens_(chunk_tokens) {}

  absl::StatusOr<KeepPlan> Plan(PrefillRunner& runner, absl::Span<const int32_t> prompt,
                                const PrefillCapture& capture, const PolicyInputs& inputs,
                                HeadBudget head_budget) override {
    const int32_t n = static_cast<int32_t>(prompt.size());
    if (budget_.keep_per_head >= n) return PolicyRequest::Plan(runner, prompt, capture, inputs, head_budget);
    PolicyInputs with_chunks = inputs;
    for (const TokenRange& range : KvzipChunkRanges(0, n, chunk_tokens_)) {
      KVGATE_ASSIGN_OR_RETURN(KvzipChunk chunk, Reconstruct(runner, prompt, range));
      with_chunks.kvzip_chunks.push_back(std::move(chunk));
    }
    return PolicyRequest::Plan(runner, prompt, capture, with_chunks, head_budget);
  }

 private:
  absl::StatusOr<KvzipChunk> Reconstruct(PrefillRunner& runner, absl::Span<const int32_t> prompt,
                                         const TokenRange& range) {
    std::vector<int32_t> recon;
    if (range.begin == 0) {
      KVGATE_ASSIGN_OR_RETURN(recon, runner.Encode(kKvzipRepeatAll));
    } else {
      KVGATE_ASSIGN_OR_RETURN(recon, runner.Encode(kKvzipRepeatFrom));
      const int32_t overlap_begin = std::max(0, range.begin - kKvzipOverlapTokens);
      recon.insert(recon.end(), prompt.begin() + overlap_begin, prompt.begin() + range.begin);
    }
    recon.insert(recon.end(), prompt.begin() + range.begin, prompt.begin() + range.end);
    const int32_t q = static_cast<int32_t>(recon.size());
    PrefillCapture recorded;
    CaptureRequest record;
    record.keys = true;
    record.keys_of_new_rows_only = true;
    record.last_queries = q;
    // The reconstruction prompt follows the prompt's own cache: only its q tokens run
    // (KVzip's cost, about one more prefill in all), not the prompt again for each chunk.
    KVGATE_RETURN_IF_ERROR(runner.ScratchForwardAfterCache(recon, record, &recorded));
    if (static_cast<int32_t>(recorded.keys.size()) != shape_.num_layers) {
      return absl::InternalError("kvzip: the reconstruction forward recorded no keys");
    }
    KvzipChunk chunk;
    chunk.begin = range.begin;
    chunk.end = range.end;
    chunk.sink_keys = std::min(kKvzipDefaultSink, range.begin);
    chunk.num_queries = q;
    chunk.queries = std::move(recorded.last_queries);
    chunk.own_keys = std::move(recorded.keys);  // [kv_heads, q, head_dim] per layer
    return chunk;
  }

  ModelShape shape_;
  int32_t chunk_tokens_;
};

class KvzipPolicy final : public Policy {
 public:
  KvzipPolicy(const ModelShape& shape, int32_t chunk_tokens, float safeguard)
      : shape_(shape), chunk_tokens_(chunk_tokens), safeguard_(safeguard) {}
  std::string_view name() const override { return "kvzip"; }
  CaptureRequest needs() const override {
    CaptureRequest r;
    r.keys = true;
    return r;
  }
  int32_t default_sink() const override { return kKvzipDefaultSink; }
  int32_t default_recent() const override { return 0; }
  bool needs_tokenizer() const override { return true; }
  std::unique_ptr<PolicyRequest> StartRequest(const ResolvedBudget& budget) const override {
    return std::make_unique<KvzipRequest>(*this, budget, shape_, chunk_tokens_);
  }
  absl::StatusOr<KeepPlan> Plan(const PrefillCapture& capture, const PolicyInputs& inputs,
                                const ResolvedBudget& budget, HeadBudget head_budget) const override {
    KVGATE_RETURN_IF_ERROR(CheckBudgetAndCapture(capture, budget, shape_));
    const int32_t n = budget.prompt_tokens;
    if (budget.keep_per_head >= n) return KeepPlan::KeepAll(shape_.num_layers, shape_.num_kv_heads, n);
    if (inputs.kvzip_chunks.empty()) {
      return absl::InvalidArgumentError(
          "kvzip: no reconstruction forwards (PolicyInputs::kvzip_chunks is empty; PolicyRequest::Plan runs them)");
    }
    KVGATE_ASSIGN_OR_RETURN(ScoreGrid grid, KvzipScoreGrid(capture, inputs.kvzip_chunks));
    switch (head_budget) {
      case HeadBudget::kUniform:
        return SelectPerHeadTopK(grid, budget.keep_per_head, budget.protected_mask);
      case HeadBudget::kAdaptive:
        return SelectAdaKv(grid, budget.keep_per_head, budget.protected_mask, safeguard_);
      case HeadBudget::kPolicyDefault:
        break;
    }
    return SelectGlobalTopK(grid, budget.keep_per_head, budget.protected_mask);
  }

 private:
  ModelShape shape_;
  int32_t chunk_tokens_;
  float safeguard_;
};

}  // namespace

std::unique_ptr<Policy> MakeKvzipPolicy(const ModelShape& shape, int32_t chunk_tokens, float adakv_safeguard) {
  return std::make_unique<KvzipPolicy>(shape, chunk_tokens, adakv_safeguard);
}

}  // namespace kvgate::gates
