// File: private helpers of gates/: the exact top-count "cut" that every selector and
// scorer-specific selection shares (so one tie rule holds everywhere), and a CHECK macro
// for programmer errors (the pinned abseil has no absl/log).
#pragma once

#include <algorithm>
#include <bit>
#include <cmath>
#include <cstdint>
#include <cstdio>
#include <cstdlib>
#include <utility>
#include <vector>

// Programmer errors only (house-style section 3); request errors return a Status.
#define KVGATE_GATES_CHECK(cond, msg)                                              \
  do {                                                                             \
    if (!(cond)) {                                                                 \
      std::fprintf(stderr, "%s:%d: CHECK failed: %s: %s\n", __FILE__, __LINE__, #cond, \
                   (msg));                                                         \
      std::abort();                                                                \
    }                                                                              \
  } while (0)

namespace kvgate::gates::internal {

// Order-preserving map of a score to an unsigned key: a > b <=> ScoreKey(a) > ScoreKey(b).
// -0 and +0 map to the same key; NaN maps to 0, below every number (-inf included).
inline uint32_t ScoreKey(float score) {
  if (std::isnan(score)) return 0;
  if (score == 0.0f) score = 0.0f;  // -0 -> +0
  const uint32_t bits = std::bit_cast<uint32_t>(score);
  return (bits & 0x80000000u) != 0 ? ~bits : (bits | 0x80000000u);
}

// Which candidates a "keep the best `need`" selection keeps. A candidate is (key, order):
// better = higher key, then lower order; orders are distinct within one selection.
struct Cut {
  bool keep_all = false;
  uint32_t key = 0xffffffffu;  // keep key > this ...
  uint64_t order_limit = 0;    // ... or key == this and order < order_limit
  bool Keeps(uint32_t k, uint64_t order) const {
    return keep_all || k > key || (k == key && order < order_limit);
  }
};

// for_each(f) must call f(uint32_t key, uint64_t order) once per candidate, in the same
// sequence every time it is called (it is called up to four times). Exact: the returned
// Cut keeps exactly min(max(need, 0), #candidates) candidates.
template <typename ForEach>
Cut FindCut(int64_t need, ForEach&& for_each) {
  int64_t total = 0;
  for_each([&](uint32_t, uint64_t) { ++total; });
  Cut cut;
  if (need >= total) {
    cut.keep_all = true;
    return cut;
  }
  if (need <= 0) return cut;  // key > 0xffffffff never holds; order < 0 never holds

  constexpr int64_t kDirectLimit = 1 << 15;
  if (total <= kDirectLimit) {
    std::vector<std::pair<uint32_t, uint64_t>> all;
    all.reserve(static_cast<size_t>(total));
    for_each([&](uint32_t k, uint64_t o) { all.emplace_back(k, o); });
    auto better = [](const std::pair<uint32_t, uint64_t>& a, const std::pair<uint32_t, uint64_t>& b) {
      return a.first != b.first ? a.first > b.first : a.second < b.second;
    };
    std::nth_element(all.begin(), all.begin() + (need - 1), all.end(), better);
    cut.key = all[need - 1].first;
    cut.order_limit = all[need - 1].second + 1;
    return cut;
  }

  // Two 16-bit radix passes find the threshold key, a third collects its ties.
  std::vector<int64_t> hist(1 << 16, 0);
  for_each([&](uint32_t k, uint64_t) { ++hist[k >> 16]; });
  int64_t above = 0;
  uint32_t high = 0;
  for (int32_t b = (1 << 16) - 1; b >= 0; --b) {
    if (above + hist[b] >= need) {
      high = static_cast<uint32_t>(b);
      break;
    }
    above += hist[b];
  }
  std::fill(hist.begin(), hist.end(), 0);
  for_each([&](uint32_t k, uint64_t) {
    if ((k >> 16) == high) ++hist[k & 0xffffu];
  });
  uint32_t low = 0;
  for (int32_t b = (1 << 16) - 1; b >= 0; --b) {
    if (above + hist[b] >= need) {
      low = static_cast<uint32_t>(b);
      break;
    }
    above += hist[b];
  }
  const uint32_t threshold = (high << 16) | low;
  const int64_t ties_needed = need - above;  // >= 1
  std::vector<uint64_t> ties;
  for_each([&](uint32_t k, uint64_t o) {
    if (k == threshold) ties.push_back(o);
  });
  std::nth_element(ties.begin(), ties.begin() + (ties_needed - 1), ties.end());
  cut.key = threshold;
  cut.order_limit = ties[ties_needed - 1] + 1;
  return cut;
}

// ceil(fraction * count) with `fraction` read to 6 decimals, clamped to [0, 1].
inline int64_t CeilFraction(float fraction, int64_t count) {
  if (!(fraction > 0.0f)) return 0;
  if (fraction >= 1.0f) return count;
  const int64_t millionths = std::llround(static_cast<double>(fraction) * 1e6);
  return (millionths * count + 999999) / 1000000;
}

}  // namespace kvgate::gates::internal
