// Two roles of one process share one copy of the weights: the second runtime's model
// computes what the first's does, outlives it, and a runtime of another model directory
// cannot share.
#include "kv/worker/worker_runtime.h"

#include <gtest/gtest.h>

#include <cstring>
#include <filesystem>
#include <string>

#include <unistd.h>

#include "tests/testing/paths.h"

namespace kvgate::kv {
namespace {

WorkerRuntimeOptions TinyOptions() {
  WorkerRuntimeOptions options;
  options.model_dir = kvgate::testing::KvgateTinyDir();
  options.kv_pool_sequences = 1;
  return options;
}

TEST(WorkerRuntimeTest, SecondRoleRunsOnTheFirstRolesWeights) {
  auto prefill = WorkerRuntime::Load(TinyOptions());
  ASSERT_TRUE(prefill.ok()) << prefill.status();
  auto decode = WorkerRuntime::Load(TinyOptions(), prefill->get());
  ASSERT_TRUE(decode.ok()) << decode.status();
  const std::vector<int32_t> prompt = {1, 500, 24, 300, 17};
  auto a = (*prefill)->model().Forward(prompt, (*(*prefill)->model().NewCache(8)).get());
  ASSERT_TRUE(a.ok()) << a.status();
  prefill->reset();  // the decode role keeps the weights and the backend that holds them
  auto b = (*decode)->model().Forward(prompt, (*(*decode)->model().NewCache(8)).get());
  ASSERT_TRUE(b.ok()) << b.status();
  ASSERT_EQ(a->size(), b->size());
  EXPECT_EQ(0, std::memcmp(a->data(), b->data(), a->size() * sizeof(float)));
}

// A pool for sequences of at most N tokens holds N tokens per (layer, kv head), not the
// model's whole context; 0 and anything above the context mean the context.
TEST(WorkerRuntimeTest, SequenceTokensSizeThePool) {
  auto full = WorkerRuntime::Load(TinyOptions());
  ASSERT_TRUE(full.ok()) << full.status();
  const engine::ModelConfig& c = (*full)->model().config();
  EXPECT_EQ((*full)->max_sequence_tokens(), c.max_context_tokens);
  const int32_t heads = c.num_layers * c.num_kv_heads;
  EXPECT_EQ((*full)->pool().num_pages(), heads * ((c.max_context_tokens + 15) / 16 + 1));

  WorkerRuntimeOptions short_prompts = TinyOptions();
  short_prompts.kv_pool_sequence_tokens = 100;
  auto small = WorkerRuntime::Load(short_prompts);
  ASSERT_TRUE(small.ok()) << small.status();
  EXPECT_EQ((*small)->max_sequence_tokens(), 100);
  EXPECT_EQ((*small)->pool().num_pages(), heads * ((100 + 15) / 16 + 1));

  short_prompts.kv_pool_sequence_tokens = c.max_context_tokens * 4;
  auto capped = WorkerRuntime::Load(short_prompts);
  ASSERT_TRUE(capped.ok()) << capped.status();
  EXPECT_EQ((*capped)->max_sequence_tokens(), c.max_context_tokens);
}

TEST(WorkerRuntimeTest, AnotherModelDirectoryCannotShare) {
  auto first = WorkerRuntime::Load(TinyOptions());
  ASSERT_TRUE(first.ok()) << first.status();
  const std::filesystem::path copy = std::filesystem::temp_directory_path() / ("kvgate-runtime-test-model-" + std::to_string(::getpid()));
  std::filesystem::remove_all(copy);
  std::filesystem::copy(kvgate::testing::KvgateTinyDir(), copy, std::filesystem::copy_options::recursive);
  WorkerRuntimeOptions other = TinyOptions();
  other.model_dir = copy.string();
  auto second = WorkerRuntime::Load(other, first->get());
  EXPECT_EQ(second.status().code(), absl::StatusCode::kInvalidArgument) << second.status();
  std::filesystem::remove_all(copy);
}

}  // namespace
}  // namespace kvgate::kv
