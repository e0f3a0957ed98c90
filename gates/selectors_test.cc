#include "gates/selectors.h"

#include <algorithm>
#include <cmath>
#include <limits>
#include <random>
#include <set>
#include <tuple>

#include "gates/internal/select_util.h"
#include "gates/internal/test_util.h"
#include "gtest/gtest.h"

namespace kvgate::gates {
namespace {

// ---- Brute-force references: sort everything with the documented order. ----

struct Entry {
  float score;
  int32_t pos, layer, head;
};

// Documented order: score descending (-0 == +0, NaN last), then position, layer, head.
bool Better(const Entry& a, const Entry& b) {
  const bool an = std::isnan(a.score), bn = std::isnan(b.score);
  if (an != bn) return bn;
  if (!an && a.score != b.score) return a.score > b.score;
  return std::tie(a.pos, a.layer, a.head) < std::tie(b.pos, b.layer, b.head);
}

using KeepSets = std::vector<std::set<int32_t>>;  // [layer * heads + head]

int64_t Protected(const std::vector<uint8_t>& mask) { return std::count(mask.begin(), mask.end(), 1); }

// Keeps the protected entries of `candidates`' heads plus the best `need` others.
void TakeBest(std::vector<Entry> others, int64_t need, int32_t heads, KeepSets* keep) {
  std::sort(others.begin(), others.end(), Better);
  for (int64_t i = 0; i < std::min<int64_t>(need, others.size()); ++i) {
    (*keep)[others[i].layer * heads + others[i].head].insert(others[i].pos);
  }
}

KeepSets ProtectedSets(const ScoreGrid& g, const std::vector<uint8_t>& mask) {
  KeepSets keep(static_cast<size_t>(g.num_layers) * g.num_kv_heads);
  for (auto& s : keep) {
    for (int32_t p = 0; p < g.prompt_tokens; ++p) {
      if (mask[p]) s.insert(p);
    }
  }
  return keep;
}

std::vector<Entry> Others(const ScoreGrid& g, const std::vector<uint8_t>& mask, int32_t layer, int32_t head,
                          const KeepSets* exclude = nullptr) {
  std::vector<Entry> out;
  for (int32_t p = 0; p < g.prompt_tokens; ++p) {
    if (mask[p]) continue;
    if (exclude != nullptr && (*exclude)[layer * g.num_kv_heads + head].count(p)) continue;
    out.push_back({g.at(layer, head, p), p, layer, head});
  }
  return out;
}

KeepSets BrutePerHead(const ScoreGrid& g, int32_t k, const std::vector<uint8_t>& mask) {
  KeepSets keep = ProtectedSets(g, mask);
  const int64_t need = std::max<int64_t>(0, std::min(k, g.prompt_tokens) - Protected(mask));
  for (int32_t l = 0; l < g.num_layers; ++l)
    for (int32_t h = 0; h < g.num_kv_heads; ++h) TakeBest(Others(g, mask, l, h), need, g.num_kv_heads, &keep);
  return keep;
}

KeepSets BrutePerLayer(const ScoreGrid& g, int32_t k, const std::vector<uint8_t>& mask) {
  KeepSets keep = ProtectedSets(g, mask);
  const int64_t need = std::max<int64_t>(0, (std::min(k, g.prompt_tokens) - Protected(mask)) * g.num_kv_heads);
  for (int32_t l = 0; l < g.num_layers; ++l) {
    std::vector<Entry> all;
    for (int32_t h = 0; h < g.num_kv_heads; ++h) {
      auto o = Others(g, mask, l, h);
      all.insert(all.end(), o.begin(), o.end());
    }
    TakeBest(all, need, g.num_kv_heads, &keep);
  }
  return keep;
}

KeepSets BruteGlobalCount(const ScoreGrid& g, int64_t total, const std::vector<uint8_t>& mask) {
  KeepSets keep = ProtectedSets(g, mask);
  const int64_t need = std::max<int64_t>(0, total - Protected(mask) * g.num_layers * g.num_kv_heads);
  std::vector<Entry> all;
  for (int32_t l = 0; l < g.num_layers; ++l)
    for (int32_t h = 0; h < g.num_kv_heads; ++h) {
      auto o = Others(g, mask, l, h);
      all.insert(all.end(), o.begin(), o.end());
    }
  TakeBest(all, need, g.num_kv_heads, &keep);
  return keep;
}

KeepSets BruteAdaKv(const ScoreGrid& g, int32_t k_in, const std::vector<uint8_t>& mask, int64_t safe) {
  const int64_t k = std::min(k_in, g.prompt_tokens);
  const int64_t P = Protected(mask);
  KeepSets keep = ProtectedSets(g, mask);
  for (int32_t l = 0; l < g.num_layers; ++l)
    for (int32_t h = 0; h < g.num_kv_heads; ++h)
      TakeBest(Others(g, mask, l, h), std::max<int64_t>(0, safe - P), g.num_kv_heads, &keep);
  const int64_t rest = std::max<int64_t>(0, k * g.num_kv_heads - std::max(safe, P) * g.num_kv_heads);
  for (int32_t l = 0; l < g.num_layers; ++l) {
    std::vector<Entry> all;
    for (int32_t h = 0; h < g.num_kv_heads; ++h) {
      auto o = Others(g, mask, l, h, &keep);
      all.insert(all.end(), o.begin(), o.end());
    }
    TakeBest(all, rest, g.num_kv_heads, &keep);
  }
  return keep;
}

// ---- Checks ----

void ExpectPlanEquals(const KeepPlan& plan, const ScoreGrid& g, const KeepSets& want) {
  ASSERT_EQ(plan.num_layers, g.num_layers);
  ASSERT_EQ(plan.num_kv_heads, g.num_kv_heads);
  ASSERT_EQ(plan.prompt_tokens, g.prompt_tokens);
  ASSERT_EQ(plan.heads.size(), want.size());
  for (size_t i = 0; i < want.size(); ++i) {
    const std::vector<int32_t>& got = plan.heads[i].positions;
    EXPECT_TRUE(std::is_sorted(got.begin(), got.end()));
    EXPECT_TRUE(std::adjacent_find(got.begin(), got.end()) == got.end()) << "duplicate position";
    EXPECT_EQ(got, std::vector<int32_t>(want[i].begin(), want[i].end())) << "head " << i;
    EXPECT_TRUE(plan.heads[i].query_mask.empty());
    EXPECT_TRUE(plan.heads[i].scores.empty());
  }
}

void ExpectProtectedKept(const KeepPlan& plan, const std::vector<uint8_t>& mask) {
  for (const HeadKeep& h : plan.heads) {
    for (size_t p = 0; p < mask.size(); ++p) {
      if (mask[p]) {
        EXPECT_TRUE(std::binary_search(h.positions.begin(), h.positions.end(), static_cast<int32_t>(p)));
      }
    }
  }
}

struct GridCase {
  int32_t layers, heads, n;
  bool ties;  // draw scores from a 4-value set (+0 and -0 both present)
  uint32_t seed;
};

ScoreGrid MakeGrid(const GridCase& c) {
  std::mt19937 rng(c.seed);
  ScoreGrid g;
  g.num_layers = c.layers;
  g.num_kv_heads = c.heads;
  g.prompt_tokens = c.n;
  g.scores.resize(static_cast<size_t>(c.layers) * c.heads * c.n);
  const float values[] = {0.5f, 0.0f, -0.0f, 1.0f, 0.25f};
  std::uniform_int_distribution<int> pick(0, 4);
  std::normal_distribution<float> dist;
  for (float& s : g.scores) s = c.ties ? values[pick(rng)] : dist(rng);
  return g;
}

std::vector<uint8_t> MakeMask(int32_t n, int32_t sink, int32_t recent, uint32_t seed, int32_t extra) {
  std::vector<uint8_t> mask(n, 0);
  for (int32_t p = 0; p < std::min(sink, n); ++p) mask[p] = 1;
  for (int32_t p = std::max(0, n - recent); p < n; ++p) mask[p] = 1;
  std::mt19937 rng(seed);
  std::uniform_int_distribution<int32_t> pos(0, std::max(0, n - 1));
  for (int32_t i = 0; i < extra && n > 0; ++i) mask[pos(rng)] = 1;
  return mask;
}

const std::vector<GridCase> kCases = {
    {1, 1, 1, true, 1},   {1, 1, 7, true, 2},   {2, 3, 13, true, 3},  {3, 2, 29, false, 4},
    {2, 4, 54, true, 5},  {4, 2, 97, false, 6}, {1, 8, 129, true, 7}, {3, 3, 64, true, 8},
};

std::vector<int32_t> Budgets(int32_t n) { return {0, 1, 2, n / 3, n / 2, n - 1, n, n + 5}; }

TEST(SelectorsTest, PerHeadTopKMatchesBruteForce) {
  for (const GridCase& c : kCases) {
    const ScoreGrid g = MakeGrid(c);
    for (int32_t extra : {0, 3}) {
      const auto mask = MakeMask(c.n, 2, 3, c.seed, extra);
      for (int32_t k : Budgets(c.n)) {
        SCOPED_TRACE(::testing::Message() << "n=" << c.n << " seed=" << c.seed << " k=" << k << " extra=" << extra);
        const KeepPlan plan = SelectPerHeadTopK(g, k, mask);
        ExpectPlanEquals(plan, g, BrutePerHead(g, k, mask));
        ExpectProtectedKept(plan, mask);
        const int64_t want = std::max<int64_t>(std::min(k, c.n), Protected(mask));
        for (const HeadKeep& h : plan.heads) EXPECT_EQ(static_cast<int64_t>(h.positions.size()), want);
      }
    }
  }
}

TEST(SelectorsTest, PerLayerTopKMatchesBruteForce) {
  for (const GridCase& c : kCases) {
    const ScoreGrid g = MakeGrid(c);
    for (int32_t extra : {0, 3}) {
      const auto mask = MakeMask(c.n, 1, 2, c.seed + 100, extra);
      for (int32_t k : Budgets(c.n)) {
        SCOPED_TRACE(::testing::Message() << "n=" << c.n << " seed=" << c.seed << " k=" << k);
        const KeepPlan plan = SelectPerLayerTopK(g, k, mask);
        ExpectPlanEquals(plan, g, BrutePerLayer(g, k, mask));
        ExpectProtectedKept(plan, mask);
        const int64_t want = std::max<int64_t>(std::min(k, c.n), Protected(mask)) * c.heads;
        for (int32_t l = 0; l < c.layers; ++l) {
          int64_t kept = 0;
          for (int32_t h = 0; h < c.heads; ++h) kept += plan.at(l, h).positions.size();
          EXPECT_EQ(kept, want) << "layer " << l;
        }
      }
    }
  }
}

TEST(SelectorsTest, GlobalTopKMatchesBruteForce) {
  for (const GridCase& c : kCases) {
    const ScoreGrid g = MakeGrid(c);
    for (int32_t extra : {0, 3}) {
      const auto mask = MakeMask(c.n, 4, 1, c.seed + 200, extra);
      for (int32_t k : Budgets(c.n)) {
        SCOPED_TRACE(::testing::Message() << "n=" << c.n << " seed=" << c.seed << " k=" << k);
        const KeepPlan plan = SelectGlobalTopK(g, k, mask);
        const int64_t total = static_cast<int64_t>(std::min(k, c.n)) * c.layers * c.heads;
        ExpectPlanEquals(plan, g, BruteGlobalCount(g, total, mask));
        ExpectProtectedKept(plan, mask);
        EXPECT_EQ(plan.KeptEntries(), std::max<int64_t>(total, Protected(mask) * c.layers * c.heads));
      }
      // Explicit counts that are not multiples of layers * heads.
      for (int64_t total : {int64_t{0}, int64_t{1}, int64_t{7}, int64_t{c.layers} * c.heads * c.n / 3 + 1}) {
        const KeepPlan plan = SelectGlobalTopKCount(g, total, mask);
        ExpectPlanEquals(plan, g, BruteGlobalCount(g, total, mask));
        EXPECT_EQ(plan.KeptEntries(), std::min<int64_t>(int64_t{c.layers} * c.heads * c.n,
                                                        std::max<int64_t>(total, Protected(mask) * c.layers * c.heads)));
      }
    }
  }
}

TEST(SelectorsTest, AdaKvMatchesBruteForce) {
  for (const GridCase& c : kCases) {
    const ScoreGrid g = MakeGrid(c);
    for (int32_t extra : {0, 2}) {
      const auto mask = MakeMask(c.n, 1, 1, c.seed + 300, extra);
      for (int32_t k : Budgets(c.n)) {
        for (float safeguard : {0.0f, 0.2f, 0.5f, 1.0f}) {
          SCOPED_TRACE(::testing::Message() << "n=" << c.n << " seed=" << c.seed << " k=" << k << " sg=" << safeguard);
          const KeepPlan plan = SelectAdaKv(g, k, mask, safeguard);
          const int64_t kk = std::min(k, c.n);
          const int64_t safe = safeguard == 0.2f ? (kk * 2 + 9) / 10 : static_cast<int64_t>(std::ceil(safeguard * kk));
          ExpectPlanEquals(plan, g, BruteAdaKv(g, k, mask, safe));
          ExpectProtectedKept(plan, mask);
          const int64_t P = Protected(mask);
          for (int32_t l = 0; l < c.layers; ++l) {
            int64_t kept = 0;
            for (int32_t h = 0; h < c.heads; ++h) {
              kept += plan.at(l, h).positions.size();
              EXPECT_GE(static_cast<int64_t>(plan.at(l, h).positions.size()), std::min<int64_t>(std::max(safe, P), c.n));
            }
            EXPECT_EQ(kept, std::max(kk, std::max(safe, P)) * c.heads) << "layer " << l;
          }
        }
      }
    }
  }
}

TEST(SelectorsTest, RadixPathMatchesBruteForceOnLargeGrids) {
  // > 32768 candidates per selection takes the radix path of FindCut.
  for (bool ties : {true, false}) {
    const GridCase c{2, 4, 6000, ties, 11};
    const ScoreGrid g = MakeGrid(c);
    const auto mask = MakeMask(c.n, 4, 64, 5, 10);
    for (int32_t k : {0, 100, 2999, 5999}) {
      SCOPED_TRACE(::testing::Message() << "ties=" << ties << " k=" << k);
      ExpectPlanEquals(SelectGlobalTopK(g, k, mask), g,
                       BruteGlobalCount(g, static_cast<int64_t>(k) * c.layers * c.heads, mask));
      ExpectPlanEquals(SelectPerLayerTopK(g, k, mask), g, BrutePerLayer(g, k, mask));
    }
  }
  // One head with 40000 candidates: the per-head path too.
  const GridCase big{1, 1, 40000, true, 12};
  const ScoreGrid g = MakeGrid(big);
  const std::vector<uint8_t> mask(big.n, 0);
  ExpectPlanEquals(SelectPerHeadTopK(g, 12345, mask), g, BrutePerHead(g, 12345, mask));
}

TEST(SelectorsTest, TiesGoToLowerPositionThenLayerThenHead) {
  ScoreGrid g;
  g.num_layers = 2;
  g.num_kv_heads = 2;
  g.prompt_tokens = 3;
  g.scores.assign(12, 1.0f);  // all tied
  const std::vector<uint8_t> none(3, 0);
  // Global, 5 of 12: position 0 of all four (layer, head), then (pos 1, layer 0, head 0).
  const KeepPlan plan = SelectGlobalTopKCount(g, 5, none);
  EXPECT_EQ(plan.at(0, 0).positions, (std::vector<int32_t>{0, 1}));
  EXPECT_EQ(plan.at(0, 1).positions, (std::vector<int32_t>{0}));
  EXPECT_EQ(plan.at(1, 0).positions, (std::vector<int32_t>{0}));
  EXPECT_EQ(plan.at(1, 1).positions, (std::vector<int32_t>{0}));
  // Per head: lower positions.
  EXPECT_EQ(SelectPerHeadTopK(g, 2, none).at(1, 1).positions, (std::vector<int32_t>{0, 1}));
}

TEST(SelectorsTest, NanRanksLastAndNegativeZeroEqualsZero) {
  ScoreGrid g;
  g.num_layers = 1;
  g.num_kv_heads = 1;
  g.prompt_tokens = 5;
  g.scores = {std::nanf(""), -0.0f, 0.0f, -std::numeric_limits<float>::infinity(), -1.0f};
  const std::vector<uint8_t> none(5, 0);
  EXPECT_EQ(SelectPerHeadTopK(g, 1, none).heads[0].positions, (std::vector<int32_t>{1}));
  EXPECT_EQ(SelectPerHeadTopK(g, 2, none).heads[0].positions, (std::vector<int32_t>{1, 2}));
  EXPECT_EQ(SelectPerHeadTopK(g, 4, none).heads[0].positions, (std::vector<int32_t>{1, 2, 3, 4}));
}

TEST(SelectorsTest, ProtectionsBeyondBudgetKeepExactlyTheProtectedRows) {
  ScoreGrid g = MakeGrid({2, 2, 10, false, 3});
  std::vector<uint8_t> mask(10, 0);
  mask[0] = mask[1] = mask[5] = mask[9] = 1;
  const std::vector<int32_t> want = {0, 1, 5, 9};
  for (const KeepPlan& plan : {SelectPerHeadTopK(g, 2, mask), SelectPerLayerTopK(g, 3, mask),
                               SelectGlobalTopK(g, 1, mask), SelectAdaKv(g, 2, mask)}) {
    for (const HeadKeep& h : plan.heads) EXPECT_EQ(h.positions, want);
  }
}

TEST(SelectorsTest, AdaKvSafeguardReadsSixDecimals) {
  EXPECT_EQ(internal::CeilFraction(0.2f, 10), 2);  // 0.2f * 10 = 2.0000000298 in double
  EXPECT_EQ(internal::CeilFraction(0.2f, 11), 3);
  EXPECT_EQ(internal::CeilFraction(0.0f, 11), 0);
  EXPECT_EQ(internal::CeilFraction(1.5f, 11), 11);
  EXPECT_EQ(internal::CeilFraction(std::nanf(""), 11), 0);
}

TEST(SelectorsTest, EmptyGrid) {
  ScoreGrid g;
  g.num_layers = 2;
  g.num_kv_heads = 3;
  g.prompt_tokens = 0;
  const KeepPlan plan = SelectGlobalTopK(g, 4, {});
  EXPECT_EQ(plan.heads.size(), 6u);
  EXPECT_EQ(plan.KeptEntries(), 0);
}

}  // namespace
}  // namespace kvgate::gates
