// The few-row GEMM: bit-for-bit the same row whatever the number of rows and threads, and
// within the summation-order error bound of the double-precision reference.
#include "cuda/cpu/row_invariant_matmul.h"

#include <gtest/gtest.h>

#include <cmath>
#include <cstring>
#include <random>
#include <vector>

#include "cuda/cpu/reference_ops.h"

namespace kvgate::ops {
namespace {

constexpr double kUnitRoundoff = 1.0 / (1 << 24);  // fp32

struct Problem {
  int32_t m, n, k;
  std::vector<float> x, w, bias;
};

Problem MakeProblem(int32_t m, int32_t n, int32_t k, uint32_t seed) {
  std::mt19937 rng(seed);
  std::normal_distribution<float> dist(0.0f, 1.0f);
  Problem p{m, n, k, {}, {}, {}};
  p.x.resize(static_cast<size_t>(m) * k);
  p.w.resize(static_cast<size_t>(n) * k);
  p.bias.resize(n);
  for (float& v : p.x) v = dist(rng);
  for (float& v : p.w) v = dist(rng);
  for (float& v : p.bias) v = dist(rng);
  return p;
}

std::vector<float> MultiplyRows(const Problem& p, int32_t first_row, int32_t rows, ThreadPool* pool) {
  std::vector<float> y(static_cast<size_t>(rows) * p.n);
  MatMulArgs a;
  a.x = p.x.data() + static_cast<int64_t>(first_row) * p.k;
  a.w = p.w.data();
  a.bias = p.bias.data();
  a.y = y.data();
  a.m = rows;
  a.n = p.n;
  a.k = p.k;
  RowInvariantMatMul(a, pool);
  return y;
}

TEST(RowInvariantMatMulTest, EveryRowEqualsItsOneRowCallBitForBit) {
  ThreadPool pool(3);
  for (int32_t k : {1, 7, 8, 9, 64, 257}) {
    for (int32_t m : {2, 3, 4, 5, 17, kRowInvariantMaxRows}) {
      const uint32_t seed = 1000u * k + m;
      SCOPED_TRACE(::testing::Message() << "m=" << m << " k=" << k << " seed=" << seed);
      const Problem p = MakeProblem(m, 33, k, seed);
      const std::vector<float> all = MultiplyRows(p, 0, m, &pool);
      const std::vector<float> no_threads = MultiplyRows(p, 0, m, nullptr);
      ASSERT_EQ(std::memcmp(all.data(), no_threads.data(), all.size() * sizeof(float)), 0);
      for (int32_t i = 0; i < m; ++i) {
        const std::vector<float> alone = MultiplyRows(p, i, 1, &pool);
        ASSERT_EQ(std::memcmp(alone.data(), all.data() + static_cast<size_t>(i) * p.n, alone.size() * sizeof(float)),
                  0)
            << "row " << i;
      }
    }
  }
}

// Eight lanes of about k/8 sequential sums, three pairwise levels, the tail and the bias:
// at most n = k/8 + 8 roundings on any path, so |y - exact| <= gamma_n * sum|terms|
// (Higham, Accuracy and Stability, 3.1), plus the reference's own rounding to float.
TEST(RowInvariantMatMulTest, WithinTheSummationBoundOfTheReference) {
  for (int32_t k : {1, 5, 64, 1000, 4096}) {
    const Problem p = MakeProblem(5, 19, k, 77u + k);
    const std::vector<float> y = MultiplyRows(p, 0, p.m, nullptr);
    std::vector<float> ref(y.size());
    MatMulArgs a;
    a.x = p.x.data();
    a.w = p.w.data();
    a.bias = p.bias.data();
    a.y = ref.data();
    a.m = p.m;
    a.n = p.n;
    a.k = p.k;
    MatMulRef(a);
    const double n_roundings = k / 8 + 8;
    const double gamma = n_roundings * kUnitRoundoff / (1 - n_roundings * kUnitRoundoff);
    for (int32_t i = 0; i < p.m; ++i) {
      for (int32_t j = 0; j < p.n; ++j) {
        double magnitude = std::fabs(p.bias[j]);
        for (int32_t t = 0; t < k; ++t) magnitude += std::fabs(double(p.x[i * k + t]) * p.w[j * k + t]);
        const double got = y[i * p.n + j], want = ref[i * p.n + j];
        ASSERT_LE(std::fabs(got - want), gamma * magnitude + kUnitRoundoff * std::fabs(want))
            << "k=" << k << " i=" << i << " j=" << j;
      }
    }
  }
}

}  // namespace
}  // namespace kvgate::ops
