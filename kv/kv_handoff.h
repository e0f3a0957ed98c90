// File: KvHandoff, a compressed sequence on its way from the prefill worker to the decode
// worker (architecture.md sections 3 and 5): the kept rows of every (layer, kv head) in
// host memory, or in backend memory when both workers run in one process on one device,
// the decode state that must continue on the other side (next position,
// first token, sampler state, the policy's decode-time eviction), and the functions that
// move it out of and into a KvPool. Transports (transport/) carry it; bookkeeping and
// serialization here hold no backend pointers.
#pragma once

#include <cstdint>
#include <memory>
#include <string>
#include <string_view>
#include <vector>

#include "absl/status/status.h"
#include "absl/status/statusor.h"
#include "gates/decode_evictor.h"
#include "kv/kv_pool.h"
#include "kv/policy_planner.h"
#include "kv/sequence_layout.h"

namespace kvgate::kv {

struct KvHandoff {
  std::string transfer_id;
  std::string request_id;
  int32_t num_layers = 0;
  int32_t num_kv_heads = 0;
  int32_t head_dim = 0;
  int32_t next_pos = 0;  // position of the next decode token
  bool has_query_masks = false;
  bool has_scores = false;
  // [num_layers * num_kv_heads], layer-major; heads[i].k / .v are [length, head_dim],
  // positions [length]; query_mask [length] when has_query_masks; scores [length] when
  // has_scores.
  std::vector<HeadRows> heads;
  // Set: the K and V rows are here, in backend memory (KvPool::GatherRows order), and
  // every heads[i].k / .v is empty. Shared, so that the in-process transport's copy of
  // a handoff does not copy the rows.
  std::shared_ptr<const BackendRows> backend_rows;
  int32_t first_token = -1;
  std::string sampler_state;  // engine::Sampler::SaveState()
  // The policy's decode-time eviction (gates/decode_evictor.h): its policy's name and
  // DecodeEvictor::SaveState(), opaque here; both empty for none. The decode worker
  // continues it with gates::RestoreDecodeEvictor.
  std::string eviction_policy;
  std::string eviction_state;

  HeadRows& at(int32_t layer, int32_t kv_head) { return heads[size_t{1} * layer * num_kv_heads + kv_head]; }
  const HeadRows& at(int32_t layer, int32_t kv_head) const {
    return heads[size_t{1} * layer * num_kv_heads + kv_head];
  }
  // Rows kept by (layer, kv head), layer-major.
  std::vector<int32_t> Lengths() const;
  // Bytes of layer `layer`'s payload (the wire format below; without K and V when they
  // are backend_rows).
  int64_t LayerPayloadBytes(int32_t layer) const;
  // Every layer's payload together.
  int64_t PayloadBytes() const;
  // Memory the handoff holds: its payload plus its backend rows (what an inbox counts).
  int64_t HeldBytes() const;
  // Checks shapes against each other (lengths, row sizes, ascending positions below
  // next_pos, masks/scores present exactly when flagged): INVALID_ARGUMENT naming the
  // first broken one. Receivers call it before importing.
  absl::Status Validate() const;
};

// Sets the handoff's eviction_policy and eviction_state from `evictor` (null: none).
void CarryDecodeEviction(const gates::DecodeEvictor* evictor, KvHandoff* handoff);

// Where ExportSequence leaves the K and V rows.
enum class RowsIn {
  kHost,     // heads[i].k / .v: for every transport
  kBackend,  // KvHandoff::backend_rows: for a receiver in this process whose pool is on
             // the same backend (KvSender::BackendRowsFor)
};

// Whether a kv head's `rows` positions travel as a bitmask over [0, next_pos) (bit p of
// byte p / 8, least significant bit first) rather than as int32s: whichever is smaller,
// so both ends derive it from the header alone. A full 32k-token head is 4 KB instead of 128 KB.
bool PositionsAsBitmask(int64_t rows, int32_t next_pos);
// Payload bytes of one kv head of `rows` rows in the wire format below.
int64_t HeadPayloadBytes(int64_t rows, int32_t next_pos, int32_t head_dim, bool has_query_masks, bool has_scores,
                         bool with_kv = true);

// Layer payload wire format (little-endian; worker.proto KvTransferHeader): per kv head,
// K rows, V rows (float32 [length, head_dim] each; absent when the rows are backend_rows,
// which travel apart: the cuda_ipc transport), positions (int32 [length], or the bitmask
// of PositionsAsBitmask), then
// query masks (uint8 [length]) if has_query_masks, scores (float32 [length]) if has_scores.
// Precondition: `handoff` passes Validate().
std::string SerializeLayer(const KvHandoff& handoff, int32_t layer);
// Fills layer `layer` of `handoff` (K and V unless it holds backend_rows, positions and,
// as flagged, masks and scores of its heads) from `bytes`. The handoff's header fields
// (shape, flags, backend_rows) must already be set; `lengths` ([num_layers * num_kv_heads], the header's) gives every head's rows;
// heads is sized to num_layers * num_kv_heads if it is not. INVALID_ARGUMENT for a bad
// shape, layer or length, or when `bytes` has the wrong size.
absl::Status ParseLayer(std::string_view bytes, absl::Span<const int32_t> lengths, int32_t layer,
                        KvHandoff* handoff);

// Copy of a sequence held in `pool` (every row of every head, with masks and scores
// when the layout carries them; waits for the backend): K and V rows on the host, or
// with RowsIn::kBackend in fresh backend memory of the pool's backend (two device
// copies; positions, masks and scores stay host data). Decode state fields other
// than the shape and next_pos are left default: the caller sets transfer_id, first_token,
// sampler_state and the eviction (CarryDecodeEviction(SequenceBatch::evictor())).
// INVALID_ARGUMENT for an empty layout.
absl::StatusOr<KvHandoff> ExportSequence(KvPool* pool, const SequenceLayout& layout, RowsIn rows_in = RowsIn::kHost);

// Lays the handoff's rows into fresh pages of `pool` (KvPool::CommitHostRows: one
// all-or-nothing allocation, rows uploaded through a backend staging buffer and
// CopyRows, mask bytes as kv_pool.h demands; backend rows go by CommitBackendRows,
// device to device, and FAILED_PRECONDITION when they are another backend's) and returns the sequence's layout (next_pos,
// masks and scores as in the handoff); it passes SequenceLayout::CheckInvariants. Wrap it
// in a SequenceBatch with gates::RestoreDecodeEvictor(handoff.eviction_policy,
// handoff.eviction_state, ...) to decode. Validates first;
// INVALID_ARGUMENT for a malformed handoff or one whose head_dim differs from the pool's;
// RESOURCE_EXHAUSTED when the pool is short. On error no page stays allocated.
absl::StatusOr<SequenceLayout> ImportSequence(KvPool* pool, const KvHandoff& handoff);

}  // namespace kvgate::kv
