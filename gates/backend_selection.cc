#include "gates/backend_selection.h"

#include "common/status_macros.h"

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

}  // namespace kvgate::gates
