#include "gates/selectors.h"

#include <algorithm>

#include "gates/internal/select_util.h"

namespace kvgate::gates {
namespace {

using internal::Cut;
using internal::FindCut;
using internal::ScoreKey;

void CheckGrid(const ScoreGrid& grid, const std::vector<uint8_t>& protected_mask) {
  KVGATE_GATES_CHECK(grid.num_layers >= 0 && grid.num_kv_heads >= 0 && grid.prompt_tokens >= 0,
                     "negative grid dimension");
  KVGATE_GATES_CHECK(grid.scores.size() == static_cast<size_t>(grid.num_layers) *
                                               grid.num_kv_heads * grid.prompt_tokens,
                     "ScoreGrid::scores must hold layers * kv_heads * prompt_tokens values");
  KVGATE_GATES_CHECK(protected_mask.size() == static_cast<size_t>(grid.prompt_tokens),
                     "protected_mask must hold prompt_tokens bytes");
}

KeepPlan EmptyPlan(const ScoreGrid& grid) {
  KeepPlan plan;
  plan.num_layers = grid.num_layers;
  plan.num_kv_heads = grid.num_kv_heads;
  plan.prompt_tokens = grid.prompt_tokens;
  plan.heads.resize(static_cast<size_t>(grid.num_layers) * grid.num_kv_heads);
  return plan;
}

int64_t CountProtected(const std::vector<uint8_t>& protected_mask) {
  return std::count_if(protected_mask.begin(), protected_mask.end(), [](uint8_t b) { return b != 0; });
}

const float* Row(const ScoreGrid& grid, int32_t layer, int32_t head) {
  return grid.scores.data() + (static_cast<size_t>(layer) * grid.num_kv_heads + head) * grid.prompt_tokens;
}

// Keeps, in one (layer, head), the protected rows plus the best `need` others.
void SelectInHead(const float* row, int32_t n, const std::vector<uint8_t>& protected_mask, int64_t need,
                  HeadKeep* out) {
  const Cut cut = FindCut(need, [&](auto&& f) {
    for (int32_t p = 0; p < n; ++p) {
      if (!protected_mask[p]) f(ScoreKey(row[p]), static_cast<uint64_t>(p));
    }
  });
  out->positions.clear();
  for (int32_t p = 0; p < n; ++p) {
    if (protected_mask[p] || cut.Keeps(ScoreKey(row[p]), static_cast<uint64_t>(p))) {
      out->positions.push_back(p);
    }
  }
}

}  // namespace

KeepPlan SelectPerHeadTopK(const ScoreGrid& grid, int32_t keep_per_head,
                           const std::vector<uint8_t>& protected_mask) {
  CheckGrid(grid, protected_mask);
  KeepPlan plan = EmptyPlan(grid);
  const int32_t n = grid.prompt_tokens;
  const int64_t keep = std::clamp(keep_per_head, 0, n);
  const int64_t need = std::max<int64_t>(0, keep - CountProtected(protected_mask));
  for (int32_t l = 0; l < grid.num_layers; ++l) {
    for (int32_t h = 0; h < grid.num_kv_heads; ++h) {
      SelectInHead(Row(grid, l, h), n, protected_mask, need, &plan.at(l, h));
    }
  }
  return plan;
}

KeepPlan SelectPerLayerTopK(const ScoreGrid& grid, int32_t keep_per_head,
                            const std::vector<uint8_t>& protected_mask) {
  CheckGrid(grid, protected_mask);
  KeepPlan plan = EmptyPlan(grid);
  const int32_t n = grid.prompt_tokens, heads = grid.num_kv_heads;
  const int64_t keep = std::clamp(keep_per_head, 0, n);
  const int64_t need = std::max<int64_t>(0, (keep - CountProtected(protected_mask)) * heads);
  for (int32_t l = 0; l < grid.num_layers; ++l) {
    // Order = position * heads + head: ties go to the lower position, then the lower head.
    const Cut cut = FindCut(need, [&](auto&& f) {
      for (int32_t h = 0; h < heads; ++h) {
        const float* row = Row(grid, l, h);
        for (int32_t p = 0; p < n; ++p) {
          if (!protected_mask[p]) f(ScoreKey(row[p]), static_cast<uint64_t>(p) * heads + h);
        }
      }
    });
    for (int32_t h = 0; h < heads; ++h) {
      const float* row = Row(grid, l, h);
      std::vector<int32_t>& out = plan.at(l, h).positions;
      for (int32_t p = 0; p < n; ++p) {
        if (protected_mask[p] || cut.Keeps(ScoreKey(row[p]), static_cast<uint64_t>(p) * heads + h)) {
          out.push_back(p);
        }
      }
    }
  }
  return plan;
}

KeepPlan SelectGlobalTopKCount(const ScoreGrid& grid, int64_t total_keep,
                               const std::vector<uint8_t>& protected_mask) {
  CheckGrid(grid, protected_mask);
  KeepPlan plan = EmptyPlan(grid);
  const int32_t n = grid.prompt_tokens, heads = grid.num_kv_heads, layers = grid.num_layers;
  const int64_t protected_total = CountProtected(protected_mask) * layers * heads;
  const int64_t need = std::max<int64_t>(0, total_keep - protected_total);
  // Order = (position * layers + layer) * heads + head.
  auto order = [&](int32_t l, int32_t h, int32_t p) {
    return (static_cast<uint64_t>(p) * layers + l) * heads + h;
  };
  const Cut cut = FindCut(need, [&](auto&& f) {
    for (int32_t l = 0; l < layers; ++l) {
      for (int32_t h = 0; h < heads; ++h) {
        const float* row = Row(grid, l, h);
        for (int32_t p = 0; p < n; ++p) {
          if (!protected_mask[p]) f(ScoreKey(row[p]), order(l, h, p));
        }
      }
    }
  });
  for (int32_t l = 0; l < layers; ++l) {
    for (int32_t h = 0; h < heads; ++h) {
      const float* row = Row(grid, l, h);
      std::vector<int32_t>& out = plan.at(l, h).positions;
      for (int32_t p = 0; p < n; ++p) {
        if (protected_mask[p] || cut.Keeps(ScoreKey(row[p]), order(l, h, p))) out.push_back(p);
      }
    }
  }
  return plan;
}

KeepPlan SelectGlobalTopK(const ScoreGrid& grid, int32_t keep_per_head,
                          const std::vector<uint8_t>& protected_mask) {
  const int64_t keep = std::clamp(keep_per_head, 0, std::max(grid.prompt_tokens, 0));
  return SelectGlobalTopKCount(
      grid, keep * static_cast<int64_t>(grid.num_layers) * grid.num_kv_heads, protected_mask);
}

KeepPlan SelectAdaKv(const ScoreGrid& grid, int32_t keep_per_head,
                     const std::vector<uint8_t>& protected_mask, float safeguard) {
  CheckGrid(grid, protected_mask);
  KeepPlan plan = EmptyPlan(grid);
  const int32_t n = grid.prompt_tokens, heads = grid.num_kv_heads;
  const int64_t keep = std::clamp(keep_per_head, 0, n);
  const int64_t protected_rows = CountProtected(protected_mask);
  const int64_t safe = internal::CeilFraction(safeguard, keep);
  const int64_t guaranteed_per_head = std::max(safe, protected_rows);
  const int64_t need_safe = std::max<int64_t>(0, safe - protected_rows);
  const int64_t layer_rest = std::max<int64_t>(0, keep * heads - guaranteed_per_head * heads);

  std::vector<uint8_t> kept(static_cast<size_t>(heads) * n);
  for (int32_t l = 0; l < grid.num_layers; ++l) {
    // 1. Per head: protected rows + its own best rows up to the safeguard.
    for (int32_t h = 0; h < heads; ++h) {
      HeadKeep guaranteed;
      SelectInHead(Row(grid, l, h), n, protected_mask, need_safe, &guaranteed);
      uint8_t* k = kept.data() + static_cast<size_t>(h) * n;
      std::fill(k, k + n, 0);
      for (int32_t p : guaranteed.positions) k[p] = 1;
    }
    // 2. The rest of the layer's budget: best remaining rows of any head.
    const Cut cut = FindCut(layer_rest, [&](auto&& f) {
      for (int32_t h = 0; h < heads; ++h) {
        const float* row = Row(grid, l, h);
        const uint8_t* k = kept.data() + static_cast<size_t>(h) * n;
        for (int32_t p = 0; p < n; ++p) {
          if (!k[p]) f(ScoreKey(row[p]), static_cast<uint64_t>(p) * heads + h);
        }
      }
    });
    for (int32_t h = 0; h < heads; ++h) {
      const float* row = Row(grid, l, h);
      const uint8_t* k = kept.data() + static_cast<size_t>(h) * n;
      std::vector<int32_t>& out = plan.at(l, h).positions;
      for (int32_t p = 0; p < n; ++p) {
        if (k[p] || cut.Keeps(ScoreKey(row[p]), static_cast<uint64_t>(p) * heads + h)) out.push_back(p);
      }
    }
  }
  return plan;
}

}  // namespace kvgate::gates
