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
#include "gates/attention_gate.h"
#include "gates/fast_kvzip.h"
#include "gates/policy.h"
#include "kv_manager/kv_pool.h"

namespace kvgate::kv {

// Eviction a policy keeps doing during decode, after every step (architecture.md §4).
struct DecodeEviction {
  enum class Kind {
    kNone,
    // streaming_llm: every head keeps its rows at positions < sink_tokens plus the most
    // recent others, at most `capacity` rows in all (a fixed-size ring after the sinks).
    kStreamingRing,
    // sage_kv: rows at positions >= ring_begin form the recent window; it keeps its
    // `capacity` most recent rows (the sink and the selected middle stay frozen).
    kRecentRing,
    // fast_kvzip: every `interval` decode steps the gate scores the new rows; if the
    // sequence holds more than capacity * layers * kv_heads rows, one global threshold
    // keeps that many, always keeping the newest `interval` rows and the first
    // sink_tokens positions (FastKVzip math/method/compression/fastkvzip.py).
    kFastKvzip,
    // attention_gate: the gate flags each new token per kv head from its causal state;
    // after the step the token's row stays only in the heads that flag it (it always
    // attends to itself first).
    kAttentionGate,
  };
  Kind kind = Kind::kNone;
  int32_t sink_tokens = 0;
  int32_t ring_begin = 0;
  int32_t capacity = 0;
  int32_t interval = 0;
  const gates::FastKvzipGate* gate = nullptr;
  // attention_gate: the gate's causal state, already holding the prompt.
  std::shared_ptr<gates::AttentionGateState> gate_state;
};

// One sequence's pages as the engine's decode batch (a batch of one). Releases its
// pages when destroyed. For a model with a sliding window it drops, before each step,
// the rows the new token can no longer see (exact: those rows are never read again);
// after each step it applies the policy's decode-time eviction.
class SequenceBatch final : public engine::PagedKvBatch {
 public:
  SequenceBatch(KvPool* pool, SequenceLayout layout, int32_t sliding_window, DecodeEviction eviction = {})
      : pool_(pool), layout_(std::move(layout)), sliding_window_(sliding_window), eviction_(eviction) {}
  ~SequenceBatch() override;

  int32_t num_sequences() const override { return 1; }
  std::vector<int32_t> NextPositions() const override { return {layout_.next_pos}; }
  absl::Status BeginStep() override;
  absl::Status AppendLayer(int32_t layer, const float* k_new, const float* v_new) override;
  absl::StatusOr<ops::HeadPagedKvView> View(int32_t layer) override;
  absl::Status EndStep() override;
  bool wants_layer_inputs() const override {
    return eviction_.kind == DecodeEviction::Kind::kFastKvzip || eviction_.kind == DecodeEviction::Kind::kAttentionGate;
  }
  absl::Status ObserveLayerInput(int32_t layer, absl::Span<const float> hidden) override;

  const SequenceLayout& layout() const { return layout_; }
  KvPool* pool() const { return pool_; }
  int32_t sliding_window() const { return sliding_window_; }
  // The policy's decode-time eviction (kv_handoff.h ToParams sends it to a decode worker).
  const DecodeEviction& eviction() const { return eviction_; }
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
  DecodeEviction eviction_;
  AppendPlan step_;
  std::vector<std::vector<float>> pending_inputs_;  // fast_kvzip: per layer [steps, hidden]
  absl::Status FastKvzipReevict();
  absl::Status DropUnflaggedNewRows();
  // Compacts the sequence to the rows keep(head index, row) accepts; moves nothing when
  // it accepts every row.
  absl::Status KeepRows(const std::function<bool(size_t head_index, int32_t row)>& keep);
  std::vector<std::vector<uint8_t>> step_flags_;  // attention_gate: per layer [kv_heads]
};

// `tokenizer` is needed only by kvzip (its reconstruction prompt); may be null otherwise.
// `decode_eviction` false turns off the policies' decode-time eviction (the rings), so
// every policy evicts once after prefill (equal-budget comparisons in bench/eval_kl).
// INVALID_ARGUMENT for a bad spec or a gate that does not fit the model.
absl::StatusOr<std::unique_ptr<engine::KvPlanner>> CreatePolicyPlanner(
    engine::Model& model, KvPool* pool, const gates::EvictionSpec& spec, const gates::PolicyOptions& options,
    const engine::Tokenizer* tokenizer = nullptr, bool decode_eviction = true);

}  // namespace kvgate::kv
