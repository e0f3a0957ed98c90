// Two roles of one process share one copy of the weights: the second runtime's model
// computes what the first's does, outlives it, and a runtime of another model directory
// cannot share.
#include "kv_manager/worker/worker_runtime.h"

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
