#include "kv_manager/policy_planner.h"

#include <algorithm>
#include <functional>
#include <optional>

#include "absl/strings/str_cat.h"
#include "common/status_macros.h"
#include "gates/fast_kvzip.h"
#include "gates/selectors.h"
#include "gates/kvzip.h"

namespace kvgate::kv {
namespace {

// KVzip's reconstruction prompts (KVzip model/wrapper.py self_task). Models without a
// chat template (TinyStories, base models) get the plain text, no assistant prefix.
constexpr char kKvzipRepeatAll[] = "\n\nRepeat the previous context exactly.";
constexpr char kKvzipRepeatFrom[] = "\n\nRepeat the part of the previous context exactly, starting with ";
constexpr int32_t kKvzipOverlapTokens = 8;

// Restricts each head of `plan` to positions >= first_visible (sliding-window models:
// the next token cannot see anything older).
void TrimToWindow(int32_t first_visible, gates::KeepPlan* plan) {
  for (gates::HeadKeep& head : plan->heads) {
    const auto begin = std::lower_bound(head.positions.begin(), head.positions.end(), first_visible);
    const size_t drop = static_cast<size_t>(begin - head.positions.begin());
    if (drop == 0) continue;
    head.positions.erase(head.positions.begin(), begin);
    if (!head.query_mask.empty()) head.query_mask.erase(head.query_mask.begin(), head.query_mask.begin() + drop);
    if (!head.scores.empty()) head.scores.erase(head.scores.begin(), head.scores.begin() + drop);
  }
}

class PolicyPlanner final : public engine::KvPlanner {
 public:
  PolicyPlanner(engine::Model& model, KvPool* pool, gates::EvictionSpec spec, gates::PolicyOptions options,
                std::unique_ptr<gates::Policy> policy, const engine::Tokenizer* tokenizer, bool decode_eviction)
      : model_(model), pool_(pool), spec_(std::move(spec)), options_(std::move(options)),
        policy_(std::move(policy)), tokenizer_(tokenizer), decode_eviction_(decode_eviction) {}

  absl::Status ConfigurePrefill(absl::Span<const int32_t> prompt, engine::ForwardOptions* options) override {
    const int32_t n = static_cast<int32_t>(prompt.size());
    KVGATE_ASSIGN_OR_RETURN(budget_, gates::ResolveBudget(spec_, n, policy_->default_sink(), policy_->default_recent()));
    options->capture_request = policy_->needs();
    inputs_ = gates::PolicyInputs{};
    request_ = policy_->StartRequest(budget_);
    if (request_->masks_prefill_keys()) {
      inputs_.gate_flags.assign(model_.config().num_layers, {});
      options->layer_key_mask = [this](int32_t layer, absl::Span<const float> hidden)
          -> absl::StatusOr<std::vector<uint8_t>> {
        KVGATE_ASSIGN_OR_RETURN(std::vector<uint8_t> mask, request_->PrefillKeyMask(layer, hidden));
        inputs_.gate_flags[layer] = mask;
        return mask;
      };
    }
    return absl::OkStatus();
  }

  absl::StatusOr<std::vector<float>> Prefill(engine::Model& model, absl::Span<const int32_t> prompt,
                                             engine::KvCache* cache, engine::PrefillCapture* capture) override {
    chunked_plan_.reset();
    if (policy_->fast_kvzip_gate() != nullptr && options_.fast_kvzip_chunked_prefill) {
      return FastKvzipChunkedPrefill(prompt, cache);
    }
    return engine::KvPlanner::Prefill(model, prompt, cache, capture);
  }

  absl::StatusOr<std::unique_ptr<engine::PagedKvBatch>> Commit(absl::Span<const int32_t> prompt,
                                                               const engine::KvCache& cache,
                                                               const engine::PrefillCapture& capture,
                                                               engine::KvAccounting* accounting) override {
    const engine::ModelConfig& c = model_.config();
    const int32_t n = cache.length_tokens();
    if (budget_.prompt_tokens != n || request_ == nullptr) {
      return absl::FailedPreconditionError("Commit without ConfigurePrefill of the same prompt");
    }
    gates::KeepPlan plan;
    if (chunked_plan_.has_value()) {
      plan = std::move(*chunked_plan_);
      chunked_plan_.reset();
    } else {
      if (policy_->hooks().kvzip_reconstruction) KVGATE_RETURN_IF_ERROR(RunKvzipReconstruction(prompt));
      KVGATE_ASSIGN_OR_RETURN(plan, policy_->Plan(capture, inputs_, budget_, spec_.head_budget));
    }
    inputs_ = gates::PolicyInputs{};
    const std::unique_ptr<gates::PolicyRequest> request = std::move(request_);
    std::unique_ptr<gates::DecodeEvictor> evictor;
    if (decode_eviction_) {
      KVGATE_ASSIGN_OR_RETURN(evictor, request->TakeDecodeEvictor());
    }
    if (c.sliding_window > 0) TrimToWindow(n - c.sliding_window + 1, &plan);
    SequenceLayout layout;
    KVGATE_RETURN_IF_ERROR(pool_->CommitPrefill(cache, plan, &layout));
    accounting->policy = std::string(policy_->name());
    accounting->kv_entries_full = int64_t{c.num_layers} * c.num_kv_heads * n;
    accounting->kv_entries_kept = plan.KeptEntries();
    accounting->keep_fraction =
        accounting->kv_entries_full > 0 ? double(accounting->kv_entries_kept) / accounting->kv_entries_full : 1.0;
    accounting->bytes_full = accounting->kv_entries_full * c.KvEntryBytes();
    accounting->bytes_kept = accounting->kv_entries_kept * c.KvEntryBytes();
    accounting->pages_used = static_cast<int32_t>(layout.NumPages());
    return std::make_unique<SequenceBatch>(pool_, std::move(layout), c.sliding_window, std::move(evictor));
  }

 private:
  // Fast KVzip's prefill (FastKVzip prefill/model/wrapper.py::prefill, eviction-methods.md
  // 5.3): the prompt runs in chunks; after each chunk's forward through every layer, the
  // tokens that have left the local window and were not yet judged are thresholded with
  // ONE threshold over all layers and kv heads (keep fraction r_chunk), and the losers
  // become invisible to every later chunk. The first sink_tokens (the "system prompt")
  // are never scored; the final window W is never evicted.
  absl::StatusOr<std::vector<float>> FastKvzipChunkedPrefill(absl::Span<const int32_t> prompt,
                                                             engine::KvCache* cache) {
    const engine::ModelConfig& c = model_.config();
    const gates::FastKvzipGate& gate = *policy_->fast_kvzip_gate();
    const int32_t n = static_cast<int32_t>(prompt.size());
    KVGATE_ASSIGN_OR_RETURN(budget_, gates::ResolveBudget(spec_, n, policy_->default_sink(), policy_->default_recent()));
    request_ = policy_->StartRequest(budget_);
    const int32_t context_begin = std::min(budget_.sink_tokens, n);
    const gates::FastKvzipChunkPlan chunks = gates::MakeFastKvzipChunkPlan(
        double(budget_.keep_per_head) / n, context_begin, n, options_.fast_kvzip_chunk_tokens,
        options_.fast_kvzip_window_tokens);
    const size_t head_rows = size_t{1} * c.num_kv_heads * n;
    std::vector<std::vector<uint8_t>> visible(c.num_layers, std::vector<uint8_t>(head_rows, 1));  // [kv_head, n]
    std::vector<std::vector<float>> scores(c.num_layers, std::vector<float>(head_rows, 1.0f));
    std::vector<float> logits;
    int32_t judged_until = context_begin;
    for (const gates::TokenRange& chunk : gates::FastKvzipPrefillChunks(chunks)) {
      const int32_t m = chunk.end - chunk.begin;
      engine::PrefillCapture recorded;
      engine::ForwardOptions forward;
      forward.capture_request.hidden_states = true;
      forward.capture = &recorded;
      // Until a chunk has evicted something every key is visible: no mask, so attention
      // takes its unmasked path (a prompt shorter than one chunk never pays for masking).
      if (judged_until > context_begin) {
        forward.key_masks.assign(c.num_layers,
                                 std::vector<uint8_t>(size_t{1} * c.num_kv_heads * cache->capacity_tokens(), 1));
        for (int32_t l = 0; l < c.num_layers; ++l) {
          for (int32_t h = 0; h < c.num_kv_heads; ++h) {
            std::copy_n(visible[l].begin() + size_t{1} * h * n, chunk.begin,
                        forward.key_masks[l].begin() + size_t{1} * h * cache->capacity_tokens());
          }
        }
      }
      KVGATE_ASSIGN_OR_RETURN(logits, model_.Forward(prompt.subspan(chunk.begin, m), cache, forward));
      for (int32_t l = 0; l < c.num_layers; ++l) {
        KVGATE_ASSIGN_OR_RETURN(std::vector<float> chunk_scores, gate.Score(l, recorded.hidden_states[l]));  // [kv, m]
        for (int32_t h = 0; h < c.num_kv_heads; ++h) {
          for (int32_t t = 0; t < m; ++t) {
            const int32_t pos = chunk.begin + t;
            if (pos >= context_begin) scores[l][size_t{1} * h * n + pos] = chunk_scores[size_t{1} * h * m + t];
          }
        }
      }
      if (!chunks.evicts) continue;
      const gates::TokenRange judge = gates::FastKvzipThresholdRange(chunks, judged_until, chunk.end);
      const int32_t len = judge.end - judge.begin;
      if (len <= 0) continue;
      gates::ScoreGrid grid{c.num_layers, c.num_kv_heads, len, {}};
      grid.scores.resize(size_t{1} * c.num_layers * c.num_kv_heads * len);
      for (int32_t l = 0; l < c.num_layers; ++l) {
        for (int32_t h = 0; h < c.num_kv_heads; ++h) {
          std::copy_n(scores[l].begin() + size_t{1} * h * n + judge.begin, len,
                      grid.scores.begin() + (size_t{1} * l * c.num_kv_heads + h) * len);
        }
      }
      const int64_t keep = gates::FastKvzipChunkKeepCount(chunks, int64_t{len} * c.num_layers * c.num_kv_heads);
      const gates::KeepPlan winners = gates::SelectGlobalTopKCount(grid, keep, std::vector<uint8_t>(len, 0));
      for (int32_t l = 0; l < c.num_layers; ++l) {
        for (int32_t h = 0; h < c.num_kv_heads; ++h) {
          uint8_t* row = visible[l].data() + size_t{1} * h * n;
          std::fill(row + judge.begin, row + judge.end, 0);
          for (int32_t p : winners.at(l, h).positions) row[judge.begin + p] = 1;
        }
      }
      judged_until = judge.end;
    }
    gates::KeepPlan plan{c.num_layers, c.num_kv_heads, n, {}};
    plan.heads.resize(size_t{1} * c.num_layers * c.num_kv_heads);
    for (int32_t l = 0; l < c.num_layers; ++l) {
      for (int32_t h = 0; h < c.num_kv_heads; ++h) {
        gates::HeadKeep& head = plan.at(l, h);
        for (int32_t p = 0; p < n; ++p) {
          if (!visible[l][size_t{1} * h * n + p]) continue;
          head.positions.push_back(p);
          // The system prompt / sinks are pinned for the whole request (score 1.0).
          head.scores.push_back(p < context_begin ? 1.0f : scores[l][size_t{1} * h * n + p]);
        }
      }
    }
    chunked_plan_ = std::move(plan);
    return logits;
  }

  // KVzip (eviction-methods.md 4.1): one teacher-forced forward per context chunk of the
  // reconstruction prompt + the chunk, on top of the full prompt; their queries and keys
  // are recorded and their K/V discarded (a scratch cache: they never enter the real one).
  absl::Status RunKvzipReconstruction(absl::Span<const int32_t> prompt) {
    if (tokenizer_ == nullptr) return absl::FailedPreconditionError("kvzip needs the model's tokenizer");
    const int32_t n = static_cast<int32_t>(prompt.size());
    for (const gates::TokenRange& range : gates::KvzipChunkRanges(0, n, options_.kvzip_chunk_tokens)) {
      std::vector<int32_t> input(prompt.begin(), prompt.end());
      std::vector<int32_t> recon;
      if (range.begin == 0) {
        KVGATE_ASSIGN_OR_RETURN(recon, tokenizer_->Encode(kKvzipRepeatAll, /*add_special_tokens=*/false));
      } else {
        KVGATE_ASSIGN_OR_RETURN(recon, tokenizer_->Encode(kKvzipRepeatFrom, /*add_special_tokens=*/false));
        const int32_t overlap_begin = std::max(0, range.begin - kKvzipOverlapTokens);
        recon.insert(recon.end(), prompt.begin() + overlap_begin, prompt.begin() + range.begin);
      }
      recon.insert(recon.end(), prompt.begin() + range.begin, prompt.begin() + range.end);
      input.insert(input.end(), recon.begin(), recon.end());
      const int32_t q = static_cast<int32_t>(recon.size());
      KVGATE_ASSIGN_OR_RETURN(std::unique_ptr<engine::KvCache> scratch,
                              model_.NewCache(n + q, /*allow_beyond_context=*/true));
      engine::PrefillCapture recorded;
      engine::ForwardOptions forward;
      forward.capture_request.keys = true;
      forward.capture_request.last_queries = q;
      forward.capture = &recorded;
      KVGATE_RETURN_IF_ERROR(model_.Forward(input, scratch.get(), forward).status());
      gates::KvzipChunk chunk;
      chunk.begin = range.begin;
      chunk.end = range.end;
      chunk.sink_keys = std::min(gates::kKvzipDefaultSink, range.begin);
      chunk.num_queries = q;
      chunk.queries = std::move(recorded.last_queries);
      const engine::ModelConfig& c = model_.config();
      chunk.own_keys.resize(c.num_layers);
      for (int32_t layer = 0; layer < c.num_layers; ++layer) {
        // recorded.keys[layer] is [kv_heads, n + q, head_dim]; keep rows [n, n + q).
        std::vector<float>& own = chunk.own_keys[layer];
        own.resize(size_t{1} * c.num_kv_heads * q * c.head_dim);
        for (int32_t h = 0; h < c.num_kv_heads; ++h) {
          const float* src = recorded.keys[layer].data() + (size_t{1} * h * (n + q) + n) * c.head_dim;
          std::copy_n(src, size_t{1} * q * c.head_dim, own.data() + size_t{1} * h * q * c.head_dim);
        }
      }
      inputs_.kvzip_chunks.push_back(std::move(chunk));
    }
    return absl::OkStatus();
  }

  engine::Model& model_;
  KvPool* pool_;
  gates::EvictionSpec spec_;
  gates::PolicyOptions options_;
  std::unique_ptr<gates::Policy> policy_;
  const engine::Tokenizer* tokenizer_;
  bool decode_eviction_;
  gates::ResolvedBudget budget_;
  gates::PolicyInputs inputs_;
  std::optional<gates::KeepPlan> chunked_plan_;  // set by FastKvzipChunkedPrefill
  std::unique_ptr<gates::PolicyRequest> request_;  // from ConfigurePrefill to Commit
};

}  // namespace

SequenceBatch::~SequenceBatch() {
  if (!layout_.heads.empty()) (void)pool_->Release(&layout_);
}

absl::Status SequenceBatch::BeginStep() {
  if (sliding_window_ > 0) {
    const int32_t first_visible = layout_.next_pos - sliding_window_ + 1;
    bool stale = false;
    for (const HeadPages& head : layout_.heads) {
      if (head.length > 0 && head.positions.front() < first_visible) stale = true;
    }
    if (stale) {
      KVGATE_RETURN_IF_ERROR(KeepRows([&](size_t i, int32_t r) { return layout_.heads[i].positions[r] >= first_visible; }));
    }
  }
  KVGATE_ASSIGN_OR_RETURN(step_, pool_->ReserveDecodeStep(&layout_));
  return absl::OkStatus();
}

absl::Status SequenceBatch::ObserveLayerInput(int32_t layer, absl::Span<const float> hidden) {
  if (evictor_ == nullptr) return absl::FailedPreconditionError("layer inputs for a sequence that evicts nothing");
  return evictor_->ObserveLayerInput(layer, hidden);
}

absl::Status SequenceBatch::KeepRows(const std::function<bool(size_t head_index, int32_t row)>& keep) {
  gates::KeepPlan plan{layout_.num_layers, layout_.num_kv_heads, layout_.next_pos, {}};
  plan.heads.resize(layout_.heads.size());
  bool drops = false;
  for (size_t i = 0; i < layout_.heads.size(); ++i) {
    const HeadPages& head = layout_.heads[i];
    gates::HeadKeep& kept = plan.heads[i];
    for (int32_t r = 0; r < head.length; ++r) {
      if (!keep(i, r)) {
        drops = true;
        continue;
      }
      kept.positions.push_back(head.positions[r]);
      if (!head.query_mask.empty()) kept.query_mask.push_back(head.query_mask[r]);
      if (!head.scores.empty()) kept.scores.push_back(head.scores[r]);
    }
  }
  if (!drops) return absl::OkStatus();
  return pool_->Compact(&layout_, plan).status();
}

absl::Status SequenceBatch::EndStep() {
  if (evictor_ == nullptr) return absl::OkStatus();
  gates::DecodeRows rows;
  rows.num_layers = layout_.num_layers;
  rows.num_kv_heads = layout_.num_kv_heads;
  rows.next_pos = layout_.next_pos;
  rows.positions.reserve(layout_.heads.size());
  rows.scores.reserve(layout_.heads.size());
  for (HeadPages& head : layout_.heads) {
    rows.positions.emplace_back(head.positions.data(), static_cast<size_t>(head.length));
    rows.scores.emplace_back(head.scores.data(), head.scores.size());
  }
  KVGATE_ASSIGN_OR_RETURN(gates::RowsToDrop drop, evictor_->AfterStep(rows));
  return DropRows(drop);
}

absl::Status SequenceBatch::DropRows(const gates::RowsToDrop& drop) {
  if (drop.empty()) return absl::OkStatus();
  if (drop.size() != layout_.heads.size()) {
    return absl::InternalError(absl::StrCat(std::string(evictor_->policy()), " decode eviction dropped rows of ", drop.size(),
                                            " heads; the sequence has ", layout_.heads.size()));
  }
  for (size_t i = 0; i < drop.size(); ++i) {
    for (size_t k = 0; k < drop[i].size(); ++k) {
      if (drop[i][k] < 0 || drop[i][k] >= layout_.heads[i].length || (k > 0 && drop[i][k] <= drop[i][k - 1])) {
        return absl::InternalError(absl::StrCat(std::string(evictor_->policy()), " decode eviction dropped row ", drop[i][k],
                                                " of head ", i, " (", layout_.heads[i].length,
                                                " rows; drops must ascend)"));
      }
    }
  }
  std::vector<size_t> next(drop.size(), 0);  // KeepRows asks each head's rows in order
  return KeepRows([&](size_t i, int32_t r) {
    if (next[i] < drop[i].size() && drop[i][next[i]] == r) {
      ++next[i];
      return false;
    }
    return true;
  });
}

absl::Status SequenceBatch::AppendLayer(int32_t layer, const float* k_new, const float* v_new) {
  return pool_->AppendDecodeRows(step_, layer, k_new, v_new);
}

absl::StatusOr<ops::HeadPagedKvView> SequenceBatch::View(int32_t layer) {
  const SequenceLayout* seqs[] = {&layout_};
  return pool_->BuildView(seqs, layer);
}

absl::StatusOr<std::unique_ptr<engine::KvPlanner>> CreatePolicyPlanner(engine::Model& model, KvPool* pool,
                                                                       const gates::EvictionSpec& spec,
                                                                       const gates::PolicyOptions& options,
                                                                       const engine::Tokenizer* tokenizer,
                                                                       bool decode_eviction) {
  KVGATE_RETURN_IF_ERROR(gates::ValidateEvictionSpec(spec));
  const engine::ModelConfig& c = model.config();
  if (pool->head_dim() != c.head_dim) {
    return absl::InvalidArgumentError(absl::StrCat("KV pool rows are ", pool->head_dim(), " wide, the model's head_dim is ",
                                                   c.head_dim));
  }
  const gates::ModelShape shape{c.num_layers, c.num_heads, c.num_kv_heads, c.head_dim, c.hidden_size};
  KVGATE_ASSIGN_OR_RETURN(std::unique_ptr<gates::Policy> policy, gates::CreatePolicy(spec.policy, options, shape));
  if (policy->hooks().kvzip_reconstruction && tokenizer == nullptr) {
    return absl::InvalidArgumentError("policy kvzip needs the model's tokenizer for its reconstruction prompt");
  }
  return std::unique_ptr<engine::KvPlanner>(
      new PolicyPlanner(model, pool, spec, options, std::move(policy), tokenizer, decode_eviction));
}

}  // namespace kvgate::kv
