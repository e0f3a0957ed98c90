// File: DecodeStepTables, the page tables of a batched decode step kept in backend memory
// from step to step, so that each step uploads what changed instead of every page id.
//
// A step reads, per layer, the append rows of the new token ([src rows | dst rows]) and
// the decode-attention view (page_indptr, lengths, page_ids). At batch 32 and 8k tokens
// of context the page ids are 1M int32 per step (8 layers x 8 kv heads); rebuilding and
// uploading them every step cost the host milliseconds while the GPU waited. Here the
// ids live in slots: a sequence keeps its slot while it stays in the batch, every slot
// holds `stride` ids per (layer, kv head), and page_indptr maps the batch's seq heads to
// their slot lists. A step diffs each head's page list against a host mirror of the
// device and scatters the changed ids with one CopyRows (a head gains a page every
// page_tokens steps; eviction rewrites a few); the small per-step tables (append rows,
// lengths, page_indptr) are uploaded whole, in one copy.
//
// Backend layout, one buffer (it moves only when it must grow, so launch arguments
// repeat from step to step: replay_key):
//   per layer l: [src rows | dst rows | page_indptr | lengths | first slots], each block of
//                slot_capacity x kv_heads entries (+1 for page_indptr)
//   then ids:    [layers][slot_capacity][kv_heads][stride]
// Not thread-safe; one decode loop drives it, as it drives the pool.
#pragma once

#include <array>
#include <cstdint>
#include <vector>

#include "absl/status/statusor.h"
#include "absl/types/span.h"
#include "cuda/backend.h"
#include "cuda/ops.h"
#include "kv/kv_pool.h"
#include "kv/sequence_layout.h"

namespace kvgate::kv {

class DecodeStepTables {
 public:
  // What one step reads, valid until the next Update.
  struct Step {
    std::vector<ops::HeadPagedKvView> views;  // [num_layers]
    std::vector<const int32_t*> append_rows;  // [num_layers]: [src rows | dst rows], backend
    int32_t num_append_rows = 0;              // sequences x kv heads
    // Equal keys: equal launch arguments (buffer address, seq heads, layers and slot
    // capacity, ids per list and whether query masks are read).
    std::array<uint64_t, 4> replay_key{};
  };
  // What the last Update moved to the backend (tests and benchmarks read it).
  struct UploadStats {
    bool rebuilt = false;         // the whole id region was uploaded
    int64_t ids_scattered = 0;    // changed ids written by the scatter
    int64_t bytes_uploaded = 0;   // host -> backend bytes of the step
  };

  explicit DecodeStepTables(KvPool* pool) : pool_(pool) {}
  DecodeStepTables(const DecodeStepTables&) = delete;
  DecodeStepTables& operator=(const DecodeStepTables&) = delete;

  // The tables of a step whose sequences (in batch order) are `layouts`, after each one's
  // ReserveDecodeStep gave steps[s]. Every layout must be non-empty and share the first
  // one's layers, kv heads and the pool's page size (INVALID_ARGUMENT naming the
  // sequence); allocation failures pass through. After an error the next Update
  // uploads everything again.
  absl::StatusOr<const Step*> Update(absl::Span<const SequenceLayout* const> layouts,
                                     absl::Span<const AppendPlan* const> steps);
  const UploadStats& last_upload() const { return last_upload_; }

 private:
  // Sizes the buffer and mirror for `num_sequences` sequences of up to `max_pages` page
  // ids per head, forgetting what the backend holds (every id is uploaded next).
  absl::Status Reshape(int32_t layers, int32_t kv_heads, size_t num_sequences, size_t max_pages);
  // Slot of each sequence: the one it had in the previous step, else a free one.
  std::vector<int32_t> AssignSlots(absl::Span<const SequenceLayout* const> layouts);
  size_t IdOffset(int32_t layer, int32_t slot, int32_t kv_head) const;

  KvPool* pool_;
  int32_t layers_ = 0, kv_heads_ = 0;
  int32_t slot_capacity_ = 0;   // sequences the buffer holds lists for
  int32_t stride_ = 0;          // ids per (layer, slot, kv head) list
  size_t small_tables_ = 0;     // int32 of the per-layer small tables, all layers
  bool mirror_valid_ = false;   // ids_mirror_ equals the backend's id region
  ops::DeviceBuffer buffer_;    // the layout above
  ops::DeviceBuffer scatter_;   // [values | source indices | destination indices] of a scatter
  std::vector<int32_t> ids_mirror_;                   // the id region as the backend holds it
  std::vector<const SequenceLayout*> slot_owner_;     // [slot_capacity], null = free
  std::vector<int32_t> small_host_, scatter_host_;    // per-step host staging
  Step step_;
  UploadStats last_upload_;
};

}  // namespace kvgate::kv
