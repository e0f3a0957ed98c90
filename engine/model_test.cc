// The engine on our bundled checkpoint (models/kvgate-tiny): equivalence chains (token-by-token
// decode == one-shot prefill == chunked prefill), and every load/run error path.
#include "engine/model.h"

#include <gtest/gtest.h>

#include <algorithm>
#include <filesystem>
#include <thread>
#include <cstring>
#include <fstream>

#include "absl/strings/str_cat.h"
#include "cuda/cpu/cpu_backend.h"
#include "engine/generator.h"
#include "engine/tokenizer.h"
#include "tests/testing/paths.h"

namespace kvgate::engine {
namespace {

namespace fs = std::filesystem;

// float32 sums in different orders (attention over 12 vs 1 query rows) over 8 layers.
constexpr float kLogitAtol = 1e-4f;

class ModelTest : public ::testing::Test {
 protected:
  void SetUp() override {
    auto model = Model::Load(testing::KvgateTinyDir(), backend_.get());
    ASSERT_TRUE(model.ok()) << model.status();
    model_ = std::move(*model);
  }
  std::unique_ptr<ops::Backend> backend_ = ops::CreateCpuBackend(2);
  std::unique_ptr<Model> model_;
  // A cache entry is one (layer, kv head) row of a token.
  int64_t EntriesPerToken() const {
    return static_cast<int64_t>(model_->config().num_layers) * model_->config().num_kv_heads;
  }
  const std::vector<int32_t> prompt_ = {1, 500, 24, 300, 17, 1200, 88, 5, 640, 2000, 33, 42};
};

void ExpectLogitsNear(const float* a, const float* b, int n, const std::string& what) {
  float worst = 0;
  for (int i = 0; i < n; ++i) worst = std::max(worst, std::fabs(a[i] - b[i]));
  EXPECT_LE(worst, kLogitAtol) << what;
}

TEST_F(ModelTest, IncrementalDecodeEqualsOneShotPrefill) {
  const int vocab = model_->config().vocab_size;
  auto full_cache = *model_->NewCache(64);
  auto all = model_->Forward(prompt_, full_cache.get(), LogitsMode::kAllTokens);
  ASSERT_TRUE(all.ok()) << all.status();
  ASSERT_EQ(all->size(), prompt_.size() * vocab);
  auto step_cache = *model_->NewCache(64);
  for (size_t t = 0; t < prompt_.size(); ++t) {
    auto step = model_->Forward({&prompt_[t], 1}, step_cache.get());
    ASSERT_TRUE(step.ok()) << step.status();
    ExpectLogitsNear(step->data(), all->data() + t * vocab, vocab, "position " + std::to_string(t));
  }
  EXPECT_EQ(step_cache->length_tokens(), static_cast<int32_t>(prompt_.size()));
  EXPECT_EQ(step_cache->num_entries(), EntriesPerToken() * static_cast<int64_t>(prompt_.size()));
}

// A backend that runs on the CPU backend and records the size of every allocation.
class AllocRecordingBackend final : public ops::Backend {
 public:
  explicit AllocRecordingBackend(std::unique_ptr<ops::Backend> inner, std::string name = "")
      : inner_(std::move(inner)), name_(std::move(name)) {}
  std::string_view Name() const override { return name_.empty() ? inner_->Name() : name_; }
  absl::StatusOr<ops::DeviceBuffer> Alloc(size_t bytes) override {
    sizes.push_back(bytes);
    return inner_->Alloc(bytes);
  }
  absl::Status CopyToBackend(void* dst, const void* src, size_t bytes) override { return inner_->CopyToBackend(dst, src, bytes); }
  absl::Status CopyToHost(void* dst, const void* src, size_t bytes) override { return inner_->CopyToHost(dst, src, bytes); }
  absl::Status CopyWithinBackend(void* dst, const void* src, size_t bytes) override {
    return inner_->CopyWithinBackend(dst, src, bytes);
  }
  absl::Status Embed(const ops::EmbedArgs& a) override { return inner_->Embed(a); }
  absl::Status MatMul(const ops::MatMulArgs& a) override { return inner_->MatMul(a); }
  absl::Status RmsNorm(const ops::RmsNormArgs& a) override { return inner_->RmsNorm(a); }
  absl::Status Rope(const ops::RopeArgs& a) override { return inner_->Rope(a); }
  absl::Status StoreKv(const ops::StoreKvArgs& a) override { return inner_->StoreKv(a); }
  absl::Status Attention(const ops::AttentionArgs& a) override { return inner_->Attention(a); }
  absl::Status SiluMul(const ops::SiluMulArgs& a) override { return inner_->SiluMul(a); }
  absl::Status Add(const ops::AddArgs& a) override { return inner_->Add(a); }
  absl::Status CopyRows(const ops::CopyRowsArgs& a) override { return inner_->CopyRows(a); }
  absl::Status HeadPagedDecodeAttention(const ops::HeadPagedDecodeAttentionArgs& a) override {
    return inner_->HeadPagedDecodeAttention(a);
  }
  absl::Status ArgMaxRows(const ops::ArgMaxRowsArgs& a) override { return inner_->ArgMaxRows(a); }
  absl::Status WindowAttentionProbs(const ops::WindowAttentionProbsArgs& a) override {
    return inner_->WindowAttentionProbs(a);
  }
  absl::Status PoolWindowScores(const ops::PoolWindowScoresArgs& a) override { return inner_->PoolWindowScores(a); }
  absl::Status SelectTop(const ops::SelectTopArgs& a) override { return inner_->SelectTop(a); }
  absl::Status SinkGateScores(const ops::SinkGateScoresArgs& a) override { return inner_->SinkGateScores(a); }
  absl::StatusOr<const void*> ConstantOnBackend(uint64_t owner, int32_t key, const void* host, size_t bytes) override {
    return inner_->ConstantOnBackend(owner, key, host, bytes);
  }
  absl::Status Synchronize() override { return inner_->Synchronize(); }
  std::vector<size_t> sizes;

 private:
  std::unique_ptr<ops::Backend> inner_;
  std::string name_;
};

// A long prompt with last-token logits allocates one row of logits, not one per token
// (a 32k-token prompt of a 128k vocabulary would need 16 GiB); all-token logits still work.
TEST(ModelScratchTest, LastTokenLogitsAllocateOneRow) {
  AllocRecordingBackend backend(ops::CreateCpuBackend(2));
  auto model = Model::Load(testing::KvgateTinyDir(), &backend);
  ASSERT_TRUE(model.ok()) << model.status();
  const size_t row_bytes = size_t{4} * (*model)->config().vocab_size;
  constexpr int32_t kTokens = 300;
  std::vector<int32_t> prompt(kTokens);
  for (int32_t i = 0; i < kTokens; ++i) prompt[i] = (7 * i + 1) % (*model)->config().vocab_size;
  auto cache = *(*model)->NewCache(kTokens + 8);
  backend.sizes.clear();
  auto last = (*model)->Forward(prompt, cache.get());
  ASSERT_TRUE(last.ok()) << last.status();
  EXPECT_EQ(last->size(), row_bytes / 4);
  EXPECT_EQ(std::count(backend.sizes.begin(), backend.sizes.end(), row_bytes), 1);
  for (size_t bytes : backend.sizes) EXPECT_LT(bytes, kTokens * row_bytes / 4) << "an allocation of " << bytes;
  auto all_cache = *(*model)->NewCache(8);
  auto all = (*model)->Forward({prompt.data(), 5}, all_cache.get(), LogitsMode::kAllTokens);
  ASSERT_TRUE(all.ok()) << all.status();
  EXPECT_EQ(all->size(), 5 * row_bytes / 4);
  EXPECT_NEAR((*all)[4 * row_bytes / 4], (*(*model)->Forward({prompt.data(), 5}, (*(*model)->NewCache(8)).get()))[0],
              kLogitAtol);
}

// A second model over the same weights allocates only scratch, gives bit-identical
// logits, and runs at the same time as the first without disturbing it.
TEST(ModelShareWeightsTest, SecondModelAllocatesNoWeightsAndComputesTheSame) {
  AllocRecordingBackend owner(ops::CreateCpuBackend(1));
  auto first = Model::Load(testing::KvgateTinyDir(), &owner);
  ASSERT_TRUE(first.ok()) << first.status();
  size_t weight_bytes = 0;
  for (size_t bytes : owner.sizes) weight_bytes += bytes;
  AllocRecordingBackend other(ops::CreateCpuBackend(1));
  auto second = Model::ShareWeights(**first, &other);
  ASSERT_TRUE(second.ok()) << second.status();
  EXPECT_TRUE(other.sizes.empty());
  const std::vector<int32_t> prompt = {1, 500, 24, 300, 17, 1200, 88, 5, 640, 2000, 33, 42};
  std::vector<float> a, b;
  std::thread run_first([&] {
    for (int repeat = 0; repeat < 3; ++repeat) a = *(*first)->Forward(prompt, (*(*first)->NewCache(32)).get());
  });
  for (int repeat = 0; repeat < 3; ++repeat) b = *(*second)->Forward(prompt, (*(*second)->NewCache(32)).get());
  run_first.join();
  ASSERT_EQ(a.size(), b.size());
  EXPECT_EQ(0, std::memcmp(a.data(), b.data(), a.size() * sizeof(float)));
  size_t scratch_bytes = 0;
  for (size_t bytes : other.sizes) scratch_bytes += bytes;
  EXPECT_LT(scratch_bytes, weight_bytes / 2) << "the second model allocated weights";
  // The first model may go first: the weights live on with the second.
  first->reset();
  auto again = (*second)->Forward(prompt, (*(*second)->NewCache(32)).get());
  ASSERT_TRUE(again.ok());
  EXPECT_EQ(0, std::memcmp(again->data(), b.data(), b.size() * sizeof(float)));
}

TEST(ModelShareWeightsTest, AnotherDeviceIsInvalidArgument) {
  std::unique_ptr<ops::Backend> cpu = ops::CreateCpuBackend(1);
  auto model = Model::Load(testing::KvgateTinyDir(), cpu.get());
  ASSERT_TRUE(model.ok()) << model.status();
  AllocRecordingBackend elsewhere(ops::CreateCpuBackend(1), "cuda:1");
  auto shared = Model::ShareWeights(**model, &elsewhere);
  EXPECT_EQ(shared.status().code(), absl::StatusCode::kInvalidArgument) << shared.status();
  EXPECT_EQ(Model::ShareWeights(**model, nullptr).status().code(), absl::StatusCode::kInvalidArgument);
}

TEST_F(ModelTest, ChunkedPrefillEqualsOneShot) {
  const int vocab = model_->config().vocab_size;
  auto one_shot = *model_->NewCache(64);
  auto expected = *model_->Forward(prompt_, one_shot.get());
  auto chunked = *model_->NewCache(64);
  ASSERT_TRUE(model_->Forward(absl::MakeConstSpan(prompt_).subspan(0, 5), chunked.get()).ok());
  auto last = model_->Forward(absl::MakeConstSpan(prompt_).subspan(5), chunked.get());
  ASSERT_TRUE(last.ok());
  ExpectLogitsNear(last->data(), expected.data(), vocab, "chunked");
}

// KVzip's reconstruction forward: tokens run after a copy of the prompt's cache record
// the keys and queries a forward of prompt + tokens from scratch records, and the prompt's
// cache stays as it was.
TEST_F(ModelTest, AForwardAfterACopiedCacheEqualsOneFromScratch) {
  const std::vector<int32_t> more = {7, 900, 61, 4};
  const int32_t n = static_cast<int32_t>(prompt_.size()), q = static_cast<int32_t>(more.size());
  CaptureRequest record;
  record.keys = true;
  record.last_queries = q;
  std::vector<int32_t> both = prompt_;
  both.insert(both.end(), more.begin(), more.end());
  auto scratch = *model_->NewCache(n + q);
  PrefillCapture want;
  ForwardOptions options;
  options.capture_request = record;
  options.capture = &want;
  ASSERT_TRUE(model_->Forward(both, scratch.get(), options).ok());

  auto prompt_cache = *model_->NewCache(n);
  ASSERT_TRUE(model_->Forward(prompt_, prompt_cache.get()).ok());
  auto copy = model_->CopyCache(*prompt_cache, n + q);
  ASSERT_TRUE(copy.ok()) << copy.status();
  EXPECT_EQ((*copy)->length_tokens(), n);
  PrefillCapture got;
  options.capture = &got;
  ASSERT_TRUE(model_->Forward(more, copy->get(), options).ok());
  EXPECT_EQ(got.prompt_tokens, n + q);
  ASSERT_EQ(got.keys.size(), want.keys.size());
  ASSERT_EQ(got.last_queries.size(), want.last_queries.size());
  for (size_t l = 0; l < want.keys.size(); ++l) {
    ASSERT_EQ(got.keys[l].size(), want.keys[l].size());
    ExpectLogitsNear(got.keys[l].data(), want.keys[l].data(), static_cast<int>(want.keys[l].size()),
                     "keys of layer " + std::to_string(l));
    ASSERT_EQ(got.last_queries[l].size(), want.last_queries[l].size());
    ExpectLogitsNear(got.last_queries[l].data(), want.last_queries[l].data(),
                     static_cast<int>(want.last_queries[l].size()), "queries of layer " + std::to_string(l));
  }
  // Only the new rows' keys: rows [n, n + q) of the whole sequence's.
  auto second_copy = *model_->CopyCache(*prompt_cache, n + q);
  PrefillCapture new_rows;
  options.capture = &new_rows;
  options.capture_request.keys_of_new_rows_only = true;
  ASSERT_TRUE(model_->Forward(more, second_copy.get(), options).ok());
  const int32_t d = model_->config().head_dim;
  for (size_t l = 0; l < got.keys.size(); ++l) {
    ASSERT_EQ(new_rows.keys[l].size(), size_t{1} * model_->config().num_kv_heads * q * d);
    for (int32_t h = 0; h < model_->config().num_kv_heads; ++h) {
      EXPECT_TRUE(std::equal(new_rows.keys[l].begin() + size_t{1} * h * q * d,
                             new_rows.keys[l].begin() + size_t{1} * (h + 1) * q * d,
                             got.keys[l].begin() + (size_t{1} * h * (n + q) + n) * d))
          << "layer " << l << " kv head " << h;
    }
  }
  EXPECT_EQ(prompt_cache->length_tokens(), n);  // the copies ran, not the prompt's cache
  EXPECT_EQ(model_->CopyCache(*prompt_cache, n - 1).status().code(), absl::StatusCode::kInvalidArgument);
}

TEST_F(ModelTest, RejectsBadTokensAndOverflow) {
  auto cache = *model_->NewCache(4);
  const int32_t vocab = model_->config().vocab_size;
  std::vector<int32_t> bad = {1, vocab};
  auto status = model_->Forward(bad, cache.get()).status();
  EXPECT_EQ(status.code(), absl::StatusCode::kInvalidArgument);
  EXPECT_NE(status.message().find(absl::StrCat("token id ", vocab)), std::string::npos) << status;
  std::vector<int32_t> negative = {-1};
  EXPECT_EQ(model_->Forward(negative, cache.get()).status().code(), absl::StatusCode::kInvalidArgument);
  EXPECT_EQ(cache->length_tokens(), 0);  // a rejected call leaves the cache untouched
  std::vector<int32_t> five = {1, 2, 3, 4, 5};
  EXPECT_EQ(model_->Forward(five, cache.get()).status().code(), absl::StatusCode::kInvalidArgument);
  EXPECT_EQ(model_->NewCache(model_->config().max_context_tokens + 1).status().code(),
            absl::StatusCode::kInvalidArgument);
}

class BrokenCheckpointTest : public ::testing::Test {
 protected:
  static constexpr const char* kFirstShard = "model-00001-of-00002.safetensors";
  static constexpr const char* kSecondShard = "model-00002-of-00002.safetensors";
  void SetUp() override {
    dir_ = testing::MakeTempDir("broken-checkpoint");
    // kvgate-tiny is stored in two shards (model.safetensors.index.json names them).
    for (const char* file : {"config.json", "model.safetensors.index.json", kFirstShard, kSecondShard,
                             "tokenizer.json"}) {
      fs::copy_file(fs::path(testing::KvgateTinyDir()) / file, dir_ / file);
      fs::permissions(dir_ / file, fs::perms::owner_read | fs::perms::owner_write, fs::perm_options::add);
    }
  }
  void TearDown() override { fs::remove_all(dir_); }
  absl::Status Load() {
    auto backend = ops::CreateCpuBackend(1);
    return Model::Load(dir_.string(), backend.get()).status();
  }
  fs::path dir_;
};

TEST_F(BrokenCheckpointTest, TruncatedWeights) {
  fs::resize_file(dir_ / kFirstShard, fs::file_size(dir_ / kFirstShard) / 2);
  absl::Status status = Load();
  EXPECT_EQ(status.code(), absl::StatusCode::kInvalidArgument);
  EXPECT_NE(status.message().find("exceed"), std::string::npos) << status;
}

TEST_F(BrokenCheckpointTest, MissingFilesAndUnknownArchitecture) {
  fs::remove(dir_ / "model.safetensors.index.json");
  EXPECT_EQ(Load().code(), absl::StatusCode::kNotFound);
  std::ofstream(dir_ / "config.json") << R"({"architectures": ["BertModel"]})";
  absl::Status status = Load();
  EXPECT_EQ(status.code(), absl::StatusCode::kInvalidArgument);
  EXPECT_NE(status.message().find("BertModel"), std::string::npos) << status;
  fs::remove(dir_ / "config.json");
  EXPECT_EQ(Load().code(), absl::StatusCode::kNotFound);
}

TEST_F(BrokenCheckpointTest, ConfigThatDisagreesWithWeights) {
  std::ifstream in(dir_ / "config.json");
  std::string text((std::istreambuf_iterator<char>(in)), {});
  in.close();
  const size_t at = text.find("\"hidden_size\": 256");
  ASSERT_NE(at, std::string::npos) << text;
  text.replace(at, 18, "\"hidden_size\": 128");
  std::ofstream(dir_ / "config.json") << text;
  absl::Status status = Load();
  EXPECT_EQ(status.code(), absl::StatusCode::kInvalidArgument);
  EXPECT_NE(status.message().find("has shape [4096, 256]"), std::string::npos) << status;
}

class GeneratorTest : public ModelTest {
 protected:
  void SetUp() override {
    ModelTest::SetUp();
    auto tokenizer = Tokenizer::FromFile(testing::KvgateTinyDir() + "/tokenizer.json");
    ASSERT_TRUE(tokenizer.ok()) << tokenizer.status();
    tokenizer_ = std::move(*tokenizer);
  }
  std::unique_ptr<Tokenizer> tokenizer_;
};

TEST_F(GeneratorTest, GreedyGenerationIsDeterministicAndStreamsAllText) {
  Generator generator(model_.get(), tokenizer_.get());
  GenerateOptions options;
  options.max_tokens = 24;
  options.ignore_eos = true;
  std::string streamed;
  std::vector<int32_t> streamed_ids;
  auto result = generator.Generate(prompt_, options, [&](int32_t id, std::string_view text) {
    streamed_ids.push_back(id);
    streamed += text;
    return true;
  });
  ASSERT_TRUE(result.ok()) << result.status();
  EXPECT_EQ(result->token_ids.size(), 24u);
  EXPECT_EQ(result->finish_reason, FinishReason::kLength);
  EXPECT_EQ(streamed_ids, result->token_ids);
  EXPECT_EQ(streamed, result->text);
  auto again = generator.Generate(prompt_, options);
  EXPECT_EQ(again->token_ids, result->token_ids);
  EXPECT_EQ(result->kv.kv_entries_full, EntriesPerToken() * static_cast<int64_t>(prompt_.size()));
}

TEST_F(GeneratorTest, StopConditions) {
  Generator generator(model_.get(), tokenizer_.get());
  GenerateOptions options;
  options.max_tokens = 24;
  options.ignore_eos = true;
  auto base = *generator.Generate(prompt_, options);
  ASSERT_GE(base.token_ids.size(), 5u);

  GenerateOptions by_id = options;
  by_id.stop_token_ids = {base.token_ids[3]};
  auto stopped = *generator.Generate(prompt_, by_id);
  EXPECT_EQ(stopped.finish_reason, FinishReason::kStop);
  EXPECT_LE(stopped.token_ids.size(), 4u);
  EXPECT_EQ(stopped.token_ids.back(), base.token_ids[3]);

  ASSERT_GE(base.text.size(), 12u);
  GenerateOptions by_string = options;
  by_string.stop = {base.text.substr(8, 3)};
  std::string streamed;
  auto cut = *generator.Generate(prompt_, by_string, [&](int32_t, std::string_view text) {
    streamed += text;
    return true;
  });
  EXPECT_EQ(cut.finish_reason, FinishReason::kStop);
  EXPECT_EQ(cut.matched_stop, by_string.stop[0]);
  EXPECT_EQ(cut.text, base.text.substr(0, base.text.find(by_string.stop[0])));
  EXPECT_EQ(streamed, cut.text);  // the stop string itself never reached the stream

  int calls = 0;
  auto aborted = *generator.Generate(prompt_, options, [&](int32_t, std::string_view) { return ++calls < 3; });
  EXPECT_EQ(aborted.finish_reason, FinishReason::kAborted);
  EXPECT_EQ(aborted.token_ids.size(), 3u);
}

TEST_F(GeneratorTest, RejectsBadRequests) {
  Generator generator(model_.get(), tokenizer_.get());
  GenerateOptions options;
  auto expect_invalid = [&](absl::Span<const int32_t> prompt, const GenerateOptions& o, const std::string& field) {
    auto result = generator.Generate(prompt, o);
    ASSERT_FALSE(result.ok()) << field;
    EXPECT_EQ(result.status().code(), absl::StatusCode::kInvalidArgument) << field;
    EXPECT_NE(result.status().message().find(field), std::string::npos) << result.status();
  };
  expect_invalid({}, options, "prompt is empty");
  const int32_t context = model_->config().max_context_tokens;
  std::vector<int32_t> out_of_range = {1, model_->config().vocab_size};
  expect_invalid(out_of_range, options, "outside the vocabulary");
  std::vector<int32_t> too_long(context + 88, 5);
  expect_invalid(too_long, options, absl::StrCat("context is ", context));
  GenerateOptions zero = options;
  zero.max_tokens = 0;
  expect_invalid(prompt_, zero, "max_tokens");
  GenerateOptions huge = options;
  huge.max_tokens = context;
  expect_invalid(prompt_, huge, "max_tokens");
  GenerateOptions hot = options;
  hot.sampling.temperature = -1;
  expect_invalid(prompt_, hot, "temperature");
  GenerateOptions empty_stop = options;
  empty_stop.stop = {""};
  expect_invalid(prompt_, empty_stop, "stop");
  GenerateOptions bad_stop_id = options;
  bad_stop_id.stop_token_ids = {99999};
  expect_invalid(prompt_, bad_stop_id, "stop_token_ids");
}

}  // namespace
}  // namespace kvgate::engine
