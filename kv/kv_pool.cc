#include "kv/kv_pool.h"

#include <algorithm>
#include <bit>
#include <cstdint>
#include <cstring>
#include <limits>
#include <numeric>
#include <utility>

#include "absl/strings/str_cat.h"
#include "absl/strings/string_view.h"
#include "common/status_macros.h"
#include "cuda/bf16.h"

namespace kvgate::kv {
namespace {

// Row copies as runs of consecutive rows on both sides, at most kMaxRunRows each (a warp
// copies a run, so runs stay short enough to spread over the GPU).
constexpr int32_t kMaxRunRows = 64;
struct RowRuns {
  std::vector<int32_t> src, dst, length;
};
RowRuns ToRowRuns(const RowCopies& copies) {
  RowRuns runs;
  for (int32_t i = 0; i < copies.size(); ++i) {
    const int32_t s = copies.src_rows[i], d = copies.dst_rows[i];
    if (!runs.src.empty() && runs.length.back() < kMaxRunRows && s == runs.src.back() + runs.length.back() &&
        d == runs.dst.back() + runs.length.back()) {
      ++runs.length.back();
      continue;
    }
    runs.src.push_back(s);
    runs.dst.push_back(d);
    runs.length.push_back(1);
  }
  return runs;
}

absl::Status WithContext(const absl::Status& s, absl::string_view what) {
  if (s.ok()) return s;
  return absl::Status(s.code(), absl::StrCat(what, ": ", s.message()));
}

// Smallest index scratch worth allocating, in int32 entries.
constexpr size_t kMinScratchEntries = 1024;

}  // namespace

absl::StatusOr<std::optional<ops::KvDtype>> ParseKvCacheDtype(std::string_view name) {
  if (name == "auto") return std::optional<ops::KvDtype>();
  if (name == "float32") return std::optional<ops::KvDtype>(ops::KvDtype::kFloat32);
  if (name == "bf16") return std::optional<ops::KvDtype>(ops::KvDtype::kBf16);
  return absl::InvalidArgumentError(
      absl::StrCat("--kv-cache-dtype must be auto, float32 or bf16, got '", std::string(name), "'"));
}

ops::KvDtype KvPool::AutoDtype(const ops::Backend& backend) {
  return backend.SupportsBf16() ? ops::KvDtype::kBf16 : ops::KvDtype::kFloat32;
}

absl::StatusOr<std::unique_ptr<KvPool>> KvPool::Create(ops::Backend* backend, int32_t num_pages,
                                                       int32_t page_tokens, int32_t head_dim, ops::KvDtype dtype) {
  if (backend == nullptr) return absl::InvalidArgumentError("KvPool needs a backend");
  if (dtype != ops::KvDtype::kFloat32 && dtype != ops::KvDtype::kBf16) {
    return absl::InvalidArgumentError(absl::StrCat("KvPool of unknown dtype ", static_cast<int>(dtype)));
  }
  if (num_pages <= 0 || page_tokens <= 0 || head_dim <= 0) {
    return absl::InvalidArgumentError(absl::StrCat("KvPool of ", num_pages, " pages x ", page_tokens,
                                                   " tokens x ", head_dim, " dims"));
  }
  const int64_t rows = int64_t{num_pages} * page_tokens;
  if (rows > std::numeric_limits<int32_t>::max()) {
    return absl::InvalidArgumentError(absl::StrCat("KvPool of ", rows, " rows overflows int32 row ids"));
  }
  auto pool = std::unique_ptr<KvPool>(new KvPool(backend, num_pages, page_tokens, head_dim, dtype));
  const size_t kv_bytes = static_cast<size_t>(rows) * pool->row_bytes();
  KVGATE_ASSIGN_OR_RETURN(pool->k_pages_, backend->Alloc(kv_bytes));
  KVGATE_ASSIGN_OR_RETURN(pool->v_pages_, backend->Alloc(kv_bytes));
  KVGATE_ASSIGN_OR_RETURN(pool->query_masks_, backend->Alloc(static_cast<size_t>(rows)));
  return pool;
}

absl::StatusOr<int32_t*> KvPool::Upload(absl::Span<const int32_t> host, ops::DeviceBuffer* scratch) {
  const size_t bytes = host.size() * sizeof(int32_t);
  if (scratch->bytes() < bytes) {
    const size_t grown = std::max({bytes, 2 * scratch->bytes(), kMinScratchEntries * sizeof(int32_t)});
    KVGATE_ASSIGN_OR_RETURN(*scratch, backend_->Alloc(grown));
  }
  if (bytes > 0) KVGATE_RETURN_IF_ERROR(backend_->CopyToBackend(scratch->data(), host.data(), bytes));
  return scratch->as<int32_t>();
}

template <typename SrcK, typename SrcV>
absl::Status KvPool::RunCopies(absl::Span<const RowCopies> copies, ops::KvDtype src_dtype, SrcK k_src,
                               SrcV v_src) {
  // Rows that run on consecutively on both sides (a page of a kept-everything head) go as
  // one entry with its length: three ints a run instead of two a row to build and upload.
  int64_t rows_total = 0, runs_total = 0;
  std::vector<RowRuns> runs(copies.size());
  for (size_t l = 0; l < copies.size(); ++l) {
    runs[l] = ToRowRuns(copies[l]);
    rows_total += copies[l].size();
    runs_total += static_cast<int64_t>(runs[l].src.size());
  }
  if (rows_total == 0) return absl::OkStatus();
  const bool as_runs = 3 * runs_total < 2 * rows_total;
  std::vector<int32_t> host;
  host.reserve(static_cast<size_t>(as_runs ? 3 * runs_total : 2 * rows_total));
  for (size_t l = 0; l < copies.size(); ++l) {
    if (as_runs) {
      host.insert(host.end(), runs[l].src.begin(), runs[l].src.end());
      host.insert(host.end(), runs[l].dst.begin(), runs[l].dst.end());
      host.insert(host.end(), runs[l].length.begin(), runs[l].length.end());
    } else {
      host.insert(host.end(), copies[l].src_rows.begin(), copies[l].src_rows.end());
      host.insert(host.end(), copies[l].dst_rows.begin(), copies[l].dst_rows.end());
    }
  }
  KVGATE_ASSIGN_OR_RETURN(const int32_t* rows, Upload(host, &copy_scratch_));
  for (size_t l = 0; l < copies.size(); ++l) {
    const int32_t n = as_runs ? static_cast<int32_t>(runs[l].src.size()) : copies[l].size();
    if (n == 0) continue;
    ops::CopyRowsArgs args;
    args.src_rows = rows;
    args.dst_rows = rows + n;
    args.run_lengths = as_runs ? rows + 2 * n : nullptr;
    args.num_rows = n;
    args.row_elements = head_dim_;
    args.src_dtype = src_dtype;
    args.dst_dtype = dtype_;
    args.src = k_src(static_cast<int32_t>(l));
    args.dst = k_pages_.data();
    KVGATE_RETURN_IF_ERROR(backend_->CopyRows(args));
    args.src = v_src(static_cast<int32_t>(l));
    args.dst = v_pages_.data();
    KVGATE_RETURN_IF_ERROR(backend_->CopyRows(args));
    rows += (as_runs ? 3 : 2) * n;
  }
  return absl::OkStatus();
}

absl::Status KvPool::UploadMaskRuns(absl::Span<const int32_t> sorted_pages, absl::Span<const uint8_t> bytes) {
  const size_t pt = static_cast<size_t>(page_tokens_);
  size_t begin = 0;
  while (begin < sorted_pages.size()) {
    size_t end = begin + 1;
    while (end < sorted_pages.size() && sorted_pages[end] == sorted_pages[end - 1] + 1) ++end;
    KVGATE_RETURN_IF_ERROR(backend_->CopyToBackend(query_masks_.as<uint8_t>() + sorted_pages[begin] * pt,
                                                   bytes.data() + begin * pt, (end - begin) * pt));
    begin = end;
  }
  return absl::OkStatus();
}

absl::Status KvPool::FillMasks(absl::Span<const int32_t> pages) {
  std::vector<int32_t> sorted(pages.begin(), pages.end());
  std::sort(sorted.begin(), sorted.end());
  const std::vector<uint8_t> bytes(sorted.size() * page_tokens_, kAllQueryHeads);
  return UploadMaskRuns(sorted, bytes);
}

absl::Status KvPool::CollectMaskBytes(const SequenceLayout& layout, absl::Span<const int32_t> pages,
                                      std::vector<int32_t>* ids, std::vector<uint8_t>* bytes) const {
  if (pages.empty()) return absl::OkStatus();
  // The sorted page set, and a page's index in it: a flat table when the set is a good
  // part of the pool (a 32k-token commit of an 8B model writes half a million pages),
  // else a binary search (a decode step's drops write a few pages of a large pool).
  std::vector<int32_t> sorted;
  std::vector<int32_t> slot_of;
  if (pages.size() * 16 >= static_cast<size_t>(num_pages_)) {
    slot_of.assign(static_cast<size_t>(num_pages_), -1);
    for (const int32_t page : pages) slot_of[static_cast<size_t>(page)] = 0;
    for (int32_t page = 0; page < num_pages_; ++page) {
      if (slot_of[static_cast<size_t>(page)] == 0) sorted.push_back(page);
    }
    for (size_t i = 0; i < sorted.size(); ++i) slot_of[static_cast<size_t>(sorted[i])] = static_cast<int32_t>(i);
  } else {
    sorted.assign(pages.begin(), pages.end());
    std::sort(sorted.begin(), sorted.end());
    sorted.erase(std::unique(sorted.begin(), sorted.end()), sorted.end());
  }
  const auto index_of = [&](int32_t page) -> int32_t {
    if (!slot_of.empty()) return slot_of[static_cast<size_t>(page)];
    const auto it = std::lower_bound(sorted.begin(), sorted.end(), page);
    return it != sorted.end() && *it == page ? static_cast<int32_t>(it - sorted.begin()) : -1;
  };
  const int32_t pt = page_tokens_;
  const size_t base = bytes->size();
  bytes->resize(base + sorted.size() * pt, kAllQueryHeads);
  size_t found = 0;
  for (const HeadPages& hp : layout.heads) {
    for (size_t p = 0; p < hp.page_ids.size(); ++p) {
      const int32_t slot = index_of(hp.page_ids[p]);
      if (slot < 0) continue;
      ++found;
      if (!layout.has_query_masks) continue;  // all 0xFF already
      // The slots of this page that hold rows; the others stay 0xFF.
      const int32_t page_first_slot = static_cast<int32_t>(p) * pt;
      for (const SlotRun& run : SlotRunsOf(hp)) {
        const int32_t begin = std::max(page_first_slot, run.slot);
        const int32_t end = std::min(page_first_slot + pt, run.slot + run.count);
        if (end <= begin) continue;
        std::copy_n(hp.query_mask.begin() + (run.row + begin - run.slot), end - begin,
                    bytes->begin() + static_cast<std::ptrdiff_t>(base + static_cast<size_t>(slot) * pt +
                                                                 (begin - page_first_slot)));
      }
    }
  }
  if (found != sorted.size()) {
    bytes->resize(base);
    return absl::InternalError(absl::StrCat("mask write of ", sorted.size(), " pages, ", found,
                                            " held by the layout"));
  }
  ids->insert(ids->end(), sorted.begin(), sorted.end());
  return absl::OkStatus();
}

absl::Status KvPool::UploadMaskPages(absl::Span<const int32_t> ids, absl::Span<const uint8_t> bytes) {
  if (ids.empty()) return absl::OkStatus();
  const size_t pt = static_cast<size_t>(page_tokens_);
  if (pt % sizeof(float) != 0 || ids.size() < 4) {
    // Few pages, or pages whose bytes are not whole words: a copy per run of ids.
    std::vector<int32_t> order(ids.size());
    std::iota(order.begin(), order.end(), 0);
    std::sort(order.begin(), order.end(), [&](int32_t a, int32_t b) { return ids[a] < ids[b]; });
    std::vector<int32_t> sorted;
    std::vector<uint8_t> sorted_bytes;
    for (const int32_t i : order) {
      sorted.push_back(ids[i]);
      sorted_bytes.insert(sorted_bytes.end(), bytes.begin() + i * pt, bytes.begin() + (i + 1) * pt);
    }
    return UploadMaskRuns(sorted, sorted_bytes);
  }
  // One upload of [src rows | dst rows | the bytes] and one scatter: a page's mask bytes
  // are one row of pt / 4 four-byte words, which a same-dtype CopyRows moves unchanged.
  const size_t n = ids.size();
  std::vector<int32_t> host(2 * n + n * pt / sizeof(int32_t));
  std::iota(host.begin(), host.begin() + static_cast<std::ptrdiff_t>(n), 0);
  std::copy(ids.begin(), ids.end(), host.begin() + static_cast<std::ptrdiff_t>(n));
  std::memcpy(host.data() + 2 * n, bytes.data(), n * pt);
  KVGATE_ASSIGN_OR_RETURN(const int32_t* uploaded, Upload(host, &mask_scratch_));
  ops::CopyRowsArgs args;
  args.src = uploaded + 2 * n;
  args.dst = query_masks_.data();
  args.src_rows = uploaded;
  args.dst_rows = uploaded + n;
  args.num_rows = static_cast<int32_t>(n);
  args.row_elements = static_cast<int32_t>(pt / sizeof(float));
  args.src_dtype = args.dst_dtype = ops::KvDtype::kFloat32;
  return backend_->CopyRows(args);
}

absl::Status KvPool::WriteMasks(const SequenceLayout& layout, absl::Span<const int32_t> pages) {
  std::vector<int32_t> ids;
  std::vector<uint8_t> bytes;
  KVGATE_RETURN_IF_ERROR(CollectMaskBytes(layout, pages, &ids, &bytes));
  return UploadMaskPages(ids, bytes);
}

absl::Status KvPool::CommitPrefill(const engine::KvCache& cache, const gates::KeepPlan& plan,
                                   SequenceLayout* out) {
  if (!out->heads.empty()) {
    return absl::FailedPreconditionError("commit into a layout that already holds pages; release it first");
  }
  if (plan.prompt_tokens != cache.length_tokens()) {
    return absl::InvalidArgumentError(absl::StrCat("keep plan for a prompt of ", plan.prompt_tokens,
                                                   " tokens, the prefill cache holds ", cache.length_tokens()));
  }
  auto committed = PlanCommit(plan, cache.capacity_tokens(), page_tokens_, &pages_);
  if (!committed.ok()) return WithContext(committed.status(), "commit prefill");
  absl::Status s = RunCopies(
      committed->copies, ops::KvDtype::kFloat32, [&](int32_t l) { return cache.k(l); },
      [&](int32_t l) { return cache.v(l); });
  if (s.ok()) s = WriteMasks(committed->layout, committed->layout.AllPages());
  if (!s.ok()) {
    (void)kv::Release(&committed->layout, &pages_);
    return WithContext(s, "commit prefill");
  }
  *out = std::move(committed->layout);
  return absl::OkStatus();
}

absl::StatusOr<AppendPlan> KvPool::ReserveDecodeStep(SequenceLayout* layout) {
  if (!layout->heads.empty() && layout->page_tokens != page_tokens_) {
    return absl::InvalidArgumentError("layout from a pool of another page size");
  }
  KVGATE_ASSIGN_OR_RETURN(AppendPlan step, PlanAppend(layout, &pages_));
  // A new page's slots are all 0xFF: the new row is visible to all, the rest unused.
  KVGATE_RETURN_IF_ERROR(WithContext(FillMasks(step.new_pages), "decode reserve"));
  return step;
}

absl::Status KvPool::AppendDecodeRows(const AppendPlan& step, int32_t layer, const float* k_new,
                                      const float* v_new) {
  const AppendPlan* steps[] = {&step};
  return AppendDecodeRows(absl::MakeConstSpan(steps), layer, k_new, v_new);
}

absl::Status KvPool::AppendDecodeRows(absl::Span<const AppendPlan* const> steps, int32_t layer,
                                      const float* k_new, const float* v_new) {
  if (steps.empty()) return absl::OkStatus();
  const int32_t heads = steps[0]->num_kv_heads;
  std::vector<int32_t> host;  // [src rows | dst rows]
  host.reserve(2 * steps.size() * heads);
  for (size_t s = 0; s < steps.size(); ++s) {
    if (steps[s]->num_kv_heads != heads || layer < 0 || layer >= steps[s]->num_layers) {
      return absl::InvalidArgumentError(absl::StrCat("decode append of layer ", layer, " for sequence ", s,
                                                     " of the batch: ", steps[s]->num_layers, " layers x ",
                                                     steps[s]->num_kv_heads, " kv heads (batch: ", heads, ")"));
    }
    for (int32_t h = 0; h < heads; ++h) host.push_back(static_cast<int32_t>(s) * heads + h);
  }
  for (const AppendPlan* step : steps) {
    absl::Span<const int32_t> rows = step->layer_rows(layer);
    host.insert(host.end(), rows.begin(), rows.end());
  }
  KVGATE_ASSIGN_OR_RETURN(const int32_t* rows, Upload(host, &copy_scratch_));
  return AppendDecodeRowsAt(rows, static_cast<int32_t>(host.size() / 2), k_new, v_new);
}

absl::Status KvPool::AppendDecodeRowsAt(const int32_t* rows, int32_t num_rows, const float* k_new,
                                        const float* v_new) {
  ops::CopyRowsArgs args;
  args.src_rows = rows;
  args.dst_rows = rows + num_rows;
  args.num_rows = num_rows;
  args.row_elements = head_dim_;
  args.dst_dtype = dtype_;
  args.src = k_new;
  args.dst = k_pages_.data();
  KVGATE_RETURN_IF_ERROR(WithContext(backend_->CopyRows(args), "decode append K"));
  args.src = v_new;
  args.dst = v_pages_.data();
  return WithContext(backend_->CopyRows(args), "decode append V");
}

absl::StatusOr<int32_t> KvPool::Compact(SequenceLayout* layout, const gates::KeepPlan& keep) {
  if (!layout->heads.empty() && layout->page_tokens != page_tokens_) {
    return absl::InvalidArgumentError("layout from a pool of another page size");
  }
  auto plan = PlanCompaction(layout, keep, &pages_);
  if (!plan.ok()) return WithContext(plan.status(), "compaction");
  const void* k = k_pages_.data();
  const void* v = v_pages_.data();
  KVGATE_RETURN_IF_ERROR(WithContext(
      RunCopies(plan->copies, dtype_, [k](int32_t) { return k; }, [v](int32_t) { return v; }), "compaction"));
  KVGATE_RETURN_IF_ERROR(WithContext(WriteMasks(*layout, plan->mask_pages), "compaction"));
  return plan->pages_freed();
}

absl::Status KvPool::DropRows(absl::Span<SequenceLayout* const> layouts, absl::Span<const RowDrops> drops) {
  if (layouts.size() != drops.size()) {
    return absl::InvalidArgumentError(absl::StrCat("drops for ", drops.size(), " sequences, ", layouts.size(),
                                                   " layouts"));
  }
  // Everything is checked and the staging buffer sized before any layout changes.
  std::vector<bool> compact(layouts.size(), false);
  int64_t staged = 0;
  for (size_t s = 0; s < layouts.size(); ++s) {
    if (drops[s].empty()) continue;
    KVGATE_RETURN_IF_ERROR(WithContext(CheckRowDrops(*layouts[s], drops[s]), absl::StrCat("sequence ", s)));
    if (layouts[s]->page_tokens != page_tokens_) {
      return absl::InvalidArgumentError(absl::StrCat("sequence ", s, ": layout from a pool of another page size"));
    }
    const DropCost cost = CostOfDrop(*layouts[s], drops[s]);
    compact[s] = 2 * cost.moved_by_compaction < cost.moved_in_place;
    staged += cost.moved_in_place;
  }
  const size_t stage_bytes = static_cast<size_t>(staged) * row_bytes();
  if (staged > std::numeric_limits<int32_t>::max()) {
    return absl::InvalidArgumentError(absl::StrCat("drop of ", staged, " moved rows overflows int32 row ids"));
  }
  if (drop_stage_.bytes() < stage_bytes) {
    drop_stage_ = ops::DeviceBuffer();
    KVGATE_ASSIGN_OR_RETURN(drop_stage_, backend_->Alloc(stage_bytes));
  }
  // Every sequence's runs, staging rows numbered on across the sequences:
  // [to src | to dst | to lengths | from src | from dst | from lengths].
  std::vector<int32_t> to_src, to_dst, to_len, from_src, from_dst, from_len, mask_ids;
  std::vector<uint8_t> mask_bytes;
  int32_t staged_rows = 0;
  for (size_t s = 0; s < layouts.size(); ++s) {
    if (drops[s].empty()) continue;
    if (compact[s]) {
      gates::KeepPlan keep{layouts[s]->num_layers, layouts[s]->num_kv_heads, layouts[s]->next_pos, {}};
      keep.heads.resize(layouts[s]->heads.size());
      for (size_t i = 0; i < keep.heads.size(); ++i) {
        const HeadPages& head = layouts[s]->heads[i];
        size_t next = 0;
        for (int32_t r = 0; r < head.length; ++r) {
          if (next < drops[s][i].size() && drops[s][i][next] == r) {
            ++next;
            continue;
          }
          keep.heads[i].positions.push_back(head.positions[r]);
        }
      }
      absl::StatusOr<int32_t> compacted = Compact(layouts[s], keep);
      if (compacted.ok()) continue;
      if (compacted.status().code() != absl::StatusCode::kResourceExhausted) {
        return WithContext(compacted.status(), absl::StrCat("sequence ", s));
      }
      // No room for fresh pages: in place needs none (and the stage was sized for it).
    }
    KVGATE_ASSIGN_OR_RETURN(DropPlan plan, PlanDropRows(layouts[s], drops[s], &pages_));
    to_src.insert(to_src.end(), plan.to_stage.src_rows.begin(), plan.to_stage.src_rows.end());
    for (const int32_t row : plan.to_stage.dst_rows) to_dst.push_back(staged_rows + row);
    to_len.insert(to_len.end(), plan.to_stage.lengths.begin(), plan.to_stage.lengths.end());
    for (const int32_t row : plan.from_stage.src_rows) from_src.push_back(staged_rows + row);
    from_dst.insert(from_dst.end(), plan.from_stage.dst_rows.begin(), plan.from_stage.dst_rows.end());
    from_len.insert(from_len.end(), plan.from_stage.lengths.begin(), plan.from_stage.lengths.end());
    staged_rows += plan.staged_rows;
    KVGATE_RETURN_IF_ERROR(WithContext(CollectMaskBytes(*layouts[s], plan.mask_pages, &mask_ids, &mask_bytes),
                                       absl::StrCat("sequence ", s)));
  }
  KVGATE_RETURN_IF_ERROR(WithContext(UploadMaskPages(mask_ids, mask_bytes), "drop rows: masks"));
  if (to_src.empty()) return absl::OkStatus();
  const int32_t n = static_cast<int32_t>(to_src.size());
  std::vector<int32_t> host;
  host.reserve(6 * to_src.size());
  for (const auto* list : {&to_src, &to_dst, &to_len, &from_src, &from_dst, &from_len}) {
    host.insert(host.end(), list->begin(), list->end());
  }
  KVGATE_ASSIGN_OR_RETURN(const int32_t* rows, Upload(host, &copy_scratch_));
  ops::CopyRowsArgs args;
  args.num_rows = n;
  args.row_elements = head_dim_;
  args.src_dtype = dtype_;
  args.dst_dtype = dtype_;
  for (ops::DeviceBuffer* pages : {&k_pages_, &v_pages_}) {
    args.src_rows = rows;
    args.dst_rows = rows + n;
    args.run_lengths = rows + 2 * n;
    args.src = pages->data();
    args.dst = drop_stage_.data();
    KVGATE_RETURN_IF_ERROR(WithContext(backend_->CopyRows(args), "drop rows: stage"));
    args.src_rows = rows + 3 * n;
    args.dst_rows = rows + 4 * n;
    args.run_lengths = rows + 5 * n;
    args.src = drop_stage_.data();
    args.dst = pages->data();
    KVGATE_RETURN_IF_ERROR(WithContext(backend_->CopyRows(args), "drop rows: unstage"));
  }
  return absl::OkStatus();
}

absl::Status KvPool::Release(SequenceLayout* layout) { return kv::Release(layout, &pages_); }

namespace {

// Tables of one entry per seq head after a view's page ids: lengths, first slots, gap
// rows, gap slots.
constexpr size_t kViewTablesPerSeqHead = 4;

// Appends layer `layer`'s [page_indptr (seq heads + 1) | page_ids | lengths | first_slots |
// gap_rows | gap_slots] to `host`;
// `*any_masks` |= a sequence carries query masks. INVALID_ARGUMENT for a sequence that
// does not fit the batch (see KvPool::BuildView).
absl::Status AppendViewTables(absl::Span<const SequenceLayout* const> seqs, int32_t layer, int32_t page_tokens,
                              std::vector<int32_t>* host, bool* any_masks) {
  const int32_t heads = seqs.empty() ? 0 : seqs[0]->num_kv_heads;
  size_t num_ids = 0;
  for (size_t s = 0; s < seqs.size(); ++s) {
    const SequenceLayout& seq = *seqs[s];
    if (seq.heads.empty() || seq.page_tokens != page_tokens || seq.num_kv_heads != heads || layer < 0 ||
        layer >= seq.num_layers) {
      return absl::InvalidArgumentError(absl::StrCat("view of layer ", layer, ": sequence ", s, " of the batch has ",
                                                     seq.num_layers, " layers x ", seq.num_kv_heads,
                                                     " kv heads, page_tokens ", seq.page_tokens, " (pool ",
                                                     page_tokens, ", batch kv heads ", heads, ")"));
    }
    *any_masks |= seq.has_query_masks;
    for (int32_t h = 0; h < heads; ++h) num_ids += seq.at(layer, h).page_ids.size();
  }
  const size_t num_seq_heads = seqs.size() * heads;
  const size_t begin = host->size();
  host->resize(begin + num_seq_heads + 1 + num_ids + kViewTablesPerSeqHead * num_seq_heads);
  int32_t* indptr = host->data() + begin;
  int32_t* ids = indptr + num_seq_heads + 1;
  int32_t* lengths = ids + num_ids;
  int32_t* first_slots = lengths + num_seq_heads;
  int32_t* gap_rows = first_slots + num_seq_heads;
  int32_t* gap_slots = gap_rows + num_seq_heads;
  indptr[0] = 0;
  size_t i = 0;
  for (const SequenceLayout* seq : seqs) {
    for (int32_t h = 0; h < heads; ++h, ++i) {
      const HeadPages& hp = seq->at(layer, h);
      std::copy(hp.page_ids.begin(), hp.page_ids.end(), ids + indptr[i]);
      indptr[i + 1] = indptr[i] + static_cast<int32_t>(hp.page_ids.size());
      lengths[i] = hp.length;
      first_slots[i] = hp.first_slot;
      gap_rows[i] = hp.gap_row;
      gap_slots[i] = hp.gap_slots;
    }
  }
  return absl::OkStatus();
}

}  // namespace

absl::StatusOr<ops::HeadPagedKvView> KvPool::BuildView(absl::Span<const SequenceLayout* const> seqs,
                                                       int32_t layer) {
  std::vector<int32_t> host;
  bool any_masks = false;
  KVGATE_RETURN_IF_ERROR(AppendViewTables(seqs, layer, page_tokens_, &host, &any_masks));
  KVGATE_ASSIGN_OR_RETURN(const int32_t* base, Upload(host, &view_scratch_));
  return ViewAt(base, seqs.size() * (seqs.empty() ? 0 : seqs[0]->num_kv_heads), host, any_masks);
}

absl::StatusOr<std::vector<ops::HeadPagedKvView>> KvPool::BuildViews(absl::Span<const SequenceLayout* const> seqs) {
  const int32_t layers = seqs.empty() ? 0 : seqs[0]->num_layers;
  std::vector<int32_t> host;
  std::vector<size_t> offsets;
  bool any_masks = false;
  for (int32_t l = 0; l < layers; ++l) {
    offsets.push_back(host.size());
    KVGATE_RETURN_IF_ERROR(AppendViewTables(seqs, l, page_tokens_, &host, &any_masks));
  }
  offsets.push_back(host.size());
  KVGATE_ASSIGN_OR_RETURN(const int32_t* base, Upload(host, &view_scratch_));
  const size_t num_seq_heads = seqs.size() * (seqs.empty() ? 0 : seqs[0]->num_kv_heads);
  std::vector<ops::HeadPagedKvView> views;
  for (int32_t l = 0; l < layers; ++l) {
    const absl::Span<const int32_t> tables(host.data() + offsets[l], offsets[l + 1] - offsets[l]);
    views.push_back(ViewAt(base + offsets[l], num_seq_heads, tables, any_masks));
  }
  return views;
}

ops::HeadPagedKvView KvPool::PagesView(bool with_query_masks) const {
  ops::HeadPagedKvView view;
  view.k_pages = k_pages_.data();
  view.v_pages = v_pages_.data();
  view.query_masks = with_query_masks ? query_masks_.as<uint8_t>() : nullptr;
  view.page_tokens = page_tokens_;
  view.head_dim = head_dim_;
  view.dtype = dtype_;
  return view;
}

ops::HeadPagedKvView KvPool::ViewAt(const int32_t* device_tables, size_t num_seq_heads,
                                    absl::Span<const int32_t> host_tables, bool any_masks) const {
  const size_t num_ids = host_tables.size() - (kViewTablesPerSeqHead + 1) * num_seq_heads - 1;
  ops::HeadPagedKvView view = PagesView(any_masks);
  view.page_indptr = device_tables;
  view.page_ids = device_tables + num_seq_heads + 1;
  view.lengths = device_tables + num_seq_heads + 1 + num_ids;
  view.first_slots = view.lengths + num_seq_heads;
  view.gap_rows = view.first_slots + num_seq_heads;
  view.gap_slots = view.gap_rows + num_seq_heads;
  return view;
}

absl::StatusOr<HeadRows> KvPool::ReadRows(const SequenceLayout& layout, int32_t layer, int32_t kv_head) const {
  if (layout.heads.empty() || layout.page_tokens != page_tokens_ || layer < 0 || layer >= layout.num_layers ||
      kv_head < 0 || kv_head >= layout.num_kv_heads) {
    return absl::InvalidArgumentError(absl::StrCat("read of layer ", layer, " kv head ", kv_head, " from a layout of ",
                                                   layout.num_layers, " x ", layout.num_kv_heads));
  }
  const HeadPages& hp = layout.at(layer, kv_head);
  const size_t row_floats = static_cast<size_t>(head_dim_);
  HeadRows out;
  out.k.resize(static_cast<size_t>(hp.length) * row_floats);
  out.v.resize(out.k.size());
  out.query_mask.resize(hp.length);
  out.positions = hp.positions;
  out.scores = hp.scores;
  // One copy per run of consecutive page ids (a commit hands a head consecutive ids).
  // bf16 rows land in a host staging vector and are widened there.
  const bool narrow = dtype_ == ops::KvDtype::kBf16;
  std::vector<ops::Bf16> stage_k, stage_v;
  if (narrow) {
    stage_k.resize(out.k.size());
    stage_v.resize(out.v.size());
  }
  const size_t element_bytes = ops::KvDtypeBytes(dtype_);
  char* k_dst = narrow ? reinterpret_cast<char*>(stage_k.data()) : reinterpret_cast<char*>(out.k.data());
  char* v_dst = narrow ? reinterpret_cast<char*>(stage_v.data()) : reinterpret_cast<char*>(out.v.data());
  const char* k_src = static_cast<const char*>(k_pages_.data());
  const char* v_src = static_cast<const char*>(v_pages_.data());
  // One copy per stretch of consecutive page ids within a run of slots (a commit hands a
  // head consecutive ids).
  const size_t pt = static_cast<size_t>(page_tokens_);
  for (const SlotRun& run : SlotRunsOf(hp)) {
    size_t slot = static_cast<size_t>(run.slot);
    const size_t run_end = slot + static_cast<size_t>(run.count);
    while (slot < run_end) {
      size_t p = slot / pt, end = p + 1;
      while (end < hp.page_ids.size() && end * pt < run_end && hp.page_ids[end] == hp.page_ids[end - 1] + 1) ++end;
      const size_t slot_end = std::min(end * pt, run_end);
      const size_t first = static_cast<size_t>(run.row) + (slot - static_cast<size_t>(run.slot));
      const size_t rows = slot_end - slot;
      const size_t pool_row = static_cast<size_t>(hp.page_ids[p]) * pt + slot % pt;
      const size_t bytes = rows * row_floats * element_bytes;
      KVGATE_RETURN_IF_ERROR(backend_->CopyToHost(k_dst + first * row_floats * element_bytes,
                                                  k_src + pool_row * row_floats * element_bytes, bytes));
      KVGATE_RETURN_IF_ERROR(backend_->CopyToHost(v_dst + first * row_floats * element_bytes,
                                                  v_src + pool_row * row_floats * element_bytes, bytes));
      KVGATE_RETURN_IF_ERROR(
          backend_->CopyToHost(out.query_mask.data() + first, query_masks_.as<uint8_t>() + pool_row, rows));
      slot = slot_end;
    }
  }
  if (narrow) {
    for (size_t i = 0; i < stage_k.size(); ++i) out.k[i] = ops::Bf16ToF32(stage_k[i]);
    for (size_t i = 0; i < stage_v.size(); ++i) out.v[i] = ops::Bf16ToF32(stage_v[i]);
  }
  return out;
}

absl::Status KvPool::CommitHostRows(const gates::KeepPlan& plan, absl::Span<const HeadRows> rows,
                                    SequenceLayout* out) {
  if (!out->heads.empty()) {
    return absl::FailedPreconditionError("import into a layout that already holds pages; release it first");
  }
  if (rows.size() != plan.heads.size()) {
    return absl::InvalidArgumentError(
        absl::StrCat("import of ", rows.size(), " heads of rows for a plan of ", plan.heads.size(), " heads"));
  }
  const size_t row_floats = static_cast<size_t>(head_dim_);
  size_t max_layer_rows = 0;
  for (int32_t l = 0; l < plan.num_layers; ++l) {
    size_t layer_rows = 0;
    for (int32_t h = 0; h < plan.num_kv_heads; ++h) {
      const size_t i = static_cast<size_t>(l) * plan.num_kv_heads + h;
      const size_t n = plan.heads[i].positions.size();
      if (rows[i].k.size() != n * row_floats || rows[i].v.size() != n * row_floats) {
        return absl::InvalidArgumentError(absl::StrCat("import of layer ", l, " kv head ", h, ": ", rows[i].k.size(),
                                                       " K and ", rows[i].v.size(), " V floats for ", n,
                                                       " rows of ", head_dim_));
      }
      layer_rows += n;
    }
    max_layer_rows = std::max(max_layer_rows, layer_rows);
  }
  // Source rows index the layer's staging buffer, which holds the layer's rows in
  // (kv head, kept row) order: the order of PlanCommit's copies.
  auto committed = PlanCommit(plan, plan.prompt_tokens, page_tokens_, &pages_);
  if (!committed.ok()) return WithContext(committed.status(), "import");
  auto run = [&]() -> absl::Status {
    const size_t stage_bytes = std::max<size_t>(max_layer_rows, 1) * row_floats * sizeof(float);
    if (stage_k_.bytes() < stage_bytes) {
      KVGATE_ASSIGN_OR_RETURN(stage_k_, backend_->Alloc(stage_bytes));
      KVGATE_ASSIGN_OR_RETURN(stage_v_, backend_->Alloc(stage_bytes));
    }
    for (int32_t l = 0; l < plan.num_layers; ++l) {
      RowCopies& copies = committed->copies[l];
      if (copies.size() == 0) continue;
      for (int32_t i = 0; i < copies.size(); ++i) copies.src_rows[i] = i;
      size_t at = 0;
      for (int32_t h = 0; h < plan.num_kv_heads; ++h) {
        const HeadRows& head = rows[static_cast<size_t>(l) * plan.num_kv_heads + h];
        if (head.k.empty()) continue;
        KVGATE_RETURN_IF_ERROR(backend_->CopyToBackend(stage_k_.as<float>() + at, head.k.data(),
                                                       head.k.size() * sizeof(float)));
        KVGATE_RETURN_IF_ERROR(backend_->CopyToBackend(stage_v_.as<float>() + at, head.v.data(),
                                                       head.v.size() * sizeof(float)));
        at += head.k.size();
      }
      const float* k = stage_k_.as<float>();
      const float* v = stage_v_.as<float>();
      KVGATE_RETURN_IF_ERROR(RunCopies(absl::MakeConstSpan(&copies, 1), ops::KvDtype::kFloat32,
                                       [k](int32_t) { return k; }, [v](int32_t) { return v; }));
    }
    return WriteMasks(committed->layout, committed->layout.AllPages());
  };
  absl::Status s = run();
  if (!s.ok()) {
    (void)kv::Release(&committed->layout, &pages_);
    return WithContext(s, "import");
  }
  *out = std::move(committed->layout);
  return absl::OkStatus();
}

absl::StatusOr<BackendRows> KvPool::GatherRows(const SequenceLayout& layout) {
  if (layout.heads.empty() || layout.page_tokens != page_tokens_) {
    return absl::InvalidArgumentError(absl::StrCat("gather of a layout of ", layout.heads.size(),
                                                   " heads, page_tokens ", layout.page_tokens, " (pool ",
                                                   page_tokens_, ")"));
  }
  int64_t total = 0;
  for (const HeadPages& hp : layout.heads) total += hp.length;
  if (total > std::numeric_limits<int32_t>::max()) {
    return absl::InvalidArgumentError(absl::StrCat("gather of ", total, " rows overflows int32 row ids"));
  }
  BackendRows out;
  out.backend = std::string(backend_->Name());
  out.rows = total;
  out.head_dim = head_dim_;
  out.dtype = dtype_;
  const size_t bytes = static_cast<size_t>(std::max<int64_t>(total, 1)) * row_bytes();
  // Shareable: the cuda_ipc transport names them to the decode process.
  KVGATE_ASSIGN_OR_RETURN(out.k, backend_->AllocShareable(bytes));
  KVGATE_ASSIGN_OR_RETURN(out.v, backend_->AllocShareable(bytes));
  if (total == 0) return out;
  // One run a page: a head's rows fill its pages in order, and land one after another.
  std::vector<int32_t> host;
  host.reserve(static_cast<size_t>(3 * (total / page_tokens_ + static_cast<int64_t>(layout.heads.size()))));
  std::vector<int32_t> dst, length;
  int32_t at = 0;
  for (const HeadPages& hp : layout.heads) {
    for (const SlotRun& run : SlotRunsOf(hp)) {
      for (int32_t i = 0; i < run.count;) {
        const int32_t slot = run.slot + i;
        const int32_t rows = std::min(page_tokens_ - slot % page_tokens_, run.count - i);
        host.push_back(hp.page_ids[slot / page_tokens_] * page_tokens_ + slot % page_tokens_);
        dst.push_back(at + run.row + i);
        length.push_back(rows);
        i += rows;
      }
    }
    at += hp.length;
  }
  const int32_t runs = static_cast<int32_t>(dst.size());
  host.insert(host.end(), dst.begin(), dst.end());
  host.insert(host.end(), length.begin(), length.end());
  KVGATE_ASSIGN_OR_RETURN(const int32_t* rows, Upload(host, &copy_scratch_));
  ops::CopyRowsArgs args;
  args.src_rows = rows;
  args.dst_rows = rows + runs;
  args.run_lengths = rows + 2 * runs;
  args.num_rows = runs;
  args.row_elements = head_dim_;
  args.src_dtype = dtype_;
  args.dst_dtype = dtype_;
  args.src = k_pages_.data();
  args.dst = out.k.data();
  KVGATE_RETURN_IF_ERROR(WithContext(backend_->CopyRows(args), "gather K"));
  args.src = v_pages_.data();
  args.dst = out.v.data();
  KVGATE_RETURN_IF_ERROR(WithContext(backend_->CopyRows(args), "gather V"));
  KVGATE_RETURN_IF_ERROR(WithContext(backend_->Synchronize(), "gather"));
  return out;
}

absl::Status KvPool::CommitBackendRows(const gates::KeepPlan& plan, const BackendRows& rows, SequenceLayout* out) {
  if (!out->heads.empty()) {
    return absl::FailedPreconditionError("import into a layout that already holds pages; release it first");
  }
  if (rows.backend != backend_->Name()) {
    return absl::FailedPreconditionError(absl::StrCat("import of rows in the memory of backend ", rows.backend,
                                                      " into a pool on ", std::string(backend_->Name())));
  }
  int64_t total = 0;
  for (const gates::HeadKeep& head : plan.heads) total += static_cast<int64_t>(head.positions.size());
  if (rows.dtype != ops::KvDtype::kFloat32 && rows.dtype != ops::KvDtype::kBf16) {
    return absl::InvalidArgumentError(absl::StrCat("import of backend rows of unknown dtype ",
                                                   static_cast<int>(rows.dtype)));
  }
  const size_t need = static_cast<size_t>(total) * head_dim_ * ops::KvDtypeBytes(rows.dtype);
  if (rows.rows != total || rows.head_dim != head_dim_ || rows.k.bytes() < need || rows.v.bytes() < need) {
    return absl::InvalidArgumentError(absl::StrCat("import of ", rows.rows, " backend rows of ", rows.head_dim,
                                                   " (", rows.k.bytes(), " / ", rows.v.bytes(),
                                                   " bytes) for a plan of ", total, " rows of ", head_dim_));
  }
  auto committed = PlanCommit(plan, plan.prompt_tokens, page_tokens_, &pages_);
  if (!committed.ok()) return WithContext(committed.status(), "import");
  // PlanCommit's source rows index a per-layer cache; ours run on across the layers in
  // the same (kv head, kept row) order.
  int32_t first = 0;
  for (RowCopies& copies : committed->copies) {
    for (int32_t i = 0; i < copies.size(); ++i) copies.src_rows[i] = first + i;
    first += copies.size();
  }
  const void* k = rows.k.data();
  const void* v = rows.v.data();
  absl::Status s =
      RunCopies(committed->copies, rows.dtype, [k](int32_t) { return k; }, [v](int32_t) { return v; });
  if (s.ok()) s = WriteMasks(committed->layout, committed->layout.AllPages());
  if (s.ok()) s = backend_->Synchronize();
  if (!s.ok()) {
    (void)kv::Release(&committed->layout, &pages_);
    return WithContext(s, "import");
  }
  *out = std::move(committed->layout);
  return absl::OkStatus();
}

}  // namespace kvgate::kv
