// DecodeBatch: several sequences with different prompts, lengths and policies (each
// with its own decode-time eviction) decode in one engine step per token, joining and
// leaving mid-way, and every sequence gets exactly the logits and tokens it gets when it
// decodes alone.
#include "kv/decode_batch.h"

#include <gtest/gtest.h>

#include <cmath>
#include <cstdio>
#include <cstring>
#include <map>

#include "absl/strings/str_cat.h"
#include "kv/tiny_decode_test_util.h"

namespace kvgate::kv {
namespace {

// Room for all six sequences of the schedule at once on kvgate-tiny (32 kv heads).
constexpr int32_t kPages = 4096;
// Batched logits are bit-identical to decoding alone: every decode GEMM runs the CPU
// backend's row-invariant kernel (cuda/cpu/row_invariant_matmul.h), and attention, norms
// and RoPE are computed per sequence. (Through OpenBLAS they were not: a one-row product
// took another kernel than a batch; 1.368e-5 apart on one machine, 1.0e-5 on another.)

struct Schedule {
  int32_t prompt_tokens;
  int32_t text;   // which generated text the prompt is a prefix of
  int32_t join;   // global step at which it joins the batch (prefill happens then)
  int32_t steps;  // decode steps before it leaves
};

class DecodeBatchTest : public ::testing::Test {
 protected:
  void SetUp() override {
    auto worker = testing::TinyWorker::Create(kPages);
    ASSERT_TRUE(worker.ok()) << worker.status();
    worker_ = std::move(*worker);
    auto tokenizer = testing::LoadTinyTokenizer();
    ASSERT_TRUE(tokenizer.ok()) << tokenizer.status();
    int seed = 1;
    for (const char* opening : {"Once upon a time, there was a little girl named Lily.", "Tom had a big red ball.",
                                "The sun was hot and the cat was sleepy."}) {
      auto text = testing::TinyText(worker_->model.get(), tokenizer->get(), opening, 130, seed++);
      ASSERT_TRUE(text.ok()) << text.status();
      texts_.push_back(*text);
    }
  }

  std::vector<int32_t> Prompt(const Schedule& s) const {
    return {texts_[s.text].begin(), texts_[s.text].begin() + s.prompt_tokens};
  }

  std::unique_ptr<testing::TinyWorker> worker_;
  std::vector<std::vector<int32_t>> texts_;
};

struct Decoded {
  std::vector<float> prefill_logits;
  std::vector<std::vector<float>> logits;  // per decode step
  std::vector<int32_t> tokens;             // input token of each step, then the last argmax
};

TEST_F(DecodeBatchTest, BatchedDecodeEqualsDecodingEachAlone) {
  testing::TinyGates gates(worker_->shape());
  const std::vector<testing::PolicyCase> cases = testing::DecodePolicyCases(gates);
  // One sequence per policy: different prompts and lengths, joining and leaving mid-way.
  const std::vector<Schedule> schedule = {
      {37, 0, 0, 10}, {64, 1, 0, 6}, {90, 2, 2, 9}, {120, 0, 3, 5}, {55, 1, 5, 8}, {101, 2, 7, 6},
  };
  ASSERT_EQ(schedule.size(), cases.size());
  KvPool& pool = *worker_->pool;
  engine::Model& model = *worker_->model;

  // Each sequence alone.
  std::vector<Decoded> alone(schedule.size());
  for (size_t s = 0; s < schedule.size(); ++s) {
    SCOPED_TRACE(cases[s].name);
    auto prefilled = testing::PrefillAndCommit(model, &pool, cases[s], Prompt(schedule[s]));
    ASSERT_TRUE(prefilled.ok()) << prefilled.status();
    alone[s].prefill_logits = prefilled->logits;
    int32_t token = testing::Argmax(prefilled->logits);
    for (int32_t step = 0; step < schedule[s].steps; ++step) {
      alone[s].tokens.push_back(token);
      auto logits = model.DecodeStep({&token, 1}, prefilled->sequence.get());
      ASSERT_TRUE(logits.ok()) << logits.status();
      token = testing::Argmax(*logits);
      alone[s].logits.push_back(std::move(*logits));
    }
    alone[s].tokens.push_back(token);
  }
  ASSERT_EQ(pool.pages_free(), kPages);

  // All of them in one batch.
  const int32_t vocab = model.config().vocab_size;
  std::vector<Decoded> batched(schedule.size());
  std::map<size_t, std::unique_ptr<SequenceBatch>> live;
  std::map<size_t, int32_t> next_token;
  DecodeBatch batch(&pool);
  int32_t max_batch = 0;
  for (int32_t t = 0;; ++t) {
    std::vector<SequenceBatch*> active;
    std::vector<size_t> ids;
    std::vector<int32_t> tokens;
    bool more = false;
    for (size_t s = 0; s < schedule.size(); ++s) {
      const Schedule& sc = schedule[s];
      if (t == sc.join) {
        auto prefilled = testing::PrefillAndCommit(model, &pool, cases[s], Prompt(sc));
        ASSERT_TRUE(prefilled.ok()) << cases[s].name << ": " << prefilled.status();
        batched[s].prefill_logits = prefilled->logits;
        next_token[s] = testing::Argmax(prefilled->logits);
        live[s] = std::move(prefilled->sequence);
      }
      if (t >= sc.join && t < sc.join + sc.steps) {
        active.push_back(live[s].get());
        ids.push_back(s);
        tokens.push_back(next_token[s]);
        batched[s].tokens.push_back(next_token[s]);
      }
      more |= t < sc.join + sc.steps;
    }
    if (!more) break;
    max_batch = std::max<int32_t>(max_batch, active.size());
    batch.SetSequences(active);
    auto logits = model.DecodeStep(tokens, &batch);
    ASSERT_TRUE(logits.ok()) << "step " << t << ": " << logits.status();
    ASSERT_EQ(logits->size(), size_t{1} * vocab * active.size());
    for (size_t i = 0; i < ids.size(); ++i) {
      const size_t s = ids[i];
      std::vector<float> mine(logits->begin() + i * vocab, logits->begin() + (i + 1) * vocab);
      next_token[s] = testing::Argmax(mine);
      batched[s].logits.push_back(std::move(mine));
      // Leaves after its last step: its pages go back at once.
      if (t + 1 == schedule[s].join + schedule[s].steps) {
        batched[s].tokens.push_back(next_token[s]);
        live.erase(s);
      }
    }
  }
  EXPECT_GE(max_batch, 4) << "the schedule should overlap most sequences";
  EXPECT_TRUE(live.empty());
  EXPECT_EQ(pool.pages_free(), kPages) << "every page must return to the pool";

  for (size_t s = 0; s < schedule.size(); ++s) {
    SCOPED_TRACE(cases[s].name);
    EXPECT_EQ(batched[s].prefill_logits, alone[s].prefill_logits);
    EXPECT_EQ(batched[s].tokens, alone[s].tokens);
    ASSERT_EQ(batched[s].logits.size(), alone[s].logits.size());
    for (size_t step = 0; step < alone[s].logits.size(); ++step) {
      const std::vector<float>& want = alone[s].logits[step];
      const std::vector<float>& got = batched[s].logits[step];
      ASSERT_EQ(got.size(), want.size());
      for (size_t i = 0; i < want.size(); ++i) {
        ASSERT_TRUE(std::isfinite(got[i])) << "step " << step << " logit " << i;
        // Bitwise, not ==: -0.0 and 0.0 would pass ==.
        ASSERT_EQ(std::memcmp(&got[i], &want[i], sizeof(float)), 0)
            << "step " << step << " logit " << i << ": batched " << got[i] << ", alone " << want[i];
      }
    }
  }
}

// DecodeStepGreedy (argmax on the backend, ids to the host) picks, step after step, the
// tokens the host argmax of DecodeStep's logits picks: two copies of the same six
// sequences decode side by side, one each way.
TEST_F(DecodeBatchTest, GreedyStepOnTheBackendPicksTheHostArgmax) {
  testing::TinyGates gates(worker_->shape());
  const std::vector<testing::PolicyCase> cases = testing::DecodePolicyCases(gates);
  KvPool& pool = *worker_->pool;
  engine::Model& model = *worker_->model;
  const int32_t vocab = model.config().vocab_size;
  std::vector<std::unique_ptr<SequenceBatch>> host_side, device_side;
  std::vector<int32_t> host_tokens, device_tokens;
  for (size_t s = 0; s < cases.size(); ++s) {
    const std::vector<int32_t> prompt(texts_[s % texts_.size()].begin(),
                                      texts_[s % texts_.size()].begin() + 40 + 11 * static_cast<int32_t>(s));
    for (auto* side : {&host_side, &device_side}) {
      auto prefilled = testing::PrefillAndCommit(model, &pool, cases[s], prompt);
      ASSERT_TRUE(prefilled.ok()) << cases[s].name << ": " << prefilled.status();
      (side == &host_side ? host_tokens : device_tokens).push_back(testing::Argmax(prefilled->logits));
      side->push_back(std::move(prefilled->sequence));
    }
  }
  auto members = [](const std::vector<std::unique_ptr<SequenceBatch>>& side) {
    std::vector<SequenceBatch*> out;
    for (const auto& s : side) out.push_back(s.get());
    return out;
  };
  DecodeBatch host_batch(&pool), device_batch(&pool);
  host_batch.SetSequences(members(host_side));
  device_batch.SetSequences(members(device_side));
  for (int step = 0; step < 12; ++step) {
    SCOPED_TRACE(::testing::Message() << "step " << step);
    ASSERT_EQ(device_tokens, host_tokens);
    auto logits = model.DecodeStep(host_tokens, &host_batch);
    ASSERT_TRUE(logits.ok()) << logits.status();
    for (size_t s = 0; s < host_tokens.size(); ++s) {
      host_tokens[s] = testing::Argmax(absl::MakeConstSpan(logits->data() + s * vocab, vocab));
    }
    auto ids = model.DecodeStepGreedy(device_tokens, &device_batch);
    ASSERT_TRUE(ids.ok()) << ids.status();
    device_tokens = *ids;
  }
  EXPECT_EQ(device_tokens, host_tokens);
  host_side.clear();
  device_side.clear();
  EXPECT_EQ(pool.pages_free(), kPages);
}

// Steps replayed as graphs (on a backend that has them) give exactly the logits of steps
// run op by op, while the batch shrinks, pages fill and decode-time eviction moves rows.
TEST_F(DecodeBatchTest, GraphReplayedStepsEqualStepsRunOpByOp) {
  testing::TinyGates gates(worker_->shape());
  KvPool& pool = *worker_->pool;
  engine::Model& model = *worker_->model;
  const int32_t vocab = model.config().vocab_size;
  std::vector<std::unique_ptr<SequenceBatch>> sides[2];  // 0: op by op, 1: graphs
  std::vector<int32_t> tokens[2];
  for (const testing::PolicyCase& c : testing::DecodePolicyCases(gates)) {
    for (int side = 0; side < 2; ++side) {
      const std::vector<int32_t> prompt(texts_[0].begin(),
                                        texts_[0].begin() + 30 + 7 * static_cast<int32_t>(sides[side].size()));
      auto prefilled = testing::PrefillAndCommit(model, &pool, c, prompt);
      ASSERT_TRUE(prefilled.ok()) << c.name << ": " << prefilled.status();
      // A sequence whose evictor reads inputs on the host never replays; fast_kvzip's
      // gate scores its tokens inside the step.
      if (prefilled->sequence->wants_layer_inputs() && prefilled->sequence->layer_scorer() == nullptr) break;
      tokens[side].push_back(testing::Argmax(prefilled->logits));
      sides[side].push_back(std::move(prefilled->sequence));
    }
  }
  ASSERT_EQ(sides[1].size(), 5u) << "every policy but attention_gate";
  const engine::Model::DecodeGraphStats before = model.decode_graph_stats();
  DecodeBatch batches[2] = {DecodeBatch(&pool), DecodeBatch(&pool)};
  for (int step = 0; step < 40; ++step) {
    SCOPED_TRACE(::testing::Message() << "step " << step);
    if (step == 25) {  // the batch shrinks: another graph
      for (auto& side : sides) side.pop_back();
      for (auto& t : tokens) t.pop_back();
    }
    std::vector<float> logits[2];
    for (int side = 0; side < 2; ++side) {
      std::vector<SequenceBatch*> members;
      for (const auto& s : sides[side]) members.push_back(s.get());
      batches[side].SetSequences(members);
      ASSERT_TRUE(batches[side].scores_layer_inputs() || step >= 25);  // fast_kvzip, popped at 25
      ASSERT_FALSE(batches[side].wants_layer_inputs());
      model.set_decode_graphs(side == 1);
      auto out = model.DecodeStep(tokens[side], &batches[side]);
      ASSERT_TRUE(out.ok()) << out.status();
      logits[side] = *std::move(out);
    }
    model.set_decode_graphs(true);
    ASSERT_EQ(logits[0].size(), logits[1].size());
    if (std::memcmp(logits[0].data(), logits[1].data(), logits[0].size() * sizeof(float)) != 0) {
      size_t differing = 0, first = logits[0].size();
      float largest = 0.0f;
      for (size_t i = 0; i < logits[0].size(); ++i) {
        if (std::memcmp(&logits[0][i], &logits[1][i], sizeof(float)) == 0) continue;
        ++differing;
        first = std::min(first, i);
        largest = std::max(largest, std::abs(logits[0][i] - logits[1][i]));
      }
      const engine::Model::DecodeGraphStats& now = model.decode_graph_stats();
      FAIL() << differing << " of " << logits[0].size() << " logits differ (first at sequence " << first / vocab
             << ", logit " << first % vocab << ": " << logits[0][first] << " op by op, " << logits[1][first]
             << " replayed; largest difference " << largest << "); graphs so far: " << now.recorded
             << " recorded, " << now.replayed << " replayed, " << now.op_by_op << " steps op by op";
    }
    for (auto& t : tokens) {
      for (size_t s = 0; s < t.size(); ++s) t[s] = testing::Argmax(absl::MakeConstSpan(logits[0].data() + s * vocab, vocab));
    }
  }
  const engine::Model::DecodeGraphStats& after = model.decode_graph_stats();
  EXPECT_TRUE(after.last_record_error.empty()) << after.last_record_error;
  if (worker_->backend->Name().rfind("cuda", 0) == 0) {
    // Two batch sizes (25 and 15 steps): each runs once op by op, records, then replays,
    // 38 replays in all; a rebuild of the step tables (new addresses) costs a step or two.
    EXPECT_GE(after.recorded - before.recorded, 2);
    EXPECT_GE(after.replayed - before.replayed, 34);
  } else {
    EXPECT_EQ(after.replayed, before.replayed);  // the CPU backend has no graphs
  }
  for (auto& side : sides) side.clear();
  EXPECT_EQ(pool.pages_free(), kPages);
}

TEST_F(DecodeBatchTest, RejectsASequenceOfAnotherPool) {
  auto other = KvPool::Create(worker_->backend.get(), 64, 16, worker_->model->config().head_dim);
  ASSERT_TRUE(other.ok());
  testing::TinyGates gates(worker_->shape());
  const testing::PolicyCase full = testing::DecodePolicyCases(gates)[0];
  auto mine = testing::PrefillAndCommit(*worker_->model, worker_->pool.get(), full, texts_[0]);
  auto theirs = testing::PrefillAndCommit(*worker_->model, other->get(), full,
                                          absl::MakeConstSpan(texts_[1]).subspan(0, 20));
  ASSERT_TRUE(mine.ok() && theirs.ok());
  DecodeBatch batch(worker_->pool.get());
  batch.SetSequences({mine->sequence.get(), theirs->sequence.get()});
  EXPECT_EQ(batch.num_sequences(), 2);
  EXPECT_EQ(batch.NextPositions(), (std::vector<int32_t>{static_cast<int32_t>(texts_[0].size()), 20}));
  const int32_t tokens[] = {1, 2};
  auto logits = worker_->model->DecodeStep(tokens, &batch);
  EXPECT_EQ(logits.status().code(), absl::StatusCode::kInvalidArgument) << logits.status();
  EXPECT_NE(logits.status().message().find("sequence 1"), std::string::npos) << logits.status();
}

}  // namespace
}  // namespace kvgate::kv
