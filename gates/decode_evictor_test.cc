// Decode-time eviction as policy objects: each policy's rule on a simulated sequence
// (rings, Fast KVzip's re-eviction, Attention-Gate's flags), and SaveState/Restore
// continuing an evictor exactly, with the errors a decode worker can meet.
#include "gates/decode_evictor.h"

#include <gtest/gtest.h>

#include <algorithm>
#include <limits>
#include <random>

#include "gates/attention_gate.h"
#include "gates/fast_kvzip.h"
#include "gates/policy.h"

namespace kvgate::gates {
namespace {

using absl::StatusCode;

ModelShape Shape() {
  ModelShape s;
  s.num_layers = 2;
  s.num_q_heads = 4;
  s.num_kv_heads = 2;
  s.head_dim = 8;
  s.hidden_size = 16;
  return s;
}

// A sequence's rows as the KV layer would hold them: per (layer, kv head) positions and
// scores, one step appended at a time.
struct SimulatedSequence {
  int32_t num_layers = 0, num_kv_heads = 0, next_pos = 0;
  std::vector<std::vector<int32_t>> positions;
  std::vector<std::vector<float>> scores;

  SimulatedSequence(const ModelShape& shape, const std::vector<int32_t>& kept, int32_t prompt_tokens)
      : num_layers(shape.num_layers), num_kv_heads(shape.num_kv_heads), next_pos(prompt_tokens),
        positions(static_cast<size_t>(shape.num_layers) * shape.num_kv_heads, kept),
        scores(positions.size(), std::vector<float>(kept.size(), 0.5f)) {}

  DecodeRows Rows() {
    DecodeRows rows;
    rows.num_layers = num_layers;
    rows.num_kv_heads = num_kv_heads;
    rows.next_pos = next_pos;
    for (size_t i = 0; i < positions.size(); ++i) {
      rows.positions.emplace_back(positions[i]);
      rows.scores.emplace_back(absl::MakeSpan(scores[i]));
    }
    return rows;
  }
  // Appends the step's token to every head, feeds the evictor and applies its drops. With
  // `score_with`, the evictor gets each layer's scores of the input, as a decode batch
  // that scored it on the backend hands them, instead of the input.
  absl::Status Step(DecodeEvictor& evictor, std::mt19937& rng, int32_t hidden_size,
                    const FastKvzipGate* score_with = nullptr) {
    for (size_t i = 0; i < positions.size(); ++i) {
      positions[i].push_back(next_pos);
      scores[i].push_back(0.0f);
    }
    ++next_pos;
    if (evictor.wants_layer_inputs()) {
      std::normal_distribution<float> normal;
      for (int32_t l = 0; l < num_layers; ++l) {
        std::vector<float> x(hidden_size);
        for (float& v : x) v = normal(rng);
        if (score_with != nullptr) {
          absl::StatusOr<std::vector<float>> scores = score_with->Score(l, x);  // [kv_heads, 1]
          if (!scores.ok()) return scores.status();
          if (absl::Status s = evictor.ObserveLayerScores(l, *scores); !s.ok()) return s;
          continue;
        }
        if (absl::Status s = evictor.ObserveLayerInput(l, x); !s.ok()) return s;
      }
    }
    absl::StatusOr<RowsToDrop> drop = evictor.AfterStep(Rows());
    if (!drop.ok()) return drop.status();
    if (drop->empty()) return absl::OkStatus();
    if (drop->size() != positions.size()) return absl::InternalError("drops for another number of heads");
    for (size_t i = 0; i < positions.size(); ++i) {
      for (auto r = (*drop)[i].rbegin(); r != (*drop)[i].rend(); ++r) {
        positions[i].erase(positions[i].begin() + *r);
        scores[i].erase(scores[i].begin() + *r);
      }
    }
    return absl::OkStatus();
  }
};

std::vector<int32_t> Range(int32_t begin, int32_t end) {
  std::vector<int32_t> out;
  for (int32_t p = begin; p < end; ++p) out.push_back(p);
  return out;
}

std::vector<int32_t> Concat(std::vector<int32_t> a, const std::vector<int32_t>& b) {
  a.insert(a.end(), b.begin(), b.end());
  return a;
}

struct Made {
  std::unique_ptr<Policy> policy;
  ResolvedBudget budget;
  std::unique_ptr<DecodeEvictor> evictor;
};

Made Make(const std::string& name, int32_t budget_tokens, int32_t prompt_tokens, const PolicyOptions& options) {
  Made m;
  auto policy = CreatePolicy(name, options, Shape());
  EXPECT_TRUE(policy.ok()) << policy.status();
  m.policy = *std::move(policy);
  EvictionSpec spec;
  spec.policy = name;
  spec.budget_tokens = budget_tokens;
  auto budget = ResolveBudget(spec, prompt_tokens, m.policy->default_sink(), m.policy->default_recent());
  EXPECT_TRUE(budget.ok()) << budget.status();
  m.budget = *budget;
  std::unique_ptr<PolicyRequest> request = m.policy->StartRequest(m.budget);
  auto evictor = request->TakeDecodeEvictor();
  EXPECT_TRUE(evictor.ok()) << evictor.status();
  m.evictor = *std::move(evictor);
  return m;
}

PolicyOptions GateOptions() {
  PolicyOptions options;
  options.fast_kvzip_gate = FastKvzipGate::CreateRandom(Shape(), 11);
  options.attention_gate = AttentionGate::CreateRandom(Shape(), 5);
  options.fast_kvzip_decode_interval = 3;
  return options;
}

TEST(DecodeEvictorTest, StreamingRingKeepsTheSinksAndTheNewestRows) {
  Made m = Make("streaming_llm", 6, 20, {});
  ASSERT_NE(m.evictor, nullptr);
  EXPECT_EQ(m.evictor->policy(), "streaming_llm");
  EXPECT_FALSE(m.evictor->wants_layer_inputs());
  SimulatedSequence seq(Shape(), Concat(Range(0, 4), Range(18, 20)), 20);
  std::mt19937 rng(1);
  for (int step = 0; step < 5; ++step) {
    { const absl::Status stepped = seq.Step(*m.evictor, rng, 16); ASSERT_TRUE(stepped.ok()) << stepped; }
    for (const auto& head : seq.positions) {
      EXPECT_EQ(head, Concat(Range(0, 4), Range(seq.next_pos - 2, seq.next_pos))) << "step " << step;
    }
  }
  // A request that keeps every row evicts nothing in decode either.
  EXPECT_EQ(Make("streaming_llm", 20, 20, {}).evictor, nullptr);
  EXPECT_EQ(Make("full", 5, 20, {}).evictor, nullptr);
  EXPECT_EQ(Make("snapkv", 5, 20, {}).evictor, nullptr);
}

TEST(DecodeEvictorTest, SageKvRingKeepsItsRecentWindowAndFreezesTheRest) {
  Made m = Make("sage_kv", 8, 40, {});  // sink = recent = 8 / 4 = 2
  ASSERT_NE(m.evictor, nullptr);
  ASSERT_EQ(m.budget.recent_tokens, 2);
  const std::vector<int32_t> frozen = {0, 1, 7, 12, 25, 30};
  SimulatedSequence seq(Shape(), Concat(frozen, Range(38, 40)), 40);
  std::mt19937 rng(2);
  for (int step = 0; step < 4; ++step) {
    { const absl::Status stepped = seq.Step(*m.evictor, rng, 16); ASSERT_TRUE(stepped.ok()) << stepped; }
    for (const auto& head : seq.positions) {
      EXPECT_EQ(head, Concat(frozen, Range(seq.next_pos - 2, seq.next_pos))) << "step " << step;
    }
  }
  EXPECT_EQ(Make("sage_kv", 40, 40, {}).evictor, nullptr);
}

TEST(DecodeEvictorTest, FastKvzipReevictsEveryIntervalWithOneThresholdAndPinsSinksAndNewest) {
  const PolicyOptions options = GateOptions();
  Made m = Make("fast_kvzip", 10, 30, options);
  ASSERT_NE(m.evictor, nullptr);
  ASSERT_EQ(m.budget.sink_tokens, 4);
  EXPECT_TRUE(m.evictor->wants_layer_inputs());
  SimulatedSequence seq(Shape(), Concat(Range(0, 4), Range(22, 30)), 30);  // 12 rows > capacity 10
  std::mt19937 rng(3);
  const int64_t budget_rows = int64_t{10} * 2 * 2;
  for (int step = 0; step < 9; ++step) {
    const int64_t before = [&] {
      int64_t rows = 0;
      for (const auto& head : seq.positions) rows += static_cast<int64_t>(head.size());
      return rows;
    }();
    const SimulatedSequence previous = seq;
    { const absl::Status stepped = seq.Step(*m.evictor, rng, 16); ASSERT_TRUE(stepped.ok()) << stepped; }
    int64_t rows = 0;
    for (const auto& head : seq.positions) rows += static_cast<int64_t>(head.size());
    if ((step + 1) % 3 != 0) {
      EXPECT_EQ(rows, before + 4) << "step " << step << ": only every 3rd step re-evicts";
      continue;
    }
    // Pinned: positions < sink (4) and the newest 3; one threshold over all heads fills
    // the budget with the best-scored others.
    EXPECT_EQ(rows, budget_rows) << "step " << step;
    float lowest_kept = std::numeric_limits<float>::infinity();
    for (size_t i = 0; i < seq.positions.size(); ++i) {
      for (size_t r = 0; r < seq.positions[i].size(); ++r) {
        const int32_t p = seq.positions[i][r];
        if (p >= 4 && p < seq.next_pos - 3) lowest_kept = std::min(lowest_kept, seq.scores[i][r]);
      }
    }
    float highest_dropped = -1.0f;
    for (size_t i = 0; i < seq.positions.size(); ++i) {
      for (size_t r = 0; r < previous.positions[i].size(); ++r) {
        const auto& now = seq.positions[i];
        if (std::find(now.begin(), now.end(), previous.positions[i][r]) == now.end()) {
          highest_dropped = std::max(highest_dropped, previous.scores[i][r]);
        }
      }
    }
    EXPECT_GE(highest_dropped, 0.0f) << "step " << step << ": something was dropped";
    EXPECT_LE(highest_dropped, lowest_kept) << "step " << step;
    for (size_t i = 0; i < seq.positions.size(); ++i) {
      const auto& head = seq.positions[i];
      for (int32_t p = 0; p < 4; ++p) EXPECT_TRUE(std::count(head.begin(), head.end(), p)) << p;
      for (int32_t p = seq.next_pos - 3; p < seq.next_pos; ++p) {
        EXPECT_TRUE(std::count(head.begin(), head.end(), p)) << p;
        // The new rows were scored by the gate: no longer the 0 they were appended with.
        const size_t r = std::find(head.begin(), head.end(), p) - head.begin();
        EXPECT_GT(seq.scores[i][r], 0.0f);
      }
    }
  }
}

TEST(DecodeEvictorTest, AttentionGateDropsTheNewRowWhereTheGateDoesNotFlagIt) {
  const PolicyOptions options = GateOptions();
  Made m = Make("attention_gate", 0, 12, options);  // no budget: the gate alone decides
  std::unique_ptr<PolicyRequest> request = m.policy->StartRequest(m.budget);
  ASSERT_TRUE(request->masks_prefill_keys());
  // The same prompt through the request and through a reference state of the same gate.
  AttentionGateState reference(options.attention_gate.get());
  std::mt19937 rng(4);
  std::normal_distribution<float> normal;
  for (int32_t l = 0; l < 2; ++l) {
    std::vector<float> x(12 * 16);
    for (float& v : x) v = normal(rng);
    auto mask = request->PrefillKeyMask(l, x);
    ASSERT_TRUE(mask.ok()) << mask.status();
    EXPECT_EQ(mask->size(), 2u * 12);
    ASSERT_TRUE(reference.Append(l, x).ok());
  }
  auto evictor = request->TakeDecodeEvictor();
  ASSERT_TRUE(evictor.ok() && *evictor != nullptr);
  EXPECT_EQ(request->TakeDecodeEvictor().status().code(), StatusCode::kFailedPrecondition);
  EXPECT_TRUE((*evictor)->wants_layer_inputs());
  SimulatedSequence seq(Shape(), Range(0, 12), 12);
  int dropped = 0, kept = 0;
  for (int step = 0; step < 12; ++step) {
    for (auto& head : seq.positions) head.push_back(seq.next_pos);
    for (auto& scores : seq.scores) scores.push_back(0.0f);
    ++seq.next_pos;
    std::vector<std::vector<uint8_t>> flags(2);
    for (int32_t l = 0; l < 2; ++l) {
      std::vector<float> x(16);
      for (float& v : x) v = normal(rng);
      ASSERT_TRUE((*evictor)->ObserveLayerInput(l, x).ok());
      auto logits = reference.Append(l, x);
      ASSERT_TRUE(logits.ok());
      for (float logit : *logits) flags[l].push_back(options.attention_gate->Flag(logit));
    }
    auto drop = (*evictor)->AfterStep(seq.Rows());
    ASSERT_TRUE(drop.ok()) << drop.status();
    for (int32_t l = 0; l < 2; ++l) {
      for (int32_t h = 0; h < 2; ++h) {
        const size_t i = static_cast<size_t>(l) * 2 + h;
        const std::vector<int32_t> want_drop =
            flags[l][h] ? std::vector<int32_t>{} : std::vector<int32_t>{static_cast<int32_t>(seq.positions[i].size()) - 1};
        EXPECT_EQ(drop->empty() ? std::vector<int32_t>{} : (*drop)[i], want_drop) << "step " << step;
        (flags[l][h] ? kept : dropped) += 1;
        if (!flags[l][h]) seq.positions[i].pop_back(), seq.scores[i].pop_back();
      }
    }
  }
  EXPECT_GT(dropped, 0);
  EXPECT_GT(kept, 0);
  // A step without every layer's input is refused, not guessed.
  for (auto& head : seq.positions) head.push_back(seq.next_pos);
  ++seq.next_pos;
  EXPECT_EQ((*evictor)->AfterStep(seq.Rows()).status().code(), StatusCode::kFailedPrecondition);
}

// Saved after a few steps and restored through the registry, an evictor continues exactly
// as the original does.
// A batch may score a sequence's step tokens on the backend and hand the evictor scores
// instead of inputs, step by step or mixed with inputs, and save it with scores waiting:
// the re-eviction is the same as from inputs alone.
TEST(DecodeEvictorTest, FastKvzipTakesScoresInPlaceOfInputsAndSavesThem) {
  const PolicyOptions options = GateOptions();
  const FastKvzipGate* gate = options.fast_kvzip_gate.get();
  Made from_inputs = Make("fast_kvzip", 10, 30, options);
  Made from_scores = Make("fast_kvzip", 10, 30, options);
  EXPECT_EQ(from_scores.evictor->layer_scorer(), gate);
  EXPECT_EQ(Make("streaming_llm", 10, 30, options).evictor->layer_scorer(), nullptr);
  const SimulatedSequence start(Shape(), Concat(Range(0, 4), Range(22, 30)), 30);
  SimulatedSequence a = start, b = start;
  std::mt19937 rng_a(3), rng_b(3);
  // Re-evictions after steps 2, 5 (interval 3): scores then an input; an input then
  // scores then an input; then two scores left waiting.
  const bool scored[] = {true, true, false, false, true, false, true, true};
  for (int step = 0; step < 8; ++step) {
    ASSERT_TRUE(a.Step(*from_inputs.evictor, rng_a, 16).ok());
    ASSERT_TRUE(b.Step(*from_scores.evictor, rng_b, 16, scored[step] ? gate : nullptr).ok());
    ASSERT_EQ(b.positions, a.positions) << "step " << step;
    ASSERT_EQ(b.scores, a.scores) << "step " << step;
  }
  // Mid-interval (8 steps, interval 3): scores are waiting; they survive a save.
  auto restored = RestoreDecodeEvictor("fast_kvzip", from_scores.evictor->SaveState(), options, Shape());
  ASSERT_TRUE(restored.ok()) << restored.status();
  EXPECT_EQ((*restored)->SaveState(), from_scores.evictor->SaveState());
  EXPECT_NE(from_scores.evictor->SaveState(), from_inputs.evictor->SaveState());
  SimulatedSequence c = b;
  std::mt19937 rng_c = rng_b;
  for (int step = 0; step < 5; ++step) {
    ASSERT_TRUE(a.Step(*from_inputs.evictor, rng_a, 16).ok());
    ASSERT_TRUE(c.Step(**restored, rng_c, 16, gate).ok());
    ASSERT_EQ(c.positions, a.positions) << "after the restore, step " << step;
    ASSERT_EQ(c.scores, a.scores) << "after the restore, step " << step;
  }
  EXPECT_EQ(from_inputs.evictor->ObserveLayerScores(2, std::vector<float>(2)).code(), StatusCode::kInvalidArgument);
  EXPECT_EQ(from_inputs.evictor->ObserveLayerScores(0, std::vector<float>(3)).code(), StatusCode::kInvalidArgument);
}

TEST(DecodeEvictorTest, SavedStateContinuesIdenticallyForEveryPolicy) {
  const PolicyOptions options = GateOptions();
  for (const char* name : {"streaming_llm", "sage_kv", "fast_kvzip", "attention_gate"}) {
    SCOPED_TRACE(name);
    Made m = Make(name, 8, 32, options);
    ASSERT_NE(m.evictor, nullptr);
    if (m.evictor->wants_layer_inputs() && std::string(name) == "attention_gate") {
      // Its state holds the prompt: feed it through a request as the prefill would.
      std::unique_ptr<PolicyRequest> request = m.policy->StartRequest(m.budget);
      std::mt19937 rng(5);
      std::normal_distribution<float> normal;
      for (int32_t l = 0; l < 2; ++l) {
        std::vector<float> x(32 * 16);
        for (float& v : x) v = normal(rng);
        ASSERT_TRUE(request->PrefillKeyMask(l, x).ok());
      }
      auto evictor = request->TakeDecodeEvictor();
      ASSERT_TRUE(evictor.ok());
      m.evictor = *std::move(evictor);
    }
    SimulatedSequence original(Shape(), Concat(Range(0, 4), Range(28, 32)), 32);
    std::mt19937 rng(6);
    for (int step = 0; step < 4; ++step) { const absl::Status stepped = original.Step(*m.evictor, rng, 16); ASSERT_TRUE(stepped.ok()) << stepped; }
    auto restored = RestoreDecodeEvictor(name, m.evictor->SaveState(), options, Shape());
    ASSERT_TRUE(restored.ok()) << restored.status();
    ASSERT_NE(*restored, nullptr);
    EXPECT_EQ((*restored)->policy(), name);
    EXPECT_EQ((*restored)->SaveState(), m.evictor->SaveState());
    SimulatedSequence copy = original;
    std::mt19937 rng_copy = rng;
    for (int step = 0; step < 7; ++step) {
      { const absl::Status stepped = original.Step(*m.evictor, rng, 16); ASSERT_TRUE(stepped.ok()) << stepped; }
      { const absl::Status stepped = copy.Step(**restored, rng_copy, 16); ASSERT_TRUE(stepped.ok()) << stepped; }
      ASSERT_EQ(copy.positions, original.positions) << "step " << step;
      ASSERT_EQ(copy.scores, original.scores) << "step " << step;
    }
  }
}

TEST(DecodeEvictorTest, RestoreRefusesWhatItCannotContinue) {
  const PolicyOptions options = GateOptions();
  const std::string ring = Make("streaming_llm", 6, 20, {}).evictor->SaveState();
  const std::string fast = Make("fast_kvzip", 6, 30, options).evictor->SaveState();
  const std::string gate = Make("attention_gate", 0, 12, options).evictor->SaveState();

  auto none = RestoreDecodeEvictor("", "", options, Shape());
  ASSERT_TRUE(none.ok());
  EXPECT_EQ(*none, nullptr);
  EXPECT_EQ(RestoreDecodeEvictor("", ring, options, Shape()).status().code(), StatusCode::kInvalidArgument);
  EXPECT_EQ(RestoreDecodeEvictor("h2o", ring, options, Shape()).status().code(), StatusCode::kInvalidArgument);
  // A state of another policy, or of a policy that evicts nothing in decode.
  EXPECT_EQ(RestoreDecodeEvictor("sage_kv", ring, options, Shape()).status().code(), StatusCode::kInvalidArgument);
  EXPECT_EQ(RestoreDecodeEvictor("snapkv", ring, options, Shape()).status().code(), StatusCode::kInvalidArgument);
  // Truncated, extended, or with values no evictor has.
  for (const std::string* state : {&ring, &fast, &gate}) {
    const std::string name = state == &ring ? "streaming_llm" : state == &fast ? "fast_kvzip" : "attention_gate";
    SCOPED_TRACE(name);
    EXPECT_EQ(RestoreDecodeEvictor(name, state->substr(0, state->size() - 1), options, Shape()).status().code(),
              StatusCode::kInvalidArgument);
    EXPECT_EQ(RestoreDecodeEvictor(name, *state + "x", options, Shape()).status().code(), StatusCode::kInvalidArgument);
    EXPECT_EQ(RestoreDecodeEvictor(name, state->substr(0, 5), options, Shape()).status().code(),
              StatusCode::kInvalidArgument);
  }
  EXPECT_EQ(RestoreDecodeEvictor("streaming_llm", internal::PackState("streaming_llm", {4, -1}), options, Shape())
                .status()
                .code(),
            StatusCode::kInvalidArgument);
  EXPECT_EQ(
      RestoreDecodeEvictor("fast_kvzip", internal::PackState("fast_kvzip", {4, 6, 0}, std::string(8, '\0')), options,
                           Shape())
          .status()
          .code(),
      StatusCode::kInvalidArgument);
  // A worker without the policy's gate cannot continue it.
  EXPECT_EQ(RestoreDecodeEvictor("fast_kvzip", fast, PolicyOptions{}, Shape()).status().code(),
            StatusCode::kFailedPrecondition);
  EXPECT_EQ(RestoreDecodeEvictor("attention_gate", gate, PolicyOptions{}, Shape()).status().code(),
            StatusCode::kFailedPrecondition);
}

TEST(DecodeEvictorTest, EvictorsRefuseRowsOfAnotherShape) {
  const PolicyOptions options = GateOptions();
  Made m = Make("fast_kvzip", 6, 30, options);
  SimulatedSequence seq(Shape(), Range(0, 8), 30);
  seq.num_layers = 1;
  seq.positions.resize(2);
  seq.scores.resize(2);
  EXPECT_EQ(m.evictor->AfterStep(seq.Rows()).status().code(), StatusCode::kInvalidArgument);
  EXPECT_EQ(m.evictor->ObserveLayerInput(5, std::vector<float>(16)).code(), StatusCode::kInvalidArgument);
  EXPECT_EQ(m.evictor->ObserveLayerInput(0, std::vector<float>(15)).code(), StatusCode::kInvalidArgument);
}

}  // namespace
}  // namespace kvgate::gates
