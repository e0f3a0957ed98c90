// File: the head-paged layout of one sequence (architecture.md section 3) and the pure
// functions that plan its data movement. Bookkeeping only: page ids, row indices and
// positions, never backend pointers, so it is tested without hardware. kv_pool.h runs
// the plans on a Backend.
//
// Rows. The page pool is viewed as rows [num_pages * page_tokens, head_dim] ("pool
// rows"): row r of a (layer, kv head) lives at pool row
//   page_ids[r / page_tokens] * page_tokens + r % page_tokens.
// A page belongs to exactly one (sequence, layer, kv head). Rows are packed densely in
// ascending position order, so a head with `length` rows holds
// ceil(length / page_tokens) pages, and a head keeping 0 rows holds 0 pages.
//
// Every planning function is all-or-nothing: on an error the layout is unchanged and no
// page is allocated or freed.
#pragma once

#include <cstdint>
#include <limits>
#include <vector>

#include "absl/status/status.h"
#include "absl/status/statusor.h"
#include "absl/types/span.h"
#include "gates/keep_plan.h"
#include "kv/page_pool.h"

namespace kvgate::kv {

// Mask byte of a row every query head of its group sees.
inline constexpr uint8_t kAllQueryHeads = 0xFF;
// Score given to a row appended in decode when the layout carries scores: the policy
// has not scored it yet, and +inf keeps it through any threshold until it does.
inline constexpr float kUnscoredRow = std::numeric_limits<float>::infinity();

// The kept rows of one (layer, kv head) of one sequence.
struct HeadPages {
  std::vector<int32_t> page_ids;   // ceil(length / page_tokens) pages, in row order
  int32_t length = 0;              // rows kept
  std::vector<int32_t> positions;  // [length], strictly ascending original positions
  // [length] when the layout has query masks (bit g = visible to query head g of the
  // group), else empty = every row visible to every query head.
  std::vector<uint8_t> query_mask;
  // [length] when the layout has scores (policies that keep evicting in decode), else
  // empty.
  std::vector<float> scores;
};

struct SequenceLayout {
  int32_t num_layers = 0;
  int32_t num_kv_heads = 0;
  int32_t page_tokens = 0;
  // Position of the next decode token: prompt length + tokens generated so far. Never
  // the compacted length.
  int32_t next_pos = 0;
  bool has_query_masks = false;  // every head's query_mask has `length` bytes
  bool has_scores = false;       // every head's scores has `length` floats
  std::vector<HeadPages> heads;  // [layer * num_kv_heads + kv_head]; empty = nothing held

  HeadPages& at(int32_t layer, int32_t kv_head) { return heads[layer * num_kv_heads + kv_head]; }
  const HeadPages& at(int32_t layer, int32_t kv_head) const {
    return heads[layer * num_kv_heads + kv_head];
  }
  // Pool row of kept row `row` (< length) of (layer, kv_head).
  int32_t PoolRow(int32_t layer, int32_t kv_head, int32_t row) const;
  // Pages held by every head together.
  int64_t NumPages() const;
  // Rows kept by every head together.
  int64_t NumRows() const;
  // Every page id of the sequence, in (layer, kv head, row) order.
  std::vector<int32_t> AllPages() const;
  // Checks the invariants above (shapes, page counts, ascending positions below
  // next_pos); INTERNAL naming the first broken one. For tests and debugging.
  absl::Status CheckInvariants() const;
};

// Row indices of one CopyRows call: dst[dst_rows[i]] = src[src_rows[i]].
struct RowCopies {
  std::vector<int32_t> src_rows;
  std::vector<int32_t> dst_rows;
  int32_t size() const { return static_cast<int32_t>(src_rows.size()); }
};

struct CommitPlan {
  SequenceLayout layout;  // next_pos = plan.prompt_tokens
  // [num_layers]. src_rows index the contiguous prefill cache of that layer viewed as
  // rows [num_kv_heads * capacity_tokens, head_dim] (row = kv_head * capacity_tokens +
  // position); dst_rows are pool rows. In (kv head, kept row) order.
  std::vector<RowCopies> copies;
};

// Lays out the rows `plan` keeps into freshly allocated pages: one Allocate of every
// page needed, handed out in (layer, kv head, row) order. INVALID_ARGUMENT for a
// malformed plan (shape, positions not strictly ascending or outside
// [0, prompt_tokens), prompt_tokens > capacity_tokens, mask or score counts that do not
// match, scores on some heads but not on others that keep rows); RESOURCE_EXHAUSTED
// when the pool is short.
absl::StatusOr<CommitPlan> PlanCommit(const gates::KeepPlan& plan, int32_t capacity_tokens,
                                      int32_t page_tokens, PagePool* pool);

// One decode step of one sequence: the slot reserved for the new token in every
// (layer, kv head).
struct AppendPlan {
  int32_t position = 0;  // the new token's position (next_pos before the step)
  int32_t num_layers = 0;
  int32_t num_kv_heads = 0;
  std::vector<int32_t> dst_rows;   // [num_layers * num_kv_heads] pool rows
  std::vector<int32_t> new_pages;  // allocated this step (a head whose last page was full)

  // [num_kv_heads] pool rows of `layer`.
  absl::Span<const int32_t> layer_rows(int32_t layer) const {
    return absl::MakeConstSpan(dst_rows).subspan(static_cast<size_t>(layer) * num_kv_heads,
                                                 num_kv_heads);
  }
};

// Reserves one row per (layer, kv head) for the token at next_pos, allocating a page
// where a head's last page is full (all-or-nothing), records its position, mask byte
// kAllQueryHeads and score kUnscoredRow (when the layout carries them), and advances
// next_pos by one: call once per decode step, not per layer. FAILED_PRECONDITION for
// an empty layout; RESOURCE_EXHAUSTED when the pool is short.
absl::StatusOr<AppendPlan> PlanAppend(SequenceLayout* layout, PagePool* pool);

struct CompactionPlan {
  // [num_layers], pool rows to pool rows; sources are in the old pages and destinations
  // in new_pages, so they never alias.
  std::vector<RowCopies> copies;
  std::vector<int32_t> new_pages;    // allocated by the compaction, now in the layout
  std::vector<int32_t> freed_pages;  // the replaced pages, already back in the pool
  // Pages whose mask bytes must be rewritten from the layout: every new page, plus the
  // pages of unmoved heads whose query masks changed.
  std::vector<int32_t> mask_pages;

  // Net pages returned to the pool.
  int32_t pages_freed() const {
    return static_cast<int32_t>(freed_pages.size()) - static_cast<int32_t>(new_pages.size());
  }
};

// Keeps, per (layer, kv head), the rows at keep.at(layer, kv_head).positions (strictly
// ascending, a subset of the head's current positions; keep.prompt_tokens is ignored).
// A head that loses rows is gathered, in position order, into FRESH pages, allocated
// (all at once) before its old pages are freed. A head that keeps every row is a
// no-op: no moves, same pages. So keeping everything moves nothing and allocates
// nothing. keep's query_mask / scores, when given, replace the kept rows' masks /
// scores; otherwise they carry over. INVALID_ARGUMENT for a keep plan of the wrong
// shape or with a position that is not present or not ascending; RESOURCE_EXHAUSTED
// when the fresh pages do not fit. Either way the layout is unchanged.
absl::StatusOr<CompactionPlan> PlanCompaction(SequenceLayout* layout, const gates::KeepPlan& keep,
                                              PagePool* pool);

// Frees every page of the layout and resets it to empty. A layout already empty is a
// no-op. A page the pool does not hold as allocated (a bookkeeping bug) is INTERNAL and
// frees nothing.
absl::Status Release(SequenceLayout* layout, PagePool* pool);

}  // namespace kvgate::kv
