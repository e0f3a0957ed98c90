// File: what the engine's decode step needs from a head-paged KV cache, as an interface
// so that the engine does not depend on the KV pool (kv/ implements it).
#pragma once

#include <array>
#include <cstdint>
#include <optional>
#include <vector>

#include "absl/status/status.h"
#include "absl/status/statusor.h"
#include "absl/types/span.h"
#include "cuda/ops.h"

namespace kvgate::engine {

// A batch of sequences that decode one token each, in a fixed order.
class PagedKvBatch {
 public:
  virtual ~PagedKvBatch() = default;
  virtual int32_t num_sequences() const = 0;
  // Position of each sequence's next token: prompt length + tokens generated so far,
  // never the compacted length.
  virtual std::vector<int32_t> NextPositions() const = 0;
  // Reserves one row per (sequence, layer, kv head) for the step's new token. For a
  // model with a sliding window W, rows the next token can no longer see (position <
  // next position - W + 1) must be gone from the view before the step.
  virtual absl::Status BeginStep() = 0;
  // Writes the new token's K and V of `layer`: [num_sequences, num_kv_heads, head_dim],
  // backend memory.
  virtual absl::Status AppendLayer(int32_t layer, const float* k_new, const float* v_new) = 0;
  // The view of `layer` for HeadPagedDecodeAttention (seq head = seq * kv_heads + head).
  virtual absl::StatusOr<ops::HeadPagedKvView> View(int32_t layer) = 0;
  // After BeginStep: a key for the step's launches, or nullopt (the default) for a batch
  // whose AppendLayer and View may copy from the host. Equal keys mean that AppendLayer
  // and View of every layer launch the same ops with the same arguments and copy nothing
  // from the host (whatever they read was uploaded by BeginStep), so the engine may
  // record a step into a graph and replay it for the next step with an equal key.
  virtual std::optional<std::array<uint64_t, 4>> replay_key() const { return std::nullopt; }
  // Advances every sequence's next position; may evict (decode-time eviction).
  virtual absl::Status EndStep() = 0;
  // Policies that score decode tokens from their attention input (Fast KVzip's gate) ask
  // for it: ObserveLayerInput then gets each layer's post input-RMSNorm hidden states of
  // the step, [num_sequences, hidden_size], host.
  virtual bool wants_layer_inputs() const { return false; }
  virtual absl::Status ObserveLayerInput(int32_t layer, absl::Span<const float> hidden) {
    return absl::OkStatus();
  }
  // Or they score them where they are: after BeginStep, ScoreLayerInput gets each layer's
  // post input-RMSNorm hidden states of the step, [num_sequences, hidden_size] in backend
  // memory, and only launches ops, so the step can still be replayed as a graph (equal
  // replay keys mean equal launches here too).
  virtual bool scores_layer_inputs() const { return false; }
  virtual absl::Status ScoreLayerInput(int32_t layer, const float* hidden) { return absl::OkStatus(); }
};

}  // namespace kvgate::engine
