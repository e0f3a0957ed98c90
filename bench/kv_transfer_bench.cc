// The KV transfer between two processes on one GPU: a compressed cache of a Llama-3-8B
// shaped model (32 layers x 8 kv heads x head_dim 128, bf16 rows) for a prompt of P
// tokens at keep ratio r, sent by the cuda_ipc transport (K and V by CUDA IPC name, the
// positions over the loopback gRPC stream) and, for comparison, by tcp (host float32
// rows, the only path before). The floor is a plain device-to-device copy of the same K
// and V bytes in the same process and run (cudaMemcpyAsync through
// Backend::CopyWithinBackend). The receiver is a forked child that serves
// kvgate.v1.KvTransfer with its own CUDA backend, takes every transfer from its inbox and
// imports it into a bf16 KV pool of its own (import_ms: delivery to rows in pages;
// received_to_pages_ms: Send plus that import, best of each).
// Prints one JSON object per line (prompt, keep, bytes, best-of-N milliseconds, GB/s).
//   kv_transfer_bench [--prompts 2048,8192,32768] [--keeps 1,0.3] [--repeats 5]
//                     [--tcp-max-prompt 8192] [--layers 32] [--kv-heads 8] [--head-dim 128]
#include <grpcpp/grpcpp.h>
#include <sys/wait.h>
#include <unistd.h>

#include <algorithm>
#include <chrono>
#include <cstdio>
#include <cstdlib>
#include <cstring>
#include <memory>
#include <string>
#include <vector>

#include "absl/strings/numbers.h"
#include "absl/strings/str_cat.h"
#include "absl/strings/str_format.h"
#include "absl/strings/str_split.h"
#include "absl/strings/ascii.h"
#include "absl/time/clock.h"
#include "cuda/backend.h"
#include "kv/kv_handoff.h"
#include "kv/kv_pool.h"
#include "kv/transport/tcp_transport.h"
#include "kvgate/v1/worker.grpc.pb.h"

namespace kvgate {
namespace {

struct Shape {
  int32_t layers = 32, kv_heads = 8, head_dim = 128;
};

double Seconds(std::chrono::steady_clock::time_point since) {
  return std::chrono::duration<double>(std::chrono::steady_clock::now() - since).count();
}

// A handoff of `kept` rows per head, positions spread over [0, prompt); K and V in
// backend memory (as ExportSequence(..., RowsIn::kBackend) leaves them) or on the host.
absl::StatusOr<kv::KvHandoff> MakeHandoff(ops::Backend* backend, const Shape& shape, int32_t prompt, int32_t kept,
                                          bool device_rows) {
  kv::KvHandoff h;
  h.request_id = "bench";
  h.num_layers = shape.layers;
  h.num_kv_heads = shape.kv_heads;
  h.head_dim = shape.head_dim;
  h.next_pos = prompt;
  h.first_token = 1;
  h.heads.resize(static_cast<size_t>(shape.layers) * shape.kv_heads);
  for (kv::HeadRows& head : h.heads) {
    head.positions.resize(static_cast<size_t>(kept));
    for (int32_t r = 0; r < kept; ++r) head.positions[r] = static_cast<int32_t>(int64_t{r} * prompt / kept);
    if (!device_rows) {
      head.k.assign(static_cast<size_t>(kept) * shape.head_dim, 0.25f);
      head.v.assign(static_cast<size_t>(kept) * shape.head_dim, -0.5f);
    }
  }
  if (device_rows) {
    auto rows = std::make_shared<kv::BackendRows>();
    rows->backend = std::string(backend->Name());
    rows->rows = int64_t{kept} * shape.layers * shape.kv_heads;
    rows->head_dim = shape.head_dim;
    rows->dtype = ops::KvDtype::kBf16;
    const size_t bytes = static_cast<size_t>(std::max<int64_t>(rows->rows, 1)) * shape.head_dim * 2;
    auto k = backend->AllocShareable(bytes);
    if (!k.ok()) return k.status();
    auto v = backend->AllocShareable(bytes);
    if (!v.ok()) return v.status();
    rows->k = *std::move(k);
    rows->v = *std::move(v);
    h.backend_rows = std::move(rows);
  }
  return h;
}

// The decode side: takes each transfer from its inbox, imports it into a bf16 pool of its
// own (the decode worker's pages) and reports on `times_fd`, one line a transfer, the
// milliseconds from the delivery to the rows in pages.
[[noreturn]] void RunReceiver(int fd, int times_fd, const Shape& shape, int64_t max_prompt) {
  auto backend = ops::CreateBackend("cuda");
  absl::StatusOr<std::unique_ptr<kv::KvPool>> pool = absl::UnavailableError("no backend");
  if (backend.ok()) {
    constexpr int32_t kPageTokens = 16;
    const int64_t pages = int64_t{shape.layers} * shape.kv_heads * ((max_prompt + kPageTokens - 1) / kPageTokens);
    pool = kv::KvPool::Create(backend->get(), static_cast<int32_t>(pages), kPageTokens, shape.head_dim,
                              ops::KvDtype::kBf16);
  }
  if (!pool.ok()) {
    const std::string line = absl::StrCat("error ", pool.status().ToString(), "\n");
    (void)!write(fd, line.data(), line.size());
    _exit(1);
  }
  kv::KvInbox inbox(int64_t{64} << 30);
  std::unique_ptr<grpc::Service> service = kv::MakeKvTransferService(&inbox, "", backend->get());
  grpc::ServerBuilder builder;
  builder.SetMaxReceiveMessageSize(64 << 20);
  int port = 0;
  builder.AddListeningPort("127.0.0.1:0", grpc::InsecureServerCredentials(), &port);
  builder.RegisterService(service.get());
  std::unique_ptr<grpc::Server> server = builder.BuildAndStart();
  const std::string line = absl::StrCat("port ", port, "\n");
  (void)!write(fd, line.data(), line.size());
  close(fd);
  for (int n = 0;; ++n) {
    auto got = inbox.Await(absl::StrCat("b-", n), absl::Now() + absl::Seconds(600));
    if (!got.ok() || got->request_id == "stop") break;
    const auto start = std::chrono::steady_clock::now();
    absl::StatusOr<kv::SequenceLayout> layout = kv::ImportSequence(pool->get(), *got);
    absl::Status synced = (*backend)->Synchronize();
    const double ms = Seconds(start) * 1e3;
    std::string report = absl::StrFormat("%.4f\n", ms);
    if (!layout.ok() || !synced.ok()) {
      report = absl::StrCat("error ", layout.ok() ? synced.ToString() : layout.status().ToString(), "\n");
    } else {
      (void)(*pool)->Release(&*layout);
    }
    *got = kv::KvHandoff();  // the rows' buffers go back before the sender's next transfer
    (void)!write(times_fd, report.data(), report.size());
  }
  server->Shutdown(absl::ToChronoTime(absl::Now() + absl::Seconds(1)));
  _exit(0);
}

// One line of the receiver's import times: milliseconds, or an error.
absl::StatusOr<double> ReadImportMs(FILE* times) {
  char line[512] = {};
  if (std::fgets(line, sizeof(line), times) == nullptr) return absl::UnavailableError("the receiver is gone");
  double ms = 0;
  if (std::strncmp(line, "error", 5) == 0 || !absl::SimpleAtod(absl::StripAsciiWhitespace(line), &ms)) {
    return absl::InternalError(absl::StrCat("receiver import: ", line));
  }
  return ms;
}

std::vector<int64_t> Ints(const std::string& csv) {
  std::vector<int64_t> out;
  for (absl::string_view part : absl::StrSplit(csv, ',', absl::SkipEmpty())) {
    int64_t v = 0;
    if (absl::SimpleAtoi(part, &v)) out.push_back(v);
  }
  return out;
}

int Main(int argc, char** argv) {
  std::vector<int64_t> prompts = {2048, 8192, 32768};
  std::vector<double> keeps = {1.0, 0.3};
  int repeats = 5;
  int64_t tcp_max_prompt = 8192;
  Shape shape;
  for (int i = 1; i + 1 < argc; i += 2) {
    const std::string flag = argv[i], value = argv[i + 1];
    if (flag == "--prompts") {
      prompts = Ints(value);
    } else if (flag == "--keeps") {
      keeps.clear();
      for (absl::string_view part : absl::StrSplit(value, ',', absl::SkipEmpty())) {
        double k = 0;
        if (absl::SimpleAtod(part, &k)) keeps.push_back(k);
      }
    } else if (flag == "--repeats") {
      repeats = std::atoi(value.c_str());
    } else if (flag == "--tcp-max-prompt") {
      tcp_max_prompt = std::atoll(value.c_str());
    } else if (flag == "--layers") {
      shape.layers = std::atoi(value.c_str());
    } else if (flag == "--kv-heads") {
      shape.kv_heads = std::atoi(value.c_str());
    } else if (flag == "--head-dim") {
      shape.head_dim = std::atoi(value.c_str());
    } else {
      std::fprintf(stderr, "unknown flag %s\n", flag.c_str());
      return 2;
    }
  }
  int pipe_fds[2], times_fds[2];
  if (pipe(pipe_fds) != 0 || pipe(times_fds) != 0) return 1;
  const int64_t max_prompt = prompts.empty() ? 1 : *std::max_element(prompts.begin(), prompts.end());
  const pid_t child = fork();
  if (child == 0) {
    close(pipe_fds[0]);
    close(times_fds[0]);
    RunReceiver(pipe_fds[1], times_fds[1], shape, max_prompt);
  }
  close(pipe_fds[1]);
  close(times_fds[1]);
  FILE* times = fdopen(times_fds[0], "r");
  char line[256] = {};
  const ssize_t n = read(pipe_fds[0], line, sizeof(line) - 1);
  close(pipe_fds[0]);
  if (n <= 5 || std::strncmp(line, "port ", 5) != 0) {
    std::fprintf(stderr, "receiver: %s\n", line);
    return 1;
  }
  const std::string address = absl::StrCat("127.0.0.1:", std::atoi(line + 5));
  auto backend = ops::CreateBackend("cuda");
  if (!backend.ok()) {
    std::fprintf(stderr, "%s\n", backend.status().ToString().c_str());
    return 1;
  }
  auto channels = [](const std::string& a) {
    grpc::ChannelArguments args;
    args.SetMaxSendMessageSize(64 << 20);
    return grpc::CreateCustomChannel(a, grpc::InsecureChannelCredentials(), args);
  };
  std::unique_ptr<kv::KvSender> ipc = kv::MakeCudaIpcSender(channels, backend->get());
  std::unique_ptr<kv::KvSender> tcp = kv::MakeTcpSender(channels);
  int transfer = 0;
  int rc = 0;
  // Seconds of Send (until the receiver holds the rows) and of the receiver's import.
  struct Timing {
    double send_s = 0, import_s = 0;
  };
  auto send = [&](kv::KvSender* sender, kv::KvHandoff* h) -> absl::StatusOr<Timing> {
    h->transfer_id = absl::StrCat("b-", transfer++);
    const auto start = std::chrono::steady_clock::now();
    auto bytes = sender->Send(address, *h, absl::Now() + absl::Seconds(300));
    if (!bytes.ok()) return bytes.status();
    Timing t;
    t.send_s = Seconds(start);
    absl::StatusOr<double> import_ms = ReadImportMs(times);
    if (!import_ms.ok()) return import_ms.status();
    t.import_s = *import_ms / 1e3;
    return t;
  };
  for (int64_t prompt : prompts) {
    for (double keep : keeps) {
      const int32_t kept = std::max<int32_t>(1, static_cast<int32_t>(prompt * keep));
      auto device = MakeHandoff(backend->get(), shape, static_cast<int32_t>(prompt), kept, true);
      if (!device.ok()) {
        std::fprintf(stderr, "%s\n", device.status().ToString().c_str());
        rc = 1;
        continue;
      }
      const kv::BackendRows& rows = *device->backend_rows;
      const int64_t kv_bytes = static_cast<int64_t>(rows.k.bytes() + rows.v.bytes());
      // The floor: the same K and V bytes copied device to device in this process.
      auto k_copy = (*backend)->Alloc(rows.k.bytes());
      auto v_copy = (*backend)->Alloc(rows.v.bytes());
      double copy_s = 1e30, ipc_s = 1e30, ipc_import_s = 1e30, tcp_s = -1;
      for (int r = 0; r < repeats + 1 && k_copy.ok() && v_copy.ok(); ++r) {
        const auto start = std::chrono::steady_clock::now();
        (void)(*backend)->CopyWithinBackend(k_copy->data(), rows.k.data(), rows.k.bytes());
        (void)(*backend)->CopyWithinBackend(v_copy->data(), rows.v.data(), rows.v.bytes());
        (void)(*backend)->Synchronize();
        if (r > 0) copy_s = std::min(copy_s, Seconds(start));  // the first warms up
      }
      for (int r = 0; r < repeats + 1; ++r) {
        auto s = send(ipc.get(), &*device);
        if (!s.ok()) {
          std::fprintf(stderr, "cuda_ipc: %s\n", s.status().ToString().c_str());
          rc = 1;
          break;
        }
        if (r > 0) ipc_s = std::min(ipc_s, s->send_s);
        if (r > 0) ipc_import_s = std::min(ipc_import_s, s->import_s);
      }
      if (prompt <= tcp_max_prompt) {
        auto host = MakeHandoff(backend->get(), shape, static_cast<int32_t>(prompt), kept, false);
        for (int r = 0; host.ok() && r < std::min(repeats, 2) + 1; ++r) {
          auto s = send(tcp.get(), &*host);
          if (!s.ok()) {
            std::fprintf(stderr, "tcp: %s\n", s.status().ToString().c_str());
            rc = 1;
            break;
          }
          if (r > 0) tcp_s = tcp_s < 0 ? s->send_s : std::min(tcp_s, s->send_s);
        }
      }
      const int64_t stream_bytes = device->PayloadBytes();
      std::printf(
          "{\"prompt\": %lld, \"keep\": %.2f, \"rows_per_head\": %d, \"kv_bytes\": %lld, \"stream_bytes\": %lld, "
          "\"d2d_copy_ms\": %.3f, \"cuda_ipc_ms\": %.3f, \"tcp_host_rows_ms\": %.3f, \"d2d_copy_gbps\": %.1f, "
          "\"cuda_ipc_gbps\": %.1f, \"cuda_ipc_vs_copy\": %.3f, \"import_ms\": %.3f, "
          "\"received_to_pages_ms\": %.3f}\n",
          static_cast<long long>(prompt), keep, kept, static_cast<long long>(kv_bytes),
          static_cast<long long>(stream_bytes), copy_s * 1e3, ipc_s * 1e3, tcp_s * 1e3, kv_bytes / copy_s / 1e9,
          kv_bytes / ipc_s / 1e9, copy_s / ipc_s, ipc_import_s * 1e3, (ipc_s + ipc_import_s) * 1e3);
      std::fflush(stdout);
    }
  }
  kv::KvHandoff stop;
  stop.request_id = "stop";
  stop.num_layers = 1;
  stop.num_kv_heads = 1;
  stop.head_dim = 1;
  stop.heads.resize(1);
  (void)send(tcp.get(), &stop);
  int status = 0;
  waitpid(child, &status, 0);
  return rc;
}

}  // namespace
}  // namespace kvgate

int main(int argc, char** argv) { return kvgate::Main(argc, argv); }
