// File: the KV planner that joins an eviction policy (gates/) to the head-paged pool:
// after a sequence's prefill it scores, selects and commits the kept rows into pages,
// and gives the engine the sequence's paged cache to decode over.
#pragma once

#include <functional>
#include <memory>
#include <utility>

#include "absl/status/statusor.h"
#include "engine/kv_planner.h"
#include "engine/model.h"
#include "engine/tokenizer.h"
#include "gates/eviction_spec.h"
#include "gates/decode_evictor.h"
#include "gates/policy.h"
#include "kv/kv_pool.h"

namespace kvgate::kv {

// One sequence's pages as the engine's decode batch (a batch of one). Releases its
// pages when destroyed. For a model with a sliding window it drops, before each step,
// the rows the new token can no longer see (exact: those rows are never read again);
// after each step it applies the policy's decode-time eviction.
class SequenceBatch final : public engine::PagedKvBatch {
 public:
  // `evictor` null: nothing is evicted during decode.
  SequenceBatch(KvPool* pool, SequenceLayout layout, int32_t sliding_window,
                std::unique_ptr<gates::DecodeEvictor> evictor = nullptr)
      : pool_(pool), layout_(std::move(layout)), sliding_window_(sliding_window), evictor_(std::move(evictor)) {}
  ~SequenceBatch() override;

  int32_t num_sequences() const override { return 1; }
  std::vector<int32_t> NextPositions() const override { return {layout_.next_pos}; }
  absl::Status BeginStep() override;
  absl::Status AppendLayer(int32_t layer, const float* k_new, const float* v_new) override;
  absl::StatusOr<ops::HeadPagedKvView> View(int32_t layer) override;
  absl::Status EndStep() override;
  // EndStep of every sequence of `batch` (all in one pool): each evictor decides its
  // drops, then one KvPool::DropRows moves the rows of all. Every evictor runs; the first
  // failure is returned, naming its sequence's index in `batch`.
  static absl::Status EndSteps(absl::Span<SequenceBatch* const> batch);
  bool wants_layer_inputs() const override { return evictor_ != nullptr && evictor_->wants_layer_inputs(); }
  absl::Status ObserveLayerInput(int32_t layer, absl::Span<const float> hidden) override;
  // Where a batch may score this sequence's step tokens on the backend instead (its
  // evictor's DecodeLayerScorer, null for none); the scores then go to ObserveLayerScores,
  // [kv_heads] of the step's token per layer.
  const gates::DecodeLayerScorer* layer_scorer() const;
  absl::Status ObserveLayerScores(int32_t layer, absl::Span<const float> scores);

  const SequenceLayout& layout() const { return layout_; }
  KvPool* pool() const { return pool_; }
  int32_t sliding_window() const { return sliding_window_; }
  // The policy's decode-time eviction, null for none (kv_handoff.h CarryDecodeEviction
  // sends it to a decode worker).
  const gates::DecodeEvictor* evictor() const { return evictor_.get(); }
  // The slot of the step in progress (BeginStep to EndStep): DecodeBatch appends the rows
  // of several sequences in one KvPool::AppendDecodeRows.
  const AppendPlan& step() const { return step_; }
  // Gives up the layout without releasing its pages: the caller owns them now (an
  // export that moves a sequence elsewhere, say). The batch is left empty.
  SequenceLayout TakeLayout() { return std::exchange(layout_, SequenceLayout{}); }

 private:
  KvPool* pool_;
  SequenceLayout layout_;
  int32_t sliding_window_;
  std::unique_ptr<gates::DecodeEvictor> evictor_;
  AppendPlan step_;
  // The evictor's drops after the step, checked against the layout (INTERNAL naming the
  // policy when they do not fit: a policy bug); empty without an evictor.
  absl::StatusOr<gates::RowsToDrop> DecideDrops();
};

// `tokenizer` is needed only by policies whose requests encode text (Policy::needs_tokenizer:
// kvzip's reconstruction prompt); may be null otherwise.
// `decode_eviction` false turns off the policies' decode-time eviction (the rings), so
// every policy evicts once after prefill (equal-budget comparisons in bench/eval_kl).
// INVALID_ARGUMENT for a bad spec or a gate that does not fit the model.
absl::StatusOr<std::unique_ptr<engine::KvPlanner>> CreatePolicyPlanner(
    engine::Model& model, KvPool* pool, const gates::EvictionSpec& spec, const gates::PolicyOptions& options,
    const engine::Tokenizer* tokenizer = nullptr, bool decode_eviction = true);

}  // namespace kvgate::kv
