// The prefill engine's start-up warm-up: it runs before WaitUntilWarm returns, is skipped
// at 0 tokens, and a Shutdown while someone waits for it does not hang.
#include "prefill_worker/prefill_engine.h"

#include <gtest/gtest.h>

#include <memory>
#include <string>
#include <thread>

#include "kv_manager/worker/worker_runtime.h"
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
