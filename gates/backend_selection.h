// File: the policies' top-count selection run where the scores are (ops::SelectTop on the
// backend that computed them): the scores never come to the host, only one keep byte per
// (row, position). Same selection as gates/internal/select_util.h FindCut, so a plan is
// the same whichever side selected.
#pragma once

#include <cstdint>
#include <vector>

#include "absl/status/statusor.h"
#include "cuda/backend.h"

namespace kvgate::gates {

struct BackendSelection {
  const float* scores = nullptr;  // row r at scores + r * row_stride, backend memory of `backend`
  int32_t rows = 0, n = 0;
  int64_t row_stride = 0;          // 0 = n
  // Host, [n]: 1 = position p may be selected in every row (the rest is the caller's:
  // protected rows, the window); empty = every position.
  std::vector<uint8_t> candidates;
  int32_t rows_per_selection = 1;  // ops::SelectTopArgs
  int32_t merge_rows = 1;
  int64_t need = 0;                // per selection
};

// Makes the candidates every position `protected_mask` leaves out (those it protects are
// kept by the caller anyway); returns how many it protects.
int64_t SetCandidatesOutside(const std::vector<uint8_t>& protected_mask, BackendSelection* selection);

// Keep bytes [rows / merge_rows, n] on the host (ops::SelectTopArgs::keep).
absl::StatusOr<std::vector<uint8_t>> SelectOnBackend(ops::Backend& backend, const BackendSelection& selection);

// SelectAdaKv's rule (selectors.h) where the scores are: `scores` is [layers * kv_heads, n]
// backend memory. Two selections: each head's own best rows up to the safeguard, then the
// rest of each layer's budget over the rows of all its heads that the first left. Returns
// keep bytes [layers * kv_heads, n] on the host: 1 where either kept a row; protected rows
// are the caller's, as with SelectOnBackend.
absl::StatusOr<std::vector<uint8_t>> SelectAdaKvOnBackend(ops::Backend& backend, const float* scores, int32_t layers,
                                                          int32_t kv_heads, int32_t n, int32_t keep_per_head,
                                                          const std::vector<uint8_t>& protected_mask, float safeguard);

}  // namespace kvgate::gates
