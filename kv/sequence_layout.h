// File: the head-paged layout of one sequence (architecture.md section 3) and the pure
// functions that plan its data movement. Bookkeeping only: page ids, row indices and
// positions, never backend pointers, so it is tested without hardware. kv_pool.h runs
// the plans on a Backend.
//
// Rows. The page pool is viewed as rows [num_pages * page_tokens, head_dim] ("pool
// rows"): row r of a (layer, kv head) lives in slot
//   s = first_slot + r + (r >= gap_row ? gap_slots : 0)
// of the head's pages, at pool row page_ids[s / page_tokens] * page_tokens + s % page_tokens.
// A page belongs to exactly one (sequence, layer, kv head). Rows are packed in ascending
// position order from first_slot (0 <= first_slot < page_tokens) with at most one gap of
// unused slots before row gap_row, so a head with `length` rows holds
// ceil((first_slot + gap_slots + length) / page_tokens) pages, and a head keeping 0 rows
// holds 0 pages (first_slot 0, no gap). A commit or a compaction leaves no gap and
// first_slot 0. Dropping rows in place (PlanDropRows) advances first_slot when the rows
// dropped are near the front (a sliding window's stale rows), or widens the gap when
// they are next to it (a ring after a frozen selection drops its oldest row just after
// the gap), instead of moving every row after them.
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
#include "kv/row_vector.h"

namespace kvgate::kv {

// Mask byte of a row every query head of its group sees.
inline constexpr uint8_t kAllQueryHeads = 0xFF;
// Score given to a row appended in decode when the layout carries scores: the policy
// has not scored it yet, and +inf keeps it through any threshold until it does.
inline constexpr float kUnscoredRow = std::numeric_limits<float>::infinity();

// The kept rows of one (layer, kv head) of one sequence.
struct HeadPages {
  std::vector<int32_t> page_ids;   // ceil((first_slot + gap_slots + length) / page_tokens) pages, in row order
  int32_t length = 0;              // rows kept
  int32_t first_slot = 0;          // slot of row 0 in the first page, [0, page_tokens)
  // Unused slots before row gap_row. Either no gap (both 0), or 0 < gap_row < length and
  // gap_slots > 0 with no page wholly inside the gap (such a page is freed), so a gap
  // wastes fewer than 2 * page_tokens slots.
  int32_t gap_row = 0;
  int32_t gap_slots = 0;
  RowVector<int32_t> positions;  // [length], strictly ascending original positions
  // [length] when the layout has query masks (bit g = visible to query head g of the
  // group), else empty = every row visible to every query head.
  RowVector<uint8_t> query_mask;
  // [length] when the layout has scores (policies that keep evicting in decode), else
  // empty.
  RowVector<float> scores;
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
  // Slot of kept row `row` (<= length: `length` is where the next row goes) of a head.
  static int32_t SlotOf(const HeadPages& head, int32_t row) {
    return head.first_slot + row + (row >= head.gap_row ? head.gap_slots : 0);
  }
  // Pool row of kept row `row` (< length) of (layer, kv_head).
  int32_t PoolRow(int32_t layer, int32_t kv_head, int32_t row) const;
  int32_t PoolRow(const HeadPages& head, int32_t row) const;
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

// The rows of a head as runs of consecutive slots: none (no rows), one, or two around
// the gap. Rows [row, row + count) live in slots [slot, slot + count).
struct SlotRun {
  int32_t row = 0, slot = 0, count = 0;
};
struct SlotRuns {
  SlotRun runs[2];
  int32_t count = 0;
  const SlotRun* begin() const { return runs; }
  const SlotRun* end() const { return runs + count; }
};
SlotRuns SlotRunsOf(const HeadPages& head);

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

// Rows a decode step drops, per (layer, kv head): ascending row indices (< length) of
// each head, heads in layout order. Either empty (nothing dropped) or one list per head.
using RowDrops = std::vector<std::vector<int32_t>>;

// Dropping rows in place (PlanDropRows). Per head, the dropped rows and the gap are the
// holes; rows in front of the first hole and after the last one can stay. The kept rows
// between the first and the last hole close up behind the rows in front, and the holes
// become the head's one gap. When nothing is kept in front, the rows before the last
// hole move back instead and first_slot advances past the holes; when nothing is kept
// after, those after the first hole move up and the tail is freed. Either way the fewest
// rows move: a ring that drops its oldest row just after a frozen selection (or a few
// sinks) moves none, and widens the gap; a sliding window that drops its oldest rows
// moves none, and advances first_slot. The moves overlap (a row may land where another one
// was), so they go through a staging area:
// `to_stage` copies pool rows to staging rows [0, staged_rows), `from_stage` copies
// staging rows back to pool rows. Pool rows are global, so one list serves every layer.
// Each entry is a run of consecutive rows on both sides (within a page).
struct RowRunCopies {
  std::vector<int32_t> src_rows, dst_rows, lengths;
  int32_t size() const { return static_cast<int32_t>(src_rows.size()); }
};
struct DropPlan {
  RowRunCopies to_stage;
  RowRunCopies from_stage;
  int32_t staged_rows = 0;
  std::vector<int32_t> freed_pages;  // pages left empty, already back in the pool
  std::vector<int32_t> mask_pages;   // pages whose mask bytes must be rewritten
};

// INVALID_ARGUMENT unless `drops` is empty or has one list per head of `layout`, each
// strictly ascending within [0, that head's length).
absl::Status CheckRowDrops(const SequenceLayout& layout, const RowDrops& drops);

// Rows PlanDropRows would move for `drops` (as above) and rows a
// compaction would move (every kept row of a head that loses any), for choosing between
// the two. Drops must be well formed (CheckRowDrops).
struct DropCost {
  int64_t moved_in_place = 0;
  int64_t moved_by_compaction = 0;
};
DropCost CostOfDrop(const SequenceLayout& layout, const RowDrops& drops);

// Drops `drops` in place, as above: positions, masks and scores lose the dropped rows, and
// a head left with no rows releases its pages. INVALID_ARGUMENT for drops of the wrong
// shape or rows not strictly ascending within [0, length); the layout is then unchanged.
// Allocates nothing.
absl::StatusOr<DropPlan> PlanDropRows(SequenceLayout* layout, const RowDrops& drops, PagePool* pool);

// Frees every page of the layout and resets it to empty. A layout already empty is a
// no-op. A page the pool does not hold as allocated (a bookkeeping bug) is INTERNAL and
// frees nothing.
absl::Status Release(SequenceLayout* layout, PagePool* pool);

}  // namespace kvgate::kv
