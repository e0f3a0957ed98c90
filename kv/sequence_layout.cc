#include "kv/sequence_layout.h"

#include <algorithm>
#include <utility>

#include "absl/strings/str_cat.h"
#include "absl/strings/string_view.h"
#include "common/status_macros.h"

namespace kvgate::kv {
namespace {

int64_t PagesFor(int64_t rows, int32_t page_tokens) { return (rows + page_tokens - 1) / page_tokens; }

absl::Status WithContext(const absl::Status& s, absl::string_view what) {
  return absl::Status(s.code(), absl::StrCat(what, ": ", s.message()));
}

// Shape of a keep plan against (num_layers, num_kv_heads).
absl::Status CheckKeepShape(const gates::KeepPlan& plan) {
  if (plan.num_layers <= 0 || plan.num_kv_heads <= 0) {
    return absl::InvalidArgumentError(absl::StrCat("keep plan has ", plan.num_layers, " layers and ",
                                                   plan.num_kv_heads, " kv heads"));
  }
  const int64_t expected = int64_t{plan.num_layers} * plan.num_kv_heads;
  if (static_cast<int64_t>(plan.heads.size()) != expected) {
    return absl::InvalidArgumentError(absl::StrCat("keep plan has ", plan.heads.size(), " heads, expected ",
                                                   plan.num_layers, " x ", plan.num_kv_heads));
  }
  return absl::OkStatus();
}

// Per-row metadata counts of one head of a keep plan, and whether plan-wide scores are
// complete: if any head carries scores, every head that keeps rows must.
absl::Status CheckKeepMetadata(const gates::KeepPlan& plan, bool scores_required) {
  for (int32_t l = 0; l < plan.num_layers; ++l) {
    for (int32_t h = 0; h < plan.num_kv_heads; ++h) {
      const gates::HeadKeep& keep = plan.at(l, h);
      const size_t n = keep.positions.size();
      if (!keep.query_mask.empty() && keep.query_mask.size() != n) {
        return absl::InvalidArgumentError(absl::StrCat("layer ", l, " kv head ", h, ": ", keep.query_mask.size(),
                                                       " query mask bytes for ", n, " kept rows"));
      }
      if (!keep.scores.empty() && keep.scores.size() != n) {
        return absl::InvalidArgumentError(
            absl::StrCat("layer ", l, " kv head ", h, ": ", keep.scores.size(), " scores for ", n, " kept rows"));
      }
      if (scores_required && n > 0 && keep.scores.empty()) {
        return absl::InvalidArgumentError(
            absl::StrCat("layer ", l, " kv head ", h, " keeps ", n,
                         " rows without scores while other heads carry scores"));
      }
    }
  }
  return absl::OkStatus();
}

bool AnyQueryMask(const gates::KeepPlan& plan) {
  for (const gates::HeadKeep& h : plan.heads) {
    if (!h.query_mask.empty()) return true;
  }
  return false;
}

bool AnyScores(const gates::KeepPlan& plan) {
  for (const gates::HeadKeep& h : plan.heads) {
    if (!h.scores.empty()) return true;
  }
  return false;
}

// Row indices (into `current`) of `keep`, which must be strictly ascending and a subset
// of the strictly ascending `current`.
absl::StatusOr<std::vector<int32_t>> MatchKept(absl::Span<const int32_t> current,
                                               absl::Span<const int32_t> keep) {
  std::vector<int32_t> rows;
  rows.reserve(keep.size());
  size_t j = 0;
  for (size_t i = 0; i < keep.size(); ++i) {
    if (i > 0 && keep[i] <= keep[i - 1]) {
      return absl::InvalidArgumentError(absl::StrCat("kept positions not strictly ascending at index ", i,
                                                     ": ", keep[i - 1], " then ", keep[i]));
    }
    while (j < current.size() && current[j] < keep[i]) ++j;
    if (j == current.size() || current[j] != keep[i]) {
      return absl::InvalidArgumentError(absl::StrCat("kept position ", keep[i], " is not held"));
    }
    rows.push_back(static_cast<int32_t>(j++));
  }
  return rows;
}

}  // namespace

int32_t SequenceLayout::PoolRow(int32_t layer, int32_t kv_head, int32_t row) const {
  return PoolRow(at(layer, kv_head), row);
}

int32_t SequenceLayout::PoolRow(const HeadPages& head, int32_t row) const {
  const int32_t slot = SlotOf(head, row);
  return head.page_ids[slot / page_tokens] * page_tokens + slot % page_tokens;
}

SlotRuns SlotRunsOf(const HeadPages& head) {
  SlotRuns out;
  if (head.length == 0) return out;
  if (head.gap_slots == 0) {
    out.runs[out.count++] = {0, head.first_slot, head.length};
    return out;
  }
  out.runs[out.count++] = {0, head.first_slot, head.gap_row};
  out.runs[out.count++] = {head.gap_row, head.first_slot + head.gap_row + head.gap_slots, head.length - head.gap_row};
  return out;
}

int64_t SequenceLayout::NumPages() const {
  int64_t total = 0;
  for (const HeadPages& hp : heads) total += static_cast<int64_t>(hp.page_ids.size());
  return total;
}

int64_t SequenceLayout::NumRows() const {
  int64_t total = 0;
  for (const HeadPages& hp : heads) total += hp.length;
  return total;
}

std::vector<int32_t> SequenceLayout::AllPages() const {
  std::vector<int32_t> pages;
  pages.reserve(static_cast<size_t>(NumPages()));
  for (const HeadPages& hp : heads) pages.insert(pages.end(), hp.page_ids.begin(), hp.page_ids.end());
  return pages;
}

absl::Status SequenceLayout::CheckInvariants() const {
  if (heads.empty()) return absl::OkStatus();
  if (num_layers <= 0 || num_kv_heads <= 0 || page_tokens <= 0 ||
      static_cast<int64_t>(heads.size()) != int64_t{num_layers} * num_kv_heads) {
    return absl::InternalError(absl::StrCat("layout shape: ", num_layers, " layers x ", num_kv_heads,
                                            " kv heads, ", heads.size(), " heads, page_tokens ", page_tokens));
  }
  for (int32_t l = 0; l < num_layers; ++l) {
    for (int32_t h = 0; h < num_kv_heads; ++h) {
      const HeadPages& hp = at(l, h);
      const std::string where = absl::StrCat("layer ", l, " kv head ", h, ": ");
      if (hp.length < 0 || static_cast<int64_t>(hp.positions.size()) != hp.length) {
        return absl::InternalError(absl::StrCat(where, "length ", hp.length, ", ", hp.positions.size(), " positions"));
      }
      if (hp.first_slot < 0 || hp.first_slot >= page_tokens || (hp.length == 0 && hp.first_slot != 0)) {
        return absl::InternalError(absl::StrCat(where, "first slot ", hp.first_slot, " with ", hp.length, " rows"));
      }
      if (hp.gap_slots < 0 || (hp.gap_slots == 0 && hp.gap_row != 0) ||
          (hp.gap_slots > 0 && (hp.gap_row <= 0 || hp.gap_row >= hp.length))) {
        return absl::InternalError(absl::StrCat(where, "gap of ", hp.gap_slots, " slots before row ", hp.gap_row,
                                                " of ", hp.length));
      }
      if (hp.gap_slots > 0) {
        const int32_t gap_begin = hp.first_slot + hp.gap_row;
        const int32_t first_whole_page = (gap_begin + page_tokens - 1) / page_tokens * page_tokens;
        if (first_whole_page + page_tokens <= gap_begin + hp.gap_slots) {
          return absl::InternalError(absl::StrCat(where, "a page wholly inside the gap of ", hp.gap_slots,
                                                  " slots from slot ", gap_begin));
        }
      }
      if (static_cast<int64_t>(hp.page_ids.size()) !=
          PagesFor(int64_t{hp.first_slot} + hp.gap_slots + hp.length, page_tokens)) {
        return absl::InternalError(absl::StrCat(where, hp.page_ids.size(), " pages for ", hp.length,
                                                " rows from slot ", hp.first_slot, " with a gap of ", hp.gap_slots));
      }
      if (hp.query_mask.size() != (has_query_masks ? hp.positions.size() : 0)) {
        return absl::InternalError(absl::StrCat(where, hp.query_mask.size(), " mask bytes"));
      }
      if (hp.scores.size() != (has_scores ? hp.positions.size() : 0)) {
        return absl::InternalError(absl::StrCat(where, hp.scores.size(), " scores"));
      }
      for (size_t i = 0; i < hp.positions.size(); ++i) {
        if ((i > 0 && hp.positions[i] <= hp.positions[i - 1]) || hp.positions[i] < 0 ||
            hp.positions[i] >= next_pos) {
          return absl::InternalError(absl::StrCat(where, "position ", hp.positions[i], " at row ", i,
                                                  " (next_pos ", next_pos, ")"));
        }
      }
    }
  }
  return absl::OkStatus();
}

absl::StatusOr<CommitPlan> PlanCommit(const gates::KeepPlan& plan, int32_t capacity_tokens,
                                      int32_t page_tokens, PagePool* pool) {
  if (page_tokens <= 0) return absl::InvalidArgumentError(absl::StrCat("page_tokens ", page_tokens));
  KVGATE_RETURN_IF_ERROR(CheckKeepShape(plan));
  if (plan.prompt_tokens < 0 || plan.prompt_tokens > capacity_tokens) {
    return absl::InvalidArgumentError(absl::StrCat("prompt of ", plan.prompt_tokens,
                                                   " tokens does not fit a cache of ", capacity_tokens));
  }
  if (int64_t{plan.num_kv_heads} * capacity_tokens > std::numeric_limits<int32_t>::max()) {
    return absl::InvalidArgumentError(absl::StrCat(plan.num_kv_heads, " kv heads x ", capacity_tokens,
                                                   " tokens overflow int32 row ids"));
  }
  const bool has_masks = AnyQueryMask(plan), has_scores = AnyScores(plan);
  KVGATE_RETURN_IF_ERROR(CheckKeepMetadata(plan, has_scores));
  int64_t total_pages = 0;
  for (int32_t l = 0; l < plan.num_layers; ++l) {
    for (int32_t h = 0; h < plan.num_kv_heads; ++h) {
      const std::vector<int32_t>& pos = plan.at(l, h).positions;
      for (size_t i = 0; i < pos.size(); ++i) {
        if (pos[i] < 0 || pos[i] >= plan.prompt_tokens || (i > 0 && pos[i] <= pos[i - 1])) {
          return absl::InvalidArgumentError(absl::StrCat("layer ", l, " kv head ", h, ": kept position ",
                                                         pos[i], " at index ", i,
                                                         " is not strictly ascending within [0, ",
                                                         plan.prompt_tokens, ")"));
        }
      }
      total_pages += PagesFor(static_cast<int64_t>(pos.size()), page_tokens);
    }
  }
  if (total_pages > pool->num_free()) {
    return absl::ResourceExhaustedError(absl::StrCat("KV page pool exhausted: commit of ", plan.KeptEntries(),
                                                     " rows needs ", total_pages, " pages, ", pool->num_free(),
                                                     " free of ", pool->num_total()));
  }
  auto pages = pool->Allocate(static_cast<int32_t>(total_pages));
  if (!pages.ok()) return WithContext(pages.status(), absl::StrCat("commit of ", plan.KeptEntries(), " rows"));

  CommitPlan out;
  SequenceLayout& layout = out.layout;
  layout.num_layers = plan.num_layers;
  layout.num_kv_heads = plan.num_kv_heads;
  layout.page_tokens = page_tokens;
  layout.next_pos = plan.prompt_tokens;
  layout.has_query_masks = has_masks;
  layout.has_scores = has_scores;
  layout.heads.resize(plan.heads.size());
  out.copies.resize(plan.num_layers);
  size_t next_page = 0;
  for (int32_t l = 0; l < plan.num_layers; ++l) {
    RowCopies& copies = out.copies[l];
    size_t layer_rows = 0;
    for (int32_t h = 0; h < plan.num_kv_heads; ++h) layer_rows += plan.at(l, h).positions.size();
    copies.src_rows.reserve(layer_rows);
    copies.dst_rows.reserve(layer_rows);
    for (int32_t h = 0; h < plan.num_kv_heads; ++h) {
      const gates::HeadKeep& keep = plan.at(l, h);
      HeadPages& hp = layout.at(l, h);
      const int32_t n = static_cast<int32_t>(keep.positions.size());
      hp.length = n;
      hp.positions = keep.positions;
      if (has_masks) {
        hp.query_mask = keep.query_mask.empty() ? std::vector<uint8_t>(n, kAllQueryHeads) : keep.query_mask;
      }
      if (has_scores) hp.scores = keep.scores;
      const int64_t num_pages = PagesFor(n, page_tokens);
      hp.page_ids.assign(pages->begin() + next_page, pages->begin() + next_page + num_pages);
      next_page += num_pages;
      const int32_t src_base = h * capacity_tokens;
      for (int32_t r = 0; r < n; ++r) {
        copies.src_rows.push_back(src_base + keep.positions[r]);
        copies.dst_rows.push_back(hp.page_ids[static_cast<size_t>(r / page_tokens)] * page_tokens + r % page_tokens);
      }
    }
  }
  return out;
}

absl::StatusOr<AppendPlan> PlanAppend(SequenceLayout* layout, PagePool* pool) {
  if (layout->heads.empty()) {
    return absl::FailedPreconditionError("decode append to a sequence with no committed layout");
  }
  if (layout->next_pos == std::numeric_limits<int32_t>::max()) {
    return absl::InvalidArgumentError("decode position overflows int32");
  }
  const int32_t pt = layout->page_tokens;
  int32_t needed = 0;
  for (const HeadPages& hp : layout->heads) needed += SequenceLayout::SlotOf(hp, hp.length) % pt == 0 ? 1 : 0;
  auto pages = pool->Allocate(needed);
  if (!pages.ok()) return WithContext(pages.status(), absl::StrCat("decode step at position ", layout->next_pos));

  AppendPlan plan;
  plan.position = layout->next_pos;
  plan.num_layers = layout->num_layers;
  plan.num_kv_heads = layout->num_kv_heads;
  plan.dst_rows.reserve(layout->heads.size());
  size_t next_page = 0;
  for (int32_t l = 0; l < layout->num_layers; ++l) {
    for (int32_t h = 0; h < layout->num_kv_heads; ++h) {
      HeadPages& hp = layout->at(l, h);
      if (SequenceLayout::SlotOf(hp, hp.length) % pt == 0) hp.page_ids.push_back((*pages)[next_page++]);
      plan.dst_rows.push_back(layout->PoolRow(hp, hp.length));
      hp.positions.push_back(plan.position);
      if (layout->has_query_masks) hp.query_mask.push_back(kAllQueryHeads);
      if (layout->has_scores) hp.scores.push_back(kUnscoredRow);
      ++hp.length;
    }
  }
  plan.new_pages = std::move(*pages);
  ++layout->next_pos;
  return plan;
}

absl::StatusOr<CompactionPlan> PlanCompaction(SequenceLayout* layout, const gates::KeepPlan& keep,
                                              PagePool* pool) {
  if (layout->heads.empty()) return absl::FailedPreconditionError("compaction of a sequence with no layout");
  KVGATE_RETURN_IF_ERROR(CheckKeepShape(keep));
  if (keep.num_layers != layout->num_layers || keep.num_kv_heads != layout->num_kv_heads) {
    return absl::InvalidArgumentError(absl::StrCat("keep plan of ", keep.num_layers, " x ", keep.num_kv_heads,
                                                   " heads for a layout of ", layout->num_layers, " x ",
                                                   layout->num_kv_heads));
  }
  const bool new_masks = layout->has_query_masks || AnyQueryMask(keep);
  const bool new_scores = layout->has_scores || AnyScores(keep);
  // Scores must come from somewhere: the keep plan, or rows that already carry them.
  KVGATE_RETURN_IF_ERROR(CheckKeepMetadata(keep, new_scores && !layout->has_scores));

  const int32_t pt = layout->page_tokens;
  const size_t num_heads = layout->heads.size();
  std::vector<std::vector<int32_t>> kept_rows(num_heads);  // indices into the current rows
  std::vector<bool> moves(num_heads, false);
  int64_t fresh_pages = 0;
  for (int32_t l = 0; l < layout->num_layers; ++l) {
    for (int32_t h = 0; h < layout->num_kv_heads; ++h) {
      const size_t i = static_cast<size_t>(l) * layout->num_kv_heads + h;
      auto rows = MatchKept(layout->heads[i].positions, keep.heads[i].positions);
      if (!rows.ok()) return WithContext(rows.status(), absl::StrCat("layer ", l, " kv head ", h));
      kept_rows[i] = std::move(*rows);
      moves[i] = static_cast<int32_t>(kept_rows[i].size()) != layout->heads[i].length;
      if (moves[i]) fresh_pages += PagesFor(static_cast<int64_t>(kept_rows[i].size()), pt);
    }
  }
  if (fresh_pages > pool->num_free()) {
    return absl::ResourceExhaustedError(absl::StrCat("KV page pool exhausted: compaction needs ", fresh_pages,
                                                     " fresh pages before it frees any, ", pool->num_free(),
                                                     " free of ", pool->num_total()));
  }
  auto pages = pool->Allocate(static_cast<int32_t>(fresh_pages));
  if (!pages.ok()) return WithContext(pages.status(), "compaction");

  CompactionPlan plan;
  plan.copies.resize(layout->num_layers);
  std::vector<HeadPages> heads(num_heads);
  size_t next_page = 0;
  for (int32_t l = 0; l < layout->num_layers; ++l) {
    for (int32_t h = 0; h < layout->num_kv_heads; ++h) {
      const size_t i = static_cast<size_t>(l) * layout->num_kv_heads + h;
      const HeadPages& old = layout->heads[i];
      const gates::HeadKeep& k = keep.heads[i];
      const std::vector<int32_t>& rows = kept_rows[i];
      const int32_t n = static_cast<int32_t>(rows.size());
      HeadPages& hp = heads[i];
      hp.length = n;
      hp.positions = k.positions;
      if (new_masks) {
        if (!k.query_mask.empty()) {
          hp.query_mask = k.query_mask;
        } else if (layout->has_query_masks) {
          for (int32_t r : rows) hp.query_mask.push_back(old.query_mask[r]);
        } else {
          hp.query_mask.assign(n, kAllQueryHeads);
        }
      }
      if (new_scores) {
        if (!k.scores.empty()) {
          hp.scores = k.scores;
        } else {
          for (int32_t r : rows) hp.scores.push_back(old.scores[r]);
        }
      }
      if (!moves[i]) {
        hp.page_ids = old.page_ids;
        hp.first_slot = old.first_slot;
        hp.gap_row = old.gap_row;
        hp.gap_slots = old.gap_slots;
        // Unmoved rows keep their pages; their mask bytes change only if the masks do.
        const bool old_all_visible = !layout->has_query_masks;
        bool mask_changed = false;
        for (int32_t r = 0; r < n && new_masks && !mask_changed; ++r) {
          const uint8_t before = old_all_visible ? kAllQueryHeads : old.query_mask[r];
          mask_changed = hp.query_mask[r] != before;
        }
        if (mask_changed) plan.mask_pages.insert(plan.mask_pages.end(), hp.page_ids.begin(), hp.page_ids.end());
        continue;
      }
      const int64_t num_pages = PagesFor(n, pt);
      hp.page_ids.assign(pages->begin() + next_page, pages->begin() + next_page + num_pages);
      next_page += num_pages;
      plan.mask_pages.insert(plan.mask_pages.end(), hp.page_ids.begin(), hp.page_ids.end());
      plan.freed_pages.insert(plan.freed_pages.end(), old.page_ids.begin(), old.page_ids.end());
      RowCopies& copies = plan.copies[l];
      for (int32_t r = 0; r < n; ++r) {
        copies.src_rows.push_back(layout->PoolRow(old, rows[r]));
        copies.dst_rows.push_back(hp.page_ids[r / pt] * pt + r % pt);
      }
    }
  }
  absl::Status freed = pool->Free(plan.freed_pages);
  if (!freed.ok()) {
    // The layout held a page the pool does not: a bookkeeping bug. Undo the allocation.
    (void)pool->Free(*pages);
    return absl::InternalError(absl::StrCat("compaction: ", freed.message()));
  }
  plan.new_pages = std::move(*pages);
  layout->heads = std::move(heads);
  layout->has_query_masks = new_masks;
  layout->has_scores = new_scores;
  return plan;
}

namespace {

// Drops of one head: strictly ascending within [0, length).
absl::Status CheckHeadDrops(const HeadPages& head, absl::Span<const int32_t> drops) {
  for (size_t k = 0; k < drops.size(); ++k) {
    if (drops[k] < 0 || drops[k] >= head.length || (k > 0 && drops[k] <= drops[k - 1])) {
      return absl::InvalidArgumentError(absl::StrCat("dropped row ", drops[k], " at index ", k, " of a head of ",
                                                     head.length, " rows (drops must ascend)"));
    }
  }
  return absl::OkStatus();
}

}  // namespace

namespace {

// One head's kept rows as segments of consecutive slots, split by the holes (dropped rows
// and the gap), in row order; empty segments are left out.
struct Segment {
  int32_t row_begin = 0, rows = 0;
  int32_t kept_begin = 0;  // index of the first row among the kept rows
  int32_t slot = 0;        // slot of the first row, now
};

// How PlanDropRows moves one head: the largest segment and the next largest stay (the
// anchors); every other segment closes up on them, and the holes between the anchors
// become the one gap. Kept row k then lives at slot first_slot + k, or from gap_row on at
// gap_end_slot + (k - gap_row).
struct HeadDrop {
  std::vector<Segment> segments;
  int32_t kept = 0;
  int32_t moved = 0;           // kept rows that change slot
  int32_t first_slot = 0;      // may reach past the first page(s), which then empty
  int32_t gap_row = 0;         // kept when there is one anchor (no gap)
  int32_t gap_end_slot = 0;    // slot of kept row gap_row
  int32_t SlotOf(int32_t k) const { return k < gap_row ? first_slot + k : gap_end_slot + (k - gap_row); }
};

void PlanHeadDrop(const HeadPages& head, absl::Span<const int32_t> drop, HeadDrop* d) {
  d->segments.clear();
  d->kept = head.length - static_cast<int32_t>(drop.size());
  int32_t kept_index = 0;
  const auto add = [&](int32_t begin, int32_t end) {
    if (end <= begin) return;
    d->segments.push_back({begin, end - begin, kept_index, SequenceLayout::SlotOf(head, begin)});
    kept_index += end - begin;
  };
  const auto add_split_at_gap = [&](int32_t begin, int32_t end) {
    if (head.gap_slots > 0 && begin < head.gap_row && head.gap_row < end) {
      add(begin, head.gap_row);
      add(head.gap_row, end);
    } else {
      add(begin, end);
    }
  };
  int32_t row = 0;
  for (int32_t dropped : drop) {
    add_split_at_gap(row, dropped);
    row = dropped + 1;
  }
  add_split_at_gap(row, head.length);
  d->moved = 0;
  d->first_slot = 0;
  d->gap_row = d->kept;
  d->gap_end_slot = 0;
  if (d->segments.empty()) return;
  size_t first = 0, second = d->segments.size();
  for (size_t i = 1; i < d->segments.size(); ++i) {
    if (d->segments[i].rows > d->segments[first].rows) {
      second = first;
      first = i;
    } else if (second == d->segments.size() || d->segments[i].rows > d->segments[second].rows) {
      second = i;
    }
  }
  const Segment& left = d->segments[std::min(first, second)];
  d->first_slot = left.slot - left.kept_begin;
  d->gap_end_slot = d->first_slot + d->kept;  // no gap: SlotOf(kept) is the end
  d->moved = d->kept - d->segments[first].rows;
  if (second < d->segments.size()) {
    const Segment& right = d->segments[std::max(first, second)];
    d->gap_row = right.kept_begin;
    d->gap_end_slot = right.slot;
    d->moved -= d->segments[second].rows;
  }
}

// Erases the dropped rows of one head's metadata, keeping the order of the rest, from the
// cheaper side (a memmove per run between two drops): the rows in front of the last drop
// move back and the front goes, or those after the first drop move up and the tail goes.
template <typename Values>
void EraseRows(absl::Span<const int32_t> drop, Values& values) {
  if (values.empty()) return;
  const int32_t dropped = static_cast<int32_t>(drop.size());
  const int32_t front_cost = drop.back() - (dropped - 1);
  const int32_t back_cost = static_cast<int32_t>(values.size()) - drop.front() - dropped;
  if (front_cost <= back_cost) {
    // Runs between drops, last first: the run before drop j moves back by the drops from
    // j on, which lands it `dropped` places after its new index; then the front goes.
    for (size_t j = drop.size(); j-- > 0;) {
      const int32_t run_begin = j == 0 ? 0 : drop[j - 1] + 1;
      const int32_t shift_by = static_cast<int32_t>(drop.size() - j);
      std::copy_backward(values.begin() + run_begin, values.begin() + drop[j], values.begin() + drop[j] + shift_by);
    }
    values.erase_front(drop.size());
    return;
  }
  for (size_t j = 0; j < drop.size(); ++j) {
    const int32_t run_end = j + 1 < drop.size() ? drop[j + 1] : static_cast<int32_t>(values.size());
    std::copy(values.begin() + drop[j] + 1, values.begin() + run_end,
              values.begin() + drop[j] - static_cast<int32_t>(j));
  }
  values.resize(values.size() - drop.size());
}

}  // namespace

DropCost CostOfDrop(const SequenceLayout& layout, const RowDrops& drops) {
  DropCost cost;
  HeadDrop d;
  for (size_t i = 0; i < drops.size() && i < layout.heads.size(); ++i) {
    if (drops[i].empty()) continue;
    PlanHeadDrop(layout.heads[i], drops[i], &d);
    cost.moved_in_place += d.moved;
    cost.moved_by_compaction += layout.heads[i].length - static_cast<int64_t>(drops[i].size());
  }
  return cost;
}

absl::Status CheckRowDrops(const SequenceLayout& layout, const RowDrops& drops) {
  if (drops.empty()) return absl::OkStatus();
  if (drops.size() != layout.heads.size()) {
    return absl::InvalidArgumentError(absl::StrCat("drops for ", drops.size(), " heads; the layout has ",
                                                   layout.heads.size()));
  }
  for (size_t i = 0; i < drops.size(); ++i) {
    absl::Status ok = CheckHeadDrops(layout.heads[i], drops[i]);
    if (!ok.ok()) {
      return WithContext(ok, absl::StrCat("layer ", i / layout.num_kv_heads, " kv head ", i % layout.num_kv_heads));
    }
  }
  return absl::OkStatus();
}

absl::StatusOr<DropPlan> PlanDropRows(SequenceLayout* layout, const RowDrops& drops, PagePool* pool) {
  if (drops.empty()) return DropPlan{};
  KVGATE_RETURN_IF_ERROR(CheckRowDrops(*layout, drops));
  const int32_t pt = layout->page_tokens;
  DropPlan plan;
  HeadDrop d;
  for (size_t i = 0; i < drops.size(); ++i) {
    const absl::Span<const int32_t> drop = drops[i];
    if (drop.empty()) continue;
    HeadPages& hp = layout->heads[i];
    PlanHeadDrop(hp, drop, &d);
    if (d.kept == 0) {
      plan.freed_pages.insert(plan.freed_pages.end(), hp.page_ids.begin(), hp.page_ids.end());
      hp = HeadPages{};
      continue;
    }
    // Segments that move go as runs, split where either side crosses a page; their new
    // pages' mask bytes are rewritten.
    int32_t last_mask_page = -1;
    for (const Segment& segment : d.segments) {
      const int32_t new_first = d.SlotOf(segment.kept_begin);
      if (new_first == segment.slot) continue;
      for (int32_t r = 0; r < segment.rows;) {
        const int32_t old_slot = segment.slot + r, new_slot = new_first + r;
        const int32_t run = std::min({segment.rows - r, pt - old_slot % pt, pt - new_slot % pt});
        const int32_t new_page = hp.page_ids[new_slot / pt];
        plan.to_stage.src_rows.push_back(hp.page_ids[old_slot / pt] * pt + old_slot % pt);
        plan.to_stage.dst_rows.push_back(plan.staged_rows);
        plan.to_stage.lengths.push_back(run);
        plan.from_stage.src_rows.push_back(plan.staged_rows);
        plan.from_stage.dst_rows.push_back(new_page * pt + new_slot % pt);
        plan.from_stage.lengths.push_back(run);
        plan.staged_rows += run;
        if (layout->has_query_masks && new_page != last_mask_page) plan.mask_pages.push_back(last_mask_page = new_page);
        r += run;
      }
    }
    EraseRows(drop, hp.positions);
    EraseRows(drop, hp.query_mask);
    EraseRows(drop, hp.scores);
    const int32_t old_end_slot = SequenceLayout::SlotOf(hp, hp.length);
    hp.length = d.kept;
    const int32_t end_slot = d.SlotOf(d.kept);
    const int32_t end_page = (end_slot + pt - 1) / pt;
    // Appends write no mask byte, so the slots a shorter tail vacates in its last page
    // must read 0xFF again (WriteMasks fills a page's slots outside the head's rows so).
    if (layout->has_query_masks && end_slot < old_end_slot && end_slot % pt != 0 &&
        hp.page_ids[end_slot / pt] != last_mask_page) {
      plan.mask_pages.push_back(hp.page_ids[end_slot / pt]);
    }
    // Pages wholly before the first slot, wholly inside the gap or wholly after the last
    // row are left empty.
    const int32_t front_pages = d.first_slot / pt;
    const int32_t gap_begin = d.first_slot + d.gap_row;
    const int32_t gap_slots = d.gap_row < d.kept ? d.gap_end_slot - gap_begin : 0;
    const int32_t gap_first_page = (gap_begin + pt - 1) / pt;
    const int32_t gap_end_page = (gap_begin + gap_slots) / pt;
    const int32_t gap_pages = gap_slots > 0 ? std::max(0, gap_end_page - gap_first_page) : 0;
    if (front_pages > 0 || gap_pages > 0 || end_page < static_cast<int32_t>(hp.page_ids.size())) {
      int32_t kept_pages = 0;
      for (int32_t p = 0; p < static_cast<int32_t>(hp.page_ids.size()); ++p) {
        const bool freed =
            p < front_pages || p >= end_page || (gap_pages > 0 && p >= gap_first_page && p < gap_end_page);
        if (freed) {
          plan.freed_pages.push_back(hp.page_ids[p]);
        } else {
          hp.page_ids[kept_pages++] = hp.page_ids[p];
        }
      }
      hp.page_ids.resize(kept_pages);
    }
    hp.first_slot = d.first_slot - front_pages * pt;
    hp.gap_slots = gap_slots - gap_pages * pt;
    hp.gap_row = hp.gap_slots > 0 ? d.gap_row : 0;
  }
  absl::Status freed = pool->Free(plan.freed_pages);
  if (!freed.ok()) return absl::InternalError(absl::StrCat("drop rows: ", freed.message()));
  return plan;
}

absl::Status Release(SequenceLayout* layout, PagePool* pool) {
  absl::Status freed = pool->Free(layout->AllPages());
  if (!freed.ok()) return absl::InternalError(absl::StrCat("release: ", freed.message()));
  *layout = SequenceLayout{};
  return absl::OkStatus();
}

}  // namespace kvgate::kv
