#include "gates/fast_kvzip.h"

#include <cmath>
#include <cstring>
#include <fstream>

#include "gates/attention_gate.h"
#include "gates/gate_weights.h"
#include "gates/internal/test_util.h"
#include "gtest/gtest.h"
#include "nlohmann/json.hpp"

namespace kvgate::gates {
namespace {

using absl::StatusCode;
using testing::RandomVector;
using testing::Shape;
using testing::TempPath;

// Direct double implementation of section 5.1 for one (token, kv head).
double ReferenceScore(const FastKvzipGate& gate, int32_t layer, const float* x, int32_t h) {
  const ModelShape& s = gate.shape();
  const int32_t D = s.hidden_size, G = s.group_size(), R = gate.rank(), S = gate.num_sinks();
  const FastKvzipGate::Layer& w = gate.layer(layer);
  auto rms = [&](std::vector<double> v, const std::vector<float>& weight) {
    double ms = 0;
    for (double e : v) ms += e * e;
    ms /= v.size();
    for (size_t i = 0; i < v.size(); ++i) v[i] = weight[i] * v[i] / std::sqrt(ms + double(gate.norm_eps()));
    return v;
  };
  std::vector<double> k(R);
  for (int32_t i = 0; i < R; ++i) {
    for (int32_t e = 0; e < D; ++e) k[i] += double(w.k_proj_weight[(size_t(h) * R + i) * D + e]) * x[e];
  }
  k = rms(k, w.k_norm_weight);
  double total = 0;
  for (int32_t g = 0; g < G; ++g) {
    std::vector<double> q(R);
    for (int32_t i = 0; i < R; ++i) {
      const size_t row = (size_t(h) * G + g) * R + i;
      q[i] = w.q_proj_bias[row];
      for (int32_t e = 0; e < D; ++e) q[i] += double(w.q_proj_weight[row * D + e]) * x[e];
    }
    q = rms(q, w.q_norm_weight);
    double l = 0;
    for (int32_t i = 0; i < R; ++i) l += k[i] * q[i];
    l = l / std::sqrt(double(R)) + w.b[size_t(h) * G + g];
    double denom = 1.0;
    for (int32_t r = 0; r < S; ++r) {
      double sr = 0;
      for (int32_t i = 0; i < R; ++i) sr += double(w.k_base[(size_t(h) * S + r) * R + i]) * q[i];
      denom += std::exp(sr / std::sqrt(double(R)) - l);
    }
    total += 1.0 / denom;
  }
  return total / G;
}

std::unique_ptr<FastKvzipGate> NonTrivialGate(const ModelShape& shape, uint64_t seed, int32_t rank = 16, int32_t sinks = 16) {
  auto gate = FastKvzipGate::CreateRandom(shape, seed, rank, sinks);
  std::mt19937 rng(static_cast<uint32_t>(seed) + 1);
  std::uniform_real_distribution<float> u(0.5f, 1.5f);
  for (int32_t l = 0; l < shape.num_layers; ++l) {
    for (float& x : gate->mutable_layer(l).q_norm_weight) x = u(rng);
    for (float& x : gate->mutable_layer(l).k_norm_weight) x = u(rng);
  }
  return gate;
}

TEST(FastKvzipGateTest, MatchesDirectDoubleFormula) {
  for (auto [layers, q_heads, kv_heads, hidden, rank, sinks] :
       std::vector<std::tuple<int, int, int, int, int, int>>{{2, 8, 2, 32, 16, 16}, {1, 7, 1, 24, 16, 16}, {1, 4, 4, 16, 8, 3}}) {
    const ModelShape shape = Shape(layers, q_heads, kv_heads, 8, hidden);
    auto gate = NonTrivialGate(shape, 42, rank, sinks);
    std::mt19937 rng(7);
    const int32_t n = 13;
    for (int32_t l = 0; l < layers; ++l) {
      const std::vector<float> x = RandomVector(size_t(n) * hidden, rng, 1.5f);
      auto scores = gate->Score(l, x);
      ASSERT_TRUE(scores.ok()) << scores.status();
      ASSERT_EQ(scores->size(), size_t(kv_heads) * n);
      for (int32_t h = 0; h < kv_heads; ++h) {
        for (int32_t t = 0; t < n; ++t) {
          const double want = ReferenceScore(*gate, l, x.data() + size_t(t) * hidden, h);
          EXPECT_NEAR((*scores)[size_t(h) * n + t], want, 2e-6 + 2e-5 * want) << "l=" << l << " h=" << h << " t=" << t;
        }
      }
    }
  }
}

TEST(FastKvzipGateTest, StableForHugeLogits) {
  const ModelShape shape = Shape(1, 2, 1, 8, 8);
  auto gate = FastKvzipGate::CreateRandom(shape, 1, 4, 2);
  gate->mutable_layer(0).b = {200.0f, -200.0f};  // exp(200) overflows float
  std::vector<float> x(8, 0.5f);
  auto s = gate->Score(0, x);
  ASSERT_TRUE(s.ok());
  EXPECT_TRUE(std::isfinite((*s)[0]));
  EXPECT_NEAR((*s)[0], 0.5f, 1e-6);  // (1 + 0) / 2
}

TEST(FastKvzipGateTest, ScoreIsPointwise) {
  const ModelShape shape = Shape(1, 4, 2, 8, 16);
  auto gate = FastKvzipGate::CreateRandom(shape, 3);
  std::mt19937 rng(1);
  std::vector<float> x = RandomVector(5 * 16, rng);
  auto a = gate->Score(0, x);
  std::vector<float> one(x.begin() + 2 * 16, x.begin() + 3 * 16);
  auto b = gate->Score(0, one);
  ASSERT_TRUE(a.ok() && b.ok());
  EXPECT_EQ((*a)[2], (*b)[0]);
  EXPECT_EQ((*a)[5 + 2], (*b)[1]);
  EXPECT_STATUS(gate->Score(1, x), StatusCode::kInvalidArgument, "layer 1");
  x.pop_back();
  EXPECT_STATUS(gate->Score(0, x), StatusCode::kInvalidArgument, "multiple of hidden_size");
}

TEST(FastKvzipGateTest, SaveLoadRoundTrip) {
  const ModelShape shape = Shape(2, 8, 2, 8, 32);
  auto gate = NonTrivialGate(shape, 5);
  const std::string path = TempPath("fkv_roundtrip.safetensors");
  ASSERT_TRUE(gate->Save(path).ok());
  auto loaded = FastKvzipGate::Load(path, shape);
  ASSERT_TRUE(loaded.ok()) << loaded.status();
  EXPECT_EQ((*loaded)->rank(), 16);
  EXPECT_EQ((*loaded)->num_sinks(), 16);
  EXPECT_FLOAT_EQ((*loaded)->norm_eps(), 1e-6f);
  std::mt19937 rng(2);
  const std::vector<float> x = RandomVector(7 * 32, rng);
  for (int32_t l = 0; l < 2; ++l) EXPECT_EQ(*gate->Score(l, x), *(*loaded)->Score(l, x));
  std::remove(path.c_str());
}

// Writes a safetensors file tensor by tensor, BF16 where asked (values truncated to bf16).
void WriteRaw(const std::string& path, const std::vector<NamedTensor>& tensors, const std::set<std::string>& bf16,
              const std::map<std::string, std::string>& meta) {
  nlohmann::json header;
  header["__metadata__"] = meta;
  std::string data;
  for (const NamedTensor& t : tensors) {
    const bool half = bf16.count(t.name) > 0;
    const size_t begin = data.size();
    for (float v : t.data) {
      uint32_t bits;
      std::memcpy(&bits, &v, 4);
      if (half) {
        const uint16_t top = static_cast<uint16_t>(bits >> 16);
        data.append(reinterpret_cast<const char*>(&top), 2);
      } else {
        data.append(reinterpret_cast<const char*>(&bits), 4);
      }
    }
    header[t.name] = {{"dtype", half ? "BF16" : "F32"}, {"shape", t.shape}, {"data_offsets", {begin, data.size()}}};
  }
  std::string text = header.dump();
  const uint64_t len = text.size();
  std::ofstream out(path, std::ios::binary);
  out.write(reinterpret_cast<const char*>(&len), 8);
  out << text << data;
}

struct GateFile {
  std::vector<NamedTensor> tensors;
  std::map<std::string, std::string> meta;
};

GateFile Describe(const FastKvzipGate& gate) {
  const ModelShape& s = gate.shape();
  const int64_t H = s.num_kv_heads, G = s.group_size(), D = s.hidden_size, R = gate.rank(), S = gate.num_sinks();
  GateFile f;
  for (int32_t l = 0; l < s.num_layers; ++l) {
    const auto& w = gate.layer(l);
    const std::string p = "layers." + std::to_string(l) + ".";
    f.tensors.push_back({p + "q_proj.weight", {H * G * R, D}, w.q_proj_weight});
    f.tensors.push_back({p + "q_proj.bias", {H * G * R}, w.q_proj_bias});
    f.tensors.push_back({p + "k_proj.weight", {H * R, D}, w.k_proj_weight});
    f.tensors.push_back({p + "q_norm.weight", {R}, w.q_norm_weight});
    f.tensors.push_back({p + "k_norm.weight", {R}, w.k_norm_weight});
    f.tensors.push_back({p + "k_base", {H, S, R}, w.k_base});
    f.tensors.push_back({p + "b", {H, G}, w.b});
  }
  f.meta = {{"format", kFastKvzipFormat}, {"num_layers", std::to_string(s.num_layers)},
            {"hidden_size", std::to_string(D)}, {"num_kv_heads", std::to_string(H)},
            {"group_size", std::to_string(G)}, {"rank", std::to_string(R)},
            {"num_sinks", std::to_string(S)}, {"norm_eps", "1e-06"}};
  return f;
}

TEST(FastKvzipGateTest, LoadsBf16Tensors) {
  const ModelShape shape = Shape(1, 4, 2, 8, 16);
  auto gate = NonTrivialGate(shape, 9);
  GateFile f = Describe(*gate);
  for (NamedTensor& t : f.tensors) {  // make the bf16 tensors exactly representable
    if (t.name.find("proj") != std::string::npos || t.name.ends_with(".b")) {
      for (float& v : t.data) {
        uint32_t bits;
        std::memcpy(&bits, &v, 4);
        bits &= 0xffff0000u;
        std::memcpy(&v, &bits, 4);
      }
    }
  }
  const std::string path = TempPath("fkv_bf16.safetensors");
  WriteRaw(path, f.tensors, {"layers.0.q_proj.weight", "layers.0.q_proj.bias", "layers.0.k_proj.weight", "layers.0.b"},
           f.meta);
  auto loaded = FastKvzipGate::Load(path, shape);
  ASSERT_TRUE(loaded.ok()) << loaded.status();
  EXPECT_EQ((*loaded)->layer(0).q_proj_weight, f.tensors[0].data);
  EXPECT_EQ((*loaded)->layer(0).b, f.tensors[6].data);
  std::remove(path.c_str());
}

TEST(FastKvzipGateTest, LoadErrorsNameTheCulprit) {
  const ModelShape shape = Shape(2, 4, 2, 8, 16);
  auto gate = FastKvzipGate::CreateRandom(shape, 11);
  const std::string path = TempPath("fkv_bad.safetensors");
  const std::string prefix = "gate weights do not fit the model: ";

  GateFile f = Describe(*gate);
  f.tensors.erase(f.tensors.begin() + 12);  // layers.1.k_base
  WriteRaw(path, f.tensors, {}, f.meta);
  EXPECT_STATUS(FastKvzipGate::Load(path, shape), StatusCode::kInvalidArgument, prefix + "tensor 'layers.1.k_base' is missing");

  f = Describe(*gate);
  f.tensors[3] = {"layers.0.q_norm.weight", {15}, std::vector<float>(15, 1.0f)};
  WriteRaw(path, f.tensors, {}, f.meta);
  EXPECT_STATUS(FastKvzipGate::Load(path, shape), StatusCode::kInvalidArgument,
                "tensor 'layers.0.q_norm.weight' in " + path + " has shape [15], expected [16]");

  f = Describe(*gate);
  f.tensors.push_back({"layers.2.b", {2, 2}, std::vector<float>(4, 0.0f)});
  WriteRaw(path, f.tensors, {}, f.meta);
  EXPECT_STATUS(FastKvzipGate::Load(path, shape), StatusCode::kInvalidArgument, "unexpected tensor 'layers.2.b'");

  f = Describe(*gate);
  f.meta.erase("num_sinks");
  WriteRaw(path, f.tensors, {}, f.meta);
  EXPECT_STATUS(FastKvzipGate::Load(path, shape), StatusCode::kInvalidArgument, "metadata 'num_sinks' is missing");

  f = Describe(*gate);
  WriteRaw(path, f.tensors, {}, f.meta);
  EXPECT_STATUS(FastKvzipGate::Load(path, Shape(3, 4, 2, 8, 16)), StatusCode::kInvalidArgument,
                prefix + path + ": metadata 'num_layers' is 2, the model has 3");
  EXPECT_STATUS(FastKvzipGate::Load(path, Shape(2, 8, 2, 8, 16)), StatusCode::kInvalidArgument, "'group_size' is 2");
  EXPECT_STATUS(FastKvzipGate::Load(path, Shape(2, 4, 2, 8, 32)), StatusCode::kInvalidArgument, "'hidden_size'");

  ASSERT_TRUE(AttentionGate::CreateRandom(shape, 1)->Save(path).ok());
  EXPECT_STATUS(FastKvzipGate::Load(path, shape), StatusCode::kInvalidArgument, "'format' is 'kvgate.attention_gate.v1'");
  std::remove(path.c_str());
  EXPECT_EQ(FastKvzipGate::Load(path, shape).status().code(), StatusCode::kNotFound);
}

TEST(FastKvzipChunkPlanTest, RatiosAndWindows) {
  // Long context: W = 4096, r = (0.3 clen - W) / (clen - W).
  FastKvzipChunkPlan p = MakeFastKvzipChunkPlan(0.3, 100, 100100);
  EXPECT_TRUE(p.evicts);
  EXPECT_EQ(p.window, 4096);
  EXPECT_DOUBLE_EQ(p.chunk_keep_ratio, (0.3 * 100000 - 4096) / (100000 - 4096));
  // Short context (clen < 16000): W = int(0.02 clen).
  p = MakeFastKvzipChunkPlan(0.3, 0, 10000);
  EXPECT_EQ(p.window, 200);
  EXPECT_DOUBLE_EQ(p.chunk_keep_ratio, (3000.0 - 200) / (10000 - 200));
  // ratio * clen < W: W = int(ratio * clen), r = 0.
  p = MakeFastKvzipChunkPlan(0.01, 0, 10000);
  EXPECT_EQ(p.window, 100);
  EXPECT_EQ(p.chunk_keep_ratio, 0.0);
  p = MakeFastKvzipChunkPlan(0.02, 0, 100000);  // 2000 < 4096
  EXPECT_EQ(p.window, 2000);
  EXPECT_EQ(p.chunk_keep_ratio, 0.0);
  // No eviction.
  p = MakeFastKvzipChunkPlan(1.0, 0, 50000);
  EXPECT_FALSE(p.evicts);
  EXPECT_EQ(FastKvzipChunkKeepCount(p, 12345), 12345);
  // Keep counts floor.
  p = MakeFastKvzipChunkPlan(0.5, 0, 20000);  // r = (10000 - 4096) / 15904
  EXPECT_EQ(FastKvzipChunkKeepCount(p, 15904), 5904);
  EXPECT_EQ(FastKvzipChunkKeepCount(p, 100), static_cast<int64_t>(std::floor(p.chunk_keep_ratio * 100)));
}

TEST(FastKvzipChunkPlanTest, ThresholdRangesTileTheContextAndHitTheRatio) {
  const int32_t n = 40000, begin = 100;
  const FastKvzipChunkPlan p = MakeFastKvzipChunkPlan(0.25, begin, n);
  const std::vector<TokenRange> chunks = FastKvzipPrefillChunks(p);
  ASSERT_EQ(chunks.size(), 3u);
  EXPECT_EQ(chunks[0].begin, 0);
  EXPECT_EQ(chunks[0].end, 16000);
  EXPECT_EQ(chunks[2].begin, 32000);
  EXPECT_EQ(chunks[2].end, 40000);
  int32_t until = begin;
  std::vector<TokenRange> ranges;
  for (const TokenRange& c : chunks) {
    const TokenRange r = FastKvzipThresholdRange(p, until, c.end);
    ranges.push_back(r);
    until = r.end;
  }
  EXPECT_EQ(ranges[0].begin, 100);
  EXPECT_EQ(ranges[0].end, 16000 - 4096);
  EXPECT_EQ(ranges[1].begin, 16000 - 4096);
  EXPECT_EQ(ranges[1].end, 32000 - 4096);
  EXPECT_EQ(ranges[2].end, 40000 - 4096);
  EXPECT_EQ(n - until, p.window);  // what remains is exactly the final window
  // Retained entries (per head) = sum of per-range keeps + W  ~= 0.25 * clen.
  double kept = p.window;
  for (const TokenRange& r : ranges) kept += FastKvzipChunkKeepCount(p, r.end - r.begin);
  EXPECT_NEAR(kept, 0.25 * (n - begin), 3.0);
  // A first chunk shorter than the window thresholds nothing.
  const FastKvzipChunkPlan small = MakeFastKvzipChunkPlan(0.25, 0, 40000, 2000);
  const TokenRange r = FastKvzipThresholdRange(small, 0, 2000);
  EXPECT_EQ(r.begin, r.end);
}

TEST(FastKvzipChunkPlanTest, SimulatedChunkedSelectionKeepsTheRatio) {
  // Threshold a random score grid chunk by chunk, one global count per range.
  const int32_t L = 2, H = 2, n = 3000, begin = 4;
  const FastKvzipChunkPlan p = MakeFastKvzipChunkPlan(0.3, begin, n, /*chunk_tokens=*/1000, /*window_tokens=*/200);
  ASSERT_EQ(p.window, 200);  // clen = 2996 >= one chunk: window_tokens
  std::mt19937 rng(4);
  const std::vector<float> scores = RandomVector(size_t(L) * H * n, rng);
  int32_t until = begin;
  int64_t kept = int64_t{p.window} * L * H;
  for (const TokenRange& c : FastKvzipPrefillChunks(p)) {
    const TokenRange r = FastKvzipThresholdRange(p, until, c.end);
    until = r.end;
    const int32_t len = r.end - r.begin;
    if (len == 0) continue;
    ScoreGrid sub;
    sub.num_layers = L;
    sub.num_kv_heads = H;
    sub.prompt_tokens = len;
    for (int32_t lh = 0; lh < L * H; ++lh) {
      sub.scores.insert(sub.scores.end(), scores.begin() + size_t(lh) * n + r.begin, scores.begin() + size_t(lh) * n + r.end);
    }
    const int64_t want = FastKvzipChunkKeepCount(p, int64_t{len} * L * H);
    const KeepPlan plan = SelectGlobalTopKCount(sub, want, std::vector<uint8_t>(len, 0));
    EXPECT_EQ(plan.KeptEntries(), want);
    kept += want;
  }
  EXPECT_EQ(n - until, p.window);
  EXPECT_NEAR(static_cast<double>(kept), 0.3 * (n - begin) * L * H, 3.0);
}

TEST(FastKvzipPolicyTest, GlobalThresholdScoresAndPinnedRows) {
  const ModelShape shape = Shape(2, 4, 2, 8, 16);
  std::shared_ptr<const FastKvzipGate> gate = FastKvzipGate::CreateRandom(shape, 21);
  PolicyOptions options;
  options.fast_kvzip_gate = gate;
  auto policy = CreatePolicy("fast_kvzip", options, shape);
  ASSERT_TRUE(policy.ok()) << policy.status();
  EXPECT_EQ((*policy)->fast_kvzip_gate(), gate.get());
  EXPECT_TRUE((*policy)->needs().hidden_states);
  EXPECT_EQ((*policy)->default_sink(), 4);
  EXPECT_EQ((*policy)->default_recent(), kDefaultFastKvzipWindow);
  const int32_t n = 400;
  const PrefillCapture c = testing::RandomCapture(shape, n, 0, true, 3);
  EvictionSpec spec;
  spec.policy = "fast_kvzip";
  spec.keep_ratio = 0.25f;
  spec.protected_ranges = {{10, 14}};
  auto budget = ResolveBudget(spec, n, (*policy)->default_sink(), (*policy)->default_recent());
  ASSERT_TRUE(budget.ok());
  EXPECT_EQ(budget->recent_tokens, 8);  // int(0.02 * 400)
  auto grid = FastKvzipScoreGrid(*gate, c.hidden_states, n);
  ASSERT_TRUE(grid.ok());
  auto plan = (*policy)->Plan(c, *budget, HeadBudget::kPolicyDefault);
  ASSERT_TRUE(plan.ok()) << plan.status();
  const KeepPlan want = SelectGlobalTopK(*grid, 100, budget->protected_mask);
  EXPECT_EQ(plan->KeptEntries(), 100 * 4);
  for (int32_t l = 0; l < 2; ++l) {
    for (int32_t h = 0; h < 2; ++h) {
      const HeadKeep& got = plan->at(l, h);
      EXPECT_EQ(got.positions, want.at(l, h).positions);
      ASSERT_EQ(got.scores.size(), got.positions.size());
      for (size_t i = 0; i < got.positions.size(); ++i) {
        const int32_t p = got.positions[i];
        const bool pinned = p < 4 || (p >= 10 && p < 14);
        EXPECT_EQ(got.scores[i], pinned ? 1.0f : grid->at(l, h, p)) << p;
      }
    }
  }
  // Scores supplied by the engine give the same plan.
  PolicyInputs inputs;
  for (int32_t l = 0; l < 2; ++l) inputs.gate_scores.push_back(*gate->Score(l, c.hidden_states[l]));
  PrefillCapture no_hidden = c;
  no_hidden.hidden_states.clear();
  auto from_inputs = (*policy)->Plan(no_hidden, inputs, *budget, HeadBudget::kPolicyDefault);
  ASSERT_TRUE(from_inputs.ok()) << from_inputs.status();
  for (size_t i = 0; i < plan->heads.size(); ++i) {
    EXPECT_EQ(from_inputs->heads[i].positions, plan->heads[i].positions);
    EXPECT_EQ(from_inputs->heads[i].scores, plan->heads[i].scores);
  }
  // Uniform and adaptive levels.
  auto uniform = (*policy)->Plan(c, *budget, HeadBudget::kUniform);
  ASSERT_TRUE(uniform.ok());
  for (size_t i = 0; i < uniform->heads.size(); ++i) {
    EXPECT_EQ(uniform->heads[i].positions, SelectPerHeadTopK(*grid, 100, budget->protected_mask).heads[i].positions);
  }
  auto adaptive = (*policy)->Plan(c, *budget, HeadBudget::kAdaptive);
  ASSERT_TRUE(adaptive.ok());
  EXPECT_EQ(adaptive->KeptEntries(), 400);
  // Missing hidden states and no scores.
  EXPECT_STATUS((*policy)->Plan(no_hidden, *budget, HeadBudget::kPolicyDefault), StatusCode::kInvalidArgument,
                "hidden states");
}

}  // namespace
}  // namespace kvgate::gates
