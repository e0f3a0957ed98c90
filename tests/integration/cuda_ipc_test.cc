// The cuda_ipc transport end to end: kv-manager, prefill, decode and router as four
// processes, prefill and decode on GPU 0 (--backend cuda), the compressed cache moving
// GPU to GPU by CUDA IPC. For every policy the served tokens and KV accounting equal
// those of the same deployment over tcp (host rows; bf16 rows widen and narrow exactly,
// so the caches are bit-identical and so must be the tokens), and 64 concurrent streams
// all complete. The deployment ends idle: every lease and page back.
// Runs where KVGATE_TEST_BACKEND=cuda (the GPU machine), else skips; the start-up refusal
// of `serve --transport cuda_ipc` runs everywhere.
#include <cstdlib>
#include <iostream>
#include <map>
#include <string>
#include <thread>
#include <vector>

#include <gtest/gtest.h>

#include "absl/strings/match.h"
#include "gates/eviction_spec.h"
#include "tests/integration/harness.h"
#include "tests/integration/process.h"

namespace kvgate::integration {
namespace {

bool OnGpu() {
  const char* backend = std::getenv("KVGATE_TEST_BACKEND");
  return backend != nullptr && std::string(backend).rfind("cuda", 0) == 0;
}

DeploymentOptions SplitOnGpu(const std::string& transport) {
  DeploymentOptions options;
  options.split = true;
  const std::vector<std::string> worker = {"--backend", "cuda", "--transport", transport};
  options.prefill_args = worker;
  options.decode_args = worker;
  options.decode_args.insert(options.decode_args.end(), {"--kv-sequences", "80"});
  return options;
}

std::vector<Case> Cases() {
  OfflineReference& reference = Reference();
  std::vector<Case> cases;
  for (const std::string& policy : gates::PolicyNames()) {
    for (int p = 0; p < 2; ++p) {
      Case c;
      c.prompt = StoryPrompt(reference.tokenizer(), p == 0 ? 140 : 300, p);
      c.policy = policy;
      c.keep_ratio = policy == "full" ? 0.0f : 0.3f;
      c.max_tokens = 24;
      c.request_id = absl::StrCat("ipc-", policy, "-", p);
      cases.push_back(c);
    }
  }
  return cases;
}

std::map<std::string, StreamResult> RunAll(Deployment& d, const std::vector<Case>& cases) {
  std::map<std::string, StreamResult> out;
  for (const Case& c : cases) out[c.Name()] = Generate(d.stub(), c.Request());
  return out;
}

TEST(CudaIpcTest, SplitRolesOnOneGpuServeWhatTcpServes) {
  if (!OnGpu()) GTEST_SKIP() << "needs a GPU: set KVGATE_TEST_BACKEND=cuda";
  const std::vector<Case> cases = Cases();
  std::map<std::string, StreamResult> over_tcp;
  {
    auto tcp = Deployment::Start(SplitOnGpu("tcp"));
    ASSERT_TRUE(tcp.ok()) << tcp.status();
    over_tcp = RunAll(**tcp, cases);
  }
  auto started = Deployment::Start(SplitOnGpu("cuda_ipc"));
  ASSERT_TRUE(started.ok()) << started.status();
  Deployment& d = **started;
  const std::map<std::string, StreamResult> over_ipc = RunAll(d, cases);
  for (const Case& c : cases) {
    SCOPED_TRACE(c.Name());
    const StreamResult& want = over_tcp.at(c.Name());
    const StreamResult& got = over_ipc.at(c.Name());
    ASSERT_TRUE(want.status.ok()) << ToString(want.status);
    ASSERT_TRUE(got.status.ok()) << ToString(got.status) << "\n" << d.Logs();
    ASSERT_TRUE(got.complete.has_value() && want.complete.has_value());
    EXPECT_EQ(got.tokens, want.tokens) << "cuda_ipc and tcp served different tokens";
    EXPECT_EQ(got.complete->kv().kv_entries_kept(), want.complete->kv().kv_entries_kept());
    EXPECT_EQ(got.complete->kv().kv_entries_full(), want.complete->kv().kv_entries_full());
    EXPECT_GT(got.complete->kv().bytes_transferred(), 0);
  }

  // 64 streams at once, each one of the cases above: each equals its sequential run.
  std::vector<StreamResult> concurrent(64);
  std::vector<std::thread> threads;
  for (size_t i = 0; i < concurrent.size(); ++i) {
    threads.emplace_back([&, i] {
      Case c = cases[i % cases.size()];
      c.request_id = absl::StrCat("ipc-concurrent-", i);
      concurrent[i] = Generate(d.stub(), c.Request(), Within(absl::Seconds(120)));
    });
  }
  for (std::thread& t : threads) t.join();
  // Batched decode on the GPU need not round as a batch of one does (GEMM shapes, split
  // counts), so tokens are counted, not compared; how many match is reported.
  int same_as_sequential = 0;
  for (size_t i = 0; i < concurrent.size(); ++i) {
    const Case& c = cases[i % cases.size()];
    SCOPED_TRACE(absl::StrCat("stream ", i, " ", c.Name()));
    ASSERT_TRUE(concurrent[i].status.ok()) << ToString(concurrent[i].status);
    EXPECT_EQ(static_cast<int32_t>(concurrent[i].tokens.size()), c.max_tokens);
    same_as_sequential += concurrent[i].tokens == over_ipc.at(c.Name()).tokens ? 1 : 0;
  }
  ::testing::Test::RecordProperty("concurrent_streams_equal_to_sequential", same_as_sequential);
  std::cout << "concurrent streams equal to their sequential run: " << same_as_sequential << " of "
            << concurrent.size() << "\n";
  absl::StatusOr<v1::ServerInfo> info = WaitServerInfo(d.stub(), Idle, absl::Seconds(5));
  ASSERT_TRUE(info.ok()) << info.status();
  EXPECT_TRUE(Idle(*info)) << Describe(*info);
}

// A decode worker killed mid-stream under cuda_ipc fails the stream UNAVAILABLE within
// 2 s; the KV manager releases the lease and the prefill worker holds no pages (its
// transfer buffers come from shareable slabs that it keeps for the next transfer).
TEST(CudaIpcTest, KilledDecodeWorkerFailsTheStreamAndFreesThePrefillPages) {
  if (!OnGpu()) GTEST_SKIP() << "needs a GPU: set KVGATE_TEST_BACKEND=cuda";
  DeploymentOptions options = SplitOnGpu("cuda_ipc");
  options.metrics = true;
  auto started = Deployment::Start(options);
  ASSERT_TRUE(started.ok()) << started.status();
  Deployment& d = **started;
  Case c;
  c.policy = "snapkv";
  c.keep_ratio = 0.5f;
  c.prompt = StoryPrompt(Reference().tokenizer(), 200, 3);
  c.max_tokens = 400;
  c.ignore_eos = true;
  c.request_id = "ipc-decode-killed";
  absl::Time killed_at = absl::InfiniteFuture();
  CallOptions call;
  call.timeout = absl::Seconds(30);
  call.on_chunk = [&](grpc::ClientContext*, const StreamResult& so_far) {
    if (so_far.chunks == 3) {
      killed_at = absl::Now();
      d.decode()->Kill();
    }
  };
  const StreamResult r = Generate(d.stub(), c.Request(), call);
  const absl::Time failed_at = absl::Now();
  ASSERT_NE(killed_at, absl::InfiniteFuture()) << "the stream ended before its third chunk: " << ToString(r.status);
  EXPECT_EQ(r.status.error_code(), grpc::StatusCode::UNAVAILABLE) << ToString(r.status);
  EXPECT_LE(failed_at - killed_at, absl::Seconds(2)) << absl::FormatDuration(failed_at - killed_at);
  ASSERT_TRUE(d.prefill()->metrics_port().has_value()) << d.prefill()->Output();
  const std::optional<double> prefill_pages = AwaitPrefillPagesFree(d, absl::Seconds(2));
  const bool drained = prefill_pages.has_value() && *prefill_pages == 0;
  EXPECT_TRUE(drained) << "prefill pages used: " << (prefill_pages ? std::to_string(*prefill_pages) : "absent");
  EXPECT_FALSE(d.prefill()->Exited()) << d.Logs();
}

// cuda_ipc joins two processes: `serve` (every role in one) refuses it at start, naming
// the transport to use instead; a misspelled transport is refused too. Runs everywhere.
TEST(CudaIpcTest, ServeRefusesTheTransportAtStart) {
  for (const std::string transport : {"cuda_ipc", "cuda-ipc"}) {
    absl::StatusOr<std::unique_ptr<Process>> p = Process::Start(
        "serve --transport " + transport,
        {"serve", "--model", ModelDir(), "--host", "127.0.0.1", "--port", "0", "--transport", transport});
    ASSERT_TRUE(p.ok()) << p.status();
    EXPECT_TRUE(PollUntil([&] { return (*p)->Exited(); }, absl::Seconds(10))) << (*p)->Output();
    const int status = (*p)->Stop();
    EXPECT_FALSE((*p)->killed()) << (*p)->Output();
    EXPECT_TRUE(WIFEXITED(status) && WEXITSTATUS(status) != 0) << Process::DescribeStatus(status);
    EXPECT_TRUE(absl::StrContains((*p)->Output(), transport == "cuda_ipc" ? "use inproc" : "inproc, tcp or cuda_ipc"))
        << (*p)->Output();
  }
}

}  // namespace
}  // namespace kvgate::integration
