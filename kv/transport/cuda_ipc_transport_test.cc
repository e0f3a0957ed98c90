// The cuda_ipc transport between two processes on one GPU (CUDA maps an IPC name only
// in a process other than its exporter): the test forks a receiver before either
// process touches CUDA. The receiver serves kvgate.v1.KvTransfer with its CUDA backend,
// imports every arriving handoff into a pool of its own and compares the pool's rows,
// read back to the host, with the same coded rows imported locally (so bf16 rounding is
// the same on both sides): the rows must cross bit for bit. The sender exports real
// pool sequences (ExportSequence, RowsIn::kBackend) as the prefill worker does. Skips
// where there is no GPU.
#include <grpcpp/grpcpp.h>
#include <gtest/gtest.h>
#include <sys/wait.h>
#include <unistd.h>

#include <cstdio>
#include <cstring>
#include <memory>
#include <string>
#include <vector>

#include "absl/strings/str_cat.h"
#include "absl/strings/str_split.h"
#include "absl/time/clock.h"
#include "cuda/backend.h"
#include "kv/kv_handoff.h"
#include "kv/kv_pool.h"
#include "kv/transport/tcp_transport.h"
#include "kv/transport/transport_test_util.h"
#include "kvgate/v1/worker.grpc.pb.h"  // grpc::Service, complete

namespace kvgate::kv {
namespace {

constexpr int32_t kPageTokens = 16;
constexpr int32_t kPoolPages = 4096;

struct Case {
  std::string id;
  ops::KvDtype dtype;
  int32_t rows;
  bool masks, scores;
  int32_t layers, kv_heads, head_dim;
};

std::vector<Case> Cases() {
  std::vector<Case> cases = {
      {"f32-plain", ops::KvDtype::kFloat32, 9, false, false, 2, 3, 8},
      {"bf16-masks-scores", ops::KvDtype::kBf16, 21, true, true, 3, 2, 64},
      {"bf16-8b-shaped", ops::KvDtype::kBf16, 700, false, false, 4, 8, 128},
  };
  // Many small transfers: every IPC mapping must be closed again.
  for (int i = 0; i < 24; ++i) cases.push_back({absl::StrCat("repeat-", i), ops::KvDtype::kBf16, 5 + i, false, i % 2 == 1, 2, 2, 16});
  return cases;
}

KvHandoff Coded(const Case& c) {
  return testing::CodedTransfer(c.id, c.rows, c.masks, c.scores, c.layers, c.kv_heads, c.head_dim);
}

// The coded handoff as a pool of `dtype` holds it, read back to the host.
absl::StatusOr<KvHandoff> Rounded(ops::Backend* backend, const Case& c) {
  auto pool = KvPool::Create(backend, kPoolPages, kPageTokens, c.head_dim, c.dtype);
  if (!pool.ok()) return pool.status();
  auto layout = ImportSequence(pool->get(), Coded(c));
  if (!layout.ok()) return layout.status();
  auto back = ExportSequence(pool->get(), *layout, RowsIn::kHost);
  if (absl::Status s = (*pool)->Release(&*layout); !s.ok()) return s;
  return back;
}

std::string Compare(const KvHandoff& want, const KvHandoff& got) {
  if (got.heads.size() != want.heads.size()) return "head count";
  if (got.first_token != want.first_token || got.sampler_state != want.sampler_state ||
      got.eviction_policy != want.eviction_policy || got.eviction_state != want.eviction_state ||
      got.next_pos != want.next_pos) {
    return "decode state";
  }
  for (size_t i = 0; i < want.heads.size(); ++i) {
    const HeadRows &w = want.heads[i], &g = got.heads[i];
    if (g.positions != w.positions) return absl::StrCat("head ", i, " positions");
    if (g.query_mask != w.query_mask) return absl::StrCat("head ", i, " masks");
    if (g.scores != w.scores) return absl::StrCat("head ", i, " scores");
    if (g.k.size() != w.k.size() || std::memcmp(g.k.data(), w.k.data(), w.k.size() * sizeof(float)) != 0) {
      return absl::StrCat("head ", i, " K rows differ");
    }
    if (g.v.size() != w.v.size() || std::memcmp(g.v.data(), w.v.data(), w.v.size() * sizeof(float)) != 0) {
      return absl::StrCat("head ", i, " V rows differ");
    }
  }
  return "ok";
}

void WriteLine(int fd, const std::string& line) {
  const std::string out = line + "\n";
  (void)!write(fd, out.data(), out.size());
}

std::string ReadAll(FILE* from) {
  std::string all;
  char buffer[4096];
  size_t n;
  while ((n = fread(buffer, 1, sizeof(buffer), from)) > 0) all.append(buffer, n);
  return all;
}

// The child: "port N" first (or "skip ..."), then one "id result" line per case.
[[noreturn]] void RunReceiver(int fd) {
  auto backend = ops::CreateBackend("cuda");
  if (!backend.ok()) {
    WriteLine(fd, absl::StrCat("skip ", backend.status().ToString()));
    _exit(0);
  }
  // As a decode worker runs it: the service copies on an instance of its own.
  auto transfer_backend = ops::CreateBackend("cuda");
  if (!transfer_backend.ok()) {
    WriteLine(fd, absl::StrCat("error ", transfer_backend.status().ToString()));
    _exit(1);
  }
  KvInbox inbox(int64_t{4} << 30);
  std::unique_ptr<grpc::Service> service = MakeKvTransferService(&inbox, "", transfer_backend->get());
  grpc::ServerBuilder builder;
  int port = 0;
  builder.AddListeningPort("127.0.0.1:0", grpc::InsecureServerCredentials(), &port);
  builder.RegisterService(service.get());
  std::unique_ptr<grpc::Server> server = builder.BuildAndStart();
  if (server == nullptr || port == 0) {
    WriteLine(fd, "error no server");
    _exit(1);
  }
  WriteLine(fd, absl::StrCat("port ", port));
  for (const Case& c : Cases()) {
    auto got = inbox.Await(c.id, absl::Now() + absl::Seconds(60));
    if (!got.ok()) {
      WriteLine(fd, absl::StrCat(c.id, " await: ", got.status().ToString()));
      continue;
    }
    std::string result;
    if (got->backend_rows == nullptr || got->backend_rows->backend != (*backend)->Name()) {
      result = "the rows did not arrive in this process's device memory";
    } else {
      auto pool = KvPool::Create(backend->get(), kPoolPages, kPageTokens, c.head_dim, c.dtype);
      auto layout = pool.ok() ? ImportSequence(pool->get(), *got) : absl::StatusOr<SequenceLayout>(pool.status());
      auto back = layout.ok() ? ExportSequence(pool->get(), *layout, RowsIn::kHost) : layout.status();
      auto want = Rounded(backend->get(), c);
      if (!back.ok() || !want.ok()) {
        result = absl::StrCat("import: ", back.ok() ? want.status().ToString() : back.status().ToString());
      } else {
        back->first_token = got->first_token;
        back->sampler_state = got->sampler_state;
        back->eviction_policy = got->eviction_policy;
        back->eviction_state = got->eviction_state;
        const KvHandoff coded = Coded(c);
        want->first_token = coded.first_token;
        want->sampler_state = coded.sampler_state;
        want->eviction_policy = coded.eviction_policy;
        want->eviction_state = coded.eviction_state;
        result = Compare(*want, *back);
      }
      if (layout.ok() && !(*pool)->Release(&*layout).ok()) result = "release failed";
      if (result == "ok" && (*pool)->pages_used() != 0) result = "pages left in the pool";
    }
    WriteLine(fd, absl::StrCat(c.id, " ", result));
  }
  WriteLine(fd, absl::StrCat("pending_bytes ", inbox.pending_bytes()));
  server->Shutdown(absl::ToChronoTime(absl::Now() + absl::Seconds(2)));
  _exit(0);
}

TEST(CudaIpcTransportTest, RowsCrossBetweenProcessesBitExact) {
  int pipe_fds[2];
  ASSERT_EQ(pipe(pipe_fds), 0);
  const pid_t child = fork();
  ASSERT_GE(child, 0);
  if (child == 0) {
    close(pipe_fds[0]);
    RunReceiver(pipe_fds[1]);
  }
  close(pipe_fds[1]);
  FILE* from_child = fdopen(pipe_fds[0], "r");
  ASSERT_NE(from_child, nullptr);
  char line[512] = {};
  ASSERT_NE(fgets(line, sizeof(line), from_child), nullptr) << "the receiver exited before it started";
  const std::string first(line);
  if (first.rfind("skip", 0) == 0) {
    fclose(from_child);
    waitpid(child, nullptr, 0);
    GTEST_SKIP() << "no GPU: " << first;
  }
  ASSERT_EQ(first.rfind("port ", 0), 0u) << first;
  const std::string address = absl::StrCat("127.0.0.1:", std::stoi(first.substr(5)));

  auto backend = ops::CreateBackend("cuda");
  ASSERT_TRUE(backend.ok()) << backend.status();
  auto channels = [](const std::string& a) { return grpc::CreateChannel(a, grpc::InsecureChannelCredentials()); };
  std::unique_ptr<KvSender> sender = MakeCudaIpcSender(channels, backend->get());
  EXPECT_EQ(sender->BackendRowsFor(address), (*backend)->Name());
  for (const Case& c : Cases()) {
    SCOPED_TRACE(c.id);
    auto pool = KvPool::Create(backend->get(), kPoolPages, kPageTokens, c.head_dim, c.dtype);
    ASSERT_TRUE(pool.ok()) << pool.status();
    const KvHandoff coded = Coded(c);
    auto layout = ImportSequence(pool->get(), coded);
    ASSERT_TRUE(layout.ok()) << layout.status();
    auto handoff = ExportSequence(pool->get(), *layout, RowsIn::kBackend);
    ASSERT_TRUE(handoff.ok()) << handoff.status();
    ASSERT_NE(handoff->backend_rows, nullptr);
    handoff->transfer_id = coded.transfer_id;
    handoff->request_id = coded.request_id;
    handoff->first_token = coded.first_token;
    handoff->sampler_state = coded.sampler_state;
    handoff->eviction_policy = coded.eviction_policy;
    handoff->eviction_state = coded.eviction_state;
    auto bytes = sender->Send(address, *handoff, absl::Now() + absl::Seconds(30));
    ASSERT_TRUE(bytes.ok()) << bytes.status();
    EXPECT_EQ(*bytes, handoff->HeldBytes()) << "positions etc. over the stream, K and V copied on the GPU";
    // The same id again: the receiver refuses it and maps nothing.
    auto again = sender->Send(address, *handoff, absl::Now() + absl::Seconds(30));
    EXPECT_EQ(again.status().code(), absl::StatusCode::kAlreadyExists) << again.status();
    ASSERT_TRUE((*pool)->Release(&*layout).ok());
  }
  const std::string report = ReadAll(from_child);
  fclose(from_child);
  int status = 0;
  waitpid(child, &status, 0);
  EXPECT_TRUE(WIFEXITED(status) && WEXITSTATUS(status) == 0) << report;
  std::vector<std::string> lines = absl::StrSplit(report, '\n', absl::SkipEmpty());
  ASSERT_EQ(lines.size(), Cases().size() + 1) << report;
  for (size_t i = 0; i < Cases().size(); ++i) EXPECT_EQ(lines[i], Cases()[i].id + " ok");
  EXPECT_EQ(lines.back(), "pending_bytes 0");
}

}  // namespace
}  // namespace kvgate::kv
