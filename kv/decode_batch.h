// File: DecodeBatch, continuous batching over the head-paged pool: one engine decode step
// serves every active sequence of a decode worker (architecture.md section 1, step 4).
// Each sequence keeps its own SequenceBatch (its pages, sliding-window trim and
// decode-time eviction); the batch joins them into one view per layer.
#pragma once

#include <vector>

#include "engine/paged_kv.h"
#include "kv/decode_step_tables.h"
#include "kv/kv_pool.h"
#include "kv/policy_planner.h"

namespace kvgate::kv {

class DecodeBatch final : public engine::PagedKvBatch {
 public:
  explicit DecodeBatch(KvPool* pool) : pool_(pool), step_tables_(pool) {}
  const DecodeStepTables& step_tables() const { return step_tables_; }

  // The sequences of the next step, in batch order (seq s of the engine's step is
  // sequences[s]). Every one must live in `pool` and share its shape; not owned.
  void SetSequences(std::vector<SequenceBatch*> sequences);
  const std::vector<SequenceBatch*>& sequences() const { return sequences_; }

  int32_t num_sequences() const override;
  std::vector<int32_t> NextPositions() const override;
  // Reserves every sequence's slot. A sequence of another pool is INVALID_ARGUMENT before
  // any slot is taken. Otherwise not all-or-nothing across sequences: on an error
  // (RESOURCE_EXHAUSTED naming the sequence index) the earlier ones hold their slot and
  // the caller must fail or drop the step's sequences; the decode worker avoids it by
  // admitting only sequences whose pages the KV manager reserved.
  absl::Status BeginStep() override;
  // Then brings every layer's views and append row lists up to date in backend memory
  // (DecodeStepTables: what changed since the last step), so that AppendLayer (one
  // CopyRows per tensor for the whole batch) and View only launch: the step can be
  // replayed as a graph.
  absl::Status AppendLayer(int32_t layer, const float* k_new, const float* v_new) override;
  absl::StatusOr<ops::HeadPagedKvView> View(int32_t layer) override;
  std::optional<std::array<uint64_t, 4>> replay_key() const override;
  // Every sequence ends its step (decode-time eviction), even after one fails; the
  // first error is returned, naming the sequence index.
  absl::Status EndStep() override;
  // True when a sequence wants them and cannot score them on the backend;
  // ObserveLayerInput hands row s of hidden ([num_sequences, hidden_size], host) to such a
  // sequence s.
  bool wants_layer_inputs() const override;
  absl::Status ObserveLayerInput(int32_t layer, absl::Span<const float> hidden) override;
  // The sequences whose evictor has a DecodeLayerScorer are scored on the backend: one
  // launch a layer per distinct scorer over every row of the step (the rows of other
  // sequences are scored and ignored), and at EndStep one copy of the scores to the host,
  // each sequence's handed to its ObserveLayerScores before its eviction runs.
  bool scores_layer_inputs() const override;
  absl::Status ScoreLayerInput(int32_t layer, const float* hidden) override;

 private:
  struct ScorerSlot {
    const gates::DecodeLayerScorer* scorer = nullptr;
    ops::DeviceBuffer scores;     // [layers, kv_heads, rows]; kept across steps (graphs hold it)
    int32_t rows = 0;             // of this step
    std::vector<size_t> members;  // the sequences of this step that it scores
  };
  // At BeginStep: the slots of this step's scorers, their weights and buffers ready.
  absl::Status PrepareScorers();
  // At EndStep: every member's scores to its sequence.
  absl::Status DeliverScores();

  KvPool* pool_;
  std::vector<ScorerSlot> scorers_;  // active: those with members
  std::vector<SequenceBatch*> sequences_;
  DecodeStepTables step_tables_;                  // kept from step to step
  const DecodeStepTables::Step* tables_ = nullptr;  // between BeginStep and EndStep
};

}  // namespace kvgate::kv
