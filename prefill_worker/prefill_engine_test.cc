// The prefill engine's start-up warm-up: it runs before WaitUntilWarm returns, is skipped
// at 0 tokens, and a Shutdown while someone waits for it does not hang.
#include "prefill_worker/prefill_engine.h"

#include <gtest/gtest.h>

#include <memory>
#include <string>
#include <thread>

#include "kv/worker/worker_runtime.h"
#include "tests/testing/paths.h"

namespace kvgate::prefill {
namespace {

std::unique_ptr<kv::WorkerRuntime> LoadTiny() {
  kv::WorkerRuntimeOptions options;
  options.model_dir = kvgate::testing::KvgateTinyDir();
  options.kv_pool_sequences = 1;
  absl::StatusOr<std::unique_ptr<kv::WorkerRuntime>> runtime = kv::WorkerRuntime::Load(options);
  EXPECT_TRUE(runtime.ok()) << runtime.status();
  return runtime.ok() ? std::move(*runtime) : nullptr;
}

TEST(PrefillEngineWarmupTest, RunsBeforeWaitUntilWarmReturns) {
  std::unique_ptr<kv::WorkerRuntime> runtime = LoadTiny();
  ASSERT_NE(runtime, nullptr);
  ::testing::internal::CaptureStderr();
  {
    PrefillEngine engine(runtime.get(), /*sender=*/nullptr, PrefillEngine::kDefaultMaxQueue, /*warmup_tokens=*/96);
    engine.WaitUntilWarm();
    EXPECT_EQ(engine.queued(), 0);
  }
  const std::string log = ::testing::internal::GetCapturedStderr();
  EXPECT_NE(log.find("prefill warm-up: 96 tokens in"), std::string::npos) << log;
}

TEST(PrefillEngineWarmupTest, ZeroTokensMeansNoWarmup) {
  std::unique_ptr<kv::WorkerRuntime> runtime = LoadTiny();
  ASSERT_NE(runtime, nullptr);
  ::testing::internal::CaptureStderr();
  {
    PrefillEngine engine(runtime.get(), nullptr, PrefillEngine::kDefaultMaxQueue, 0);
    engine.WaitUntilWarm();
  }
  EXPECT_EQ(::testing::internal::GetCapturedStderr().find("warm-up"), std::string::npos);
}

// A prompt longer than the staging pool is refused at once (nothing queued, no page
// taken), naming the flag; the warm-up shrinks to fit the pool instead of failing.
TEST(PrefillEngineTest, PromptLongerThanTheStagingPoolIsInvalidArgument) {
  kv::WorkerRuntimeOptions options;
  options.model_dir = kvgate::testing::KvgateTinyDir();
  options.kv_pool_sequences = 1;
  options.kv_pool_sequence_tokens = 64;
  absl::StatusOr<std::unique_ptr<kv::WorkerRuntime>> runtime = kv::WorkerRuntime::Load(options);
  ASSERT_TRUE(runtime.ok()) << runtime.status();
  ::testing::internal::CaptureStderr();
  PrefillEngine engine(runtime->get(), nullptr, PrefillEngine::kDefaultMaxQueue, /*warmup_tokens=*/512);
  engine.WaitUntilWarm();
  const std::string log = ::testing::internal::GetCapturedStderr();
  EXPECT_NE(log.find("prefill warm-up: 64 tokens in"), std::string::npos) << log;
  PrefillJob job;
  job.request_id = "too-long";
  job.prompt.assign(65, 7);
  absl::Status status;
  engine.Submit(std::move(job), [&](absl::StatusOr<PrefillResult> result) { status = result.status(); });
  EXPECT_EQ(status.code(), absl::StatusCode::kInvalidArgument) << status;
  EXPECT_NE(status.message().find("--max-prompt-tokens"), std::string::npos) << status;
  EXPECT_EQ(engine.queued(), 0);
  EXPECT_EQ((*runtime)->pool().pages_used(), 0);
}

TEST(PrefillEngineWarmupTest, ShutdownReleasesAWaiter) {
  std::unique_ptr<kv::WorkerRuntime> runtime = LoadTiny();
  ASSERT_NE(runtime, nullptr);
  PrefillEngine engine(runtime.get(), nullptr, PrefillEngine::kDefaultMaxQueue, 512);
  std::thread waiter([&] { engine.WaitUntilWarm(); });
  engine.Shutdown();
  waiter.join();  // returns whether the warm-up finished first or Shutdown came first
}

}  // namespace
}  // namespace kvgate::prefill
