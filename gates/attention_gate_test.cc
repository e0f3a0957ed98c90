#include "gates/attention_gate.h"

#include <cmath>
#include <cstring>

#include "gates/gate_weights.h"
#include "gates/internal/test_util.h"
#include "gtest/gtest.h"

namespace kvgate::gates {
namespace {

using absl::StatusCode;
using testing::RandomVector;
using testing::Shape;
using testing::TempPath;

// Direct double implementation of the documented module.
std::vector<double> ReferenceLogits(const AttentionGate& gate, int32_t layer, const std::vector<float>& x) {
  const ModelShape& s = gate.shape();
  const int32_t D = s.hidden_size, H = s.num_kv_heads, A = gate.config().num_heads, hd = gate.config().head_dim;
  const int32_t inner = A * hd, n = x.size() / D;
  const AttentionGate::Layer& w = gate.layer(layer);
  auto proj = [&](const std::vector<float>& W, int32_t t) {
    std::vector<double> out(inner);
    for (int32_t o = 0; o < inner; ++o)
      for (int32_t e = 0; e < D; ++e) out[o] += double(W[size_t(o) * D + e]) * x[size_t(t) * D + e];
    return out;
  };
  std::vector<std::vector<double>> q(n), k(n), v(n);
  for (int32_t t = 0; t < n; ++t) q[t] = proj(w.q_proj_weight, t), k[t] = proj(w.k_proj_weight, t), v[t] = proj(w.v_proj_weight, t);
  std::vector<double> out(size_t(H) * n);
  for (int32_t t = 0; t < n; ++t) {
    std::vector<double> feat(2 * inner, 0.0);
    for (int32_t a = 0; a < A; ++a) {
      std::vector<double> logit(t + 1);
      for (int32_t s2 = 0; s2 <= t; ++s2) {
        for (int32_t i = 0; i < hd; ++i) logit[s2] += q[t][a * hd + i] * k[s2][a * hd + i];
        logit[s2] /= std::sqrt(double(hd));
      }
      const double mx = *std::max_element(logit.begin(), logit.end());
      double z = 0;
      for (double l : logit) z += std::exp(l - mx);
      for (int32_t s2 = 0; s2 <= t; ++s2)
        for (int32_t i = 0; i < hd; ++i) feat[a * hd + i] += std::exp(logit[s2] - mx) / z * v[s2][a * hd + i];
    }
    for (int32_t i = 0; i < inner; ++i) feat[inner + i] = v[t][i];
    for (int32_t h = 0; h < H; ++h) {
      double zz = w.out_proj_bias[h];
      for (int32_t i = 0; i < 2 * inner; ++i) zz += double(w.out_proj_weight[size_t(h) * 2 * inner + i]) * feat[i];
      out[size_t(h) * n + t] = zz;
    }
  }
  return out;
}

TEST(AttentionGateTest, LogitsMatchDirectDoubleImplementation) {
  const ModelShape shape = Shape(2, 8, 4, 8, 32);
  AttentionGateConfig config;
  config.num_heads = 3;
  config.head_dim = 5;
  auto gate = AttentionGate::CreateRandom(shape, 7, config);
  for (float& b : gate->mutable_layer(1).out_proj_bias) b = 0.3f;
  std::mt19937 rng(1);
  for (int32_t l = 0; l < 2; ++l) {
    const std::vector<float> x = RandomVector(23 * 32, rng);
    auto logits = gate->Logits(l, x);
    ASSERT_TRUE(logits.ok()) << logits.status();
    const std::vector<double> want = ReferenceLogits(*gate, l, x);
    for (size_t i = 0; i < want.size(); ++i) EXPECT_NEAR((*logits)[i], want[i], 2e-5 * (1 + std::abs(want[i]))) << i;
    auto flags = gate->Flags(l, x);
    ASSERT_TRUE(flags.ok());
    for (size_t i = 0; i < want.size(); ++i) {
      if (std::abs(want[i]) > 1e-4) {
        EXPECT_EQ((*flags)[i], want[i] > 0 ? 1 : 0) << i;  // threshold 0.5
      }
    }
  }
}

TEST(AttentionGateTest, FlagsAreCausal) {
  const ModelShape shape = Shape(1, 4, 2, 8, 16);
  auto gate = AttentionGate::CreateRandom(shape, 3);
  std::mt19937 rng(2);
  const int32_t n = 40, H = 2;
  const std::vector<float> x = RandomVector(size_t(n) * 16, rng);
  auto base_logits = gate->Logits(0, x);
  auto base_flags = gate->Flags(0, x);
  ASSERT_TRUE(base_logits.ok() && base_flags.ok());
  int64_t kept = 0;
  for (uint8_t f : *base_flags) kept += f;
  EXPECT_GT(kept, 0);        // a random gate keeps some rows ...
  EXPECT_LT(kept, n * H);    // ... and evicts some
  for (int32_t t : {0, 1, 17, n - 1}) {
    std::vector<float> changed = x;
    for (int32_t e = 0; e < 16; ++e) changed[size_t(t) * 16 + e] += 3.0f * (e % 2 ? 1 : -1);
    auto logits = gate->Logits(0, changed);
    auto flags = gate->Flags(0, changed);
    ASSERT_TRUE(logits.ok() && flags.ok());
    bool later_changed = false;
    for (int32_t h = 0; h < H; ++h) {
      for (int32_t s = 0; s < n; ++s) {
        if (s < t) {
          EXPECT_EQ((*flags)[h * n + s], (*base_flags)[h * n + s]) << "t=" << t << " s=" << s;
          EXPECT_EQ((*logits)[h * n + s], (*base_logits)[h * n + s]);
        } else if ((*logits)[h * n + s] != (*base_logits)[h * n + s]) {
          later_changed = true;
        }
      }
    }
    EXPECT_TRUE(later_changed) << "changing token " << t << " must change its own logits";
  }
  // A prefix sees exactly the prefix's logits.
  auto prefix = gate->Logits(0, absl::MakeConstSpan(x.data(), 10 * 16));
  ASSERT_TRUE(prefix.ok());
  for (int32_t h = 0; h < H; ++h)
    for (int32_t s = 0; s < 10; ++s) EXPECT_EQ((*prefix)[h * 10 + s], (*base_logits)[h * n + s]);
}

TEST(AttentionGateTest, IncrementalStateEqualsBatch) {
  const ModelShape shape = Shape(2, 4, 2, 8, 16);
  auto gate = AttentionGate::CreateRandom(shape, 5);
  std::mt19937 rng(3);
  const int32_t n = 12;
  const std::vector<float> x = RandomVector(size_t(n) * 16, rng);
  auto batch = gate->Logits(1, x);
  ASSERT_TRUE(batch.ok());
  AttentionGateState state(gate.get());
  int32_t t = 0;
  for (int32_t step : {5, 1, 1, 3, 2}) {  // a "prefill" of 5, then decode-like steps
    auto got = state.Append(1, absl::MakeConstSpan(x.data() + size_t(t) * 16, size_t(step) * 16));
    ASSERT_TRUE(got.ok());
    for (int32_t h = 0; h < 2; ++h)
      for (int32_t i = 0; i < step; ++i) EXPECT_EQ((*got)[h * step + i], (*batch)[h * n + t + i]);
    t += step;
  }
  EXPECT_EQ(state.tokens(1), n);
  EXPECT_EQ(state.tokens(0), 0);
  EXPECT_STATUS(state.Append(2, x), StatusCode::kInvalidArgument, "layer 2");
}

// A state continued elsewhere (the decode worker, kv/kv_handoff.h) flags the next
// tokens exactly as the original does.
TEST(AttentionGateTest, SerializedStateContinuesBitIdentically) {
  const ModelShape shape = Shape(2, 4, 2, 8, 16);
  auto gate = AttentionGate::CreateRandom(shape, 5);
  std::mt19937 rng(4);
  const std::vector<float> prompt = RandomVector(size_t(7) * 16, rng), next = RandomVector(size_t(3) * 16, rng);
  AttentionGateState state(gate.get());
  ASSERT_TRUE(state.Append(0, prompt).ok());
  ASSERT_TRUE(state.Append(1, absl::MakeConstSpan(prompt).subspan(0, 5 * 16)).ok());  // layers may differ
  const std::string bytes = state.Serialize();
  auto copy = AttentionGateState::Deserialize(gate.get(), bytes);
  ASSERT_TRUE(copy.ok()) << copy.status();
  EXPECT_EQ((*copy)->tokens(0), 7);
  EXPECT_EQ((*copy)->tokens(1), 5);
  EXPECT_EQ((*copy)->Serialize(), bytes);
  for (int32_t layer : {0, 1}) {
    auto want = state.Append(layer, next);
    auto got = (*copy)->Append(layer, next);
    ASSERT_TRUE(want.ok() && got.ok());
    EXPECT_EQ(*got, *want) << "layer " << layer;
  }

  // Malformed bytes and a gate of another shape are INVALID_ARGUMENT.
  EXPECT_STATUS(AttentionGateState::Deserialize(gate.get(), "").status(), StatusCode::kInvalidArgument, "not a v1");
  EXPECT_STATUS(AttentionGateState::Deserialize(gate.get(), bytes.substr(0, bytes.size() - 4)).status(),
                StatusCode::kInvalidArgument, "truncated");
  EXPECT_STATUS(AttentionGateState::Deserialize(gate.get(), bytes + "x").status(), StatusCode::kInvalidArgument,
                "trailing");
  std::string bad_tokens = bytes;
  const int32_t negative = -1;
  std::memcpy(bad_tokens.data() + 7 * sizeof(int32_t), &negative, sizeof(negative));
  EXPECT_STATUS(AttentionGateState::Deserialize(gate.get(), bad_tokens).status(), StatusCode::kInvalidArgument,
                "layer 0");
  auto other = AttentionGate::CreateRandom(Shape(2, 4, 2, 8, 24), 5);
  EXPECT_STATUS(AttentionGateState::Deserialize(other.get(), bytes).status(), StatusCode::kInvalidArgument,
                "hidden 16");
}

TEST(AttentionGateTest, SaveLoadAndLoadErrors) {
  const ModelShape shape = Shape(2, 4, 2, 8, 16);
  auto gate = AttentionGate::CreateRandom(shape, 8);
  const std::string path = TempPath("ag.safetensors");
  ASSERT_TRUE(gate->Save(path).ok());
  auto loaded = AttentionGate::Load(path, shape);
  ASSERT_TRUE(loaded.ok()) << loaded.status();
  EXPECT_EQ((*loaded)->config().num_heads, 2);
  EXPECT_EQ((*loaded)->config().head_dim, 16);
  EXPECT_FLOAT_EQ((*loaded)->config().threshold, 0.5f);
  std::mt19937 rng(1);
  const std::vector<float> x = RandomVector(9 * 16, rng);
  EXPECT_EQ(*gate->Logits(1, x), *(*loaded)->Logits(1, x));

  EXPECT_STATUS(AttentionGate::Load(path, Shape(2, 4, 4, 8, 16)), StatusCode::kInvalidArgument,
                "gate weights do not fit the model: " + path + ": metadata 'num_kv_heads' is 2, the model has 4");
  // A wrong tensor shape: gate heads claimed 3 in the metadata -> q_proj must be [48, 16].
  std::vector<NamedTensor> tensors;
  for (int32_t l = 0; l < 2; ++l) {
    const auto& w = gate->layer(l);
    const std::string p = "layers." + std::to_string(l) + ".";
    tensors.push_back({p + "q_proj.weight", {32, 16}, w.q_proj_weight});
    tensors.push_back({p + "k_proj.weight", {32, 16}, w.k_proj_weight});
    tensors.push_back({p + "v_proj.weight", {32, 16}, w.v_proj_weight});
    tensors.push_back({p + "out_proj.weight", {2, 64}, w.out_proj_weight});
    if (l == 0) tensors.push_back({p + "out_proj.bias", {2}, w.out_proj_bias});
  }
  std::map<std::string, std::string> meta = {{"format", kAttentionGateFormat}, {"num_layers", "2"},
                                             {"hidden_size", "16"}, {"num_kv_heads", "2"},
                                             {"gate_heads", "2"}, {"gate_head_dim", "16"}};
  ASSERT_TRUE(WriteSafetensorsF32(path, tensors, meta).ok());
  EXPECT_STATUS(AttentionGate::Load(path, shape), StatusCode::kInvalidArgument,
                "gate weights do not fit the model: tensor 'layers.1.out_proj.bias' is missing");
  meta["gate_heads"] = "3";
  ASSERT_TRUE(WriteSafetensorsF32(path, tensors, meta).ok());
  EXPECT_STATUS(AttentionGate::Load(path, shape), StatusCode::kInvalidArgument,
                "tensor 'layers.0.q_proj.weight' in " + path + " has shape [32, 16], expected [48, 16]");
  meta.erase("gate_head_dim");
  ASSERT_TRUE(WriteSafetensorsF32(path, tensors, meta).ok());
  EXPECT_STATUS(AttentionGate::Load(path, shape), StatusCode::kInvalidArgument, "metadata 'gate_head_dim' is missing");
  std::remove(path.c_str());
}

TEST(AttentionGatePolicyTest, KeepsFlaggedAndProtectedRowsAndCapsToTheBudget) {
  const ModelShape shape = Shape(2, 4, 2, 8, 16);
  std::shared_ptr<const AttentionGate> gate = AttentionGate::CreateRandom(shape, 13);
  PolicyOptions options;
  options.attention_gate = gate;
  auto policy = CreatePolicy("attention_gate", options, shape);
  ASSERT_TRUE(policy.ok()) << policy.status();
  const int32_t n = 60;
  const PrefillCapture c = testing::RandomCapture(shape, n, 0, true, 4);
  EvictionSpec spec;
  spec.policy = "attention_gate";
  auto budget = ResolveBudget(spec, n, (*policy)->default_sink(), (*policy)->default_recent());
  ASSERT_TRUE(budget.ok());
  EXPECT_EQ(budget->keep_per_head, n);  // no budget: flags alone decide
  // The prefill key mask = flags OR protected (sink 4).
  PolicyInputs inputs;
  std::unique_ptr<PolicyRequest> request = (*policy)->StartRequest(*budget);
  EXPECT_TRUE(request->masks_prefill_keys());
  for (int32_t l = 0; l < 2; ++l) {
    auto mask = AttentionGatePrefillKeyMask(*gate, l, c.hidden_states[l], *budget);
    ASSERT_TRUE(mask.ok());
    auto from_request = request->PrefillKeyMask(l, c.hidden_states[l]);
    ASSERT_TRUE(from_request.ok()) << from_request.status();
    EXPECT_EQ(*from_request, *mask);
    auto flags = gate->Flags(l, c.hidden_states[l]);
    for (int32_t h = 0; h < 2; ++h)
      for (int32_t p = 0; p < n; ++p) EXPECT_EQ((*mask)[h * n + p], (p < 4 || (*flags)[h * n + p]) ? 1 : 0);
    inputs.gate_flags.push_back(*mask);
  }
  auto plan = (*policy)->Plan(c, inputs, *budget, HeadBudget::kPolicyDefault);
  ASSERT_TRUE(plan.ok()) << plan.status();
  for (int32_t l = 0; l < 2; ++l) {
    for (int32_t h = 0; h < 2; ++h) {
      std::vector<int32_t> want;
      for (int32_t p = 0; p < n; ++p)
        if (inputs.gate_flags[l][h * n + p]) want.push_back(p);
      EXPECT_EQ(plan->at(l, h).positions, want);
    }
  }
  // Recomputed from hidden states when no flags are supplied: same plan.
  auto recomputed = (*policy)->Plan(c, *budget, HeadBudget::kPolicyDefault);
  ASSERT_TRUE(recomputed.ok());
  for (size_t i = 0; i < plan->heads.size(); ++i) EXPECT_EQ(recomputed->heads[i].positions, plan->heads[i].positions);

  // A budget caps: protected + the highest-logit flagged rows, never an unflagged row.
  spec.budget_tokens = 10;
  auto capped_budget = ResolveBudget(spec, n, 4, 0);
  ASSERT_TRUE(capped_budget.ok());
  auto capped = (*policy)->Plan(c, inputs, *capped_budget, HeadBudget::kPolicyDefault);
  ASSERT_TRUE(capped.ok());
  for (int32_t l = 0; l < 2; ++l) {
    auto logits = gate->Logits(l, c.hidden_states[l]);
    for (int32_t h = 0; h < 2; ++h) {
      std::vector<std::pair<float, int32_t>> flagged;
      for (int32_t p = 4; p < n; ++p)
        if (inputs.gate_flags[l][h * n + p]) flagged.push_back({-(*logits)[h * n + p], p});
      std::sort(flagged.begin(), flagged.end());
      std::vector<int32_t> want = {0, 1, 2, 3};
      for (size_t i = 0; i < std::min<size_t>(6, flagged.size()); ++i) want.push_back(flagged[i].second);
      std::sort(want.begin(), want.end());
      EXPECT_EQ(capped->at(l, h).positions, want);
    }
  }
  EXPECT_STATUS((*policy)->Plan(c, *budget, HeadBudget::kAdaptive), StatusCode::kInvalidArgument, "ADAPTIVE");
  PrefillCapture bare = c;
  bare.hidden_states.clear();
  EXPECT_STATUS((*policy)->Plan(bare, *budget, HeadBudget::kPolicyDefault), StatusCode::kInvalidArgument, "gate_flags");
}

}  // namespace
}  // namespace kvgate::gates
