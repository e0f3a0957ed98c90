// Only the router faces clients (issue 9, item 5). Each attack that once worked from an
// outsider's gRPC client is replayed while a victim's authenticated stream runs, and
// must be refused with the victim's stream untouched (it completes with exactly the
// offline reference's tokens):
//   - KvManager.RegisterWorker of a fake prefill + decode worker (prompt hijack), and of
//     the real decode worker's id with a dead address;
//   - KvManager.Admit + RenewLease (capacity hogging); KvManager.Abort / Finish,
//     DecodeWorker.AbortRequest, PrefillWorker.AbortRequest (killing the stream);
//   - KvTransfer.Push of a 1 GiB header (inbox pinning / poisoning);
//   - KvManager.GetServerInfo, Inference.GetServerInfo (request ids), and
//     PrefillWorker.Prefill (skipping the router's checks).
// On `kvgate serve` the internal services are not on the public port at all
// (UNIMPLEMENTED); on a split deployment their ports refuse calls without the internal
// token (UNAUTHENTICATED), even with the clients' token. The public API needs the
// client token on every RPC, accepts the scheme in any case, reads the token from a file
// or the environment, and the metrics endpoint binds loopback.
#include <sys/wait.h>

#include <cstdio>
#include <cstdlib>
#include <filesystem>
#include <fstream>
#include <sstream>

#include <gtest/gtest.h>

#include "absl/strings/match.h"
#include "absl/strings/str_cat.h"
#include "absl/strings/str_format.h"
#include "absl/strings/str_split.h"
#include "kvgate/v1/kv_manager.grpc.pb.h"
#include "kvgate/v1/worker.grpc.pb.h"
#include "tests/integration/harness.h"
#include "tests/testing/paths.h"

namespace kvgate::integration {
namespace {

constexpr char kToken[] = "client-secret-7f3a";

std::string TokenFile() {
  static const std::string* const path = [] {
    const std::filesystem::path file = testing::MakeTempDir("kvgate-client-token") / "token";
    std::ofstream(file) << kToken << "\n";
    return new std::string(file.string());
  }();
  return *path;
}

Case VictimCase(const std::string& request_id) {
  Case c;
  c.policy = "snapkv";
  c.keep_ratio = 0.5f;
  c.prompt = StoryPrompt(Reference().tokenizer(), 60, 2);
  c.max_tokens = 48;
  c.ignore_eos = true;
  c.request_id = request_id;
  return c;
}

// One attack: its name and how the server answered.
struct Outcome {
  std::string name;
  grpc::Status status;
};

// A context as the attacker sends it: a short deadline and, when given, the clients'
// bearer token (which must not open internal services).
void Prepare(grpc::ClientContext* ctx, const std::string& bearer) {
  ctx->set_deadline(absl::ToChronoTime(absl::Now() + absl::Seconds(5)));
  if (!bearer.empty()) ctx->AddMetadata("authorization", "Bearer " + bearer);
}

v1::RegisterWorkerRequest FakeWorker(const std::string& id, v1::WorkerRole role, const std::string& address) {
  v1::RegisterWorkerRequest r;
  r.set_worker_id(id);
  r.set_role(role);
  r.set_address(address);
  r.set_model_name("tinystories-656k");
  r.set_num_layers(1);
  r.set_num_kv_heads(1);
  r.set_head_dim(1);
  r.set_page_tokens(16);
  r.mutable_capacity()->set_kv_pages_total(1 << 20);
  r.mutable_capacity()->set_kv_pages_free(1 << 20);
  r.mutable_capacity()->set_serving(true);
  r.add_transports("tcp");
  return r;
}

// Every KvManager attack against `manager`.
std::vector<Outcome> AttackManager(const std::shared_ptr<grpc::Channel>& manager, const std::string& bearer,
                                   const std::string& victim_id, const std::string& real_decode_id) {
  auto stub = v1::KvManager::NewStub(manager);
  std::vector<Outcome> out;
  auto call = [&](const std::string& name, auto&& rpc) {
    grpc::ClientContext ctx;
    Prepare(&ctx, bearer);
    out.push_back({name, rpc(&ctx)});
  };
  // Not a structured binding: clang 14 cannot capture one in the lambda below.
  for (const auto& fake : {std::pair<std::string, v1::WorkerRole>{"evil/prefill", v1::PREFILL},
                           std::pair<std::string, v1::WorkerRole>{"evil/decode", v1::DECODE}}) {
    const std::string& id = fake.first;
    const v1::WorkerRole role = fake.second;
    call("KvManager.RegisterWorker " + id, [&](grpc::ClientContext* ctx) {
      v1::RegisterWorkerResponse r;
      return stub->RegisterWorker(ctx, FakeWorker(id, role, "127.0.0.1:9"), &r);
    });
  }
  call("KvManager.RegisterWorker (the real decode id, a dead address)", [&](grpc::ClientContext* ctx) {
    v1::RegisterWorkerResponse r;
    return stub->RegisterWorker(ctx, FakeWorker(real_decode_id, v1::DECODE, "127.0.0.1:9"), &r);
  });
  call("KvManager.Admit", [&](grpc::ClientContext* ctx) {
    v1::AdmitRequest a;
    a.set_request_id("hog");
    a.set_prompt_tokens(2000);
    a.set_max_tokens(2000);
    v1::Ticket t;
    return stub->Admit(ctx, a, &t);
  });
  call("KvManager.RenewLease", [&](grpc::ClientContext* ctx) {
    v1::RenewLeaseRequest r;
    r.set_lease_id("x-l1");
    v1::RenewLeaseResponse resp;
    return stub->RenewLease(ctx, r, &resp);
  });
  call("KvManager.Abort", [&](grpc::ClientContext* ctx) {
    v1::AbortRequest r;
    r.set_request_id(victim_id);
    v1::AbortResponse resp;
    return stub->Abort(ctx, r, &resp);
  });
  call("KvManager.Finish", [&](grpc::ClientContext* ctx) {
    v1::FinishRequest r;
    r.set_request_id(victim_id);
    r.set_phase(v1::RequestState::FAILED);
    v1::FinishResponse resp;
    return stub->Finish(ctx, r, &resp);
  });
  call("KvManager.GetServerInfo", [&](grpc::ClientContext* ctx) {
    v1::ServerInfo info;
    return stub->GetServerInfo(ctx, v1::GetServerInfoRequest(), &info);
  });
  return out;
}

std::vector<Outcome> AttackPrefill(const std::shared_ptr<grpc::Channel>& prefill, const std::string& bearer,
                                   const std::string& victim_id) {
  auto stub = v1::PrefillWorker::NewStub(prefill);
  std::vector<Outcome> out;
  {
    grpc::ClientContext ctx;
    Prepare(&ctx, bearer);
    v1::WorkerAbortRequest r;
    r.set_request_id(victim_id);
    v1::WorkerAbortResponse resp;
    out.push_back({"PrefillWorker.AbortRequest", stub->AbortRequest(&ctx, r, &resp)});
  }
  {
    grpc::ClientContext ctx;
    Prepare(&ctx, bearer);
    v1::PrefillRequest r;
    r.mutable_ticket()->set_request_id("unchecked");
    r.mutable_ticket()->set_transfer_id("t-unchecked");
    r.mutable_ticket()->mutable_decode()->set_address("inproc");
    r.add_prompt(1);
    r.add_prompt(2);
    v1::PrefillResponse resp;
    out.push_back({"PrefillWorker.Prefill", stub->Prefill(&ctx, r, &resp)});
  }
  return out;
}

std::vector<Outcome> AttackDecode(const std::shared_ptr<grpc::Channel>& decode, const std::string& bearer,
                                  const std::string& victim_id) {
  std::vector<Outcome> out;
  {
    auto stub = v1::DecodeWorker::NewStub(decode);
    grpc::ClientContext ctx;
    Prepare(&ctx, bearer);
    v1::WorkerAbortRequest r;
    r.set_request_id(victim_id);
    v1::WorkerAbortResponse resp;
    out.push_back({"DecodeWorker.AbortRequest", stub->AbortRequest(&ctx, r, &resp)});
  }
  {
    auto stub = v1::KvTransfer::NewStub(decode);
    grpc::ClientContext ctx;
    Prepare(&ctx, bearer);
    v1::KvTransferAck ack;
    std::unique_ptr<grpc::ClientWriter<v1::KvTransferChunk>> writer = stub->Push(&ctx, &ack);
    v1::KvTransferChunk chunk;
    v1::KvTransferHeader* h = chunk.mutable_header();
    h->set_transfer_id("guessed-next-transfer");
    h->set_request_id("poison");
    h->set_num_layers(1);
    h->set_num_kv_heads(1);
    h->set_head_dim(1);
    h->add_lengths(1);
    h->set_payload_bytes(int64_t{1} << 30);  // 1 GiB reserved in the inbox, then silence
    (void)writer->Write(chunk);
    (void)writer->WritesDone();
    out.push_back({"KvTransfer.Push (1 GiB header)", writer->Finish()});
  }
  return out;
}

void ExpectAllRefused(const std::vector<Outcome>& outcomes, grpc::StatusCode want) {
  for (const Outcome& o : outcomes) {
    EXPECT_EQ(o.status.error_code(), want) << o.name << " answered " << ToString(o.status);
  }
}

// The victim's stream, with `attack` run after its second chunk; checked against the
// offline reference.
void RunVictim(Deployment& d, const Case& victim, const std::function<void()>& attack) {
  absl::StatusOr<engine::GenerateResult> want = Reference().Run(victim);
  ASSERT_TRUE(want.ok()) << want.status();
  bool attacked = false;
  CallOptions options = Within(absl::Seconds(60), kToken);
  options.on_chunk = [&](grpc::ClientContext*, const StreamResult& so_far) {
    if (so_far.chunks == 2 && !attacked) {
      attacked = true;
      attack();
    }
  };
  StreamResult r = Generate(d.stub(), victim.Request(), options);
  ASSERT_TRUE(attacked) << "the stream ended before the attack: " << ToString(r.status);
  ASSERT_TRUE(r.status.ok()) << "the victim's stream: " << ToString(r.status) << "\n" << d.Logs();
  ASSERT_TRUE(r.complete.has_value());
  EXPECT_EQ(r.complete->finish_reason(), v1::GenerateComplete::LENGTH);
  EXPECT_EQ(r.tokens, want->token_ids) << "the victim's stream was altered";
}

// The public API's own checks: every RPC needs the token; ServerInfo lists only the
// request ids the caller names.
void ExpectPublicApiGuarded(Deployment& d, const std::string& victim_id) {
  auto stub = v1::Inference::NewStub(Connect(d.address()));
  EXPECT_EQ(GetServerInfo(*stub).status().code(), absl::StatusCode::kUnauthenticated);
  EXPECT_EQ(GetServerInfo(*stub, "wrong-token").status().code(), absl::StatusCode::kUnauthenticated);
  EXPECT_EQ(GetModelInfo(*stub).status().code(), absl::StatusCode::kUnauthenticated);
  {
    grpc::ClientContext ctx;
    ctx.set_deadline(absl::ToChronoTime(absl::Now() + absl::Seconds(5)));
    v1::AbortRequest r;
    r.set_request_id(victim_id);
    v1::AbortResponse resp;
    grpc::Status s = stub->Abort(&ctx, r, &resp);
    EXPECT_EQ(s.error_code(), grpc::StatusCode::UNAUTHENTICATED) << "Inference.Abort without the token: " << ToString(s);
  }
  absl::StatusOr<v1::ServerInfo> info = GetServerInfo(*stub, kToken);
  ASSERT_TRUE(info.ok()) << info.status();
  EXPECT_EQ(info->requests_size(), 0) << "Inference.GetServerInfo lists request ids nobody asked for";
}

TEST(SecurityTest, ServeKeepsInternalServicesOffThePublicPort) {
  DeploymentOptions options;
  options.extra_args = {"--token-file", TokenFile()};
  options.token = kToken;
  absl::StatusOr<std::unique_ptr<Deployment>> deployment = Deployment::Start(options);
  ASSERT_TRUE(deployment.ok()) << deployment.status();
  Deployment& d = **deployment;
  const Case victim = VictimCase("victim-serve");
  std::vector<Outcome> outcomes;
  RunVictim(d, victim, [&] {
    for (const std::string& bearer : {std::string(), std::string(kToken)}) {
      for (auto& o : AttackManager(d.channel(), bearer, victim.request_id, absl::StrCat("serve-", d.router().pid(), "/decode"))) {
        outcomes.push_back(o);
      }
      for (auto& o : AttackPrefill(d.channel(), bearer, victim.request_id)) outcomes.push_back(o);
      for (auto& o : AttackDecode(d.channel(), bearer, victim.request_id)) outcomes.push_back(o);
    }
    ExpectPublicApiGuarded(d, victim.request_id);
  });
  ExpectAllRefused(outcomes, grpc::StatusCode::UNIMPLEMENTED);
  EXPECT_EQ(outcomes.size(), 2u * 12u);

  // The scheme in any case; the next user's request is the server's own work.
  auto stub = v1::Inference::NewStub(Connect(d.address()));
  Case next = VictimCase("after-the-attacks");
  next.max_tokens = 8;
  absl::StatusOr<engine::GenerateResult> want = Reference().Run(next);
  ASSERT_TRUE(want.ok()) << want.status();
  grpc::ClientContext ctx;
  ctx.set_deadline(absl::ToChronoTime(absl::Now() + absl::Seconds(60)));
  ctx.AddMetadata("authorization", absl::StrCat("bEaReR  ", kToken));
  std::unique_ptr<grpc::ClientReader<v1::GenerateResponse>> reader = stub->Generate(&ctx, next.Request());
  std::vector<int32_t> tokens;
  v1::GenerateResponse message;
  while (reader->Read(&message)) {
    if (message.has_chunk()) tokens.insert(tokens.end(), message.chunk().token_ids().begin(), message.chunk().token_ids().end());
  }
  grpc::Status s = reader->Finish();
  EXPECT_TRUE(s.ok()) << ToString(s);
  EXPECT_EQ(tokens, want->token_ids);
}

TEST(SecurityTest, SplitInternalPortsRequireTheInternalToken) {
  DeploymentOptions options;
  options.split = true;
  options.router_args = {"--token-file", TokenFile()};
  options.token = kToken;
  absl::StatusOr<std::unique_ptr<Deployment>> deployment = Deployment::Start(options);
  ASSERT_TRUE(deployment.ok()) << deployment.status();
  Deployment& d = **deployment;
  const Case victim = VictimCase("victim-split");
  std::vector<Outcome> outcomes;
  std::vector<Outcome> public_port;
  RunVictim(d, victim, [&] {
    for (const std::string& bearer : {std::string(), std::string(kToken)}) {
      const std::string decode_id = absl::StrCat("decode-", d.decode()->pid(), "/decode");
      for (auto& o : AttackManager(Connect(d.Address(*d.manager())), bearer, victim.request_id, decode_id)) {
        outcomes.push_back(o);
      }
      for (auto& o : AttackPrefill(Connect(d.Address(*d.prefill())), bearer, victim.request_id)) outcomes.push_back(o);
      for (auto& o : AttackDecode(Connect(d.Address(*d.decode())), bearer, victim.request_id)) outcomes.push_back(o);
      // The router's port serves none of them.
      for (auto& o : AttackManager(d.channel(), bearer, victim.request_id, decode_id)) public_port.push_back(o);
    }
    ExpectPublicApiGuarded(d, victim.request_id);
  });
  ExpectAllRefused(outcomes, grpc::StatusCode::UNAUTHENTICATED);
  EXPECT_EQ(outcomes.size(), 2u * 12u);
  ExpectAllRefused(public_port, grpc::StatusCode::UNIMPLEMENTED);

  // Nothing the attacker did is left in the manager: no extra requests, every lease
  // released (asked with the internal token).
  auto manager = v1::KvManager::NewStub(Connect(d.Address(*d.manager())));
  grpc::ClientContext ctx;
  ctx.set_deadline(absl::ToChronoTime(absl::Now() + absl::Seconds(5)));
  ctx.AddMetadata("kvgate-internal-token", InternalToken());
  v1::ServerInfo info;
  grpc::Status s = manager->GetServerInfo(&ctx, v1::GetServerInfoRequest(), &info);
  ASSERT_TRUE(s.ok()) << ToString(s);
  EXPECT_EQ(info.requests_total(), 1) << Describe(info);
  for (const v1::RequestState& r : info.requests()) EXPECT_EQ(r.request_id(), victim.request_id);
}

TEST(SecurityTest, SplitRolesRefuseToStartWithoutInternalCredentials) {
  absl::StatusOr<std::unique_ptr<Process>> p =
      Process::Start("kv-manager (no credentials)", {"kv-manager", "--host", "127.0.0.1", "--port", "0"});
  ASSERT_TRUE(p.ok()) << p.status();
  EXPECT_TRUE(PollUntil([&] { return (*p)->Exited(); }, absl::Seconds(10))) << (*p)->Output();
  const int status = (*p)->Stop();
  EXPECT_FALSE((*p)->killed()) << (*p)->Output();
  EXPECT_TRUE(WIFEXITED(status) && WEXITSTATUS(status) == 2) << Process::DescribeStatus(status) << "\n"
                                                             << (*p)->Output();
  EXPECT_TRUE(absl::StrContains((*p)->Output(), "--internal-token-file")) << (*p)->Output();
}

// The token from $KVGATE_TOKEN; the metrics endpoint on loopback although gRPC listens
// on every address.
TEST(SecurityTest, TokenFromTheEnvironmentAndMetricsOnLoopback) {
  ASSERT_EQ(setenv("KVGATE_TOKEN", kToken, 1), 0);
  DeploymentOptions options;
  options.metrics = true;
  options.extra_args = {"--host", "0.0.0.0"};
  options.token = kToken;  // ready = ServerInfo answered with the token
  absl::StatusOr<std::unique_ptr<Deployment>> deployment = Deployment::Start(options);
  unsetenv("KVGATE_TOKEN");
  ASSERT_TRUE(deployment.ok()) << deployment.status();
  Deployment& d = **deployment;
  EXPECT_EQ(GetServerInfo(d.stub()).status().code(), absl::StatusCode::kUnauthenticated);
  ASSERT_TRUE(d.router().metrics_port().has_value()) << d.router().Output();
  // /proc/net/tcp: the listening socket (state 0A) of the metrics port.
  std::ifstream tcp("/proc/net/tcp");
  std::string line, metrics_local;
  const std::string metrics_port = absl::StrFormat(":%04X", *d.router().metrics_port());
  while (std::getline(tcp, line)) {
    std::vector<std::string> f = absl::StrSplit(line, ' ', absl::SkipEmpty());
    if (f.size() < 4 || f[3] != "0A") continue;
    if (absl::EndsWith(f[1], metrics_port)) metrics_local = f[1];
  }
  EXPECT_EQ(metrics_local, "0100007F" + metrics_port) << "the metrics endpoint is not on 127.0.0.1 only";
  EXPECT_TRUE(absl::StrContains(d.router().Output(), "metrics on 127.0.0.1:")) << d.router().Output();
}

}  // namespace
}  // namespace kvgate::integration
