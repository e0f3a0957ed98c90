// File: KvPool, the backend memory of the head-paged KV cache (architecture.md section
// 3) and the executor of the plans in sequence_layout.h.
//
// Memory, all in backend memory and shared by every layer and sequence:
//   k_pages, v_pages  [num_pages, page_tokens, head_dim] of the pool's KvDtype (float32
//                     or bf16); a page holds the rows of ONE (sequence, layer, kv head)
//   query_masks       [num_pages, page_tokens] uint8, one byte per row (bit g = visible
//                     to query head g of the kv head's group)
// plus the PagePool of ids and small index scratch buffers. Data moves only through
// Backend::CopyRows, whose row lists are uploaded to the scratch buffers.
//
// Mask bytes are kept valid for every held row: 0xFF (kAllQueryHeads) for a layout
// without masks, and 0xFF in the unused slots of a head's last page, so a decode step
// never writes a mask byte unless it allocates a page, and sequences with and without
// masks batch into one view.
//
// Ordering: every call submits its copies and returns; the backend runs ops in
// submission order (cuda/backend.h), so the next call may reuse the scratch buffers.
// Not thread-safe: one caller (the decode loop) drives a pool.
#pragma once

#include <array>
#include <cstdint>
#include <memory>
#include <optional>
#include <string>
#include <string_view>
#include <vector>

#include "absl/status/status.h"
#include "absl/status/statusor.h"
#include "absl/types/span.h"
#include "cuda/backend.h"
#include "cuda/ops.h"
#include "engine/model.h"
#include "gates/keep_plan.h"
#include "kv/page_pool.h"
#include "kv/sequence_layout.h"

namespace kvgate::kv {

// Host copies of the kept rows of one (layer, kv head), for tests and transfer. Always
// float32: a bf16 pool widens its rows exactly, and narrows float32 rows on import.
struct HeadRows {
  std::vector<float> k;             // [length, head_dim]
  std::vector<float> v;             // [length, head_dim]
  std::vector<int32_t> positions;   // [length]
  std::vector<uint8_t> query_mask;  // [length], read back from the backend mask buffer
  std::vector<float> scores;        // [length] when the layout carries scores, else empty
};

// A sequence's K and V rows outside the pages, in backend memory: how a sequence moves
// between two pools of one process on one device without a host copy (kv_handoff.h).
// Every (layer, kv head)'s rows in row order, heads layer-major, one after another.
// The buffers free themselves (DeviceBuffer) and may outlive the pool that made them.
struct BackendRows {
  std::string backend;  // ops::Backend::Name() of the memory's owner
  int64_t rows = 0;
  int32_t head_dim = 0;
  ops::KvDtype dtype = ops::KvDtype::kFloat32;  // the gathering pool's
  ops::DeviceBuffer k, v;  // [rows, head_dim] of dtype, backend
};

// The value of --kv-cache-dtype: "auto" (nullopt: KvPool::AutoDtype of the backend),
// "float32" or "bf16"; anything else is INVALID_ARGUMENT naming the flag.
absl::StatusOr<std::optional<ops::KvDtype>> ParseKvCacheDtype(std::string_view name);

class KvPool {
 public:
  // num_pages, page_tokens, head_dim > 0 and num_pages * page_tokens < 2^31 (pool rows
  // are int32), else INVALID_ARGUMENT; allocation failures pass through. `backend`
  // must outlive the pool. Rows are stored as `dtype`; rows that arrive as float32 (the
  // prefill cache, decode K/V, host imports) are rounded to it once, as they land.
  static absl::StatusOr<std::unique_ptr<KvPool>> Create(ops::Backend* backend, int32_t num_pages,
                                                        int32_t page_tokens, int32_t head_dim,
                                                        ops::KvDtype dtype = ops::KvDtype::kFloat32);
  // The dtype a pool on `backend` stores by default ("auto"): bf16 where the backend
  // runs its model in bf16 (SupportsBf16), else float32.
  static ops::KvDtype AutoDtype(const ops::Backend& backend);

  KvPool(const KvPool&) = delete;
  KvPool& operator=(const KvPool&) = delete;

  int32_t num_pages() const { return num_pages_; }
  int32_t page_tokens() const { return page_tokens_; }
  int32_t head_dim() const { return head_dim_; }
  ops::KvDtype dtype() const { return dtype_; }
  // Bytes of one K (or V) row: head_dim x the dtype's size.
  size_t row_bytes() const { return static_cast<size_t>(head_dim_) * ops::KvDtypeBytes(dtype_); }
  int32_t pages_used() const { return pages_.num_used(); }
  int32_t pages_free() const { return pages_.num_free(); }
  const PagePool& page_pool() const { return pages_; }

  // Copies the rows `plan` keeps from the contiguous prefill cache into fresh pages
  // (K and V) and writes their mask bytes; *out becomes the sequence's layout with
  // next_pos = plan.prompt_tokens. Preconditions: `cache` was made by the model the
  // plan is for (plan.num_layers layers, plan.num_kv_heads kv heads, head_dim() wide
  // rows). *out must be empty (FAILED_PRECONDITION otherwise);
  // plan.prompt_tokens != cache.length_tokens() and every PlanCommit error are
  // INVALID_ARGUMENT; a short pool is RESOURCE_EXHAUSTED. On any error *out is
  // unchanged and no page stays allocated.
  absl::Status CommitPrefill(const engine::KvCache& cache, const gates::KeepPlan& plan, SequenceLayout* out);

  // One decode step, in two parts. ReserveDecodeStep runs PlanAppend once for the
  // step (a slot in every (layer, kv head), next_pos + 1) and prepares mask bytes of any
  // new page; then, as each layer computes its K/V, AppendDecodeRows copies them into
  // that layer's slots. On a reservation error the layout is unchanged.
  absl::StatusOr<AppendPlan> ReserveDecodeStep(SequenceLayout* layout);
  // k_new, v_new: [num_kv_heads, head_dim], in, backend.
  absl::Status AppendDecodeRows(const AppendPlan& step, int32_t layer, const float* k_new, const float* v_new);
  // A batch of sequences in one CopyRows per tensor: steps[s] belongs to sequence s;
  // k_new, v_new: [steps.size(), num_kv_heads, head_dim], in, backend. Every step must
  // have the same num_kv_heads and more than `layer` layers (INVALID_ARGUMENT).
  absl::Status AppendDecodeRows(absl::Span<const AppendPlan* const> steps, int32_t layer, const float* k_new,
                                const float* v_new);

  // Keeps the rows of `keep` (see PlanCompaction: heads that lose rows are gathered
  // into fresh pages, heads that keep all rows are untouched) and returns the net
  // number of pages freed. INVALID_ARGUMENT / RESOURCE_EXHAUSTED leave the layout
  // unchanged.
  absl::StatusOr<int32_t> Compact(SequenceLayout* layout, const gates::KeepPlan& keep);

  // Drops rows of several sequences (drops[s] of layouts[s], RowDrops of
  // sequence_layout.h: empty, or ascending rows per head) by whichever moves fewer rows:
  // in place (PlanDropRows: the kept rows in front of each head's last drop shift back,
  // through a staging buffer, all sequences in one CopyRows per step), or by compacting a
  // sequence's heads that lose rows into fresh pages (Compact) when that moves under half
  // as many. In-place needs no free page, so it is also the answer when a compaction
  // would not fit. INVALID_ARGUMENT for a malformed drop (naming the sequence), checked
  // before any layout changes; allocation failures of the staging buffer pass through,
  // also before any change.
  absl::Status DropRows(absl::Span<SequenceLayout* const> layouts, absl::Span<const RowDrops> drops);

  // Returns every page of the layout to the pool and empties it.
  absl::Status Release(SequenceLayout* layout);

  // The decode-attention view of `layer` for a batch: seq head i = s * num_kv_heads +
  // kv_head. Uploads page_indptr, page_ids and lengths to a scratch buffer that the
  // view points into: valid until the next BuildView. query_masks is set when any
  // sequence of the batch carries masks, else null. Every sequence must be non-empty,
  // share num_kv_heads and page_tokens() and have more than `layer` layers
  // (INVALID_ARGUMENT).
  absl::StatusOr<ops::HeadPagedKvView> BuildView(absl::Span<const SequenceLayout* const> seqs, int32_t layer);
  // The views of every layer at once (views[l] = BuildView(seqs, l)), in one upload: a
  // decode step builds them after its BeginStep, since the layouts change only at step
  // boundaries. Valid until the next BuildView or BuildViews.
  absl::StatusOr<std::vector<ops::HeadPagedKvView>> BuildViews(absl::Span<const SequenceLayout* const> seqs);

  // A view of the pool's pages without tables (page_indptr, page_ids, lengths are
  // null): DecodeStepTables fills them. query_masks is set when `with_query_masks`.
  ops::HeadPagedKvView PagesView(bool with_query_masks) const;
  ops::Backend* backend() const { return backend_; }
  // AppendDecodeRows through row lists already in backend memory ([src rows | dst
  // rows], num_rows each; DecodeStepTables::Step::append_rows): launches only, so a graph
  // can record it.
  absl::Status AppendDecodeRowsAt(const int32_t* rows, int32_t num_rows, const float* k_new, const float* v_new);

  // Host copies of the rows of (layer, kv_head), in row order; scores from the layout.
  // Waits for prior work.
  absl::StatusOr<HeadRows> ReadRows(const SequenceLayout& layout, int32_t layer, int32_t kv_head) const;

  // The import of a sequence that arrives from elsewhere (kv_handoff.h): lays host rows
  // into fresh pages. `plan` gives every (layer, kv head)'s kept positions, and its query
  // masks and scores when the sequence carries them, as for CommitPrefill, with
  // prompt_tokens = the sequence's next_pos; rows[i] holds the K and V ([length,
  // head_dim] each, host) of head i = layer * num_kv_heads + kv_head (its positions,
  // query_mask and scores are not read). Pages come from one all-or-nothing Allocate;
  // each layer's rows go through a backend staging buffer and CopyRows, and the mask
  // bytes are written as CommitPrefill writes them. *out must be empty
  // (FAILED_PRECONDITION); every PlanCommit error and rows that do not match the plan
  // are INVALID_ARGUMENT; a short pool is RESOURCE_EXHAUSTED. On any error *out is
  // unchanged and no page stays allocated.
  absl::Status CommitHostRows(const gates::KeepPlan& plan, absl::Span<const HeadRows> rows, SequenceLayout* out);

  // Copies every row of `layout` into fresh BackendRows (one CopyRows for K and one for
  // V, no host copy) and waits for the copies, so that another backend instance of the
  // same device (another role's pool) may read them. INVALID_ARGUMENT for an empty
  // layout, one of another page size, or more than 2^31 - 1 rows; allocation failures
  // (RESOURCE_EXHAUSTED) pass through.
  absl::StatusOr<BackendRows> GatherRows(const SequenceLayout& layout);

  // CommitHostRows with the rows already in backend memory: `rows` (GatherRows of a pool
  // on a backend of the same Name(), of any dtype: they are converted to the pool's) holds
  // the rows of head i = layer * num_kv_heads + kv_head after those of every head before it. FAILED_PRECONDITION for rows of another
  // backend; INVALID_ARGUMENT when their count or width does not match the plan; errors
  // otherwise as CommitHostRows. Waits for the copies: `rows` may be freed on return.
  absl::Status CommitBackendRows(const gates::KeepPlan& plan, const BackendRows& rows, SequenceLayout* out);

  // [num_pages, page_tokens, head_dim] of dtype() / [num_pages, page_tokens] uint8, backend.
  const void* k_pages() const { return k_pages_.data(); }
  const void* v_pages() const { return v_pages_.data(); }
  const uint8_t* query_masks() const { return query_masks_.as<uint8_t>(); }

 private:
  KvPool(ops::Backend* backend, int32_t num_pages, int32_t page_tokens, int32_t head_dim, ops::KvDtype dtype)
      : backend_(backend), num_pages_(num_pages), page_tokens_(page_tokens), head_dim_(head_dim), dtype_(dtype),
        pages_(num_pages) {}

  // Uploads `host` into *scratch, growing it as needed; returns its backend address.
  absl::StatusOr<int32_t*> Upload(absl::Span<const int32_t> host, ops::DeviceBuffer* scratch);
  // Runs `copies` from k_src/v_src (rows of src_dtype) into the K/V pools, one upload
  // for every layer. k_src(l)/v_src(l) give layer l's source.
  template <typename SrcK, typename SrcV>
  absl::Status RunCopies(absl::Span<const RowCopies> copies, ops::KvDtype src_dtype, SrcK k_src, SrcV v_src);
  // Rewrites the mask bytes of `pages` (all held by `layout`) from the layout: each
  // row's byte, 0xFF in the slots outside the head's rows.
  absl::Status WriteMasks(const SequenceLayout& layout, absl::Span<const int32_t> pages);
  // WriteMasks in two halves, so several layouts' pages go in one upload: appends the
  // distinct ids of `pages` to *ids and their page_tokens bytes each to *bytes.
  absl::Status CollectMaskBytes(const SequenceLayout& layout, absl::Span<const int32_t> pages,
                                std::vector<int32_t>* ids, std::vector<uint8_t>* bytes) const;
  // Writes bytes[i * page_tokens, ...) to page ids[i] (distinct ids): one upload and one
  // scatter, or a copy per run of consecutive ids for few pages.
  absl::Status UploadMaskPages(absl::Span<const int32_t> ids, absl::Span<const uint8_t> bytes);
  // Sets every byte of `pages` to 0xFF.
  absl::Status FillMasks(absl::Span<const int32_t> pages);
  absl::Status UploadMaskRuns(absl::Span<const int32_t> sorted_pages, absl::Span<const uint8_t> bytes);

  ops::Backend* backend_;
  int32_t num_pages_, page_tokens_, head_dim_;
  ops::KvDtype dtype_;
  PagePool pages_;
  ops::DeviceBuffer k_pages_, v_pages_, query_masks_;
  ops::DeviceBuffer copy_scratch_;  // int32 row lists of the copies in flight
  // The view whose tables (one layer's, as AppendViewTables lays them out: host_tables on
  // the host) were uploaded to device_tables.
  ops::HeadPagedKvView ViewAt(const int32_t* device_tables, size_t num_seq_heads,
                              absl::Span<const int32_t> host_tables, bool any_masks) const;

  ops::DeviceBuffer view_scratch_;  // int32 indptr / ids / lengths of the last view(s)
  ops::DeviceBuffer stage_k_, stage_v_;  // CommitHostRows: one layer's host rows (float32)
  ops::DeviceBuffer drop_stage_;          // DropRows: the rows in flight, of dtype()
  ops::DeviceBuffer mask_scratch_;        // UploadMaskPages: row lists and mask bytes
};

}  // namespace kvgate::kv
