// The threaded/BLAS CPU backend against the plain references, op by op.
#include "cuda/cpu/cpu_backend.h"

#include <gtest/gtest.h>

#include <algorithm>
#include <cmath>
#include <cstring>
#include <limits>
#include <numeric>
#include <random>
#include <string>
#include <vector>

#include "absl/strings/str_cat.h"
#include "cuda/cpu/reference_ops.h"
#include "cuda/testing/head_paged_layout.h"

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

// Bit equality of the first n floats (NaN-safe).
void ExpectBitEqual(const std::vector<float>& a, const std::vector<float>& b, size_t n,
                    const std::string& what) {
  ASSERT_GE(a.size(), n);
  ASSERT_GE(b.size(), n);
  for (size_t i = 0; i < n; ++i) {
    ASSERT_EQ(std::memcmp(&a[i], &b[i], sizeof(float)), 0)
        << what << ": differs at " << i << ": " << a[i] << " vs " << b[i];
  }
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

// ------------------------------------------------------------- Attention key_mask

struct MaskedAttentionCase {
  int num_tokens, q_heads, kv_heads, head_dim, q_start_row, window, keep_percent;
  uint32_t seed;
  bool per_query_head = false;  // key_mask rows per query head (key_mask_per_query_head)
  std::string Name() const {
    return absl::StrCat("tokens=", num_tokens, " q_heads=", q_heads, " kv_heads=", kv_heads,
                        " head_dim=", head_dim, " q_start=", q_start_row, " window=", window,
                        " keep=", keep_percent, "% seed=", seed, " per_q_head=", per_query_head);
  }
};

// Masked attention by brute force, written from the rule in cuda/ops.h rather than from
// AttentionRef: list the rows query t may see, then a double softmax over that list.
std::vector<float> BruteForceMaskedAttention(const AttentionArgs& a) {
  std::vector<float> out(static_cast<size_t>(a.num_tokens) * a.num_q_heads * a.head_dim);
  const int group = a.num_q_heads / a.num_kv_heads;
  for (int t = 0; t < a.num_tokens; ++t) {
    const int self = a.q_start_row + t;
    for (int h = 0; h < a.num_q_heads; ++h) {
      const int kv = h / group;
      const int mask_row = a.key_mask_per_query_head ? h : kv;
      std::vector<int> seen;
      for (int r = 0; r <= self; ++r) {
        const bool in_window = a.sliding_window == 0 || self - r < a.sliding_window;
        const bool kept = a.key_mask[static_cast<size_t>(mask_row) * a.capacity_tokens + r] != 0;
        if (in_window && (kept || r == self)) seen.push_back(r);
      }
      const float* q = a.q + (static_cast<size_t>(t) * a.num_q_heads + h) * a.head_dim;
      std::vector<double> w;
      for (int r : seen) {
        const float* k = a.k_cache + (static_cast<size_t>(kv) * a.capacity_tokens + r) * a.head_dim;
        double dot = 0.0;
        for (int i = 0; i < a.head_dim; ++i) dot += static_cast<double>(q[i]) * k[i];
        w.push_back(dot * a.scale);
      }
      const double max_w = *std::max_element(w.begin(), w.end());
      double sum = 0.0;
      for (double& x : w) sum += (x = std::exp(x - max_w));
      for (int i = 0; i < a.head_dim; ++i) {
        double acc = 0.0;
        for (size_t j = 0; j < seen.size(); ++j) {
          acc += w[j] / sum *
                 a.v_cache[(static_cast<size_t>(kv) * a.capacity_tokens + seen[j]) * a.head_dim + i];
        }
        out[(static_cast<size_t>(t) * a.num_q_heads + h) * a.head_dim + i] = static_cast<float>(acc);
      }
    }
  }
  return out;
}

TEST_F(CpuBackendTest, AttentionKeyMaskMatchesBruteForce) {
  const MaskedAttentionCase cases[] = {
      {1, 8, 2, 64, 96, 0, 50, 21},   // decode over an evicted history, GQA 4
      {54, 4, 4, 16, 43, 0, 30, 22},  // chunked prefill, MHA
      {97, 8, 2, 32, 0, 0, 60, 23},   // evicted rows inside the chunk: each still sees itself
      {5, 14, 2, 16, 40, 7, 50, 24},  // GQA 7 with a sliding window
      {3, 8, 2, 128, 50, 16, 0, 25},  // everything evicted: each query sees only its own row
      {129, 4, 1, 16, 0, 32, 70, 26}, // window prefill, one kv head
      // One mask row per query head: the heads of a group see different rows.
      {1, 8, 2, 64, 96, 0, 50, 27, true},    // SAGE-KV decode, GQA 4
      {1, 14, 2, 32, 129, 0, 30, 28, true},  // decode, GQA 7
      {5, 14, 2, 16, 40, 7, 50, 29, true},   // GQA 7 with a sliding window
      {54, 8, 2, 16, 43, 0, 40, 30, true},   // chunked prefill
      {97, 4, 4, 16, 0, 0, 60, 31, true},    // MHA: per query head = per kv head
      {3, 8, 2, 128, 50, 16, 0, 32, true},   // everything evicted
  };
  for (const MaskedAttentionCase& c : cases) {
    std::mt19937 rng(c.seed);
    const int capacity = c.q_start_row + c.num_tokens + 3;
    const int first_seen = c.window > 0 ? std::max(0, c.q_start_row - c.window + 1) : 0;
    const size_t row_floats = c.head_dim;
    auto q = RandomVector(c.num_tokens * c.q_heads * c.head_dim, c.seed + 1);
    auto k = RandomVector(c.kv_heads * capacity * row_floats, c.seed + 2);
    auto v = RandomVector(c.kv_heads * capacity * row_floats, c.seed + 3);
    const int mask_rows = c.per_query_head ? c.q_heads : c.kv_heads;
    const int rows_per_kv_head = mask_rows / c.kv_heads;
    std::vector<uint8_t> mask(mask_rows * capacity);
    std::uniform_int_distribution<int> percent(0, 99);
    for (uint8_t& m : mask) m = percent(rng) < c.keep_percent ? 1 : 0;
    const float nan = std::numeric_limits<float>::quiet_NaN();
    for (int h = 0; h < c.kv_heads; ++h) {
      for (int r = 0; r < capacity; ++r) {
        bool kept = false;  // by the mask row of some query head of the group
        for (int j = 0; j < rows_per_kv_head; ++j) kept |= mask[(h * rows_per_kv_head + j) * capacity + r] != 0;
        // NaN wherever no query may look: evicted rows of earlier chunks, rows before the
        // first window, rows after the last query. An evicted row of this chunk stays
        // finite: its own query sees it.
        const bool unseen = (!kept && r < c.q_start_row) || r < first_seen ||
                            r >= c.q_start_row + c.num_tokens;
        if (unseen) {
          std::fill_n(k.begin() + (h * capacity + r) * row_floats, row_floats, nan);
          std::fill_n(v.begin() + (h * capacity + r) * row_floats, row_floats, nan);
        }
      }
    }
    const size_t n = q.size();
    auto ref = Guarded(n), out = Guarded(n);
    AttentionArgs args{q.data(), k.data(), v.data(), ref.data(), c.num_tokens, c.q_heads,
                       c.kv_heads, c.head_dim, capacity, c.q_start_row, c.window,
                       1.0f / std::sqrt(static_cast<float>(c.head_dim)), mask.data(),
                       c.per_query_head};
    std::vector<float> brute = BruteForceMaskedAttention(args);
    brute.resize(n + kGuard, kCanary);
    AttentionRef(args);
    ExpectAllClose(brute, ref, n, "ref " + c.Name());
    args.out = out.data();
    ASSERT_TRUE(backend_->Attention(args).ok());
    ExpectAllClose(brute, out, n, "cpu " + c.Name());
  }
}

TEST_F(CpuBackendTest, AttentionAllOnesKeyMaskIsBitExactNoMask) {
  const AttentionCase cases[] = {{1, 8, 2, 64, 96, 0}, {54, 4, 4, 16, 0, 0}, {97, 8, 2, 16, 0, 8},
                                 {5, 14, 2, 32, 40, 7}};
  for (const AttentionCase& c : cases) {
    const int capacity = c.q_start_row + c.num_tokens + 5;
    auto q = RandomVector(c.num_tokens * c.q_heads * c.head_dim, 31);
    auto k = RandomVector(c.kv_heads * capacity * c.head_dim, 32);
    auto v = RandomVector(c.kv_heads * capacity * c.head_dim, 33);
    const std::vector<uint8_t> ones(c.kv_heads * capacity, 1);
    const size_t n = q.size();
    auto plain = Guarded(n), masked = Guarded(n);
    AttentionArgs args{q.data(), k.data(), v.data(), plain.data(), c.num_tokens, c.q_heads,
                       c.kv_heads, c.head_dim, capacity, c.q_start_row, c.window,
                       1.0f / std::sqrt(static_cast<float>(c.head_dim))};
    AttentionRef(args);
    args.out = masked.data();
    args.key_mask = ones.data();
    AttentionRef(args);
    ExpectBitEqual(plain, masked, n + kGuard, "ref " + c.Name());
    args.key_mask = nullptr;
    args.out = plain.data();
    ASSERT_TRUE(backend_->Attention(args).ok());
    args.key_mask = ones.data();
    args.out = masked.data();
    ASSERT_TRUE(backend_->Attention(args).ok());
    ExpectBitEqual(plain, masked, n + kGuard, "cpu " + c.Name());
  }
}

// A per-query-head mask whose rows repeat the kv head's row for every query head of the
// group is the per-kv-head mask: bit-identical outputs, in the reference and the backend.
TEST_F(CpuBackendTest, AttentionPerQueryHeadMaskOfGroupRowsIsBitExactKvMask) {
  const MaskedAttentionCase cases[] = {{1, 8, 2, 64, 96, 0, 50, 41},
                                       {54, 14, 2, 16, 43, 0, 40, 42},
                                       {5, 4, 4, 32, 40, 7, 50, 43}};
  for (const MaskedAttentionCase& c : cases) {
    std::mt19937 rng(c.seed);
    const int capacity = c.q_start_row + c.num_tokens + 3;
    const int group = c.q_heads / c.kv_heads;
    auto q = RandomVector(c.num_tokens * c.q_heads * c.head_dim, c.seed + 1);
    auto k = RandomVector(c.kv_heads * capacity * c.head_dim, c.seed + 2);
    auto v = RandomVector(c.kv_heads * capacity * c.head_dim, c.seed + 3);
    std::vector<uint8_t> kv_mask(c.kv_heads * capacity);
    std::uniform_int_distribution<int> percent(0, 99);
    for (uint8_t& m : kv_mask) m = percent(rng) < c.keep_percent ? 1 : 0;
    std::vector<uint8_t> q_mask(c.q_heads * capacity);
    for (int h = 0; h < c.q_heads; ++h) {
      std::copy_n(kv_mask.begin() + (h / group) * capacity, capacity, q_mask.begin() + h * capacity);
    }
    const size_t n = q.size();
    for (bool use_backend : {false, true}) {
      auto by_kv = Guarded(n), by_q = Guarded(n);
      AttentionArgs args{q.data(), k.data(), v.data(), by_kv.data(), c.num_tokens, c.q_heads,
                         c.kv_heads, c.head_dim, capacity, c.q_start_row, c.window,
                         1.0f / std::sqrt(static_cast<float>(c.head_dim)), kv_mask.data()};
      const auto run = [&] {
        if (use_backend) {
          ASSERT_TRUE(backend_->Attention(args).ok());
        } else {
          AttentionRef(args);
        }
      };
      run();
      args.out = by_q.data();
      args.key_mask = q_mask.data();
      args.key_mask_per_query_head = true;
      run();
      ExpectBitEqual(by_kv, by_q, n + kGuard, (use_backend ? "cpu " : "ref ") + c.Name());
    }
  }
}

// --------------------------------------------------------------------- CopyRows

// Rows coded by value (src row s, element e holds s * 1000 + e, exact in float), so the
// expected destination follows from the indices alone.
TEST_F(CpuBackendTest, CopyRowsIsExact) {
  struct Case {
    int num_rows, row_elements, pool_rows;
    bool in_place;  // src and dst are one buffer (page compaction)
  };
  for (const Case& c : {Case{1, 1, 1, false}, Case{3, 3, 7, false}, Case{54, 64, 129, false},
                        Case{97, 128, 200, true}, Case{129, 3, 300, true},
                        Case{4096, 128, 5000, false}}) {
    const std::string what = absl::StrCat("rows=", c.num_rows, " elements=", c.row_elements,
                                          " pool=", c.pool_rows, " in_place=", c.in_place);
    std::mt19937 rng(c.num_rows);
    std::vector<int32_t> order(c.pool_rows);
    std::iota(order.begin(), order.end(), 0);
    std::shuffle(order.begin(), order.end(), rng);
    std::vector<int32_t> src_rows(order.begin(), order.begin() + c.num_rows), dst_rows;
    if (c.in_place) {
      // Disjoint source and destination rows of one pool (needs 2 * num_rows <= pool).
      ASSERT_LE(2 * c.num_rows, c.pool_rows);
      dst_rows.assign(order.begin() + c.num_rows, order.begin() + 2 * c.num_rows);
    } else {
      std::shuffle(order.begin(), order.end(), rng);
      dst_rows.assign(order.begin(), order.begin() + c.num_rows);
    }
    const size_t n = static_cast<size_t>(c.pool_rows) * c.row_elements;
    std::vector<float> src(n);
    for (size_t i = 0; i < n; ++i) {
      src[i] = static_cast<float>(i / c.row_elements * 1000 + i % c.row_elements);
    }
    std::vector<float> expected = c.in_place ? src : RandomVector(n, 41);
    const std::vector<float> dst_before = expected;
    for (int i = 0; i < c.num_rows; ++i) {
      for (int e = 0; e < c.row_elements; ++e) {
        expected[static_cast<size_t>(dst_rows[i]) * c.row_elements + e] =
            static_cast<float>(src_rows[i] * 1000 + e);
      }
    }
    expected.resize(n + kGuard, kCanary);
    for (bool use_backend : {false, true}) {
      auto dst = Guarded(n);
      std::copy(dst_before.begin(), dst_before.end(), dst.begin());
      const CopyRowsArgs args{c.in_place ? dst.data() : src.data(), dst.data(), src_rows.data(),
                              dst_rows.data(), c.num_rows, c.row_elements};
      if (use_backend) {
        ASSERT_TRUE(backend_->CopyRows(args).ok());
      } else {
        CopyRowsRef(args);
      }
      ExpectBitEqual(expected, dst, n + kGuard, (use_backend ? "cpu " : "ref ") + what);
    }
  }
}

// Runs (run_lengths): entry i copies run_lengths[i] consecutive rows; the result equals the
// same copy written out one row an entry, for every dtype pair, in the backend and the reference.
TEST_F(CpuBackendTest, CopyRowRunsEqualTheRowByRowCopy) {
  const int page = 16, pages = 40, row_elements = 24;
  std::mt19937 rng(47);
  std::vector<int32_t> page_order(pages);
  std::iota(page_order.begin(), page_order.end(), 0);
  std::shuffle(page_order.begin(), page_order.end(), rng);
  // Source: a contiguous cache of 300 rows cut into runs of 1..16 rows; each run lands at
  // the start of its own (shuffled) page.
  std::vector<int32_t> src_runs, dst_runs, lengths, src_rows, dst_rows;
  for (int32_t at = 0, k = 0; at < 300 && k < pages; ++k) {
    const int32_t n = std::min<int32_t>(1 + static_cast<int32_t>(rng() % page), 300 - at);
    src_runs.push_back(at);
    dst_runs.push_back(page_order[k] * page);
    lengths.push_back(n);
    for (int32_t r = 0; r < n; ++r) {
      src_rows.push_back(at + r);
      dst_rows.push_back(page_order[k] * page + r);
    }
    at += n;
  }
  lengths.push_back(0);  // an empty run is a no-op
  src_runs.push_back(0);
  dst_runs.push_back(0);
  const size_t src_n = 300 * row_elements, dst_n = static_cast<size_t>(pages) * page * row_elements;
  const std::vector<float> src = RandomVector(src_n, 48);
  std::vector<Bf16> src_bf16(src_n);
  for (size_t i = 0; i < src_n; ++i) src_bf16[i] = F32ToBf16(src[i]);
  for (KvDtype from : {KvDtype::kFloat32, KvDtype::kBf16}) {
    for (KvDtype to : {KvDtype::kFloat32, KvDtype::kBf16}) {
      const void* src_data = from == KvDtype::kFloat32 ? static_cast<const void*>(src.data()) : src_bf16.data();
      std::vector<float> want_f(dst_n, 7.0f), got_f(dst_n, 7.0f), ref_f(dst_n, 7.0f);
      std::vector<Bf16> want_b(dst_n, F32ToBf16(7.0f)), got_b = want_b, ref_b = want_b;
      auto dst_of = [&](std::vector<float>& f, std::vector<Bf16>& b) -> void* {
        return to == KvDtype::kFloat32 ? static_cast<void*>(f.data()) : b.data();
      };
      CopyRowsRef({src_data, dst_of(want_f, want_b), src_rows.data(), dst_rows.data(),
                   static_cast<int32_t>(src_rows.size()), row_elements, from, to});
      CopyRowsArgs runs{src_data, dst_of(got_f, got_b), src_runs.data(), dst_runs.data(),
                        static_cast<int32_t>(src_runs.size()), row_elements, from, to, lengths.data()};
      ASSERT_TRUE(backend_->CopyRows(runs).ok());
      runs.dst = dst_of(ref_f, ref_b);
      CopyRowsRef(runs);
      const std::string what = absl::StrCat(KvDtypeName(from), " -> ", KvDtypeName(to));
      if (to == KvDtype::kFloat32) {
        EXPECT_EQ(std::memcmp(got_f.data(), want_f.data(), dst_n * 4), 0) << "cpu " << what;
        EXPECT_EQ(std::memcmp(ref_f.data(), want_f.data(), dst_n * 4), 0) << "ref " << what;
      } else {
        EXPECT_EQ(std::memcmp(got_b.data(), want_b.data(), dst_n * 2), 0) << "cpu " << what;
        EXPECT_EQ(std::memcmp(ref_b.data(), want_b.data(), dst_n * 2), 0) << "ref " << what;
      }
    }
  }
}

// float32 -> bf16 rounds each element to nearest even (F32ToBf16), bf16 -> float32 widens
// exactly, bf16 -> bf16 moves the bits; the backend and the reference agree bit for bit,
// and untouched rows keep their old contents.
TEST_F(CpuBackendTest, CopyRowsConvertsBetweenFloat32AndBf16) {
  const int num_rows = 300, row_elements = 128, pool_rows = 700;
  std::mt19937 rng(43);
  std::vector<int32_t> order(pool_rows);
  std::iota(order.begin(), order.end(), 0);
  std::shuffle(order.begin(), order.end(), rng);
  const std::vector<int32_t> src_rows(order.begin(), order.begin() + num_rows);
  std::shuffle(order.begin(), order.end(), rng);
  const std::vector<int32_t> dst_rows(order.begin(), order.begin() + num_rows);
  const size_t n = static_cast<size_t>(pool_rows) * row_elements;
  std::vector<float> src_f32 = RandomVector(n, 44);
  src_f32[5] = std::numeric_limits<float>::quiet_NaN();
  src_f32[6] = std::numeric_limits<float>::infinity();
  const std::vector<Bf16> src_bf16 = paged_testing::ToBf16Bits(RandomVector(n, 45));
  const std::vector<float> dst_f32_before = RandomVector(n, 46);
  const std::vector<Bf16> dst_bf16_before = paged_testing::ToBf16Bits(RandomVector(n, 47));

  std::vector<Bf16> expect_narrow = dst_bf16_before, expect_same = dst_bf16_before;
  std::vector<float> expect_wide = dst_f32_before;
  for (int i = 0; i < num_rows; ++i) {
    for (int e = 0; e < row_elements; ++e) {
      const size_t from = static_cast<size_t>(src_rows[i]) * row_elements + e;
      const size_t to = static_cast<size_t>(dst_rows[i]) * row_elements + e;
      expect_narrow[to] = F32ToBf16(src_f32[from]);
      expect_same[to] = src_bf16[from];
      expect_wide[to] = Bf16ToF32(src_bf16[from]);
    }
  }
  for (bool use_backend : {false, true}) {
    const std::string who = use_backend ? "cpu" : "ref";
    auto run = [&](const void* src, KvDtype src_dtype, void* dst, KvDtype dst_dtype) {
      CopyRowsArgs args{src, dst, src_rows.data(), dst_rows.data(), num_rows, row_elements, src_dtype, dst_dtype};
      if (use_backend) {
        ASSERT_TRUE(backend_->CopyRows(args).ok());
      } else {
        CopyRowsRef(args);
      }
    };
    std::vector<Bf16> narrow = dst_bf16_before, same = dst_bf16_before;
    std::vector<float> wide = dst_f32_before;
    run(src_f32.data(), KvDtype::kFloat32, narrow.data(), KvDtype::kBf16);
    run(src_bf16.data(), KvDtype::kBf16, same.data(), KvDtype::kBf16);
    run(src_bf16.data(), KvDtype::kBf16, wide.data(), KvDtype::kFloat32);
    EXPECT_EQ(narrow, expect_narrow) << who << " float32 -> bf16";
    EXPECT_EQ(same, expect_same) << who << " bf16 -> bf16";
    EXPECT_EQ(std::memcmp(wide.data(), expect_wide.data(), n * sizeof(float)), 0) << who << " bf16 -> float32";
  }
  // A converting copy cannot run within one buffer; unknown dtypes are refused.
  std::vector<float> buffer = dst_f32_before;
  EXPECT_EQ(backend_
                ->CopyRows({buffer.data(), buffer.data(), src_rows.data(), dst_rows.data(), num_rows, row_elements,
                            KvDtype::kFloat32, KvDtype::kBf16})
                .code(),
            absl::StatusCode::kInvalidArgument);
  EXPECT_EQ(backend_
                ->CopyRows({src_f32.data(), buffer.data(), src_rows.data(), dst_rows.data(), num_rows, row_elements,
                            static_cast<KvDtype>(7), KvDtype::kFloat32})
                .code(),
            absl::StatusCode::kInvalidArgument);
}

// ------------------------------------------------------------------- ArgMaxRows

// engine::ArgMax's rule on hand-made rows (ties, NaN in and out of column 0, -inf, one
// column), then random rows against the reference.
TEST_F(CpuBackendTest, ArgMaxRowsFollowsTheHostRule) {
  const float nan = std::numeric_limits<float>::quiet_NaN(), inf = std::numeric_limits<float>::infinity();
  const std::vector<std::pair<std::vector<float>, int32_t>> rows = {
      {{1, 3, 2, 3}, 1},      {{nan, 5, 7}, 0},       {{1, nan, 0.5f}, 0},  {{-inf, -inf, -1}, 2},
      {{nan, nan, nan}, 0},   {{-inf, nan, -inf}, 0}, {{0.0f, -0.0f}, 0},   {{2, inf, inf}, 1},
      {{-1, -2, nan, -0.5f}, 3},
  };
  for (const auto& [row, want] : rows) {
    int32_t ref = -1, cpu = -1;
    const ArgMaxRowsArgs args{row.data(), &ref, 1, static_cast<int32_t>(row.size())};
    ArgMaxRowsRef(args);
    ASSERT_TRUE(backend_->ArgMaxRows({row.data(), &cpu, 1, static_cast<int32_t>(row.size())}).ok());
    EXPECT_EQ(ref, want) << "row of " << row.size();
    EXPECT_EQ(cpu, want) << "row of " << row.size();
  }
  std::mt19937 rng(71);
  const int32_t num_rows = 37, cols = 50000;
  std::vector<float> x = RandomVector(static_cast<size_t>(num_rows) * cols, 72);
  for (int32_t r = 0; r < num_rows; r += 3) x[static_cast<size_t>(r) * cols + rng() % cols] = 5.0f;  // ties
  for (int32_t r = 0; r < num_rows; r += 3) x[static_cast<size_t>(r) * cols + rng() % cols] = 5.0f;
  std::vector<int32_t> ref(num_rows, -1), cpu(num_rows, -1);
  ArgMaxRowsRef({x.data(), ref.data(), num_rows, cols});
  ASSERT_TRUE(backend_->ArgMaxRows({x.data(), cpu.data(), num_rows, cols}).ok());
  EXPECT_EQ(cpu, ref);
  EXPECT_EQ(backend_->ArgMaxRows({x.data(), cpu.data(), 1, 0}).code(), absl::StatusCode::kInvalidArgument);
}

// ------------------------------------------------------ HeadPagedDecodeAttention

struct HeadPagedCase {
  const char* label;
  int num_seqs, q_heads, kv_heads, head_dim, page_tokens;
  std::vector<int32_t> lengths;  // cycled over the seq heads
  bool masks;
  uint32_t seed;
  std::string Name() const {
    std::string lens;
    for (int32_t l : lengths) absl::StrAppend(&lens, "_", l);
    return absl::StrCat(label, " seqs=", num_seqs, " q_heads=", q_heads, " kv_heads=", kv_heads,
                        " head_dim=", head_dim, " page_tokens=", page_tokens, " lengths", lens,
                        " masks=", masks, " seed=", seed);
  }
};

TEST_F(CpuBackendTest, HeadPagedDecodeAttentionMatchesReference) {
  const HeadPagedCase cases[] = {
      {"pt16_gqa4_masks", 3, 8, 2, 64, 16, {1, 3, 54, 97, 129, 16}, true, 51},
      {"pt1_mha", 2, 4, 4, 16, 1, {1, 3, 54, 97, 129}, false, 52},
      {"pt128_gqa7_masks", 2, 14, 2, 32, 128, {129, 3, 97, 1}, true, 53},
      {"pt128_gqa7", 2, 14, 2, 32, 128, {129, 3, 97, 1}, false, 54},
      {"pt16_hd3", 1, 2, 1, 3, 16, {54}, true, 55},
      {"pt16_hd256_masks", 2, 4, 2, 256, 16, {97, 129, 1, 3}, true, 56},
      {"pt16_gqa1_masks", 2, 4, 4, 64, 16, {3, 54, 97, 129}, true, 57},
  };
  for (const HeadPagedCase& c : cases) {
    std::mt19937 rng(c.seed);
    std::vector<int32_t> lengths(c.num_seqs * c.kv_heads);
    for (size_t i = 0; i < lengths.size(); ++i) lengths[i] = c.lengths[i % c.lengths.size()];
    // Odd seeds start each head at a random slot of its first page (a ring's layout).
    const paged_testing::HeadPagedLayout layout = paged_testing::MakeHeadPagedLayout(
        rng, lengths, c.page_tokens, c.head_dim, c.q_heads / c.kv_heads, c.masks, 3, c.seed % 2 == 1);
    auto q = RandomVector(c.num_seqs * c.q_heads * c.head_dim, c.seed);
    const size_t n = q.size();
    auto ref = Guarded(n), out = Guarded(n);
    HeadPagedDecodeAttentionArgs args{q.data(), layout.HostView(), ref.data(), c.num_seqs,
                                      c.q_heads, c.kv_heads,
                                      1.0f / std::sqrt(static_cast<float>(c.head_dim))};
    HeadPagedDecodeAttentionRef(args);
    args.out = out.data();
    ASSERT_TRUE(backend_->HeadPagedDecodeAttention(args).ok());
    ExpectAllClose(ref, out, n, c.Name());

    // bf16 pages: the same computation as float32 pages holding the rounded values, bit
    // for bit, in the backend and in the reference.
    const paged_testing::HeadPagedLayout rounded = paged_testing::RoundedToBf16(layout);
    const std::vector<Bf16> k16 = paged_testing::ToBf16Bits(layout.k_pages);
    const std::vector<Bf16> v16 = paged_testing::ToBf16Bits(layout.v_pages);
    HeadPagedKvView view16 = rounded.HostView();
    view16.k_pages = k16.data();
    view16.v_pages = v16.data();
    view16.dtype = KvDtype::kBf16;
    for (bool use_backend : {false, true}) {
      auto from_f32 = Guarded(n), from_bf16 = Guarded(n);
      HeadPagedDecodeAttentionArgs a32 = args, a16 = args;
      a32.kv = rounded.HostView();
      a32.out = from_f32.data();
      a16.kv = view16;
      a16.out = from_bf16.data();
      if (use_backend) {
        ASSERT_TRUE(backend_->HeadPagedDecodeAttention(a32).ok());
        ASSERT_TRUE(backend_->HeadPagedDecodeAttention(a16).ok());
      } else {
        HeadPagedDecodeAttentionRef(a32);
        HeadPagedDecodeAttentionRef(a16);
      }
      ExpectBitEqual(from_f32, from_bf16, n + kGuard, (use_backend ? "cpu bf16 " : "ref bf16 ") + c.Name());
    }
  }
}

// Paged decode over pages holding exactly rows [0, L) of every kv head equals
// AttentionRef for the query at row L - 1 of a contiguous cache gathered from the pages.
TEST_F(CpuBackendTest, HeadPagedDecodeEqualsContiguousAttentionOnGatheredCopy) {
  const int kv_heads = 2, q_heads = 8, head_dim = 32, page_tokens = 16;
  const std::vector<int32_t> seq_lengths = {1, 54, 129};
  const int num_seqs = static_cast<int>(seq_lengths.size());
  std::vector<int32_t> lengths;
  for (int32_t l : seq_lengths) lengths.insert(lengths.end(), kv_heads, l);
  std::mt19937 rng(61);
  paged_testing::HeadPagedLayout layout =
      paged_testing::MakeHeadPagedLayout(rng, lengths, page_tokens, head_dim, 4, false, 5);
  const float scale = 1.0f / std::sqrt(static_cast<float>(head_dim));
  auto q = RandomVector(num_seqs * q_heads * head_dim, 62);
  const size_t n = q.size();
  auto paged_ref = Guarded(n), paged_cpu = Guarded(n), contiguous = Guarded(n);
  HeadPagedDecodeAttentionArgs args{q.data(), layout.HostView(), paged_ref.data(), num_seqs,
                                    q_heads, kv_heads, scale};
  HeadPagedDecodeAttentionRef(args);
  args.out = paged_cpu.data();
  ASSERT_TRUE(backend_->HeadPagedDecodeAttention(args).ok());
  for (int s = 0; s < num_seqs; ++s) {
    const int length = seq_lengths[s], capacity = length + 2;  // 2 NaN rows past the query
    std::vector<float> k(kv_heads * capacity * head_dim, std::numeric_limits<float>::quiet_NaN());
    std::vector<float> v = k;
    for (int h = 0; h < kv_heads; ++h) {
      for (int r = 0; r < length; ++r) {
        std::copy_n(layout.K(s * kv_heads + h, r), head_dim, k.begin() + (h * capacity + r) * head_dim);
        std::copy_n(layout.V(s * kv_heads + h, r), head_dim, v.begin() + (h * capacity + r) * head_dim);
      }
    }
    const size_t offset = static_cast<size_t>(s) * q_heads * head_dim;
    AttentionRef({q.data() + offset, k.data(), v.data(), contiguous.data() + offset, 1, q_heads,
                  kv_heads, head_dim, capacity, length - 1, 0, scale});
  }
  ExpectAllClose(contiguous, paged_ref, n, "paged ref vs contiguous ref");
  ExpectAllClose(contiguous, paged_cpu, n, "paged cpu vs contiguous ref");
}

// Per kv head a random subset of rows [0, L - 1) is kept, plus the new token L - 1; the
// pages hold only the kept rows. That equals AttentionRef over the full contiguous cache
// with key_mask clearing the dropped rows (NaN there), for the query at row L - 1.
TEST_F(CpuBackendTest, HeadPagedDecodeOfKeptRowsEqualsKeyMaskedAttention) {
  const int kv_heads = 2, q_heads = 14, head_dim = 64, page_tokens = 16;
  const float scale = 1.0f / std::sqrt(static_cast<float>(head_dim));
  for (int length : {1, 3, 97, 129}) {
    std::mt19937 rng(70 + length);
    std::vector<std::vector<int32_t>> kept(kv_heads);
    std::vector<int32_t> kept_lengths;
    std::bernoulli_distribution keep(0.5);
    for (int h = 0; h < kv_heads; ++h) {
      for (int r = 0; r < length - 1; ++r) {
        if (keep(rng)) kept[h].push_back(r);
      }
      kept[h].push_back(length - 1);
      kept_lengths.push_back(static_cast<int32_t>(kept[h].size()));
    }
    paged_testing::HeadPagedLayout layout =
        paged_testing::MakeHeadPagedLayout(rng, kept_lengths, page_tokens, head_dim, 7, false, 2);
    const int capacity = length + 1;
    std::vector<float> k(kv_heads * capacity * head_dim, std::numeric_limits<float>::quiet_NaN());
    std::vector<float> v = k;
    std::vector<uint8_t> key_mask(kv_heads * capacity, 0);
    for (int h = 0; h < kv_heads; ++h) {
      for (size_t j = 0; j < kept[h].size(); ++j) {
        const int r = kept[h][j];
        key_mask[h * capacity + r] = 1;
        std::copy_n(layout.K(h, j), head_dim, k.begin() + (h * capacity + r) * head_dim);
        std::copy_n(layout.V(h, j), head_dim, v.begin() + (h * capacity + r) * head_dim);
      }
    }
    auto q = RandomVector(q_heads * head_dim, 71);
    const size_t n = q.size();
    auto masked = Guarded(n), paged_ref = Guarded(n), paged_cpu = Guarded(n);
    AttentionRef({q.data(), k.data(), v.data(), masked.data(), 1, q_heads, kv_heads, head_dim,
                  capacity, length - 1, 0, scale, key_mask.data()});
    HeadPagedDecodeAttentionArgs args{q.data(), layout.HostView(), paged_ref.data(), 1, q_heads,
                                      kv_heads, scale};
    HeadPagedDecodeAttentionRef(args);
    args.out = paged_cpu.data();
    ASSERT_TRUE(backend_->HeadPagedDecodeAttention(args).ok());
    const std::string what = absl::StrCat("length=", length);
    ExpectAllClose(masked, paged_ref, n, "paged ref vs key-masked ref " + what);
    ExpectAllClose(masked, paged_cpu, n, "paged cpu vs key-masked ref " + what);
  }
}

// SAGE-KV's cache in contiguous form: per kv head a random subset of rows [0, L - 1) is
// kept, plus the new token L - 1, and every kept row carries random query-head bits (the
// new token all of them). Paged decode with query_masks equals AttentionRef over the full
// contiguous cache with a per-query-head key_mask (key_mask_per_query_head) that clears,
// for query head g, every row that is not kept or whose bit g is clear.
TEST_F(CpuBackendTest, HeadPagedDecodeWithQueryMasksEqualsPerQueryHeadMaskedAttention) {
  const int kv_heads = 2, head_dim = 32, page_tokens = 16;
  for (int q_heads : {8, 14}) {
    const int group = q_heads / kv_heads;
    const float scale = 1.0f / std::sqrt(static_cast<float>(head_dim));
    for (int length : {1, 3, 97, 129}) {
      std::mt19937 rng(90 + length + q_heads);
      std::vector<std::vector<int32_t>> kept(kv_heads);
      std::vector<int32_t> kept_lengths;
      std::bernoulli_distribution keep(0.6);
      for (int h = 0; h < kv_heads; ++h) {
        for (int r = 0; r < length - 1; ++r) {
          if (keep(rng)) kept[h].push_back(r);
        }
        kept[h].push_back(length - 1);
        kept_lengths.push_back(static_cast<int32_t>(kept[h].size()));
      }
      paged_testing::HeadPagedLayout layout =
          paged_testing::MakeHeadPagedLayout(rng, kept_lengths, page_tokens, head_dim, group, true, 2);
      const int capacity = length + 1;
      std::vector<float> k(kv_heads * capacity * head_dim, std::numeric_limits<float>::quiet_NaN());
      std::vector<float> v = k;
      std::vector<uint8_t> key_mask(q_heads * capacity, 0);
      bool heads_differ = false;
      for (int h = 0; h < kv_heads; ++h) {
        for (size_t j = 0; j < kept[h].size(); ++j) {
          const int r = kept[h][j];
          const uint8_t bits = layout.query_masks[layout.PoolRow(h, static_cast<int32_t>(j))];
          for (int g = 0; g < group; ++g) key_mask[(h * group + g) * capacity + r] = (bits >> g) & 1;
          heads_differ |= bits != 0 && bits != (1u << group) - 1;
          std::copy_n(layout.K(h, static_cast<int32_t>(j)), head_dim, k.begin() + (h * capacity + r) * head_dim);
          std::copy_n(layout.V(h, static_cast<int32_t>(j)), head_dim, v.begin() + (h * capacity + r) * head_dim);
        }
      }
      if (length > 3) {
        ASSERT_TRUE(heads_differ) << "the query heads of a group should see different rows";
      }
      auto q = RandomVector(q_heads * head_dim, 91);
      const size_t n = q.size();
      auto masked = Guarded(n), paged_ref = Guarded(n), paged_cpu = Guarded(n);
      AttentionArgs attention{q.data(), k.data(), v.data(), masked.data(), 1, q_heads, kv_heads, head_dim,
                              capacity, length - 1, 0, scale, key_mask.data(), true};
      AttentionRef(attention);
      HeadPagedDecodeAttentionArgs args{q.data(), layout.HostView(), paged_ref.data(), 1, q_heads,
                                        kv_heads, scale};
      HeadPagedDecodeAttentionRef(args);
      args.out = paged_cpu.data();
      ASSERT_TRUE(backend_->HeadPagedDecodeAttention(args).ok());
      const std::string what = absl::StrCat("q_heads=", q_heads, " length=", length);
      ExpectAllClose(masked, paged_ref, n, "paged ref vs per-query-head masked ref " + what);
      ExpectAllClose(masked, paged_cpu, n, "paged cpu vs per-query-head masked ref " + what);
      auto masked_cpu = Guarded(n);
      attention.out = masked_cpu.data();
      ASSERT_TRUE(backend_->Attention(attention).ok());
      ExpectAllClose(masked, masked_cpu, n, "cpu vs ref, per-query-head mask " + what);
    }
  }
}

// A head with no visible row (length 0, or every mask bit clear) gets zeros, not NaN.
TEST_F(CpuBackendTest, HeadPagedDecodeWithoutVisibleRowsGivesZeros) {
  const int head_dim = 16;
  std::mt19937 rng(81);
  paged_testing::HeadPagedLayout layout =
      paged_testing::MakeHeadPagedLayout(rng, {0, 5}, 4, head_dim, 2, false, 1);
  layout.query_masks.assign(layout.num_pages * layout.page_tokens, 0);
  for (int r = 0; r < 5; ++r) layout.query_masks[layout.PoolRow(1, r)] = 1;  // q head 3 sees none
  auto q = RandomVector(4 * head_dim, 82);
  auto ref = Guarded(q.size()), out = Guarded(q.size());
  HeadPagedDecodeAttentionArgs args{q.data(), layout.HostView(), ref.data(), 1, 4, 2, 0.25f};
  HeadPagedDecodeAttentionRef(args);
  args.out = out.data();
  ASSERT_TRUE(backend_->HeadPagedDecodeAttention(args).ok());
  ExpectAllClose(ref, out, q.size(), "no visible rows");
  for (int h : {0, 1, 3}) {
    for (int d = 0; d < head_dim; ++d) {
      EXPECT_EQ(ref[h * head_dim + d], 0.0f) << "ref head " << h;
      EXPECT_EQ(out[h * head_dim + d], 0.0f) << "cpu head " << h;
    }
  }
  EXPECT_NE(out[2 * head_dim], 0.0f);
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

// ------------------------------------------------------------- WindowAttentionProbs

namespace kvgate::ops {
namespace {

// The threaded backend equals the reference bit for bit (it splits query heads, not
// sums); every query's probabilities sum to 1, so every output row does; a key no
// window query sees before its position scores only what later queries give it.
TEST(CpuWindowAttentionProbsTest, EqualsTheReferenceAndRowsSumToOne) {
  std::unique_ptr<Backend> cpu = CreateCpuBackend(4);
  std::mt19937 rng(11);
  std::uniform_real_distribution<float> dist(-2.0f, 2.0f);
  WindowAttentionProbsArgs args;
  args.window = 16;
  args.length = 700;
  args.capacity_tokens = 720;
  args.num_q_heads = 8;
  args.num_kv_heads = 2;
  args.head_dim = 64;
  args.scale = 0.125f;
  std::vector<float> q(static_cast<size_t>(args.window) * args.num_q_heads * args.head_dim);
  std::vector<float> k(static_cast<size_t>(args.num_kv_heads) * args.capacity_tokens * args.head_dim);
  for (float& x : q) x = dist(rng);
  for (float& x : k) x = dist(rng);
  std::vector<float> ref(static_cast<size_t>(args.num_q_heads) * args.length), got(ref.size(), -1.0f);
  args.q = q.data();
  args.k_cache = k.data();
  args.out = ref.data();
  WindowAttentionProbsRef(args);
  args.out = got.data();
  ASSERT_TRUE(cpu->WindowAttentionProbs(args).ok());
  EXPECT_EQ(0, std::memcmp(ref.data(), got.data(), ref.size() * sizeof(float)));
  for (int32_t h = 0; h < args.num_q_heads; ++h) {
    double sum = 0.0;
    for (int32_t j = 0; j < args.length; ++j) sum += got[static_cast<size_t>(h) * args.length + j];
    EXPECT_NEAR(sum, 1.0, 1e-5) << "query head " << h;
    // The last key is seen by the last query only: its score is that query's probability / window.
    const float* qv = q.data() + (static_cast<size_t>(args.window - 1) * args.num_q_heads + h) * args.head_dim;
    const float* keys = k.data() + static_cast<size_t>(h / 4) * args.capacity_tokens * args.head_dim;
    std::vector<double> logits(args.length);
    double max_logit = -1e300, denom = 0.0;
    for (int32_t j = 0; j < args.length; ++j) {
      double dot = 0.0;
      for (int32_t c = 0; c < args.head_dim; ++c) dot += double{qv[c]} * keys[static_cast<size_t>(j) * args.head_dim + c];
      logits[j] = dot * args.scale;
      max_logit = std::max(max_logit, logits[j]);
    }
    for (double l : logits) denom += std::exp(l - max_logit);
    const double last = std::exp(logits.back() - max_logit) / denom / args.window;
    EXPECT_NEAR(got[static_cast<size_t>(h) * args.length + args.length - 1], last, 1e-7);
  }
  WindowAttentionProbsArgs bad = args;
  bad.num_kv_heads = 3;
  EXPECT_EQ(cpu->WindowAttentionProbs(bad).code(), absl::StatusCode::kInvalidArgument);
  bad = args;
  bad.length = args.capacity_tokens + 1;
  EXPECT_EQ(cpu->WindowAttentionProbs(bad).code(), absl::StatusCode::kInvalidArgument);
}

}  // namespace
}  // namespace kvgate::ops

// ------------------------------------------------------------------------- SelectTop

namespace kvgate::ops {
namespace {

// The threaded backend against an independent oracle: every candidate of a selection
// ranked by a full sort on (score desc with NaN lowest and -0 == +0, order asc), the first
// `need` selected.
TEST(CpuSelectTopTest, EqualsAFullSortOfEverySelection) {
  std::unique_ptr<Backend> cpu = CreateCpuBackend(4);
  std::mt19937 rng(5);
  std::uniform_int_distribution<int> level(-3, 3);
  for (const auto& [rows, n, per_selection, merge, need] :
       {std::tuple{4, 500, 1, 1, 120}, std::tuple{8, 300, 4, 1, 700}, std::tuple{8, 300, 1, 4, 50},
        std::tuple{3, 40, 3, 1, 500}, std::tuple{2, 40, 1, 2, 0}}) {
    std::vector<float> scores(static_cast<size_t>(rows) * n);
    for (size_t i = 0; i < scores.size(); ++i) {
      scores[i] = static_cast<float>(level(rng)) * 0.5f;
      if (i % 13 == 3) scores[i] = std::numeric_limits<float>::quiet_NaN();
      if (scores[i] == 0.0f && i % 2 == 1) scores[i] = -0.0f;
    }
    std::vector<uint8_t> candidates(n);
    for (int32_t p = 0; p < n; ++p) candidates[p] = p % 5 == 0 ? 0 : 1;
    // Every other case also excludes entries row by row (what AdaKV's first stage kept).
    const bool excluding = (rows + n) % 2 == 0;
    std::vector<uint8_t> exclude(static_cast<size_t>(rows) * n);
    for (size_t i = 0; i < exclude.size(); ++i) exclude[i] = excluding && i % 7 == 2 ? 1 : 0;
    SelectTopArgs args;
    args.scores = scores.data();
    args.candidates = candidates.data();
    if (excluding) args.exclude = exclude.data();
    args.rows = rows;
    args.n = n;
    args.rows_per_selection = per_selection;
    args.merge_rows = merge;
    args.need = need;
    std::vector<uint8_t> got(static_cast<size_t>(rows / merge) * n, 0xee);
    args.keep = got.data();
    ASSERT_TRUE(cpu->SelectTop(args).ok());

    std::vector<uint8_t> want(got.size(), 0);
    auto rank = [](float s) { return std::isnan(s) ? 0.0 : double{s}; };  // NaN ranks by its flag below
    const int32_t group = merge > 1 ? 1 : per_selection;
    for (int32_t first = 0; first < rows; first += group) {
      struct Entry { bool nan; double score; int64_t order; int32_t row, p; };
      std::vector<Entry> entries;
      for (int32_t p = 0; p < n; ++p) {
        if (!candidates[p]) continue;
        for (int32_t r = 0; r < group; ++r) {
          if (exclude[static_cast<size_t>(first + r) * n + p]) continue;
          const float s = scores[static_cast<size_t>(first + r) * n + p];
          entries.push_back({std::isnan(s), rank(s), int64_t{p} * group + r, first + r, p});
        }
      }
      std::sort(entries.begin(), entries.end(), [](const Entry& a, const Entry& b) {
        if (a.nan != b.nan) return !a.nan;  // a number beats NaN
        if (!a.nan && a.score != b.score) return a.score > b.score;
        return a.order < b.order;
      });
      for (size_t i = 0; i < entries.size() && static_cast<int64_t>(i) < need; ++i) {
        const int32_t row = entries[i].row;
        want[static_cast<size_t>(row / merge) * n + entries[i].p] |= static_cast<uint8_t>(1u << (row % merge));
      }
    }
    EXPECT_EQ(got, want) << "rows " << rows << " n " << n << " per_selection " << per_selection << " merge " << merge;
  }
  SelectTopArgs bad;
  bad.rows = 3;
  bad.n = 4;
  bad.merge_rows = 2;
  EXPECT_EQ(cpu->SelectTop(bad).code(), absl::StatusCode::kInvalidArgument);
}

}  // namespace
}  // namespace kvgate::ops
