#include "gates/policy.h"

#include "gates/attention_gate.h"
#include "gates/fast_kvzip.h"
#include "gates/internal/test_util.h"
#include "gates/kvzip.h"
#include "gtest/gtest.h"

namespace kvgate::gates {
namespace {

using absl::StatusCode;
using testing::Shape;

TEST(CreatePolicyTest, EveryNameAndItsNeeds) {
  const ModelShape shape = Shape(2, 4, 2, 8, 16);
  PolicyOptions options;
  options.allow_random_gate = true;
  struct Want {
    std::string name;
    bool keys;
    int32_t last_queries;
    bool hidden;
    int32_t sink, recent;
  };
  const std::vector<Want> wants = {
      {"full", false, 0, false, 0, 0},
      {"streaming_llm", false, 0, false, 4, 0},
      {"snapkv", true, 64, false, 0, 0},
      {"sage_kv", true, 1, false, kDefaultQuarterOfBudget, kDefaultQuarterOfBudget},
      {"kvzip", true, 0, false, 4, 0},
      {"fast_kvzip", false, 0, true, 4, kDefaultFastKvzipWindow},
      {"attention_gate", false, 0, false, 4, 0},
  };
  ASSERT_EQ(wants.size(), PolicyNames().size());
  for (const Want& w : wants) {
    SCOPED_TRACE(w.name);
    auto policy = CreatePolicy(w.name, options, shape);
    ASSERT_TRUE(policy.ok()) << policy.status();
    EXPECT_EQ((*policy)->name(), w.name);
    EXPECT_EQ((*policy)->needs().keys, w.keys);
    EXPECT_EQ((*policy)->needs().last_queries, w.last_queries);
    EXPECT_EQ((*policy)->needs().hidden_states, w.hidden);
    EXPECT_EQ((*policy)->default_sink(), w.sink);
    EXPECT_EQ((*policy)->default_recent(), w.recent);
    // The registry's traits, used where no policy is built, say the same.
    auto traits = TraitsOfPolicy(w.name);
    ASSERT_TRUE(traits.ok()) << traits.status();
    EXPECT_EQ(traits->default_sink, w.sink);
    EXPECT_EQ(traits->default_recent, w.recent);
    EXPECT_EQ(traits->evicts, w.name != "full");
    EXPECT_EQ(traits->learned_gate, w.name == "fast_kvzip" || w.name == "attention_gate");
    EXPECT_EQ((*policy)->fast_kvzip_gate() != nullptr, w.name == "fast_kvzip");
    EvictionSpec spec;
    spec.policy = w.name;
    auto budget = ResolveBudget(spec, 32, (*policy)->default_sink(), (*policy)->default_recent());
    ASSERT_TRUE(budget.ok());
    EXPECT_EQ((*policy)->StartRequest(*budget)->masks_prefill_keys(), w.name == "attention_gate");
  }
}

TEST(CreatePolicyTest, Errors) {
  const ModelShape shape = Shape(2, 4, 2, 8, 16);
  EXPECT_STATUS(CreatePolicy("h2o", {}, shape), StatusCode::kInvalidArgument, "unknown eviction policy 'h2o'");
  EXPECT_STATUS(TraitsOfPolicy("h2o"), StatusCode::kInvalidArgument, "unknown eviction policy 'h2o'");
  EXPECT_EQ(AdaptiveHeadPolicies(), "snapkv, kvzip, fast_kvzip");
  EXPECT_STATUS(CreatePolicy("full", {}, Shape(2, 3, 2, 8, 16)), StatusCode::kInvalidArgument, "model shape");
  EXPECT_STATUS(CreatePolicy("fast_kvzip", {}, shape), StatusCode::kInvalidArgument, "gate_path");
  EXPECT_STATUS(CreatePolicy("attention_gate", {}, shape), StatusCode::kInvalidArgument, "gate_path");
  PolicyOptions missing;
  missing.gate_path = testing::TempPath("does_not_exist.safetensors");
  EXPECT_EQ(CreatePolicy("fast_kvzip", missing, shape).status().code(), StatusCode::kNotFound);
  PolicyOptions other;
  other.fast_kvzip_gate = FastKvzipGate::CreateRandom(Shape(3, 4, 2, 8, 16), 1);
  EXPECT_STATUS(CreatePolicy("fast_kvzip", other, shape), StatusCode::kInvalidArgument, "gate weights do not fit the model");
  PolicyOptions snap;
  snap.snapkv_kernel = 4;
  EXPECT_STATUS(CreatePolicy("snapkv", snap, shape), StatusCode::kInvalidArgument, "kernel");
}

TEST(CreatePolicyTest, LoadsGatesFromPath) {
  const ModelShape shape = Shape(2, 4, 2, 8, 16);
  const std::string path = testing::TempPath("policy_gate.safetensors");
  ASSERT_TRUE(FastKvzipGate::CreateRandom(shape, 3)->Save(path).ok());
  PolicyOptions options;
  options.gate_path = path;
  EXPECT_TRUE(CreatePolicy("fast_kvzip", options, shape).ok());
  EXPECT_STATUS(CreatePolicy("attention_gate", options, shape), StatusCode::kInvalidArgument, "'format'");
  ASSERT_TRUE(AttentionGate::CreateRandom(shape, 3)->Save(path).ok());
  EXPECT_TRUE(CreatePolicy("attention_gate", options, shape).ok());
  std::remove(path.c_str());
}

// A worker's gates: files by policy, seeded random gates for the rest, and refusals.
TEST(LoadGatesTest, LoadsFilesAndRandomGatesAndRefusesUngatedPolicies) {
  const ModelShape shape = Shape(2, 4, 2, 8, 16);
  const std::string path = testing::TempPath("worker_gate.safetensors");
  ASSERT_TRUE(AttentionGate::CreateRandom(shape, 3)->Save(path).ok());
  GateFiles files;
  files.paths["attention_gate"] = path;
  auto options = LoadGates(files, shape);
  ASSERT_TRUE(options.ok()) << options.status();
  EXPECT_NE(options->attention_gate, nullptr);
  EXPECT_EQ(options->fast_kvzip_gate, nullptr) << "no file and no seed: fast_kvzip stays refused";
  EXPECT_FALSE(CreatePolicy("fast_kvzip", *options, shape).ok());
  EXPECT_TRUE(CreatePolicy("attention_gate", *options, shape).ok());
  files.random_seed = 9;
  options = LoadGates(files, shape);
  ASSERT_TRUE(options.ok()) << options.status();
  EXPECT_NE(options->fast_kvzip_gate, nullptr);
  EXPECT_TRUE(CreatePolicy("fast_kvzip", *options, shape).ok());
  files.paths["fast_kvzip"] = path;  // an attention gate's file
  EXPECT_STATUS(LoadGates(files, shape), StatusCode::kInvalidArgument, "'format'");
  files.paths["fast_kvzip"] = path + ".missing";
  EXPECT_EQ(LoadGates(files, shape).status().code(), StatusCode::kNotFound);
  files.paths.erase("fast_kvzip");
  files.paths["snapkv"] = path;
  EXPECT_STATUS(LoadGates(files, shape), StatusCode::kInvalidArgument, "policy 'snapkv'");
  std::remove(path.c_str());
}

// The engine's flow for every policy: resolve with the policy's defaults, capture what it
// needs, plan. Checks the invariants every plan must satisfy.
TEST(PolicyTest, EndToEndInvariants) {
  const ModelShape shape = Shape(2, 4, 2, 8, 16);
  const int32_t n = 150;
  PolicyOptions options;
  options.allow_random_gate = true;
  options.snapkv_window = 16;
  for (const std::string& name : PolicyNames()) {
    for (float ratio : {0.2f, 0.5f, 1.0f}) {
      SCOPED_TRACE(::testing::Message() << name << " ratio " << ratio);
      auto policy = CreatePolicy(name, options, shape);
      ASSERT_TRUE(policy.ok()) << policy.status();
      EvictionSpec spec;
      spec.policy = name;
      spec.keep_ratio = ratio;
      spec.protected_ranges = {{20, 25}};
      auto budget = ResolveBudget(spec, n, (*policy)->default_sink(), (*policy)->default_recent());
      ASSERT_TRUE(budget.ok()) << budget.status();
      const CaptureRequest need = (*policy)->needs();
      PrefillCapture c = testing::RandomCapture(shape, n, std::max(need.last_queries, 1), true, 17);
      PolicyInputs inputs;
      if ((*policy)->name() == "kvzip") {
        std::mt19937 rng(5);
        for (TokenRange r : KvzipChunkRanges(4, n, 50)) {
          KvzipChunk ch;
          ch.begin = r.begin;
          ch.end = r.end;
          ch.sink_keys = 4;
          ch.num_queries = r.end - r.begin + 3;
          for (int32_t l = 0; l < 2; ++l) {
            ch.queries.push_back(testing::RandomVector(size_t(ch.num_queries) * 4 * 8, rng));
            ch.own_keys.push_back(testing::RandomVector(size_t(2) * ch.num_queries * 8, rng));
          }
          inputs.kvzip_chunks.push_back(std::move(ch));
        }
      }
      auto plan = (*policy)->Plan(c, inputs, *budget, HeadBudget::kPolicyDefault);
      ASSERT_TRUE(plan.ok()) << plan.status();
      EXPECT_EQ(plan->num_layers, 2);
      EXPECT_EQ(plan->num_kv_heads, 2);
      EXPECT_EQ(plan->prompt_tokens, n);
      ASSERT_EQ(plan->heads.size(), 4u);
      int64_t protected_rows = std::count(budget->protected_mask.begin(), budget->protected_mask.end(), 1);
      for (const HeadKeep& h : plan->heads) {
        EXPECT_TRUE(std::is_sorted(h.positions.begin(), h.positions.end()));
        EXPECT_TRUE(std::adjacent_find(h.positions.begin(), h.positions.end()) == h.positions.end());
        for (int32_t p = 0; p < n; ++p) {
          if (budget->protected_mask[p]) {
            EXPECT_TRUE(std::binary_search(h.positions.begin(), h.positions.end(), p)) << p;
          }
        }
        EXPECT_TRUE(h.query_mask.empty() || h.query_mask.size() == h.positions.size());
        EXPECT_TRUE(h.scores.empty() || h.scores.size() == h.positions.size());
        if (name != "fast_kvzip" && name != "kvzip" && name != "full") {  // per-head budgets (global ones average)
          EXPECT_LE(static_cast<int64_t>(h.positions.size()),
                    std::max<int64_t>(budget->keep_per_head,
                                      protected_rows + (name == "snapkv" ? 16 : 0) + (name == "sage_kv" ? 1 : 0)));
        }
      }
      if (name == "full" || ratio == 1.0f) {
        if (name != "attention_gate") {
          EXPECT_EQ(plan->KeptEntries(), int64_t{n} * 4);
        }
      }
      if (name == "fast_kvzip" || name == "kvzip") {
        EXPECT_EQ(plan->KeptEntries(), std::max<int64_t>(int64_t{budget->keep_per_head} * 4, protected_rows * 4));
      }
    }
  }
}

}  // namespace
}  // namespace kvgate::gates
