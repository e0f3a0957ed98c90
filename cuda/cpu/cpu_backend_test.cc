// The threaded/BLAS CPU backend against the plain references, op by op.
#include "cuda/cpu/cpu_backend.h"

#include <gtest/gtest.h>

#include <cmath>
#include <random>
#include <string>
#include <vector>

#include "absl/strings/str_cat.h"
#include "cuda/cpu/reference_ops.h"

namespace kvgate::ops {
namespace {

// float32 accumulation in the backend vs double in the reference; k up to 300 here.
constexpr float kAtolF32 = 1e-5f;
constexpr float kRtolF32 = 1e-4f;
constexpr float kCanary = -7777.0f;
constexpr int kGuard = 16;

std::vector<float> RandomVector(size_t n, uint32_t seed) {
  std::mt19937 rng(seed);
  std::normal_distribution<float> dist(0.0f, 1.0f);
  std::vector<float> v(n);
  for (float& x : v) x = dist(rng);
  return v;
}

// Output buffer with kGuard canaries after the end.
std::vector<float> Guarded(size_t n) { return std::vector<float>(n + kGuard, kCanary); }

void ExpectAllClose(const std::vector<float>& ref, const std::vector<float>& out, size_t n,
                    const std::string& what) {
  size_t worst = 0;
  float worst_err = 0.0f;
  for (size_t i = 0; i < n; ++i) {
    ASSERT_TRUE(std::isfinite(out[i])) << what << ": non-finite at " << i;
    const float err = std::fabs(ref[i] - out[i]);
    if (err > kAtolF32 + kRtolF32 * std::fabs(ref[i]) && err > worst_err) {
      worst_err = err;
      worst = i;
    }
  }
  EXPECT_EQ(worst_err, 0.0f) << what << ": worst index " << worst << " ref " << ref[worst]
                             << " out " << out[worst];
  for (size_t i = n; i < n + kGuard; ++i) ASSERT_EQ(out[i], kCanary) << what << ": wrote past end";
}

class CpuBackendTest : public ::testing::Test {
 protected:
  std::unique_ptr<Backend> backend_ = CreateCpuBackend(2);
};

TEST_F(CpuBackendTest, MatMulMatchesReference) {
  for (auto [m, n, k] : {std::tuple{1, 3, 54}, {3, 97, 129}, {54, 129, 300}, {97, 1, 3}}) {
    for (bool with_bias : {false, true}) {
      const std::string what = absl::StrCat("m=", m, " n=", n, " k=", k, " bias=", with_bias);
      auto x = RandomVector(m * k, 1), w = RandomVector(n * k, 2), bias = RandomVector(n, 3);
      auto ref = Guarded(m * n), out = Guarded(m * n);
      MatMulArgs args{x.data(), w.data(), with_bias ? bias.data() : nullptr, ref.data(), m, n, k};
      MatMulRef(args);
      args.y = out.data();
      ASSERT_TRUE(backend_->MatMul(args).ok());
      ExpectAllClose(ref, out, m * n, what);
    }
  }
}

TEST_F(CpuBackendTest, RmsNormRopeSiluMatchReference) {
  for (int rows : {1, 3, 97, 129}) {
    const int dim = 64;
    auto x = RandomVector(rows * dim, 4), weight = RandomVector(dim, 5);
    auto ref = Guarded(rows * dim), out = Guarded(rows * dim);
    RmsNormArgs norm{x.data(), weight.data(), ref.data(), rows, dim, 1e-5f};
    RmsNormRef(norm);
    norm.out = out.data();
    ASSERT_TRUE(backend_->RmsNorm(norm).ok());
    ExpectAllClose(ref, out, rows * dim, absl::StrCat("rmsnorm rows=", rows));

    const int heads = 4, head_dim = 16;
    auto q = RandomVector(rows * heads * head_dim, 6);
    std::vector<int32_t> positions(rows);
    for (int t = 0; t < rows; ++t) positions[t] = 3 * t + 1;
    std::vector<float> inv_freq(head_dim / 2);
    for (int i = 0; i < head_dim / 2; ++i) inv_freq[i] = std::pow(10000.0f, -2.0f * i / head_dim);
    auto q_ref = q, q_out = q;
    q_out.resize(q.size() + kGuard, kCanary);
    q_ref.resize(q.size() + kGuard, kCanary);
    RopeArgs rope{q_ref.data(), positions.data(), inv_freq.data(), rows, heads, head_dim};
    RopeRef(rope);
    rope.x = q_out.data();
    ASSERT_TRUE(backend_->Rope(rope).ok());
    ExpectAllClose(q_ref, q_out, q.size(), absl::StrCat("rope rows=", rows));

    auto gate = RandomVector(rows * dim, 7), up = RandomVector(rows * dim, 8);
    SiluMulArgs silu{gate.data(), up.data(), ref.data(), rows * dim};
    SiluMulRef(silu);
    silu.out = out.data();
    ASSERT_TRUE(backend_->SiluMul(silu).ok());
    ExpectAllClose(ref, out, rows * dim, absl::StrCat("silu rows=", rows));
  }
}

struct AttentionCase {
  int num_tokens, q_heads, kv_heads, head_dim, q_start_row, window;
  std::string Name() const {
    return absl::StrCat("tokens=", num_tokens, " q_heads=", q_heads, " kv_heads=", kv_heads,
                        " head_dim=", head_dim, " q_start=", q_start_row, " window=", window);
  }
};

TEST_F(CpuBackendTest, AttentionMatchesReference) {
  const AttentionCase cases[] = {{1, 8, 2, 16, 0, 0},    {1, 8, 2, 64, 96, 0},
                                 {54, 4, 4, 16, 0, 0},   {3, 8, 2, 128, 50, 0},
                                 {97, 8, 2, 16, 0, 8},   {129, 4, 1, 32, 0, 0},
                                 {5, 4, 2, 16, 40, 7}};
  for (const AttentionCase& c : cases) {
    const int capacity = c.q_start_row + c.num_tokens + 5;
    auto q = RandomVector(c.num_tokens * c.q_heads * c.head_dim, 11);
    auto k = RandomVector(c.kv_heads * capacity * c.head_dim, 12);
    auto v = RandomVector(c.kv_heads * capacity * c.head_dim, 13);
    const size_t n = c.num_tokens * c.q_heads * c.head_dim;
    auto ref = Guarded(n), out = Guarded(n);
    AttentionArgs args{q.data(), k.data(), v.data(), ref.data(), c.num_tokens, c.q_heads,
                       c.kv_heads, c.head_dim, capacity, c.q_start_row, c.window,
                       1.0f / std::sqrt(static_cast<float>(c.head_dim))};
    AttentionRef(args);
    args.out = out.data();
    ASSERT_TRUE(backend_->Attention(args).ok());
    ExpectAllClose(ref, out, n, c.Name());
  }
}

TEST_F(CpuBackendTest, StoreKvThenAttentionSeesOnlyVisibleRows) {
  // With one visible row (window 1) the output must be exactly that row's V.
  const int capacity = 8, head_dim = 4;
  std::vector<float> k(2 * head_dim, 1.0f), v = {1, 2, 3, 4, 5, 6, 7, 8};
  std::vector<float> k_cache(capacity * head_dim, 0.0f), v_cache(capacity * head_dim, 0.0f);
  StoreKvArgs store{k.data(), v.data(), k_cache.data(), v_cache.data(), 2, 1, head_dim, capacity, 3};
  ASSERT_TRUE(backend_->StoreKv(store).ok());
  EXPECT_EQ(v_cache[3 * head_dim], 1.0f);
  EXPECT_EQ(v_cache[4 * head_dim + 3], 8.0f);
  std::vector<float> q(head_dim, 0.5f), out(head_dim);
  AttentionArgs args{q.data(), k_cache.data(), v_cache.data(), out.data(), 1, 1, 1, head_dim,
                     capacity, 4, 1, 0.5f};
  ASSERT_TRUE(backend_->Attention(args).ok());
  EXPECT_EQ(out, (std::vector<float>{5, 6, 7, 8}));
}

TEST_F(CpuBackendTest, EmbedAndAdd) {
  std::vector<float> table = {0, 1, 10, 11, 20, 21};
  std::vector<int32_t> ids = {2, 0};
  std::vector<float> out(4);
  ASSERT_TRUE(backend_->Embed({ids.data(), table.data(), out.data(), 2, 2, 3}).ok());
  EXPECT_EQ(out, (std::vector<float>{20, 21, 0, 1}));
  std::vector<float> y = {1, 1, 1, 1};
  ASSERT_TRUE(backend_->Add({out.data(), y.data(), 4}).ok());
  EXPECT_EQ(out, (std::vector<float>{21, 22, 1, 2}));
}

}  // namespace
}  // namespace kvgate::ops
