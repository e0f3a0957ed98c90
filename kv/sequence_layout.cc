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
  const int32_t slot = head.first_slot + row;
  return head.page_ids[slot / page_tokens] * page_tokens + slot % page_tokens;
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
      if (static_cast<int64_t>(hp.page_ids.size()) != PagesFor(int64_t{hp.first_slot} + hp.length, page_tokens)) {
        return absl::InternalError(absl::StrCat(where, hp.page_ids.size(), " pages for ", hp.length,
                                                " rows from slot ", hp.first_slot));
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
  for (const HeadPages& hp : layout->heads) needed += (hp.first_slot + hp.length) % pt == 0 ? 1 : 0;
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
      if ((hp.first_slot + hp.length) % pt == 0) hp.page_ids.push_back((*pages)[next_page++]);
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

// Kept rows a drop moves if the rows in front of the last drop shift back (first_slot
// advances), and if the rows after the first drop shift forward instead.
struct ShiftCosts {
  int32_t front = 0, back = 0;
};
ShiftCosts ShiftCostsOf(const HeadPages& head, absl::Span<const int32_t> drop) {
  const int32_t dropped = static_cast<int32_t>(drop.size());
  return {drop.back() - (dropped - 1), head.length - drop.front() - dropped};
}

}  // namespace

DropCost CostOfDrop(const SequenceLayout& layout, const RowDrops& drops) {
  DropCost cost;
  for (size_t i = 0; i < drops.size() && i < layout.heads.size(); ++i) {
    if (drops[i].empty()) continue;
    const ShiftCosts shift = ShiftCostsOf(layout.heads[i], drops[i]);
    cost.moved_in_place += std::min(shift.front, shift.back);
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
  for (size_t i = 0; i < drops.size(); ++i) {
    const absl::Span<const int32_t> drop = drops[i];
    if (drop.empty()) continue;
    HeadPages& hp = layout->heads[i];
    const int32_t dropped = static_cast<int32_t>(drop.size());
    if (dropped == hp.length) {
      plan.freed_pages.insert(plan.freed_pages.end(), hp.page_ids.begin(), hp.page_ids.end());
      hp = HeadPages{};
      continue;
    }
    // Kept row k (in order) goes to slot base + k of the old pages: base past the dropped
    // count when the front shifts, the old first slot when the back does. Rows whose slot
    // does not change stay; the rest go through the staging rows.
    const ShiftCosts shift = ShiftCostsOf(hp, drop);
    const bool shift_front = shift.front <= shift.back;
    const int32_t base = hp.first_slot + (shift_front ? dropped : 0);
    const int32_t kept = hp.length - dropped;
    int32_t first_moved_slot = -1, last_moved_slot = -1;
    // Only rows on the shifting side can move: the kept rows in front of the last drop,
    // or those after the first one. They go as runs of consecutive kept rows between two
    // drops, split where either side crosses a page.
    const auto move_segment = [&](int32_t row_begin, int32_t row_end, int32_t new_index) {
      const int32_t old_first = hp.first_slot + row_begin, new_first = base + new_index;
      if (row_end <= row_begin || old_first == new_first) return;
      for (int32_t i = 0; i < row_end - row_begin;) {
        const int32_t old_slot = old_first + i, new_slot = new_first + i;
        const int32_t run = std::min({row_end - row_begin - i, pt - old_slot % pt, pt - new_slot % pt});
        plan.to_stage.src_rows.push_back(hp.page_ids[old_slot / pt] * pt + old_slot % pt);
        plan.to_stage.dst_rows.push_back(plan.staged_rows);
        plan.to_stage.lengths.push_back(run);
        plan.from_stage.src_rows.push_back(plan.staged_rows);
        plan.from_stage.dst_rows.push_back(hp.page_ids[new_slot / pt] * pt + new_slot % pt);
        plan.from_stage.lengths.push_back(run);
        plan.staged_rows += run;
        i += run;
      }
      if (first_moved_slot < 0) first_moved_slot = new_first;
      last_moved_slot = new_first + (row_end - row_begin) - 1;
    };
    if (shift_front) {
      int32_t row = 0;
      for (size_t j = 0; j < drop.size(); ++j) {  // kept rows [row, drop j) follow j drops
        move_segment(row, drop[j], row - static_cast<int32_t>(j));
        row = drop[j] + 1;
      }
    } else {
      for (size_t j = 0; j < drop.size(); ++j) {
        const int32_t row_end = j + 1 < drop.size() ? drop[j + 1] : hp.length;
        move_segment(drop[j] + 1, row_end, drop[j] + 1 - static_cast<int32_t>(j + 1));
      }
    }
    // Host metadata: erase the dropped rows, keeping the order of the rest, on the same
    // side as the rows (a memmove per run between two drops): the kept rows in front of
    // the last drop move back and the front is dropped, or those after the first drop
    // move up and the tail is cut.
    auto erase_rows = [&](auto& values) {
      if (values.empty()) return;
      if (shift_front) {
        // Runs between drops, last first: the run before drop j moves back by the drops
        // from j on, which lands it `dropped` places after its new index; then the front
        // `dropped` places go.
        for (size_t j = drop.size(); j-- > 0;) {
          const int32_t run_begin = j == 0 ? 0 : drop[j - 1] + 1;
          const int32_t shift_by = static_cast<int32_t>(drop.size() - j);
          std::copy_backward(values.begin() + run_begin, values.begin() + drop[j],
                             values.begin() + drop[j] + shift_by);
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
    };
    erase_rows(hp.positions);
    erase_rows(hp.query_mask);
    erase_rows(hp.scores);
    hp.length = kept;
    // Pages wholly before slot base or wholly after the last kept row are left empty.
    const int32_t front_pages = base / pt;
    const int32_t end_page = (base + kept + pt - 1) / pt;
    if (layout->has_query_masks) {
      // Mask bytes change where rows land and, when the back shifts, in the slots it
      // vacates in the last kept page: appends write no mask byte, so those must read
      // 0xFF again (WriteMasks fills a page's slots past the head's rows with 0xFF).
      int32_t from = first_moved_slot, to = last_moved_slot;
      if (!shift_front) {
        from = first_moved_slot >= 0 ? std::min(first_moved_slot, base + kept) : base + kept;
        to = (end_page - 1) * pt;
      }
      for (int32_t p = from >= 0 ? from / pt : 0; from >= 0 && p <= to / pt && p < end_page; ++p) {
        plan.mask_pages.push_back(hp.page_ids[p]);
      }
    }
    plan.freed_pages.insert(plan.freed_pages.end(), hp.page_ids.begin() + end_page, hp.page_ids.end());
    hp.page_ids.resize(end_page);
    plan.freed_pages.insert(plan.freed_pages.end(), hp.page_ids.begin(), hp.page_ids.begin() + front_pages);
    hp.page_ids.erase(hp.page_ids.begin(), hp.page_ids.begin() + front_pages);
    hp.first_slot = base % pt;
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
