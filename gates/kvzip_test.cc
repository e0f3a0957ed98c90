#include "gates/kvzip.h"

#include <cmath>
#include <limits>

#include "gates/internal/test_util.h"
#include "gtest/gtest.h"

namespace kvgate::gates {
namespace {

using testing::RandomCapture;
using testing::RandomVector;
using testing::Shape;

// Brute force of section 4.1, per kv head: build the explicit key list [sink | chunk | own
// 0..i] for every query, softmax it, and take the max over group heads and queries.
std::vector<double> BruteKvzip(int32_t H_q, int32_t H_kv, int32_t d, int32_t q_len, const std::vector<float>& queries,
                               const std::vector<std::vector<float>>& sink,   // per kv head [s, d]
                               const std::vector<std::vector<float>>& chunk,  // per kv head [c, d]
                               const std::vector<std::vector<float>>& own) {  // per kv head [q_len, d]
  const int32_t G = H_q / H_kv, s = sink[0].size() / d, c = chunk[0].size() / d;
  std::vector<double> out(size_t(H_kv) * c, 0.0);
  for (int32_t qh = 0; qh < H_q; ++qh) {
    const int32_t h = qh / G;
    for (int32_t i = 0; i < q_len; ++i) {
      std::vector<const float*> keys;
      for (int32_t j = 0; j < s; ++j) keys.push_back(&sink[h][j * d]);
      for (int32_t j = 0; j < c; ++j) keys.push_back(&chunk[h][j * d]);
      for (int32_t j = 0; j <= i; ++j) keys.push_back(&own[h][j * d]);
      std::vector<double> logit;
      for (const float* k : keys) {
        double dot = 0;
        for (int32_t e = 0; e < d; ++e) dot += double(queries[(size_t(i) * H_q + qh) * d + e]) * k[e];
        logit.push_back(dot / std::sqrt(double(d)));
      }
      double mx = *std::max_element(logit.begin(), logit.end()), z = 0;
      for (double x : logit) z += std::exp(x - mx);
      for (int32_t j = 0; j < c; ++j) {
        out[size_t(h) * c + j] = std::max(out[size_t(h) * c + j], std::exp(logit[s + j] - mx) / z);
      }
    }
  }
  return out;
}

TEST(KvzipScoresTest, MatchesBruteForce) {
  std::mt19937 rng(3);
  for (auto [H_q, H_kv, s, c, q_len] : std::vector<std::tuple<int, int, int, int, int>>{
           {4, 2, 3, 17, 9}, {6, 2, 0, 5, 1}, {2, 2, 4, 1, 12}, {8, 1, 2, 30, 20}}) {
    const int32_t d = 8;
    const std::vector<float> queries = RandomVector(size_t(q_len) * H_q * d, rng, 2.0f);
    std::vector<std::vector<float>> sink, chunk, own;
    // Lay the keys out with gaps between heads to exercise head_stride.
    const int32_t stride_rows = s + c + 5;
    std::vector<float> cache(size_t(H_kv) * stride_rows * d, 0.0f);
    std::vector<float> own_flat = RandomVector(size_t(H_kv) * q_len * d, rng, 2.0f);
    for (float& x : cache) x = std::normal_distribution<float>(0, 2)(rng);
    for (int32_t h = 0; h < H_kv; ++h) {
      const float* base = cache.data() + size_t(h) * stride_rows * d;
      sink.emplace_back(base, base + s * d);
      chunk.emplace_back(base + (s + 2) * d, base + (s + 2 + c) * d);  // 2 skipped rows
      own.emplace_back(own_flat.begin() + size_t(h) * q_len * d, own_flat.begin() + size_t(h + 1) * q_len * d);
    }
    KvzipLayerInput in;
    in.num_q_heads = H_q;
    in.num_kv_heads = H_kv;
    in.head_dim = d;
    in.num_queries = q_len;
    in.queries = queries.data();
    in.sink_keys = {cache.data(), int64_t(stride_rows) * d, s};
    in.chunk_keys = {cache.data() + (s + 2) * d, int64_t(stride_rows) * d, c};
    in.own_keys = {own_flat.data(), int64_t(q_len) * d, q_len};
    const std::vector<float> got = KvzipScores(in);
    const std::vector<double> want = BruteKvzip(H_q, H_kv, d, q_len, queries, sink, chunk, own);
    ASSERT_EQ(got.size(), want.size());
    for (size_t i = 0; i < got.size(); ++i) {
      EXPECT_NEAR(got[i], want[i], 1e-6 * want[i] + 1e-9) << i;
      EXPECT_GE(got[i], 0.0f);
      EXPECT_LE(got[i], 1.0f);
    }
  }
}

TEST(KvzipChunkRangesTest, CoversTheContext) {
  EXPECT_EQ(KvzipChunkRanges(3, 10, 4).size(), 2u);
  const auto r = KvzipChunkRanges(3, 10, 4);
  EXPECT_EQ(r[0].begin, 3);
  EXPECT_EQ(r[0].end, 7);
  EXPECT_EQ(r[1].begin, 7);
  EXPECT_EQ(r[1].end, 10);
  EXPECT_TRUE(KvzipChunkRanges(10, 10, 4).empty());
  EXPECT_EQ(KvzipChunkRanges(0, 4000, 2000).size(), 2u);
  EXPECT_EQ(KvzipChunkRanges(0, 4001, 2000).back().end, 4001);
}

// Reconstruction chunks with random q/k: the grid holds each chunk's KvzipScores at its
// positions (max where chunks overlap) and 1.0 where no chunk scored.
TEST(KvzipScoreGridTest, MergesChunks) {
  const ModelShape shape = Shape(2, 4, 2, 8, 16);
  const int32_t n = 30;
  const PrefillCapture c = RandomCapture(shape, n, 0, false, 5);
  std::mt19937 rng(6);
  auto chunk = [&](int32_t begin, int32_t end, int32_t sink, int32_t q_len) {
    KvzipChunk ch;
    ch.begin = begin;
    ch.end = end;
    ch.sink_keys = sink;
    ch.num_queries = q_len;
    for (int32_t l = 0; l < 2; ++l) {
      ch.queries.push_back(RandomVector(size_t(q_len) * 4 * 8, rng));
      ch.own_keys.push_back(RandomVector(size_t(2) * q_len * 8, rng));
    }
    return ch;
  };
  const std::vector<KvzipChunk> chunks = {chunk(4, 14, 4, 7), chunk(14, 25, 4, 9), chunk(20, 27, 2, 3)};
  auto grid = KvzipScoreGrid(c, chunks);
  ASSERT_TRUE(grid.ok()) << grid.status();
  for (int32_t l = 0; l < 2; ++l) {
    std::vector<std::vector<float>> per_chunk;
    for (const KvzipChunk& ch : chunks) {
      KvzipLayerInput in;
      in.num_q_heads = 4;
      in.num_kv_heads = 2;
      in.head_dim = 8;
      in.num_queries = ch.num_queries;
      in.queries = ch.queries[l].data();
      in.sink_keys = {c.keys[l].data(), int64_t(n) * 8, ch.sink_keys};
      in.chunk_keys = {c.keys[l].data() + ch.begin * 8, int64_t(n) * 8, ch.end - ch.begin};
      in.own_keys = {ch.own_keys[l].data(), int64_t(ch.num_queries) * 8, ch.num_queries};
      per_chunk.push_back(KvzipScores(in));
    }
    for (int32_t h = 0; h < 2; ++h) {
      for (int32_t p = 0; p < n; ++p) {
        float want = -1.0f;
        for (size_t i = 0; i < chunks.size(); ++i) {
          const int32_t len = chunks[i].end - chunks[i].begin;
          if (p >= chunks[i].begin && p < chunks[i].end) {
            want = std::max(want, per_chunk[i][size_t(h) * len + (p - chunks[i].begin)]);
          }
        }
        if (want < 0) want = 1.0f;
        EXPECT_EQ(grid->at(l, h, p), want) << l << " " << h << " " << p;
      }
    }
  }
  // Bad chunks.
  std::vector<KvzipChunk> bad = {chunk(4, 14, 5, 2)};
  EXPECT_STATUS(KvzipScoreGrid(c, bad), absl::StatusCode::kInvalidArgument, "sink_keys");
  bad = {chunk(25, 31, 0, 2)};
  EXPECT_STATUS(KvzipScoreGrid(c, bad), absl::StatusCode::kInvalidArgument, "range");
  bad = {chunk(4, 14, 0, 2)};
  bad[0].queries[1].pop_back();
  EXPECT_STATUS(KvzipScoreGrid(c, bad), absl::StatusCode::kInvalidArgument, "wrong size");
}

TEST(KvzipPolicyTest, GlobalThresholdByDefault) {
  const ModelShape shape = Shape(2, 4, 2, 8, 16);
  const int32_t n = 40;
  auto policy = CreatePolicy("kvzip", {}, shape);
  ASSERT_TRUE(policy.ok());
  EXPECT_TRUE((*policy)->needs_tokenizer());
  EXPECT_TRUE((*policy)->needs().keys);
  const PrefillCapture c = RandomCapture(shape, n, 0, false, 8);
  std::mt19937 rng(9);
  PolicyInputs inputs;
  for (TokenRange r : KvzipChunkRanges(4, n, 16)) {
    KvzipChunk ch;
    ch.begin = r.begin;
    ch.end = r.end;
    ch.sink_keys = 4;
    ch.num_queries = (r.end - r.begin) + 5;
    for (int32_t l = 0; l < 2; ++l) {
      ch.queries.push_back(RandomVector(size_t(ch.num_queries) * 4 * 8, rng));
      ch.own_keys.push_back(RandomVector(size_t(2) * ch.num_queries * 8, rng));
    }
    inputs.kvzip_chunks.push_back(std::move(ch));
  }
  EvictionSpec spec;
  spec.policy = "kvzip";
  spec.keep_ratio = 0.3f;
  auto budget = ResolveBudget(spec, n, (*policy)->default_sink(), (*policy)->default_recent());
  ASSERT_TRUE(budget.ok());
  auto grid = KvzipScoreGrid(c, inputs.kvzip_chunks);
  ASSERT_TRUE(grid.ok());
  for (HeadBudget hb : {HeadBudget::kPolicyDefault, HeadBudget::kUniform, HeadBudget::kAdaptive}) {
    auto plan = (*policy)->Plan(c, inputs, *budget, hb);
    ASSERT_TRUE(plan.ok()) << plan.status();
    const KeepPlan want = hb == HeadBudget::kPolicyDefault ? SelectGlobalTopK(*grid, 12, budget->protected_mask)
                          : hb == HeadBudget::kUniform     ? SelectPerHeadTopK(*grid, 12, budget->protected_mask)
                                                           : SelectAdaKv(*grid, 12, budget->protected_mask, 0.2f);
    for (size_t i = 0; i < want.heads.size(); ++i) EXPECT_EQ(plan->heads[i].positions, want.heads[i].positions);
    EXPECT_EQ(plan->KeptEntries(), 12 * 4);
  }
  EXPECT_STATUS((*policy)->Plan(c, *budget, HeadBudget::kPolicyDefault), absl::StatusCode::kInvalidArgument,
                "kvzip_chunks");
}

}  // namespace
}  // namespace kvgate::gates
