// The eviction invariants on our bundled kvgate-tiny (GQA: 8 query / 4 kv heads):
//  1. `full`, and every policy asked to keep everything, is bit-identical to no eviction.
//  2. Decoding over a compacted cache equals full attention with the evicted keys masked
//     out (per kv head), for every policy whose selection is per kv head, at several ratios;
//     for sage_kv, whose selection is per QUERY head, per query head.
//  3. Positions survive compaction and new tokens continue at next_pos.
#include "kv/policy_planner.h"

#include "gates/fast_kvzip.h"

#include <gtest/gtest.h>

#include <cmath>
#include <iostream>

#include "absl/strings/str_cat.h"
#include "cuda/cpu/cpu_backend.h"
#include "engine/generator.h"
#include "tests/testing/paths.h"

namespace kvgate::kv {
namespace {

// Paged decode vs masked contiguous attention: float32 sums in different orders.
constexpr float kMaskedLogitAtol = 1e-4f;
constexpr int kDecodeSteps = 8;

class PolicyPlannerTest : public ::testing::Test {
 protected:
  void SetUp() override {
    auto model = engine::Model::Load(testing::KvgateTinyDir(), backend_.get());
    ASSERT_TRUE(model.ok()) << model.status();
    model_ = std::move(*model);
    auto tokenizer = engine::Tokenizer::FromFile(testing::KvgateTinyDir() + "/tokenizer.json");
    ASSERT_TRUE(tokenizer.ok()) << tokenizer.status();
    tokenizer_ = std::move(*tokenizer);
    // 64 pages of 16 rows per (layer, kv head): 1024 tokens, far more than any test holds.
    auto pool = KvPool::Create(backend_.get(), model_->config().num_layers * model_->config().num_kv_heads * 64, 16,
                               model_->config().head_dim);
    ASSERT_TRUE(pool.ok()) << pool.status();
    pool_ = std::move(*pool);
    // A prompt the model wrote itself, then tokens to teacher-force through decode.
    engine::Generator generator(model_.get(), tokenizer_.get());
    engine::GenerateOptions options;
    options.max_tokens = 180 + kDecodeSteps;
    options.ignore_eos = true;
    options.sampling.temperature = 0.8f;
    options.sampling.seed = 3;
    auto text = generator.Generate(*tokenizer_->Encode("Once upon a time, there was a little girl named Lily. She"),
                                   options);
    ASSERT_TRUE(text.ok()) << text.status();
    prompt_ = *tokenizer_->Encode("Once upon a time, there was a little girl named Lily. She");
    prompt_.insert(prompt_.end(), text->token_ids.begin(), text->token_ids.end() - kDecodeSteps);
    continuation_.assign(text->token_ids.end() - kDecodeSteps, text->token_ids.end());
  }

  static gates::PolicyOptions RandomGateOptions() {
    gates::PolicyOptions options;
    options.allow_random_gate = true;
    options.random_gate_seed = 11;
    return options;
  }

  struct PagedRun {
    std::vector<float> prefill_logits;       // the last prompt token's
    std::vector<std::vector<float>> logits;  // per decode step
    gates::KeepPlan kept;                    // positions per (layer, kv head) after commit
    std::vector<gates::KeepPlan> kept_per_step;  // the same, just before each decode step
    engine::KvAccounting accounting;
    std::vector<int32_t> next_positions;
  };

  // Prefill with the policy, commit, then teacher-force the continuation.
  PagedRun RunPaged(const gates::EvictionSpec& spec, gates::PolicyOptions options = RandomGateOptions()) {
    PagedRun run;
    auto planner = CreatePolicyPlanner(*model_, pool_.get(), spec, options, tokenizer_.get());
    EXPECT_TRUE(planner.ok()) << planner.status();
    if (!planner.ok()) return run;
    auto cache = *model_->NewCache(static_cast<int32_t>(prompt_.size()));
    engine::PrefillCapture capture;
    auto prefill = (*planner)->Prefill(*model_, prompt_, cache.get(), &capture);
    if (prefill.ok()) run.prefill_logits = *prefill;
    EXPECT_TRUE(prefill.ok()) << prefill.status();
    auto batch = (*planner)->Commit(prompt_, *cache, capture, &run.accounting);
    EXPECT_TRUE(batch.ok()) << batch.status();
    if (!batch.ok()) return run;
    const SequenceLayout& layout = static_cast<SequenceBatch*>(batch->get())->layout();
    run.kept = gates::KeepPlan{layout.num_layers, layout.num_kv_heads, static_cast<int32_t>(prompt_.size()), {}};
    for (const HeadPages& head : layout.heads) run.kept.heads.push_back({head.positions, head.query_mask, {}});
    for (int32_t token : continuation_) {
      run.next_positions.push_back((*batch)->NextPositions()[0]);
      gates::KeepPlan now{layout.num_layers, layout.num_kv_heads, layout.next_pos, {}};
      for (const HeadPages& head : layout.heads) now.heads.push_back({head.positions, head.query_mask, {}});
      run.kept_per_step.push_back(std::move(now));
      auto logits = model_->DecodeStep({&token, 1}, batch->get());
      EXPECT_TRUE(logits.ok()) << logits.status();
      if (logits.ok()) run.logits.push_back(std::move(*logits));
    }
    return run;
  }

  // The reference: the full contiguous cache, with the rows `kept` does not hold masked
  // out of every decode query (rows written in decode stay visible).
  // `prefill_masks` (per layer [num_kv_heads, n]) replays an in-prefill eviction.
  std::vector<std::vector<float>> RunMasked(const gates::KeepPlan& kept,
                                            const std::vector<std::vector<uint8_t>>& prefill_masks = {}) {
    // Rows written in decode stay visible.
    std::vector<gates::KeepPlan> per_step;
    for (int step = 0; step < kDecodeSteps; ++step) {
      gates::KeepPlan plan = kept;
      for (gates::HeadKeep& head : plan.heads) {
        for (int t = 0; t < step; ++t) head.positions.push_back(static_cast<int32_t>(prompt_.size()) + t);
      }
      per_step.push_back(std::move(plan));
    }
    return RunMasked(per_step, prefill_masks);
  }
  // Per decode step t, the rows before the new token that `kept[t]` does not hold are
  // masked out (decode-time eviction changes the set step by step).
  std::vector<std::vector<float>> RunMasked(const std::vector<gates::KeepPlan>& kept,
                                            const std::vector<std::vector<uint8_t>>& prefill_masks) {
    const engine::ModelConfig& c = model_->config();
    const int32_t n = static_cast<int32_t>(prompt_.size());
    const int32_t capacity = n + kDecodeSteps;
    auto cache = *model_->NewCache(capacity);
    engine::ForwardOptions prefill;
    if (!prefill_masks.empty()) prefill.key_masks = ExpandMasks(prefill_masks, n, capacity);
    EXPECT_TRUE(model_->Forward(prompt_, cache.get(), prefill).ok());
    std::vector<std::vector<float>> logits;
    for (int step = 0; step < kDecodeSteps; ++step) {
      const int32_t token = continuation_[step];
      const int32_t position = n + step;
      engine::ForwardOptions forward;
      forward.key_masks.assign(c.num_layers, std::vector<uint8_t>(size_t{1} * c.num_kv_heads * capacity, 1));
      for (int32_t layer = 0; layer < c.num_layers; ++layer) {
        for (int32_t h = 0; h < c.num_kv_heads; ++h) {
          uint8_t* mask = forward.key_masks[layer].data() + size_t{1} * h * capacity;
          std::fill(mask, mask + position, 0);
          for (int32_t p : kept[step].at(layer, h).positions) mask[p] = 1;
        }
      }
      auto step_logits = model_->Forward({&token, 1}, cache.get(), forward);
      EXPECT_TRUE(step_logits.ok()) << step_logits.status();
      logits.push_back(*step_logits);
    }
    return logits;
  }

  // [num_kv_heads, n] masks -> [num_kv_heads, capacity] (rows past n visible).
  std::vector<std::vector<uint8_t>> ExpandMasks(const std::vector<std::vector<uint8_t>>& masks, int32_t n,
                                                int32_t capacity) const {
    const int32_t kv_heads = model_->config().num_kv_heads;
    std::vector<std::vector<uint8_t>> out;
    for (const auto& mask : masks) {
      std::vector<uint8_t> wide(size_t{1} * kv_heads * capacity, 1);
      for (int32_t h = 0; h < kv_heads; ++h) {
        std::copy_n(mask.begin() + size_t{1} * h * n, n, wide.begin() + size_t{1} * h * capacity);
      }
      out.push_back(std::move(wide));
    }
    return out;
  }

  std::unique_ptr<ops::Backend> backend_ = ops::CreateCpuBackend(2);
  std::unique_ptr<engine::Model> model_;
  std::unique_ptr<engine::Tokenizer> tokenizer_;
  std::unique_ptr<KvPool> pool_;
  std::vector<int32_t> prompt_, continuation_;
};

TEST_F(PolicyPlannerTest, KeepingEverythingIsBitIdenticalToNoEviction) {
  gates::EvictionSpec full;
  const PagedRun reference = RunPaged(full);
  ASSERT_EQ(reference.logits.size(), static_cast<size_t>(kDecodeSteps));
  // No eviction at all: the contiguous cache with nothing masked.
  const engine::ModelConfig& c = model_->config();
  gates::KeepPlan everything = gates::KeepPlan::KeepAll(c.num_layers, c.num_kv_heads, prompt_.size());
  const auto unmasked = RunMasked(everything);
  for (int step = 0; step < kDecodeSteps; ++step) {
    float worst = 0;
    for (size_t i = 0; i < unmasked[step].size(); ++i) {
      worst = std::max(worst, std::fabs(unmasked[step][i] - reference.logits[step][i]));
    }
    EXPECT_LE(worst, kMaskedLogitAtol) << "paged full vs contiguous, step " << step;
  }
  for (const std::string& policy : gates::PolicyNames()) {
    if (policy == "attention_gate") continue;  // learned rate: cannot be asked to keep all
    gates::EvictionSpec spec;
    spec.policy = policy;
    spec.keep_ratio = 1.0f;
    const PagedRun run = RunPaged(spec);
    ASSERT_EQ(run.logits.size(), reference.logits.size()) << policy;
    EXPECT_EQ(run.accounting.kv_entries_kept, run.accounting.kv_entries_full) << policy;
    for (int step = 0; step < kDecodeSteps; ++step) {
      EXPECT_EQ(run.logits[step], reference.logits[step]) << policy << " step " << step << " is not bit-identical";
    }
  }
}

TEST_F(PolicyPlannerTest, CompactedDecodeEqualsMaskedFullAttention) {
  const int32_t n = static_cast<int32_t>(prompt_.size());
  for (const std::string policy : {"streaming_llm", "snapkv", "kvzip", "fast_kvzip", "full"}) {
    for (float ratio : {0.75f, 0.5f, 0.3f}) {
      SCOPED_TRACE(absl::StrCat(policy, " keep_ratio ", ratio));
      gates::EvictionSpec spec;
      spec.policy = policy;
      spec.keep_ratio = ratio;
      const PagedRun run = RunPaged(spec);
      ASSERT_EQ(run.logits.size(), static_cast<size_t>(kDecodeSteps));
      if (policy != "full") {
        EXPECT_LT(run.accounting.kv_entries_kept, run.accounting.kv_entries_full);
      }
      const auto masked = RunMasked(run.kept_per_step, {});
      for (int step = 0; step < kDecodeSteps; ++step) {
        float worst = 0;
        for (size_t i = 0; i < masked[step].size(); ++i) {
          worst = std::max(worst, std::fabs(masked[step][i] - run.logits[step][i]));
        }
        EXPECT_LE(worst, kMaskedLogitAtol) << "step " << step;
        // Positions continue at next_pos, never at the compacted length.
        EXPECT_EQ(run.next_positions[step], n + step);
      }
      // Kept rows keep their original positions: ascending and inside the prompt.
      for (const gates::HeadKeep& head : run.kept.heads) {
        EXPECT_TRUE(std::is_sorted(head.positions.begin(), head.positions.end()));
        if (!head.positions.empty()) {
          EXPECT_LT(head.positions.back(), n);
        }
      }
    }
  }
}

// Attention-Gate evicts inside prefill: tokens it flags are invisible to later prompt
// tokens. The planned prefill must equal a forward with those masks given up front, and
// decode over the compacted cache must equal masked full attention after that prefill.
TEST_F(PolicyPlannerTest, AttentionGatePrefillAndDecodeEqualMaskedReference) {
  const engine::ModelConfig& c = model_->config();
  const int32_t n = static_cast<int32_t>(prompt_.size());
  gates::EvictionSpec spec;
  spec.policy = "attention_gate";
  gates::PolicyOptions options;
  options.allow_random_gate = true;
  options.random_gate_seed = 5;
  auto planner = CreatePolicyPlanner(*model_, pool_.get(), spec, options, tokenizer_.get());
  ASSERT_TRUE(planner.ok()) << planner.status();
  auto cache = *model_->NewCache(n);
  engine::PrefillCapture capture;
  engine::ForwardOptions forward;
  forward.capture = &capture;
  forward.logits = engine::LogitsMode::kAllTokens;
  ASSERT_TRUE((*planner)->ConfigurePrefill(prompt_, &forward).ok());
  ASSERT_TRUE(forward.layer_key_mask) << "attention_gate must evict inside prefill";
  std::vector<std::vector<uint8_t>> recorded(c.num_layers);
  auto gate_mask = forward.layer_key_mask;
  forward.layer_key_mask = [&](int32_t layer, absl::Span<const float> hidden) -> absl::StatusOr<std::vector<uint8_t>> {
    auto mask = gate_mask(layer, hidden);
    if (mask.ok()) recorded[layer] = *mask;
    return mask;
  };
  auto planned = model_->Forward(prompt_, cache.get(), forward);
  ASSERT_TRUE(planned.ok()) << planned.status();
  int64_t evicted = 0;
  for (const auto& mask : recorded) {
    ASSERT_EQ(mask.size(), size_t{1} * c.num_kv_heads * n);
    evicted += std::count(mask.begin(), mask.end(), 0);
    for (int32_t h = 0; h < c.num_kv_heads; ++h) EXPECT_EQ(mask[size_t{1} * h * n], 1) << "sink evicted";
  }
  EXPECT_GT(evicted, 0) << "the random gate should evict something, or the test proves nothing";

  auto reference_cache = *model_->NewCache(n);
  engine::ForwardOptions reference;
  reference.logits = engine::LogitsMode::kAllTokens;
  reference.key_masks = ExpandMasks(recorded, n, n);
  auto expected = model_->Forward(prompt_, reference_cache.get(), reference);
  ASSERT_TRUE(expected.ok());
  EXPECT_EQ(*planned, *expected) << "in-prefill eviction differs from the masked reference";

  engine::KvAccounting accounting;
  auto batch = (*planner)->Commit(prompt_, *cache, capture, &accounting);
  ASSERT_TRUE(batch.ok()) << batch.status();
  EXPECT_EQ(accounting.kv_entries_kept, accounting.kv_entries_full - evicted);
  const SequenceLayout& layout = static_cast<SequenceBatch*>(batch->get())->layout();
  // Decode flags each new token per kv head: record the rows held before every step.
  std::vector<gates::KeepPlan> kept_per_step;
  std::vector<std::vector<float>> paged_logits;
  for (int step = 0; step < kDecodeSteps; ++step) {
    gates::KeepPlan now{layout.num_layers, layout.num_kv_heads, layout.next_pos, {}};
    for (const HeadPages& head : layout.heads) now.heads.push_back({head.positions, {}, {}});
    kept_per_step.push_back(std::move(now));
    auto logits = model_->DecodeStep({&continuation_[step], 1}, batch->get());
    ASSERT_TRUE(logits.ok()) << logits.status();
    paged_logits.push_back(std::move(*logits));
  }
  int64_t decode_rows_dropped = 0;
  for (const gates::HeadKeep& head : kept_per_step.back().heads) {
    decode_rows_dropped += (kDecodeSteps - 1) - std::count_if(head.positions.begin(), head.positions.end(),
                                                              [&](int32_t p) { return p >= n; });
  }
  EXPECT_GT(decode_rows_dropped, 0) << "the gate should evict some decoded tokens";
  const auto masked = RunMasked(kept_per_step, recorded);
  for (int step = 0; step < kDecodeSteps; ++step) {
    const std::vector<float>* logits = &paged_logits[step];
    float worst = 0;
    for (size_t i = 0; i < logits->size(); ++i) worst = std::max(worst, std::fabs((*logits)[i] - masked[step][i]));
    EXPECT_LE(worst, kMaskedLogitAtol) << "step " << step;
  }
}

// streaming_llm keeps a fixed-size ring after its sinks during decode: the head never
// grows past its budget, the sinks stay, the oldest others go.
TEST_F(PolicyPlannerTest, StreamingLlmDecodeRingKeepsTheBudget) {
  gates::EvictionSpec spec;
  spec.policy = "streaming_llm";
  spec.keep_ratio = 0.3f;
  const PagedRun run = RunPaged(spec);
  ASSERT_EQ(run.kept_per_step.size(), static_cast<size_t>(kDecodeSteps));
  const int64_t budget = std::lround(0.3 * prompt_.size());
  for (int step = 1; step < kDecodeSteps; ++step) {
    for (const gates::HeadKeep& head : run.kept_per_step[step].heads) {
      ASSERT_EQ(static_cast<int64_t>(head.positions.size()), budget) << "step " << step;
      for (int32_t sink = 0; sink < 4; ++sink) EXPECT_EQ(head.positions[sink], sink);
      // The most recent token (written by the previous step) is kept.
      EXPECT_EQ(head.positions.back(), static_cast<int32_t>(prompt_.size()) + step - 1);
    }
  }
}

// sage_kv's recent window is a fixed-size ring in decode: sink and selected rows stay
// frozen, every head keeps a constant row count, the newest token is kept.
TEST_F(PolicyPlannerTest, SageKvDecodeRingFreezesTheSelection) {
  gates::EvictionSpec spec;
  spec.policy = "sage_kv";
  spec.keep_ratio = 0.3f;
  const PagedRun run = RunPaged(spec);
  ASSERT_EQ(run.kept_per_step.size(), static_cast<size_t>(kDecodeSteps));
  const int32_t n = static_cast<int32_t>(prompt_.size());
  const int32_t recent = static_cast<int32_t>(std::lround(0.3 * n)) / 4;  // B/4
  for (size_t i = 0; i < run.kept.heads.size(); ++i) {
    const std::vector<int32_t>& at_commit = run.kept.heads[i].positions;
    const std::vector<int32_t> frozen(at_commit.begin(), at_commit.end() - recent);
    for (int step = 1; step < kDecodeSteps; ++step) {
      const std::vector<int32_t>& now = run.kept_per_step[step].heads[i].positions;
      ASSERT_EQ(now.size(), at_commit.size()) << "head " << i << " step " << step;
      EXPECT_TRUE(std::equal(frozen.begin(), frozen.end(), now.begin())) << "selection changed in decode";
      EXPECT_EQ(now.back(), n + step - 1);
      EXPECT_EQ(now[frozen.size()], n - recent + step) << "the ring drops its oldest row each step";
    }
  }
}

// sage_kv keeps a separate top-k per QUERY head: a kept row carries a query_mask byte,
// bit g = visible to query head g of its kv head's group. Decode over the compacted
// paged cache must equal full contiguous attention whose per-query-head key masks
// (ForwardOptions::query_head_key_masks) hide from each query head exactly the rows it
// cannot see in the paged cache, at every step: with the decode-time recent ring
// (kRecentRing; more steps than the largest ring, so it turns over completely) and
// without it (decode_eviction = false). The masks are rebuilt before each step from the
// layout's positions and the query-mask bytes the paged kernel reads (the pool's).
// Negative control: the per-kv-head union of those masks (what ignoring the query-head
// bits would attend) must NOT match, so the test fails if the bits were ignored.
TEST_F(PolicyPlannerTest, SageKvDecodeEqualsPerQueryHeadMaskedFullAttention) {
  constexpr int kSteps = 48;
  const engine::ModelConfig& c = model_->config();
  const int32_t n = static_cast<int32_t>(prompt_.size());
  const int32_t group = c.num_heads / c.num_kv_heads;
  ASSERT_GT(group, 1) << "the test needs a GQA model";
  const uint8_t all_heads = static_cast<uint8_t>((1u << group) - 1);
  // A continuation longer than the fixture's, written by the model itself.
  engine::Generator generator(model_.get(), tokenizer_.get());
  engine::GenerateOptions generate;
  generate.max_tokens = kSteps;
  generate.ignore_eos = true;
  generate.sampling.temperature = 0.8f;
  generate.sampling.seed = 5;
  auto text = generator.Generate(prompt_, generate);
  ASSERT_TRUE(text.ok()) << text.status();
  const std::vector<int32_t> continuation = text->token_ids;
  ASSERT_EQ(continuation.size(), static_cast<size_t>(kSteps));
  const int32_t capacity = n + kSteps;

  for (bool decode_eviction : {true, false}) {
    for (float ratio : {0.75f, 0.5f, 0.3f}) {
      SCOPED_TRACE(absl::StrCat("keep_ratio ", ratio, " decode_eviction ", decode_eviction));
      // The ring holds the default recent window, B/4 rows: kSteps turns it over.
      ASSERT_GT(kSteps, std::lround(ratio * n) / 4);
      gates::EvictionSpec spec;
      spec.policy = "sage_kv";
      spec.keep_ratio = ratio;
      auto planner = CreatePolicyPlanner(*model_, pool_.get(), spec, RandomGateOptions(), tokenizer_.get(),
                                         decode_eviction);
      ASSERT_TRUE(planner.ok()) << planner.status();
      auto prefill_cache = *model_->NewCache(n);
      engine::PrefillCapture capture;
      ASSERT_TRUE((*planner)->Prefill(*model_, prompt_, prefill_cache.get(), &capture).ok());
      engine::KvAccounting accounting;
      auto batch = (*planner)->Commit(prompt_, *prefill_cache, capture, &accounting);
      ASSERT_TRUE(batch.ok()) << batch.status();
      EXPECT_LT(accounting.kv_entries_kept, accounting.kv_entries_full);
      const SequenceLayout& layout = static_cast<SequenceBatch*>(batch->get())->layout();
      ASSERT_TRUE(layout.has_query_masks) << "sage_kv must commit per-query-head masks";
      const int64_t rows_at_commit = layout.NumRows();

      // The reference: the full prompt cache, no eviction, then one masked forward per
      // step; the control runs the same on its own cache with the per-kv-head union.
      auto full = *model_->NewCache(capacity);
      auto union_full = *model_->NewCache(capacity);
      ASSERT_TRUE(model_->Forward(prompt_, full.get(), {}).ok());
      ASSERT_TRUE(model_->Forward(prompt_, union_full.get(), {}).ok());
      float worst = 0, worst_union = 0;
      int64_t rows_split_in_group = 0;  // kept rows visible to some, not all, heads of a group
      for (int step = 0; step < kSteps; ++step) {
        EXPECT_EQ((*batch)->NextPositions()[0], n + step);
        EXPECT_EQ(layout.NumRows(), decode_eviction ? rows_at_commit : rows_at_commit + int64_t{step} * c.num_layers * c.num_kv_heads)
            << "step " << step;
        // What each query head sees in the paged cache before this step; the new token's
        // own row is visible to every head in both.
        engine::ForwardOptions per_query_head, per_kv_head;
        per_query_head.query_head_key_masks.assign(c.num_layers, std::vector<uint8_t>(size_t{1} * c.num_heads * capacity, 0));
        per_kv_head.key_masks.assign(c.num_layers, std::vector<uint8_t>(size_t{1} * c.num_kv_heads * capacity, 0));
        for (int32_t l = 0; l < c.num_layers; ++l) {
          for (int32_t h = 0; h < c.num_kv_heads; ++h) {
            const HeadPages& head = layout.at(l, h);
            auto rows = pool_->ReadRows(layout, l, h);  // the query-mask bytes in backend memory
            ASSERT_TRUE(rows.ok()) << rows.status();
            ASSERT_EQ(rows->query_mask.size(), head.positions.size());
            EXPECT_EQ(rows->query_mask, head.query_mask) << "pool and layout masks differ, layer " << l << " head " << h;
            for (size_t r = 0; r < head.positions.size(); ++r) {
              const int32_t p = head.positions[r];
              const uint8_t bits = rows->query_mask[r] & all_heads;
              ASSERT_NE(bits, 0) << "a kept row no query head sees";
              if (bits != all_heads) ++rows_split_in_group;
              for (int32_t g = 0; g < group; ++g) {
                per_query_head.query_head_key_masks[l][size_t{1} * (h * group + g) * capacity + p] = (bits >> g) & 1;
              }
              per_kv_head.key_masks[l][size_t{1} * h * capacity + p] = 1;
            }
          }
        }
        const int32_t token = continuation[step];
        auto paged = model_->DecodeStep({&token, 1}, batch->get());
        ASSERT_TRUE(paged.ok()) << paged.status();
        auto expected = model_->Forward({&token, 1}, full.get(), per_query_head);
        ASSERT_TRUE(expected.ok()) << expected.status();
        auto ignoring_bits = model_->Forward({&token, 1}, union_full.get(), per_kv_head);
        ASSERT_TRUE(ignoring_bits.ok()) << ignoring_bits.status();
        float step_worst = 0;
        for (size_t i = 0; i < paged->size(); ++i) {
          step_worst = std::max(step_worst, std::fabs((*expected)[i] - (*paged)[i]));
          worst_union = std::max(worst_union, std::fabs((*ignoring_bits)[i] - (*paged)[i]));
        }
        EXPECT_LE(step_worst, kMaskedLogitAtol) << "step " << step;
        worst = std::max(worst, step_worst);
      }
      EXPECT_GT(rows_split_in_group, 0) << "no row is visible to only part of a group: the per-query-head masks are untested";
      EXPECT_GT(worst_union, kMaskedLogitAtol) << "ignoring the query-head bits would pass too: the test proves nothing";
      std::cout << "[ sage_kv  ] keep_ratio " << ratio << " decode_eviction " << decode_eviction
                << ": max |paged - per-query-head masked| " << worst << ", max |paged - per-kv-head union| "
                << worst_union << " over " << kSteps << " steps\n";
    }
  }
}

// Fast KVzip evicts between prefill chunks. An independent reference loop of the method
// description (eviction-methods.md 5.3, FastKVzip prefill/model/wrapper.py) must give
// the same kept rows and the same last-token logits, and decode over the result must
// equal masked full attention.
TEST_F(PolicyPlannerTest, FastKvzipChunkedPrefillEqualsTheReferenceLoop) {
  const engine::ModelConfig& c = model_->config();
  const int32_t n = static_cast<int32_t>(prompt_.size());
  const int32_t chunk_tokens = 64, window_tokens = 16, sinks = 4;
  const double keep_ratio = 0.3;
  gates::PolicyOptions options = RandomGateOptions();
  options.fast_kvzip_chunk_tokens = chunk_tokens;
  options.fast_kvzip_window_tokens = window_tokens;
  gates::EvictionSpec spec;
  spec.policy = "fast_kvzip";
  spec.keep_ratio = static_cast<float>(keep_ratio);
  const PagedRun run = RunPaged(spec, options);
  ASSERT_FALSE(run.prefill_logits.empty());

  auto policy = gates::CreatePolicy("fast_kvzip", options, {c.num_layers, c.num_heads, c.num_kv_heads, c.head_dim, c.hidden_size});
  ASSERT_TRUE(policy.ok()) << policy.status();
  const gates::FastKvzipGate& gate = *(*policy)->fast_kvzip_gate();
  // The method's numbers, written out (context = the prompt after the 4 sink tokens).
  const int32_t context = n - sinks;
  const int32_t keep = static_cast<int32_t>(std::lround(keep_ratio * n));
  const double context_ratio = double(keep) / n;
  // The context is longer than one chunk, so W = window_size (else 2% of the context).
  int32_t window = context < chunk_tokens ? static_cast<int32_t>(0.02 * context) : window_tokens;
  double r_chunk = (context_ratio * context - window) / (context - window);
  if (context_ratio * context < window) {
    window = static_cast<int32_t>(context_ratio * context);
    r_chunk = 0;
  }
  std::vector<std::vector<uint8_t>> visible(c.num_layers, std::vector<uint8_t>(size_t{1} * c.num_kv_heads * n, 1));
  std::vector<std::vector<float>> score(c.num_layers, std::vector<float>(size_t{1} * c.num_kv_heads * n, 0));
  const int32_t capacity = n + kDecodeSteps;
  auto cache = *model_->NewCache(capacity);
  std::vector<float> logits;
  int32_t judged = sinks;
  for (int32_t begin = 0; begin < n; begin += chunk_tokens) {
    const int32_t end = std::min(n, begin + chunk_tokens);
    engine::PrefillCapture hidden;
    engine::ForwardOptions forward;
    forward.capture_request.hidden_states = true;
    forward.capture = &hidden;
    forward.key_masks = ExpandMasks(visible, n, capacity);  // rows not yet judged are visible
    logits = *model_->Forward(absl::MakeConstSpan(prompt_).subspan(begin, end - begin), cache.get(), forward);
    for (int32_t l = 0; l < c.num_layers; ++l) {
      const std::vector<float> s = *gate.Score(l, hidden.hidden_states[l]);
      for (int32_t h = 0; h < c.num_kv_heads; ++h) {
        for (int32_t t = begin; t < end; ++t) score[l][size_t{1} * h * n + t] = s[size_t{1} * h * (end - begin) + t - begin];
      }
    }
    const int32_t judge_end = end - window;
    if (judge_end <= judged) continue;
    struct Entry { float score; int32_t pos, layer, head; };
    std::vector<Entry> entries;
    for (int32_t l = 0; l < c.num_layers; ++l) {
      for (int32_t h = 0; h < c.num_kv_heads; ++h) {
        for (int32_t p = judged; p < judge_end; ++p) entries.push_back({score[l][size_t{1} * h * n + p], p, l, h});
      }
    }
    std::sort(entries.begin(), entries.end(), [](const Entry& a, const Entry& b) {
      if (a.score != b.score) return a.score > b.score;
      if (a.pos != b.pos) return a.pos < b.pos;
      return a.layer != b.layer ? a.layer < b.layer : a.head < b.head;
    });
    const size_t kept = static_cast<size_t>(std::floor(r_chunk * entries.size()));
    for (size_t i = kept; i < entries.size(); ++i) visible[entries[i].layer][size_t{1} * entries[i].head * n + entries[i].pos] = 0;
    judged = judge_end;
  }
  EXPECT_GT(n / chunk_tokens, 1) << "the prompt must span several chunks";
  EXPECT_EQ(run.prefill_logits, logits) << "last-token logits differ from the reference loop";
  int64_t reference_kept = 0;
  for (int32_t l = 0; l < c.num_layers; ++l) {
    for (int32_t h = 0; h < c.num_kv_heads; ++h) {
      std::vector<int32_t> want;
      for (int32_t p = 0; p < n; ++p) if (visible[l][size_t{1} * h * n + p]) want.push_back(p);
      reference_kept += want.size();
      EXPECT_EQ(run.kept.at(l, h).positions, want) << "layer " << l << " head " << h;
    }
  }
  EXPECT_NEAR(double(reference_kept) / (int64_t{n} * c.num_layers * c.num_kv_heads), keep_ratio, 0.02);
  // Decode over the compacted cache equals masked attention over the reference loop's
  // own cache (the same chunked prefill, so the same K/V).
  for (int step = 0; step < kDecodeSteps; ++step) {
    engine::ForwardOptions forward;
    forward.key_masks = ExpandMasks(visible, n, capacity);
    auto decoded = model_->Forward({&continuation_[step], 1}, cache.get(), forward);
    ASSERT_TRUE(decoded.ok()) << decoded.status();
    float worst = 0;
    for (size_t i = 0; i < decoded->size(); ++i) worst = std::max(worst, std::fabs((*decoded)[i] - run.logits[step][i]));
    EXPECT_LE(worst, kMaskedLogitAtol) << "step " << step;
  }
}

// Fast KVzip keeps evicting in decode: every `interval` steps the gate scores the new
// rows and one global threshold brings the sequence back to its budget, keeping the
// newest `interval` rows and the first 4. Decode must still equal masked attention.
TEST_F(PolicyPlannerTest, FastKvzipDecodeReevictionKeepsTheBudget) {
  const engine::ModelConfig& c = model_->config();
  const int32_t n = static_cast<int32_t>(prompt_.size());
  const int32_t interval = 4;
  gates::PolicyOptions options = RandomGateOptions();
  options.fast_kvzip_decode_interval = interval;
  gates::EvictionSpec spec;
  spec.policy = "fast_kvzip";
  spec.keep_ratio = 0.3f;
  const PagedRun run = RunPaged(spec, options);
  ASSERT_EQ(run.kept_per_step.size(), static_cast<size_t>(kDecodeSteps));
  const int64_t budget = std::lround(0.3 * n) * c.num_layers * c.num_kv_heads;
  for (int step = 0; step < kDecodeSteps; ++step) {
    // kept_per_step[step] is the cache after `step` decode steps.
    if (step > 0 && step % interval == 0) {
      EXPECT_EQ(run.kept_per_step[step].KeptEntries(), budget) << "after re-eviction at step " << step;
      for (const gates::HeadKeep& head : run.kept_per_step[step].heads) {
        for (int32_t t = 0; t < interval; ++t) {
          EXPECT_TRUE(std::binary_search(head.positions.begin(), head.positions.end(), n + step - 1 - t))
              << "a row of the newest " << interval << " was evicted";
        }
        for (int32_t sink = 0; sink < 4; ++sink) EXPECT_EQ(head.positions[sink], sink);
      }
    }
  }
  EXPECT_LT(run.kept_per_step[kDecodeSteps - 1].KeptEntries(), run.kept.KeptEntries() + int64_t{kDecodeSteps - 1} * c.num_layers * c.num_kv_heads)
      << "decode never evicted";
  const auto masked = RunMasked(run.kept_per_step, {});
  for (int step = 0; step < kDecodeSteps; ++step) {
    float worst = 0;
    for (size_t i = 0; i < masked[step].size(); ++i) worst = std::max(worst, std::fabs(masked[step][i] - run.logits[step][i]));
    EXPECT_LE(worst, kMaskedLogitAtol) << "step " << step;
  }
}

TEST_F(PolicyPlannerTest, ReportsAccountingAndReturnsPages) {
  const int32_t free_before = pool_->pages_free();
  {
    gates::EvictionSpec spec;
    spec.policy = "snapkv";
    spec.keep_ratio = 0.3f;
    const PagedRun run = RunPaged(spec);
    const engine::ModelConfig& c = model_->config();
    EXPECT_EQ(run.accounting.policy, "snapkv");
    EXPECT_EQ(run.accounting.kv_entries_full, int64_t{c.num_layers} * c.num_kv_heads * prompt_.size());
    EXPECT_EQ(run.accounting.bytes_kept, run.accounting.kv_entries_kept * c.KvEntryBytes());
    EXPECT_DOUBLE_EQ(run.accounting.keep_fraction,
                     double(run.accounting.kv_entries_kept) / run.accounting.kv_entries_full);
    // snapkv keeps exactly round(0.3 n) rows per head (its protected window is capped
    // at half the budget).
    const int64_t per_head = std::lround(0.3 * prompt_.size());
    EXPECT_EQ(run.accounting.kv_entries_kept, per_head * c.num_layers * c.num_kv_heads);
    EXPECT_GT(run.accounting.pages_used, 0);
  }
  EXPECT_EQ(pool_->pages_free(), free_before) << "a finished sequence must return every page";
}

// Bytes count what the pool stores: a bf16 pool's entries are half a float32 entry.
TEST_F(PolicyPlannerTest, AccountingCountsThePoolsBytesPerEntry) {
  const engine::ModelConfig& c = model_->config();
  auto narrow = KvPool::Create(backend_.get(), c.num_layers * c.num_kv_heads * 64, 16, c.head_dim, ops::KvDtype::kBf16);
  ASSERT_TRUE(narrow.ok()) << narrow.status();
  std::swap(pool_, *narrow);
  gates::EvictionSpec spec;
  spec.policy = "snapkv";
  spec.keep_ratio = 0.3f;
  const PagedRun run = RunPaged(spec);
  std::swap(pool_, *narrow);
  const int64_t entry_bytes = 2 * int64_t{c.head_dim} * 2;  // bf16 K and V
  EXPECT_EQ(run.accounting.bytes_full, run.accounting.kv_entries_full * entry_bytes);
  EXPECT_EQ(run.accounting.bytes_kept, run.accounting.kv_entries_kept * entry_bytes);
  EXPECT_LT(run.accounting.bytes_kept, run.accounting.bytes_full);
}

TEST_F(PolicyPlannerTest, BadSpecsAreInvalidArgument) {
  gates::PolicyOptions options;
  gates::EvictionSpec unknown;
  unknown.policy = "h2o";
  EXPECT_EQ(CreatePolicyPlanner(*model_, pool_.get(), unknown, options).status().code(),
            absl::StatusCode::kInvalidArgument);
  gates::EvictionSpec ratio;
  ratio.policy = "snapkv";
  ratio.keep_ratio = 1.5f;
  EXPECT_EQ(CreatePolicyPlanner(*model_, pool_.get(), ratio, options).status().code(),
            absl::StatusCode::kInvalidArgument);
  gates::EvictionSpec gate;
  gate.policy = "fast_kvzip";
  options.gate_path = "/nonexistent/gate.safetensors";
  EXPECT_FALSE(CreatePolicyPlanner(*model_, pool_.get(), gate, options).ok());
}

}  // namespace
}  // namespace kvgate::kv
