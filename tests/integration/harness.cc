#include "tests/integration/harness.h"

#include <arpa/inet.h>
#include <sys/wait.h>
#include <netinet/in.h>
#include <sys/socket.h>
#include <unistd.h>

#include <chrono>
#include <csignal>
#include <cstdio>
#include <cstdlib>
#include <filesystem>
#include <fstream>
#include <future>
#include <random>
#include <sstream>
#include <thread>

#include <google/protobuf/unknown_field_set.h>
#include <grpc/grpc.h>
#include <grpcpp/generic/generic_stub.h>
#include <gtest/gtest.h>

#include "absl/strings/match.h"
#include "absl/strings/numbers.h"
#include "absl/strings/str_cat.h"
#include "absl/strings/str_split.h"
#include "common/status_macros.h"
#include "cuda/backend.h"
#include "gates/attention_gate.h"
#include "gates/fast_kvzip.h"
#include "gates/policy.h"
#include "kv/kv_pool.h"
#include "kv/policy_planner.h"
#include "tests/testing/paths.h"

namespace kvgate::integration {

std::string ModelDir() { return testing::KvgateTinyDir(); }

const std::string& InternalToken() {
  static const std::string* const token = [] {
    std::random_device rd;
    return new std::string(absl::StrCat("itok-", rd(), "-", rd(), "-", rd()));
  }();
  return *token;
}

const std::string& InternalTokenFile() {
  static const std::string* const path = [] {
    const std::filesystem::path file = testing::MakeTempDir("kvgate-internal-token") / "token";
    std::ofstream(file) << InternalToken() << "\n";
    return new std::string(file.string());
  }();
  return *path;
}

std::string ToString(const grpc::Status& status) {
  return absl::StrCat(absl::StatusCodeToString(static_cast<absl::StatusCode>(status.error_code())), ": ",
                      status.error_message());
}

// ---- Deployments ----------------------------------------------------------------------

namespace {

void Append(std::vector<std::string>* to, const std::vector<std::string>& more) {
  to->insert(to->end(), more.begin(), more.end());
}

std::vector<std::string> Common(const DeploymentOptions& o) {
  std::vector<std::string> args = {"--host", "127.0.0.1", "--port", "0", "--shutdown-grace-ms", "300"};
  if (o.split) Append(&args, {"--internal-token-file", InternalTokenFile()});
  if (o.metrics) Append(&args, {"--metrics-port", "0"});
  Append(&args, o.extra_args);
  return args;
}

std::vector<std::string> ModelArgs() {
  return {"--model", ModelDir(), "--random-gates", std::to_string(kGateSeed)};
}

}  // namespace

absl::StatusOr<std::unique_ptr<Deployment>> Deployment::Start(const DeploymentOptions& options) {
  auto d = std::unique_ptr<Deployment>(new Deployment());
  d->options_ = options;
  auto start = [&](const std::string& name, std::vector<std::string> args) -> absl::StatusOr<Process*> {
    KVGATE_ASSIGN_OR_RETURN(std::unique_ptr<Process> p, Process::Start(name, std::move(args)));
    d->processes_.push_back(std::move(p));
    return d->processes_.back().get();
  };
  auto listen = [&](Process* p) -> absl::Status {
    KVGATE_ASSIGN_OR_RETURN(int port, p->WaitListening());
    d->ports_[p] = port;
    return absl::OkStatus();
  };
  if (!options.split) {
    std::vector<std::string> args = {"serve", "--transport", options.transport};
    Append(&args, ModelArgs());
    Append(&args, Common(options));
    Append(&args, options.router_args);
    Append(&args, options.prefill_args);
    Append(&args, options.decode_args);
    KVGATE_ASSIGN_OR_RETURN(Process * serve, start("serve", args));
    KVGATE_RETURN_IF_ERROR(listen(serve));
  } else {
    std::vector<std::string> args = {"kv-manager"};
    Append(&args, Common(options));
    KVGATE_ASSIGN_OR_RETURN(Process * manager, start("kv-manager", args));
    KVGATE_RETURN_IF_ERROR(listen(manager));
    const std::vector<std::string> to_manager = {"--kv-manager", absl::StrCat("127.0.0.1:", d->ports_[manager])};
    std::vector<Process*> roles;
    for (const char* role : {"prefill", "decode", "router"}) {
      std::vector<std::string> role_args = {role};
      Append(&role_args, ModelArgs());
      Append(&role_args, to_manager);
      Append(&role_args, Common(options));
      const std::string r = role;
      Append(&role_args, r == "prefill" ? options.prefill_args : r == "decode" ? options.decode_args : options.router_args);
      KVGATE_ASSIGN_OR_RETURN(Process * p, start(role, role_args));
      roles.push_back(p);
    }
    for (Process* p : roles) KVGATE_RETURN_IF_ERROR(listen(p));
  }
  d->channel_ = Connect(d->address(), options.credentials);
  d->stub_ = v1::Inference::NewStub(d->channel_);
  if (options.wait_ready) {
    for (const auto& p : d->processes_) {
      std::shared_ptr<grpc::Channel> channel = p.get() == &d->router() ? d->channel_ : Connect(d->Address(*p), options.credentials);
      const bool serving = PollUntil(
          [&] {
            absl::StatusOr<int> health = HealthStatus(channel, absl::Milliseconds(500));
            return health.ok() && *health == kServing;
          },
          absl::Seconds(20));
      if (!serving) {
        return absl::DeadlineExceededError(
            absl::StrCat(p->name(), " did not report SERVING within 20 s; logs:\n", d->Logs()));
      }
    }
    // The decode pool is visible once a heartbeat carried it.
    const std::string token = [&] {
      if (!options.token.empty()) return options.token;
      for (size_t i = 0; i + 1 < options.extra_args.size(); ++i) {
        if (options.extra_args[i] == "--token") return options.extra_args[i + 1];
      }
      for (size_t i = 0; i + 1 < options.router_args.size(); ++i) {
        if (options.router_args[i] == "--token") return options.router_args[i + 1];
      }
      return std::string();
    }();
    absl::StatusOr<v1::ServerInfo> info = WaitServerInfo(*d->stub_, Idle, absl::Seconds(20), token);
    if (!info.ok() || !Idle(*info)) {
      return absl::DeadlineExceededError(absl::StrCat("the deployment did not become idle with its decode pool visible: ",
                                                      info.ok() ? Describe(*info) : info.status().ToString(),
                                                      "\nlogs:\n", d->Logs()));
    }
  }
  return d;
}

Deployment::~Deployment() {
  // Reverse order: the router first, the KV manager last.
  for (auto it = processes_.rbegin(); it != processes_.rend(); ++it) (*it)->Signal(SIGTERM);
  for (auto it = processes_.rbegin(); it != processes_.rend(); ++it) {
    Process& p = **it;
    const bool killed_by_test = p.killed();
    const int status = p.Stop(absl::Seconds(5));
    // A server asked to stop exits 0 (its grace is 300 ms; the metrics server takes up to
    // 2 s to stop).
    if (!killed_by_test && !(WIFEXITED(status) && WEXITSTATUS(status) == 0)) {
      ADD_FAILURE() << p.name() << " (pid " << p.pid() << ") did not shut down cleanly on SIGTERM: "
                    << (p.killed() ? "still running after 5 s" : Process::DescribeStatus(status)) << "; output:\n"
                    << p.Output();
    }
  }
}

Process* Deployment::manager() const { return options_.split ? processes_[0].get() : nullptr; }
Process* Deployment::prefill() const { return options_.split ? processes_[1].get() : nullptr; }
Process* Deployment::decode() const { return options_.split ? processes_[2].get() : nullptr; }

int Deployment::port(const Process& p) const {
  auto it = ports_.find(&p);
  return it == ports_.end() ? 0 : it->second;
}

std::string Deployment::Address(const Process& p) const { return absl::StrCat("127.0.0.1:", port(p)); }

absl::Status Deployment::RestartManager() {
  if (!options_.split) return absl::FailedPreconditionError("RestartManager needs a split deployment");
  const int old_port = port(*processes_[0]);
  processes_[0]->Stop(absl::Seconds(1));
  std::vector<std::string> args = {"kv-manager"};
  Append(&args, Common(options_));
  for (size_t i = 0; i < args.size(); ++i) {
    if (args[i] == "--port") args[i + 1] = std::to_string(old_port);
  }
  KVGATE_ASSIGN_OR_RETURN(std::unique_ptr<Process> manager, Process::Start("kv-manager (restarted)", args));
  KVGATE_ASSIGN_OR_RETURN(int port, manager->WaitListening());
  if (port != old_port) return absl::InternalError(absl::StrCat("restarted manager listens on ", port, ", not ", old_port));
  ports_.erase(processes_[0].get());
  ports_[manager.get()] = port;
  processes_[0] = std::move(manager);
  return absl::OkStatus();
}

std::string Deployment::Logs() const {
  std::string out;
  for (const auto& p : processes_) {
    absl::StrAppend(&out, "---- ", p->name(), " (pid ", p->pid(), ", port ", port(*p), ") ----\n", p->Output());
  }
  return out;
}

// ---- Client ---------------------------------------------------------------------------

std::shared_ptr<grpc::Channel> Connect(const std::string& address,
                                       std::shared_ptr<grpc::ChannelCredentials> credentials) {
  // gRPC stays initialized for the whole test binary: otherwise destroying the last
  // channel runs grpc_shutdown, which waits up to 10 s for an idle executor thread.
  static const bool initialized = [] {
    grpc_init();
    return true;
  }();
  (void)initialized;
  if (!credentials) credentials = grpc::InsecureChannelCredentials();
  grpc::ChannelArguments args;
  args.SetMaxReceiveMessageSize(64 << 20);
  args.SetInt(GRPC_ARG_INITIAL_RECONNECT_BACKOFF_MS, 100);
  args.SetInt(GRPC_ARG_MIN_RECONNECT_BACKOFF_MS, 100);
  args.SetInt(GRPC_ARG_MAX_RECONNECT_BACKOFF_MS, 500);
  // Each channel its own connection (the concurrency test wants real parallel sockets
  // sometimes; it never hurts here).
  args.SetInt(GRPC_ARG_USE_LOCAL_SUBCHANNEL_POOL, 1);
  return grpc::CreateCustomChannel(address, credentials, args);
}

namespace {

void AddToken(grpc::ClientContext* ctx, const std::string& token) {
  if (!token.empty()) ctx->AddMetadata("authorization", "Bearer " + token);
}

}  // namespace

CallOptions Within(absl::Duration timeout, std::string token) {
  CallOptions options;
  options.timeout = timeout;
  options.token = std::move(token);
  return options;
}

absl::Duration ScaledPatience(absl::Duration d) {
  const char* scale = std::getenv("KVGATE_TEST_TIME_SCALE");
  double factor = 1.0;
  if (scale != nullptr && absl::SimpleAtod(scale, &factor) && factor >= 1.0) return d * factor;
  return d;
}

StreamResult Generate(v1::Inference::Stub& stub, const v1::GenerateRequest& request, const CallOptions& options) {
  StreamResult result;
  grpc::ClientContext ctx;
  ctx.set_deadline(absl::ToChronoTime(absl::Now() + ScaledPatience(options.timeout)));
  AddToken(&ctx, options.token);
  const absl::Time start = absl::Now();
  std::unique_ptr<grpc::ClientReader<v1::GenerateResponse>> reader = stub.Generate(&ctx, request);
  v1::GenerateResponse message;
  while (reader->Read(&message)) {
    if (result.complete.has_value()) ++result.messages_after_complete;
    if (message.has_chunk()) {
      ++result.chunks;
      result.tokens.insert(result.tokens.end(), message.chunk().token_ids().begin(), message.chunk().token_ids().end());
      result.text += message.chunk().text();
      if (options.on_chunk) options.on_chunk(&ctx, result);
    } else if (message.has_complete()) {
      result.complete = message.complete();
    }
  }
  result.status = reader->Finish();
  result.elapsed = absl::Now() - start;
  return result;
}

absl::StatusOr<v1::ServerInfo> GetServerInfo(v1::Inference::Stub& stub, const std::string& token,
                                             const std::vector<std::string>& request_ids) {
  grpc::ClientContext ctx;
  ctx.set_deadline(absl::ToChronoTime(absl::Now() + absl::Seconds(5)));
  AddToken(&ctx, token);
  v1::ServerInfo info;
  v1::GetServerInfoRequest request;
  for (const std::string& id : request_ids) request.add_request_ids(id);
  grpc::Status s = stub.GetServerInfo(&ctx, request, &info);
  if (!s.ok()) return absl::Status(static_cast<absl::StatusCode>(s.error_code()), s.error_message());
  return info;
}

absl::StatusOr<v1::ModelInfo> GetModelInfo(v1::Inference::Stub& stub, const std::string& token) {
  grpc::ClientContext ctx;
  ctx.set_deadline(absl::ToChronoTime(absl::Now() + absl::Seconds(5)));
  AddToken(&ctx, token);
  v1::ModelInfo info;
  grpc::Status s = stub.GetModelInfo(&ctx, v1::GetModelInfoRequest(), &info);
  if (!s.ok()) return absl::Status(static_cast<absl::StatusCode>(s.error_code()), s.error_message());
  return info;
}

bool PollUntil(const std::function<bool()>& predicate, absl::Duration timeout) {
  const absl::Time deadline = absl::Now() + timeout;
  while (true) {
    if (predicate()) return true;
    if (absl::Now() >= deadline) return false;
    std::this_thread::sleep_for(std::chrono::milliseconds(20));
  }
}

absl::StatusOr<v1::ServerInfo> WaitServerInfo(v1::Inference::Stub& stub,
                                              const std::function<bool(const v1::ServerInfo&)>& predicate,
                                              absl::Duration timeout, const std::string& token,
                                              const std::vector<std::string>& request_ids) {
  absl::StatusOr<v1::ServerInfo> last = absl::DeadlineExceededError("no ServerInfo yet");
  PollUntil(
      [&] {
        last = GetServerInfo(stub, token, request_ids);
        return last.ok() && predicate(*last);
      },
      timeout);
  return last;
}

v1::RequestState::Phase PhaseOf(const v1::ServerInfo& info, const std::string& request_id) {
  for (const v1::RequestState& r : info.requests()) {
    if (r.request_id() == request_id) return r.phase();
  }
  return v1::RequestState::PHASE_UNSPECIFIED;
}

bool Idle(const v1::ServerInfo& info) {
  return info.kv_pages_total() > 0 && info.kv_pages_free() == info.kv_pages_total() && info.leases_active() == 0 &&
         info.transfers_active() == 0 && info.requests_in_flight() == 0;
}

std::string Describe(const v1::ServerInfo& info) {
  std::string out = absl::StrCat("kv_pages_free ", info.kv_pages_free(), "/", info.kv_pages_total(), ", leases_active ",
                                 info.leases_active(), ", transfers_active ", info.transfers_active(),
                                 ", requests_in_flight ", info.requests_in_flight(), ", requests_total ",
                                 info.requests_total());
  int shown = 0;
  for (const v1::RequestState& r : info.requests()) {
    if (r.phase() == v1::RequestState::DONE) continue;
    if (++shown > 20) {
      absl::StrAppend(&out, " ...");
      break;
    }
    absl::StrAppend(&out, "; ", r.request_id(), "=", v1::RequestState::Phase_Name(r.phase()), " (pages ",
                    r.pages_held(), ")");
  }
  return out;
}

namespace {

grpc::ByteBuffer Bytes(const std::string& data) {
  grpc::Slice slice(data);
  return grpc::ByteBuffer(&slice, 1);
}

std::string String(const grpc::ByteBuffer& buffer) {
  std::vector<grpc::Slice> slices;
  (void)buffer.Dump(&slices);
  std::string out;
  for (const grpc::Slice& s : slices) out.append(reinterpret_cast<const char*>(s.begin()), s.size());
  return out;
}

absl::Status FromGrpc(const grpc::Status& s) {
  return absl::Status(static_cast<absl::StatusCode>(s.error_code()), s.error_message());
}

}  // namespace

absl::StatusOr<int> HealthStatus(const std::shared_ptr<grpc::Channel>& channel, absl::Duration timeout,
                                 const std::string& service) {
  grpc::GenericStub stub(channel);
  grpc::ClientContext ctx;
  ctx.set_deadline(absl::ToChronoTime(absl::Now() + timeout));
  // HealthCheckRequest{service = 1}: empty for the whole server.
  std::string encoded;
  if (!service.empty()) {
    encoded.push_back('\x0a');
    encoded.push_back(static_cast<char>(service.size()));  // names under 128 bytes
    encoded += service;
  }
  const grpc::ByteBuffer request = Bytes(encoded);
  grpc::ByteBuffer response;
  std::promise<grpc::Status> done;
  stub.UnaryCall(&ctx, "/grpc.health.v1.Health/Check", grpc::StubOptions(), &request, &response,
                 [&done](grpc::Status s) { done.set_value(std::move(s)); });
  grpc::Status s = done.get_future().get();
  if (!s.ok()) return FromGrpc(s);
  // HealthCheckResponse{ServingStatus status = 1}.
  google::protobuf::UnknownFieldSet fields;
  if (!fields.ParseFromString(String(response))) return absl::DataLossError("unparsable HealthCheckResponse");
  for (int i = 0; i < fields.field_count(); ++i) {
    if (fields.field(i).number() == 1 && fields.field(i).type() == google::protobuf::UnknownField::TYPE_VARINT) {
      return static_cast<int>(fields.field(i).varint());
    }
  }
  return 0;  // UNKNOWN (the default value is not on the wire)
}

absl::StatusOr<std::vector<std::string>> ReflectionServices(const std::shared_ptr<grpc::Channel>& channel,
                                                            const std::string& version) {
  grpc::GenericStub stub(channel);
  grpc::CompletionQueue cq;
  grpc::ClientContext ctx;
  ctx.set_deadline(absl::ToChronoTime(absl::Now() + absl::Seconds(5)));
  std::unique_ptr<grpc::GenericClientAsyncReaderWriter> call =
      stub.PrepareCall(&ctx, absl::StrCat("/grpc.reflection.", version, ".ServerReflection/ServerReflectionInfo"), &cq);
  if (!call) return absl::InternalError("PrepareCall failed");
  auto step = [&](auto&& start, const char* what) -> absl::Status {
    void* tag = nullptr;
    bool ok = false;
    start();
    if (!cq.Next(&tag, &ok) || !ok) return absl::UnavailableError(absl::StrCat("reflection call: ", what, " failed"));
    return absl::OkStatus();
  };
  int tag = 0;
  KVGATE_RETURN_IF_ERROR(step([&] { call->StartCall(&tag); }, "start"));
  // ServerReflectionRequest{list_services = ""}: field 7, length-delimited, empty.
  const grpc::ByteBuffer request = Bytes(std::string("\x3a\x00", 2));
  KVGATE_RETURN_IF_ERROR(step([&] { call->Write(request, &tag); }, "write"));
  KVGATE_RETURN_IF_ERROR(step([&] { call->WritesDone(&tag); }, "writes done"));
  grpc::ByteBuffer response;
  absl::Status read = step([&] { call->Read(&response, &tag); }, "read");
  grpc::Status status;
  KVGATE_RETURN_IF_ERROR(step([&] { call->Finish(&status, &tag); }, "finish"));
  cq.Shutdown();
  void* ignored_tag;
  bool ignored_ok;
  while (cq.Next(&ignored_tag, &ignored_ok)) {
  }
  if (!status.ok()) return FromGrpc(status);
  KVGATE_RETURN_IF_ERROR(read);
  // ServerReflectionResponse{list_services_response = 6: ListServiceResponse{service = 1:
  // ServiceResponse{name = 1}}}.
  google::protobuf::UnknownFieldSet top;
  if (!top.ParseFromString(String(response))) return absl::DataLossError("unparsable ServerReflectionResponse");
  std::vector<std::string> names;
  for (int i = 0; i < top.field_count(); ++i) {
    if (top.field(i).number() == 7) return absl::InternalError("reflection answered with an error_response");
    if (top.field(i).number() != 6) continue;
    google::protobuf::UnknownFieldSet list;
    if (!list.ParseFromString(top.field(i).length_delimited())) return absl::DataLossError("bad ListServiceResponse");
    for (int j = 0; j < list.field_count(); ++j) {
      if (list.field(j).number() != 1) continue;
      google::protobuf::UnknownFieldSet service;
      if (!service.ParseFromString(list.field(j).length_delimited())) return absl::DataLossError("bad ServiceResponse");
      for (int k = 0; k < service.field_count(); ++k) {
        if (service.field(k).number() == 1) names.push_back(service.field(k).length_delimited());
      }
    }
  }
  return names;
}

absl::StatusOr<std::string> HttpGet(int port, const std::string& path) {
  const int fd = socket(AF_INET, SOCK_STREAM | SOCK_CLOEXEC, 0);
  if (fd < 0) return absl::InternalError("socket failed");
  timeval tv{5, 0};
  setsockopt(fd, SOL_SOCKET, SO_RCVTIMEO, &tv, sizeof(tv));
  setsockopt(fd, SOL_SOCKET, SO_SNDTIMEO, &tv, sizeof(tv));
  sockaddr_in addr{};
  addr.sin_family = AF_INET;
  addr.sin_port = htons(static_cast<uint16_t>(port));
  addr.sin_addr.s_addr = htonl(INADDR_LOOPBACK);
  if (connect(fd, reinterpret_cast<sockaddr*>(&addr), sizeof(addr)) != 0) {
    close(fd);
    return absl::UnavailableError(absl::StrCat("connect 127.0.0.1:", port, " failed"));
  }
  const std::string request = absl::StrCat("GET ", path, " HTTP/1.0\r\nHost: 127.0.0.1\r\nConnection: close\r\n\r\n");
  if (send(fd, request.data(), request.size(), MSG_NOSIGNAL) != static_cast<ssize_t>(request.size())) {
    close(fd);
    return absl::UnavailableError("send failed");
  }
  std::string response;
  char buffer[8192];
  while (true) {
    const ssize_t n = recv(fd, buffer, sizeof(buffer), 0);
    if (n <= 0) break;
    response.append(buffer, static_cast<size_t>(n));
  }
  close(fd);
  const size_t body = response.find("\r\n\r\n");
  if (!absl::StartsWith(response, "HTTP/1.") || body == std::string::npos) {
    return absl::DataLossError(absl::StrCat("not an HTTP response: ", response.substr(0, 200)));
  }
  if (response.find(" 200 ") == std::string::npos || response.find(" 200 ") > response.find("\r\n")) {
    return absl::UnavailableError(absl::StrCat("HTTP status line: ", response.substr(0, response.find("\r\n"))));
  }
  return response.substr(body + 4);
}

std::optional<double> MetricValue(const std::string& exposition, const std::string& name) {
  for (absl::string_view line : absl::StrSplit(exposition, '\n')) {
    if (!absl::StartsWith(line, name) || line.size() <= name.size() || line[name.size()] != ' ') continue;
    double value = 0;
    std::vector<absl::string_view> parts = absl::StrSplit(line.substr(name.size() + 1), ' ', absl::SkipEmpty());
    if (!parts.empty() && absl::SimpleAtod(parts[0], &value)) return value;
  }
  return std::nullopt;
}

std::optional<double> AwaitPrefillPagesFree(Deployment& d, absl::Duration timeout) {
  std::optional<double> pages;
  if (!d.prefill()->metrics_port().has_value()) return pages;
  PollUntil(
      [&] {
        absl::StatusOr<std::string> body = HttpGet(*d.prefill()->metrics_port(), "/metrics");
        pages = body.ok() ? MetricValue(*body, "kvgate_kv_pages_used{role=\"prefill\"}") : std::nullopt;
        return pages.has_value() && *pages == 0;
      },
      timeout);
  return pages;
}

// ---- Requests and the offline reference -------------------------------------------------

std::vector<int32_t> StoryPrompt(const engine::Tokenizer& tokenizer, int32_t tokens, int32_t variant) {
  static const char* const kParagraphs[] = {
      "Once upon a time, there was a little girl named Lily. She loved to play outside in the park with her "
      "dog, Max. One day, Lily saw a big red ball under a tree. She ran to get it, but Max got there first. ",
      "Tom was a happy boy who liked to build things. He had a box of blocks and a little toy truck. Every "
      "morning he made a tall tower and every evening his sister Sue knocked it down and laughed. ",
      "The sun was warm and the sky was blue. A small bird sat on a branch and sang a sweet song. A cat "
      "looked up at the bird and wanted to be its friend, so it climbed the tree very slowly. ",
      "Mom baked a big cake for the party. It had pink frosting and yellow candles. The children sat around "
      "the table and sang. Ben wanted the first piece, but he shared it with his friend Amy. ",
      "In the forest lived a wise old owl. The animals came to him when they had a problem. One day a sad "
      "rabbit said it had lost its way home. The owl smiled and showed the rabbit the path by the river. ",
  };
  constexpr int kCount = sizeof(kParagraphs) / sizeof(kParagraphs[0]);
  std::string text;
  std::vector<int32_t> ids;
  for (int i = 0; static_cast<int32_t>(ids.size()) < tokens + 1; ++i) {
    text += kParagraphs[(variant + i) % kCount];
    ids = *tokenizer.Encode(text);
  }
  ids.resize(static_cast<size_t>(tokens));
  return ids;
}

std::string Case::Name() const {
  return absl::StrCat(policy, keep_ratio > 0 ? absl::StrCat("@", keep_ratio) : "", text.empty() ? "/ids" : "/text",
                      prompt.size(), "/max",
                      max_tokens, ignore_eos ? "/ignore_eos" : "");
}

v1::GenerateRequest Case::Request() const {
  v1::GenerateRequest r;
  r.set_request_id(request_id);
  if (!text.empty()) {
    r.set_text(text);
  } else {
    r.mutable_tokens()->mutable_ids()->Add(prompt.begin(), prompt.end());
  }
  r.mutable_sampling()->set_max_tokens(max_tokens);
  r.mutable_sampling()->set_temperature(0);
  r.mutable_sampling()->set_ignore_eos(ignore_eos);
  r.mutable_compression()->set_policy(policy);
  if (keep_ratio > 0) r.mutable_compression()->set_keep_ratio(keep_ratio);
  return r;
}

engine::GenerateOptions Case::Options() const {
  engine::GenerateOptions o;
  o.max_tokens = max_tokens;
  o.ignore_eos = ignore_eos;
  o.sampling.temperature = 0;
  return o;
}

gates::EvictionSpec Case::Spec() const {
  gates::EvictionSpec spec;
  spec.policy = policy;
  spec.keep_ratio = keep_ratio;
  return spec;
}

absl::StatusOr<std::unique_ptr<OfflineReference>> OfflineReference::Load() {
  auto ref = std::make_unique<OfflineReference>();
  KVGATE_ASSIGN_OR_RETURN(ref->backend_, ops::CreateBackend("cpu"));
  KVGATE_ASSIGN_OR_RETURN(ref->model_, engine::Model::Load(ModelDir(), ref->backend_.get()));
  KVGATE_ASSIGN_OR_RETURN(ref->tokenizer_, engine::Tokenizer::FromFile(ModelDir() + "/tokenizer.json"));
  return ref;
}

absl::StatusOr<engine::GenerateResult> OfflineReference::Run(const Case& c) {
  // As cli/generate_command.cc: a pool for this one request, 16-token pages (the servers'
  // --page-tokens default).
  constexpr int32_t kPageTokens = 16;
  const engine::ModelConfig& m = model_->config();
  const int32_t max_rows = static_cast<int32_t>(c.prompt.size()) + c.max_tokens;
  const int32_t pages = m.num_layers * m.num_kv_heads * ((max_rows + kPageTokens - 1) / kPageTokens + 1);
  KVGATE_ASSIGN_OR_RETURN(std::unique_ptr<kv::KvPool> pool, kv::KvPool::Create(backend_.get(), pages, kPageTokens, m.head_dim));
  // The gates `--random-gates kGateSeed` gives a worker (kv/worker/worker_runtime.cc).
  const gates::ModelShape shape{m.num_layers, m.num_heads, m.num_kv_heads, m.head_dim, m.hidden_size};
  gates::PolicyOptions options;
  options.fast_kvzip_gate = gates::FastKvzipGate::CreateRandom(shape, kGateSeed);
  options.attention_gate = gates::AttentionGate::CreateRandom(shape, kGateSeed);
  KVGATE_ASSIGN_OR_RETURN(std::unique_ptr<engine::KvPlanner> planner,
                          kv::CreatePolicyPlanner(*model_, pool.get(), c.Spec(), options, tokenizer_.get()));
  engine::Generator generator(model_.get(), tokenizer_.get());
  return generator.Generate(c.prompt, c.Options(), nullptr, planner.get());
}

OfflineReference& Reference() {
  static OfflineReference* const reference = [] {
    absl::StatusOr<std::unique_ptr<OfflineReference>> loaded = OfflineReference::Load();
    if (!loaded.ok()) {
      std::fprintf(stderr, "loading the offline reference from %s: %s\n", ModelDir().c_str(),
                   loaded.status().ToString().c_str());
      std::abort();
    }
    return loaded->release();
  }();
  return *reference;
}

}  // namespace kvgate::integration
