#include "gates/backend_selection.h"

#include <algorithm>

#include "common/status_macros.h"
#include "gates/internal/select_util.h"

namespace kvgate::gates {

int64_t SetCandidatesOutside(const std::vector<uint8_t>& protected_mask, BackendSelection* selection) {
  selection->candidates.resize(protected_mask.size());
  int64_t protected_rows = 0;
  for (size_t p = 0; p < protected_mask.size(); ++p) {
    selection->candidates[p] = protected_mask[p] ? 0 : 1;
    protected_rows += protected_mask[p] ? 1 : 0;
  }
  return protected_rows;
}

absl::StatusOr<std::vector<uint8_t>> SelectOnBackend(ops::Backend& backend, const BackendSelection& selection) {
  if (selection.rows < 1 || selection.n < 1 ||
      (!selection.candidates.empty() && selection.candidates.size() != static_cast<size_t>(selection.n)) ||
      selection.merge_rows < 1 || selection.rows % selection.merge_rows != 0) {
    return absl::InvalidArgumentError("SelectOnBackend: scores, candidates and rows disagree");
  }
  const size_t keep_bytes = static_cast<size_t>(selection.rows / selection.merge_rows) * selection.n;
  // One allocation: the candidate mask, then the keep bytes.
  KVGATE_ASSIGN_OR_RETURN(ops::DeviceBuffer memory, backend.Alloc(selection.candidates.size() + keep_bytes));
  uint8_t* candidates = memory.as<uint8_t>();
  if (!selection.candidates.empty()) {
    KVGATE_RETURN_IF_ERROR(backend.CopyToBackend(candidates, selection.candidates.data(), selection.candidates.size()));
  }
  ops::SelectTopArgs args;
  args.scores = selection.scores;
  args.candidates = selection.candidates.empty() ? nullptr : candidates;
  args.row_stride = selection.row_stride;
  args.keep = candidates + selection.candidates.size();
  args.rows = selection.rows;
  args.n = selection.n;
  args.rows_per_selection = selection.rows_per_selection;
  args.merge_rows = selection.merge_rows;
  args.need = selection.need;
  KVGATE_RETURN_IF_ERROR(backend.SelectTop(args));
  std::vector<uint8_t> keep(keep_bytes);
  KVGATE_RETURN_IF_ERROR(backend.CopyToHost(keep.data(), args.keep, keep_bytes));
  return keep;
}

absl::StatusOr<std::vector<uint8_t>> SelectAdaKvOnBackend(ops::Backend& backend, const float* scores, int32_t layers,
                                                          int32_t kv_heads, int32_t n, int32_t keep_per_head,
                                                          const std::vector<uint8_t>& protected_mask, float safeguard) {
  if (layers < 1 || kv_heads < 1 || n < 1 || protected_mask.size() != static_cast<size_t>(n)) {
    return absl::InvalidArgumentError("SelectAdaKvOnBackend: scores, heads and protected mask disagree");
  }
  BackendSelection unprotected;  // only its candidates: the positions the mask leaves out
  const int64_t protected_rows = SetCandidatesOutside(protected_mask, &unprotected);
  // SelectAdaKv's budget arithmetic (selectors.cc), to the row.
  const int64_t keep = std::clamp(keep_per_head, 0, n);
  const int64_t safe = internal::CeilFraction(safeguard, keep);
  const int64_t guaranteed_per_head = std::max(safe, protected_rows);
  const int64_t need_safe = std::max<int64_t>(0, safe - protected_rows);
  const int64_t layer_rest = std::max<int64_t>(0, keep * kv_heads - guaranteed_per_head * kv_heads);

  const int32_t rows = layers * kv_heads;
  const size_t keep_bytes = static_cast<size_t>(rows) * n;
  // One allocation: the candidates (the unprotected positions), then each stage's keep bytes.
  KVGATE_ASSIGN_OR_RETURN(ops::DeviceBuffer memory, backend.Alloc(static_cast<size_t>(n) + 2 * keep_bytes));
  uint8_t* candidates = memory.as<uint8_t>();
  uint8_t* guaranteed = candidates + n;
  uint8_t* rest = guaranteed + keep_bytes;
  KVGATE_RETURN_IF_ERROR(backend.CopyToBackend(candidates, unprotected.candidates.data(), unprotected.candidates.size()));
  ops::SelectTopArgs per_head;
  per_head.scores = scores;
  per_head.candidates = candidates;
  per_head.keep = guaranteed;
  per_head.rows = rows;
  per_head.n = n;
  per_head.need = need_safe;
  KVGATE_RETURN_IF_ERROR(backend.SelectTop(per_head));
  ops::SelectTopArgs per_layer = per_head;
  per_layer.exclude = guaranteed;
  per_layer.keep = rest;
  per_layer.rows_per_selection = kv_heads;
  per_layer.need = layer_rest;
  KVGATE_RETURN_IF_ERROR(backend.SelectTop(per_layer));
  std::vector<uint8_t> kept(2 * keep_bytes);
  KVGATE_RETURN_IF_ERROR(backend.CopyToHost(kept.data(), guaranteed, kept.size()));
  for (size_t i = 0; i < keep_bytes; ++i) kept[i] |= kept[keep_bytes + i];
  kept.resize(keep_bytes);
  return kept;
}

}  // namespace kvgate::gates
