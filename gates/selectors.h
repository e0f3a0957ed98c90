// File: selectors turn per-entry scores into a KeepPlan under a budget. Exact and
// deterministic: higher score first, ties broken by lower position; protected positions
// are always kept and count toward the budget.
#pragma once

#include <cstddef>
#include <cstdint>
#include <vector>

#include "gates/keep_plan.h"

namespace kvgate::gates {

// Scores of the prompt's entries: scores[(layer * num_kv_heads + kv_head) * n + position].
struct ScoreGrid {
  int32_t num_layers = 0;
  int32_t num_kv_heads = 0;
  int32_t prompt_tokens = 0;  // n
  std::vector<float> scores;
  float at(int32_t layer, int32_t kv_head, int32_t position) const {
    return scores[(static_cast<size_t>(layer) * num_kv_heads + kv_head) * prompt_tokens + position];
  }
};

// Each (layer, kv head) keeps max(keep_per_head, #protected) rows: all protected rows,
// then the best-scored others.
KeepPlan SelectPerHeadTopK(const ScoreGrid& grid, int32_t keep_per_head,
                           const std::vector<uint8_t>& protected_mask);

// Each layer keeps keep_per_head * num_kv_heads rows across its heads (heads of one
// layer compete), every head keeping its protected rows first.
KeepPlan SelectPerLayerTopK(const ScoreGrid& grid, int32_t keep_per_head,
                            const std::vector<uint8_t>& protected_mask);

// One threshold across all layers and heads: keeps keep_per_head * layers * kv_heads
// rows in total (Fast KVzip's and KVzip's "pair" level), protected rows first.
KeepPlan SelectGlobalTopK(const ScoreGrid& grid, int32_t keep_per_head,
                          const std::vector<uint8_t>& protected_mask);

// AdaKV: per layer, each head first keeps its own top ceil(safeguard * keep_per_head)
// rows; the rest of the layer's budget goes to the best remaining rows of any head.
KeepPlan SelectAdaKv(const ScoreGrid& grid, int32_t keep_per_head,
                     const std::vector<uint8_t>& protected_mask, float safeguard = 0.2f);

// --- Additions (gates implementation) ---
//
// Exact rules shared by every selector:
// - protected_mask is [prompt_tokens] and applies to every (layer, kv head);
// - keep_per_head is clamped to [0, prompt_tokens];
// - ranking: higher score first; ties by lower position, then lower layer, then lower kv
//   head (only position matters within one head); -0 equals +0; NaN ranks below every
//   number;
// - when the protected rows alone reach a budget, exactly the protected rows are kept
//   (a head may then keep only its protected rows);
// - HeadKeep::positions ascending; query_mask and scores empty.
// SelectAdaKv: safeguard is clamped to [0, 1] and read to 6 decimals (0.2f means 0.2, so
// ceil(0.2 * 10) = 2, not 3). Each head's guaranteed set = its protected rows plus its best
// other rows up to max(#protected, ceil(safeguard * keep_per_head)) rows; the layer's
// remaining keep_per_head * num_kv_heads - sum(guaranteed) rows (if positive) go to the
// best not-yet-kept rows of any head of the layer.

// SelectGlobalTopK with an explicit total: keeps max(total_keep, #protected * layers *
// kv_heads) rows over the whole grid (Fast KVzip's per-chunk threshold, whose count is
// not a multiple of layers * kv_heads).
KeepPlan SelectGlobalTopKCount(const ScoreGrid& grid, int64_t total_keep,
                               const std::vector<uint8_t>& protected_mask);

}  // namespace kvgate::gates
