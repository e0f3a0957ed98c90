// File: a policy's decode-time eviction (architecture.md section 4) as one object: what it
// keeps dropping after every decode step of a sequence, and its state as opaque bytes so
// that a decode worker in another process continues it. The KV layer drives it without
// knowing which policy made it:
//
//   evictor->ObserveLayerInput(layer, x)   // per layer, only if wants_layer_inputs()
//   evictor->ObserveLayerScores(layer, s)  //   or, where a batch ran layer_scorer() on
//                                          //   the backend, the step token's scores
//   RowsToDrop drop = evictor->AfterStep(rows)  // after the step's token is appended
//   ... compact the sequence without `drop` ...
//
// A policy makes one per sequence (PolicyRequest::TakeDecodeEvictor); a decode worker
// rebuilds it from SaveState() with RestoreDecodeEvictor (gates/policy.h).
#pragma once

#include <algorithm>
#include <cstdint>
#include <initializer_list>
#include <string>
#include <string_view>
#include <vector>

#include "absl/status/status.h"
#include "absl/status/statusor.h"
#include "absl/types/span.h"

namespace kvgate::ops {
class Backend;
}  // namespace kvgate::ops

namespace kvgate::gates {

// One sequence's cache as an evictor sees it, after a step: per (layer, kv head),
// layer-major, the rows' positions (ascending) and, when the sequence's layout carries
// scores, one score per row that the evictor may rewrite (the KV layer keeps them).
struct DecodeRows {
  int32_t num_layers = 0;
  int32_t num_kv_heads = 0;
  int32_t next_pos = 0;  // the position the next token takes; the step's token sits at next_pos - 1
  std::vector<absl::Span<const int32_t>> positions;
  std::vector<absl::Span<float>> scores;  // empty spans when the layout has no scores
  absl::Span<const int32_t> head_positions(int32_t layer, int32_t kv_head) const {
    return positions[static_cast<size_t>(layer) * num_kv_heads + kv_head];
  }
};

// Per (layer, kv head), layer-major: the row indices (not positions) to drop, ascending.
// Empty (no heads at all) when nothing is dropped, the common case.
using RowsToDrop = std::vector<std::vector<int32_t>>;

// Scores decode tokens from their layer input on the backend where the step runs, so the
// input never leaves it: one call a layer for every sequence of a batch that shares the
// scorer (a policy's gate, loaded once per worker). Score only launches ops (no host copy,
// no allocation once Prepare ran), so a decode step that calls it replays as a graph.
class DecodeLayerScorer {
 public:
  virtual ~DecodeLayerScorer() = default;
  virtual int32_t scorer_layers() const = 0;
  virtual int32_t scorer_kv_heads() const = 0;
  // Makes what Score reads backend memory; cheap after the first call.
  virtual absl::Status PrepareOn(ops::Backend& backend) const = 0;
  // out[h * out_stride + r]: the score at kv head h of row r of x ([rows, hidden_size],
  // the post input-RMSNorm hidden states of `layer`); x and out are backend memory.
  virtual absl::Status ScoreOn(ops::Backend& backend, int32_t layer, const float* x, int32_t rows, float* out,
                               int64_t out_stride) const = 0;
};

class DecodeEvictor {
 public:
  virtual ~DecodeEvictor() = default;
  // The policy that made it (its name from PolicyNames()).
  virtual std::string_view policy() const = 0;
  // Whether the engine must pass, every step, each layer's attention input (the
  // post-RMSNorm hidden state of the step's token) to ObserveLayerInput.
  virtual bool wants_layer_inputs() const { return false; }
  // `x` is [tokens_in_step, hidden_size] of layer `layer`.
  virtual absl::Status ObserveLayerInput(int32_t layer, absl::Span<const float> x) { return absl::OkStatus(); }
  // Where the evictor's scores of a layer input can be computed on the backend: the scorer
  // (shared, outliving the evictor), else null. A batch that runs it passes each layer's
  // scores of the step's token, [kv_heads], to ObserveLayerScores instead of the input.
  virtual const DecodeLayerScorer* layer_scorer() const { return nullptr; }
  virtual absl::Status ObserveLayerScores(int32_t layer, absl::Span<const float> scores) {
    return absl::UnimplementedError("this decode evictor takes no layer scores");
  }
  // After a step whose rows are already appended: the rows to drop. INVALID_ARGUMENT when
  // `rows` does not fit the evictor (another model's shape, scores it needs missing).
  virtual absl::StatusOr<RowsToDrop> AfterStep(const DecodeRows& rows) = 0;
  // The evictor's state as bytes (tagged with its policy; see internal::PackState).
  virtual std::string SaveState() const = 0;
};

namespace internal {

// The state wire format shared by the evictors (little-endian): the policy's name, a NUL,
// uint32 version 1, uint32 count, int32 values[count], then a policy-specific tail.
std::string PackState(std::string_view policy, std::initializer_list<int32_t> values, std::string_view tail = {});

struct PackedState {
  std::vector<int32_t> values;
  std::string_view tail;  // points into the unpacked bytes
};
// INVALID_ARGUMENT when `bytes` is not PackState output of `policy` with `count` values.
absl::StatusOr<PackedState> UnpackState(std::string_view bytes, std::string_view policy, size_t count);

// The ring rule of streaming_llm and sage_kv: per head, the rows at positions >=
// ring_first_position form the ring, which keeps at most ring_capacity(rows before the
// ring) rows, dropping its oldest.
template <typename Capacity>
RowsToDrop DropRingOverflow(const DecodeRows& rows, int32_t ring_first_position, Capacity ring_capacity) {
  RowsToDrop drop;
  for (size_t i = 0; i < rows.positions.size(); ++i) {
    const absl::Span<const int32_t> positions = rows.positions[i];
    const int32_t length = static_cast<int32_t>(positions.size());
    const int32_t ring_start = static_cast<int32_t>(
        std::lower_bound(positions.begin(), positions.end(), ring_first_position) - positions.begin());
    const int32_t excess = length - ring_start - ring_capacity(ring_start);
    if (excess <= 0) continue;
    if (drop.empty()) drop.resize(rows.positions.size());
    for (int32_t r = ring_start; r < ring_start + excess; ++r) drop[i].push_back(r);
  }
  return drop;
}

}  // namespace internal
}  // namespace kvgate::gates
