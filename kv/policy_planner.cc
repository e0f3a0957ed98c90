#include "kv/policy_planner.h"

#include <algorithm>
#include <cstdlib>
#include <functional>
#include <optional>
#include <string>
#include <utility>

#include "absl/strings/str_cat.h"
#include "common/status_macros.h"
#include "gates/prefill_runner.h"

namespace kvgate::kv {
namespace {

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

// The forwards a policy runs during a request's prefill, over the engine's model and the
// request's cache (null once the prefill is over: only scratch forwards remain).
class ModelPrefillRunner final : public gates::PrefillRunner {
 public:
  // `cache` takes the prefill's forwards (null once the prefill is over); `prompt_cache`
  // is the request's cache as the scratch forwards read it.
  ModelPrefillRunner(engine::Model& model, engine::KvCache* cache, const engine::KvCache* prompt_cache,
                     const engine::Tokenizer* tokenizer)
      : model_(model), cache_(cache), prompt_cache_(prompt_cache), tokenizer_(tokenizer) {}

  int32_t cache_capacity_tokens() const override { return cache_ != nullptr ? cache_->capacity_tokens() : 0; }
  ops::Backend& backend() const override { return *model_.backend(); }

  absl::StatusOr<std::vector<float>> Forward(absl::Span<const int32_t> tokens,
                                             const std::vector<std::vector<uint8_t>>& key_masks,
                                             const gates::CaptureRequest& record,
                                             gates::PrefillCapture* capture) override {
    if (cache_ == nullptr) return absl::FailedPreconditionError("a prefill forward after the prefill");
    engine::ForwardOptions forward;
    forward.capture_request = record;
    forward.capture = capture;
    forward.key_masks = key_masks;
    return model_.Forward(tokens, cache_, forward);
  }

  absl::Status ScratchForwardAfterCache(absl::Span<const int32_t> tokens, const gates::CaptureRequest& record,
                                        gates::PrefillCapture* capture) override {
    if (prompt_cache_ == nullptr) return absl::FailedPreconditionError("a scratch forward without the prompt's cache");
    KVGATE_ASSIGN_OR_RETURN(std::unique_ptr<engine::KvCache> scratch,
                            model_.CopyCache(*prompt_cache_, prompt_cache_->length_tokens() + static_cast<int32_t>(tokens.size())));
    engine::ForwardOptions forward;
    forward.capture_request = record;
    forward.capture = capture;
    return model_.Forward(tokens, scratch.get(), forward).status();
  }

  absl::StatusOr<std::vector<int32_t>> Encode(std::string_view text) override {
    if (tokenizer_ == nullptr) return absl::FailedPreconditionError("this policy needs the model's tokenizer");
    return tokenizer_->Encode(std::string(text), /*add_special_tokens=*/false);
  }

 private:
  engine::Model& model_;
  engine::KvCache* cache_;
  const engine::KvCache* prompt_cache_;
  const engine::Tokenizer* tokenizer_;
};

class PolicyPlanner final : public engine::KvPlanner {
 public:
  PolicyPlanner(engine::Model& model, KvPool* pool, gates::EvictionSpec spec, std::unique_ptr<gates::Policy> policy,
                const engine::Tokenizer* tokenizer, bool decode_eviction)
      : model_(model), pool_(pool), spec_(std::move(spec)), policy_(std::move(policy)), tokenizer_(tokenizer),
        decode_eviction_(decode_eviction) {}

  absl::Status ConfigurePrefill(absl::Span<const int32_t> prompt, engine::ForwardOptions* options) override {
    KVGATE_RETURN_IF_ERROR(StartRequest(prompt));
    ConfigureForward(options);
    return absl::OkStatus();
  }

  absl::StatusOr<std::vector<float>> Prefill(engine::Model& model, absl::Span<const int32_t> prompt,
                                             engine::KvCache* cache, engine::PrefillCapture* capture) override {
    KVGATE_RETURN_IF_ERROR(StartRequest(prompt));
    if (request_->runs_prefill()) {
      ModelPrefillRunner runner(model, cache, cache, tokenizer_);
      return request_->RunPrefill(runner, prompt);
    }
    engine::ForwardOptions forward;
    forward.capture = capture;
    ConfigureForward(&forward);
    return model.Forward(prompt, cache, forward);
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
    const std::unique_ptr<gates::PolicyRequest> request = std::move(request_);
    const gates::PolicyInputs inputs = std::exchange(inputs_, gates::PolicyInputs{});
    ModelPrefillRunner runner(model_, /*cache=*/nullptr, &cache, tokenizer_);
    KVGATE_ASSIGN_OR_RETURN(gates::KeepPlan plan, request->Plan(runner, prompt, capture, inputs, spec_.head_budget));
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
    // An entry is a K row and a V row of the pool's dtype (bf16 pages hold half the bytes
    // of the model's float32 entries).
    const int64_t entry_bytes = 2 * static_cast<int64_t>(pool_->row_bytes());
    accounting->bytes_full = accounting->kv_entries_full * entry_bytes;
    accounting->bytes_kept = accounting->kv_entries_kept * entry_bytes;
    accounting->pages_used = static_cast<int32_t>(layout.NumPages());
    return std::make_unique<SequenceBatch>(pool_, std::move(layout), c.sliding_window, std::move(evictor));
  }

 private:
  // Resolves the budget of `prompt` and starts the policy's part of the request.
  absl::Status StartRequest(absl::Span<const int32_t> prompt) {
    const int32_t n = static_cast<int32_t>(prompt.size());
    KVGATE_ASSIGN_OR_RETURN(budget_, gates::ResolveBudget(spec_, n, policy_->default_sink(), policy_->default_recent()));
    inputs_ = gates::PolicyInputs{};
    request_ = policy_->StartRequest(budget_);
    return absl::OkStatus();
  }

  // What the prefill's one forward records and masks for the started request.
  void ConfigureForward(engine::ForwardOptions* options) {
    // KVGATE_HOST_SCORING=1 records what the policy scores on the host (every key, the
    // last queries) instead of what its request asks the backend to score: the path
    // before device scoring, for benchmark A/B runs.
    static const bool host_scoring = [] {
      const char* v = std::getenv("KVGATE_HOST_SCORING");
      return v != nullptr && std::string(v) == "1";
    }();
    options->capture_request = host_scoring ? policy_->needs() : request_->capture_request();
    if (request_->masks_prefill_keys()) {
      inputs_.gate_flags.assign(model_.config().num_layers, {});
      options->layer_key_mask = [this](int32_t layer, absl::Span<const float> hidden)
          -> absl::StatusOr<std::vector<uint8_t>> {
        KVGATE_ASSIGN_OR_RETURN(std::vector<uint8_t> mask, request_->PrefillKeyMask(layer, hidden));
        inputs_.gate_flags[layer] = mask;
        return mask;
      };
    }
  }

  engine::Model& model_;
  KvPool* pool_;
  gates::EvictionSpec spec_;
  std::unique_ptr<gates::Policy> policy_;
  const engine::Tokenizer* tokenizer_;
  bool decode_eviction_;
  gates::ResolvedBudget budget_;
  gates::PolicyInputs inputs_;
  std::unique_ptr<gates::PolicyRequest> request_;  // from the prefill to Commit
};

}  // namespace

SequenceBatch::~SequenceBatch() {
  if (!layout_.heads.empty()) (void)pool_->Release(&layout_);
}

absl::Status SequenceBatch::BeginStep() {
  if (sliding_window_ > 0) {
    // Rows the new token can no longer see lead each head (positions ascend): dropping
    // them advances the head's first slot and moves nothing.
    const int32_t first_visible = layout_.next_pos - sliding_window_ + 1;
    RowDrops stale(layout_.heads.size());
    bool any = false;
    for (size_t i = 0; i < layout_.heads.size(); ++i) {
      const std::vector<int32_t>& positions = layout_.heads[i].positions;
      const auto visible = std::lower_bound(positions.begin(), positions.end(), first_visible);
      for (int32_t r = 0; r < visible - positions.begin(); ++r) stale[i].push_back(r);
      any |= !stale[i].empty();
    }
    if (any) {
      SequenceLayout* layouts[] = {&layout_};
      KVGATE_RETURN_IF_ERROR(pool_->DropRows(layouts, absl::MakeConstSpan(&stale, 1)));
    }
  }
  KVGATE_ASSIGN_OR_RETURN(step_, pool_->ReserveDecodeStep(&layout_));
  return absl::OkStatus();
}

absl::Status SequenceBatch::ObserveLayerInput(int32_t layer, absl::Span<const float> hidden) {
  if (evictor_ == nullptr) return absl::FailedPreconditionError("layer inputs for a sequence that evicts nothing");
  return evictor_->ObserveLayerInput(layer, hidden);
}

const gates::DecodeLayerScorer* SequenceBatch::layer_scorer() const {
  return evictor_ == nullptr ? nullptr : evictor_->layer_scorer();
}

absl::Status SequenceBatch::ObserveLayerScores(int32_t layer, absl::Span<const float> scores) {
  if (evictor_ == nullptr) return absl::FailedPreconditionError("layer scores for a sequence that evicts nothing");
  return evictor_->ObserveLayerScores(layer, scores);
}

absl::StatusOr<gates::RowsToDrop> SequenceBatch::DecideDrops() {
  if (evictor_ == nullptr) return gates::RowsToDrop{};
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
  absl::Status fits = CheckRowDrops(layout_, drop);
  if (!fits.ok()) {
    return absl::InternalError(
        absl::StrCat(std::string(evictor_->policy()), " decode eviction: ", fits.message()));
  }
  return drop;
}

absl::Status SequenceBatch::EndStep() {
  SequenceBatch* batch[] = {this};
  return EndSteps(batch);
}

absl::Status SequenceBatch::EndSteps(absl::Span<SequenceBatch* const> batch) {
  absl::Status first;
  // One entry per sequence (empty drops for none), so DropRows names batch indices.
  std::vector<SequenceLayout*> layouts;
  std::vector<RowDrops> drops(batch.size());
  bool any = false;
  for (size_t s = 0; s < batch.size(); ++s) {
    layouts.push_back(&batch[s]->layout_);
    absl::StatusOr<gates::RowsToDrop> drop = batch[s]->DecideDrops();
    if (!drop.ok()) {
      if (first.ok()) {
        first = absl::Status(drop.status().code(), absl::StrCat("sequence ", s, ": ", drop.status().message()));
      }
      continue;
    }
    any |= !drop->empty();
    drops[s] = std::move(*drop);
  }
  if (!any) return first;
  absl::Status dropped = batch[0]->pool_->DropRows(layouts, drops);
  return first.ok() ? dropped : first;
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
  if (policy->needs_tokenizer() && tokenizer == nullptr) {
    return absl::InvalidArgumentError(absl::StrCat("policy ", spec.policy, " needs the model's tokenizer"));
  }
  return std::unique_ptr<engine::KvPlanner>(
      new PolicyPlanner(model, pool, spec, std::move(policy), tokenizer, decode_eviction));
}

}  // namespace kvgate::kv
