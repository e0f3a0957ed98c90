// The KvManager service over a real socket (127.0.0.1, real stubs): registration,
// admission, Finish; Abort and lease expiry reaching the workers' AbortRequest; a worker
// registering again after the manager restarted on the same port.
//
// The workers here are peer endpoints: a small PrefillWorker / DecodeWorker server that
// records the AbortRequest calls it receives (the product under test is the manager).
#include "kv_manager/kv_manager_service.h"

#include <algorithm>
#include <condition_variable>
#include <memory>
#include <mutex>
#include <string>
#include <vector>

#include <grpcpp/grpcpp.h>
#include <gtest/gtest.h>

#include "kv_manager/manager_client.h"
#include "kvgate/v1/worker.grpc.pb.h"

namespace kvgate::kv {
namespace {

struct AbortCall {
  std::string service;  // "prefill" or "decode"
  v1::WorkerAbortRequest request;
};

class AbortRecorder {
 public:
  void Add(std::string service, const v1::WorkerAbortRequest& request) {
    {
      std::lock_guard<std::mutex> lock(mu_);
      calls_.push_back({std::move(service), request});
    }
    changed_.notify_all();
  }
  // Waits until at least n calls arrived.
  bool WaitFor(size_t n, absl::Duration timeout) {
    std::unique_lock<std::mutex> lock(mu_);
    return changed_.wait_for(lock, absl::ToChronoNanoseconds(timeout), [&] { return calls_.size() >= n; });
  }
  std::vector<AbortCall> calls() const {
    std::lock_guard<std::mutex> lock(mu_);
    return calls_;
  }

 private:
  mutable std::mutex mu_;
  std::condition_variable changed_;
  std::vector<AbortCall> calls_;
};

class PrefillPeer final : public v1::PrefillWorker::CallbackService {
 public:
  explicit PrefillPeer(AbortRecorder* recorder) : recorder_(recorder) {}
  grpc::ServerUnaryReactor* AbortRequest(grpc::CallbackServerContext* ctx, const v1::WorkerAbortRequest* request,
                                         v1::WorkerAbortResponse* response) override {
    recorder_->Add("prefill", *request);
    response->set_was_running(true);
    grpc::ServerUnaryReactor* reactor = ctx->DefaultReactor();
    reactor->Finish(grpc::Status::OK);
    return reactor;
  }

 private:
  AbortRecorder* recorder_;
};

class DecodePeer final : public v1::DecodeWorker::CallbackService {
 public:
  explicit DecodePeer(AbortRecorder* recorder) : recorder_(recorder) {}
  grpc::ServerUnaryReactor* AbortRequest(grpc::CallbackServerContext* ctx, const v1::WorkerAbortRequest* request,
                                         v1::WorkerAbortResponse* response) override {
    recorder_->Add("decode", *request);
    response->set_was_running(true);
    grpc::ServerUnaryReactor* reactor = ctx->DefaultReactor();
    reactor->Finish(grpc::Status::OK);
    return reactor;
  }

 private:
  AbortRecorder* recorder_;
};

// The two worker services on one real port.
struct WorkerPeers {
  AbortRecorder recorder;
  PrefillPeer prefill{&recorder};
  DecodePeer decode{&recorder};
  std::unique_ptr<grpc::Server> server;
  std::string address;

  WorkerPeers() {
    int port = 0;
    grpc::ServerBuilder builder;
    builder.AddListeningPort("127.0.0.1:0", grpc::InsecureServerCredentials(), &port);
    builder.RegisterService(&prefill);
    builder.RegisterService(&decode);
    server = builder.BuildAndStart();
    address = "127.0.0.1:" + std::to_string(port);
  }
  ~WorkerPeers() { server->Shutdown(absl::ToChronoTime(absl::Now() + absl::Seconds(1))); }
};

// A manager on 127.0.0.1:`port` (0: any free port).
struct ManagerServer {
  std::unique_ptr<KvManagerService> service;  // outlives the server (declared first)
  std::unique_ptr<grpc::Server> server;
  int port = 0;

  ManagerServer(const ManagerConfig& config, int want_port) {
    absl::StatusOr<std::unique_ptr<ManagerState>> state = ManagerState::Create(config);
    EXPECT_TRUE(state.ok()) << state.status();
    KvManagerServiceOptions options;
    options.abort_retry_backoff = absl::Milliseconds(50);
    service = std::make_unique<KvManagerService>(*std::move(state), InsecureChannelFactory(), options);
    grpc::ServerBuilder builder;
    builder.AddListeningPort("127.0.0.1:" + std::to_string(want_port), grpc::InsecureServerCredentials(), &port);
    builder.RegisterService(service.get());
    server = builder.BuildAndStart();
    EXPECT_NE(server, nullptr);
    EXPECT_NE(port, 0);
  }
  ~ManagerServer() {
    const absl::Time deadline = absl::Now() + absl::Seconds(1);
    server->Shutdown(absl::ToChronoTime(deadline));
    service->Shutdown(deadline);
  }
  std::string address() const { return "127.0.0.1:" + std::to_string(port); }
};

ManagerConfig TestConfig() {
  ManagerConfig c;
  c.heartbeat_interval_ms = 50;
  c.worker_timeout_ms = 10000;
  c.lease_ttl_ms = 10000;
  c.version = "test";
  return c;
}

v1::RegisterWorkerRequest WorkerInfo(const std::string& id, v1::WorkerRole role, const std::string& address) {
  v1::RegisterWorkerRequest r;
  r.set_worker_id(id);
  r.set_role(role);
  r.set_address(address);
  r.set_model_name("tiny");
  r.set_num_layers(2);
  r.set_num_kv_heads(2);
  r.set_head_dim(8);
  r.set_page_tokens(16);
  return r;
}

v1::WorkerCapacity Capacity(int32_t pages) {
  v1::WorkerCapacity c;
  c.set_kv_pages_total(pages);
  c.set_kv_pages_free(pages);
  c.set_serving(true);
  return c;
}

v1::AdmitRequest Request(const std::string& id) {
  v1::AdmitRequest r;
  r.set_request_id(id);
  r.set_prompt_tokens(100);
  r.set_max_tokens(16);
  r.mutable_compression()->set_policy("snapkv");
  r.mutable_compression()->set_keep_ratio(0.5f);
  return r;
}

std::shared_ptr<grpc::Channel> ManagerChannel(const std::string& address) {
  return grpc::CreateCustomChannel(address, grpc::InsecureChannelCredentials(),
                                   ManagerChannelArguments(absl::Milliseconds(200)));
}

// Registers p1 and d1 (at the peers' address) through the plain client.
void RegisterPeers(KvManagerClient& client, const std::string& address) {
  v1::RegisterWorkerRequest p = WorkerInfo("p1", v1::PREFILL, address);
  *p.mutable_capacity() = Capacity(0);
  ASSERT_TRUE(client.RegisterWorker(p).ok());
  v1::RegisterWorkerRequest d = WorkerInfo("d1", v1::DECODE, address);
  *d.mutable_capacity() = Capacity(1000);
  ASSERT_TRUE(client.RegisterWorker(d).ok());
}

TEST(KvManagerServiceTest, RegisterAdmitReportFinish) {
  ManagerServer manager(TestConfig(), 0);
  WorkerPeers peers;
  auto channel = ManagerChannel(manager.address());
  WorkerRegistration prefill(channel, WorkerInfo("p1", v1::PREFILL, peers.address), [] { return Capacity(0); });
  WorkerRegistration decode(channel, WorkerInfo("d1", v1::DECODE, peers.address), [] { return Capacity(1000); });
  EXPECT_FALSE(decode.registered());
  prefill.Start();
  decode.Start();
  ASSERT_TRUE(prefill.WaitRegistered(absl::Seconds(5))) << prefill.last_error();
  ASSERT_TRUE(decode.WaitRegistered(absl::Seconds(5))) << decode.last_error();

  KvManagerClient client(channel);
  absl::StatusOr<v1::Ticket> ticket = client.Admit(Request("r1"));
  ASSERT_TRUE(ticket.ok()) << ticket.status();
  EXPECT_EQ(ticket->prefill().worker_id(), "p1");
  EXPECT_EQ(ticket->prefill().address(), peers.address);
  EXPECT_EQ(ticket->decode().worker_id(), "d1");
  EXPECT_EQ(ticket->transport(), "tcp");
  EXPECT_EQ(ticket->plan().policy(), "snapkv");
  EXPECT_EQ(ticket->reserved_pages(), 4 * 5);  // ceil((50 + 16) / 16) = 5 per head

  // Errors cross the wire with their code and the field in the message.
  v1::AdmitRequest bad = Request("r2");
  bad.mutable_compression()->set_policy("h2o");
  absl::StatusOr<v1::Ticket> refused = client.Admit(bad);
  EXPECT_EQ(refused.status().code(), absl::StatusCode::kInvalidArgument);
  EXPECT_NE(refused.status().message().find("compression.policy"), std::string::npos) << refused.status();
  EXPECT_EQ(client.Admit(Request("r1")).status().code(), absl::StatusCode::kAlreadyExists);

  v1::ProgressReport report;
  report.set_request_id("r1");
  report.set_phase(v1::RequestState::TRANSFERRING);
  absl::StatusOr<bool> active = prefill.ReportProgress(report);
  ASSERT_TRUE(active.ok()) << active.status();
  EXPECT_TRUE(*active);
  absl::StatusOr<int32_t> ttl = client.RenewLease(ticket->lease_id());
  ASSERT_TRUE(ttl.ok()) << ttl.status();
  EXPECT_EQ(*ttl, 10000);

  absl::StatusOr<v1::ServerInfo> info = client.GetServerInfo();
  ASSERT_TRUE(info.ok()) << info.status();
  EXPECT_EQ(info->requests_in_flight(), 1);
  EXPECT_EQ(info->transfers_active(), 1);
  EXPECT_EQ(info->kv_pages_total(), 1000);
  EXPECT_EQ(info->kv_pages_free(), 1000 - 20);
  ASSERT_EQ(info->requests_size(), 1);
  EXPECT_EQ(info->requests(0).phase(), v1::RequestState::TRANSFERRING);

  ASSERT_TRUE(client.Finish("r1", v1::RequestState::DONE).ok());
  info = client.GetServerInfo();
  ASSERT_TRUE(info.ok());
  EXPECT_EQ(info->requests_in_flight(), 0);
  EXPECT_EQ(info->requests_total(), 1);
  EXPECT_EQ(info->kv_pages_free(), 1000);
  EXPECT_EQ(info->requests(0).phase(), v1::RequestState::DONE);
  EXPECT_FALSE(*client.Abort("r1"));
  // A finished request tells its workers to stop.
  EXPECT_FALSE(*prefill.ReportProgress(report));
  EXPECT_EQ(manager.service->fanout_stats().sent, 0);  // DONE aborts nothing
}

TEST(KvManagerServiceTest, AbortReachesPrefillAndDecodeWorkers) {
  ManagerServer manager(TestConfig(), 0);
  WorkerPeers peers;
  KvManagerClient client(ManagerChannel(manager.address()));
  RegisterPeers(client, peers.address);
  absl::StatusOr<v1::Ticket> ticket = client.Admit(Request("r1"));
  ASSERT_TRUE(ticket.ok()) << ticket.status();

  absl::StatusOr<bool> was_running = client.Abort("r1");
  ASSERT_TRUE(was_running.ok()) << was_running.status();
  EXPECT_TRUE(*was_running);
  ASSERT_TRUE(peers.recorder.WaitFor(2, absl::Seconds(5)));
  std::vector<AbortCall> calls = peers.recorder.calls();
  ASSERT_EQ(calls.size(), 2u);
  std::vector<std::string> services;
  for (const AbortCall& c : calls) {
    services.push_back(c.service);
    EXPECT_EQ(c.request.request_id(), "r1");
    EXPECT_EQ(c.request.transfer_id(), ticket->transfer_id());
    EXPECT_FALSE(c.request.reason().empty());
  }
  std::sort(services.begin(), services.end());
  EXPECT_EQ(services, (std::vector<std::string>{"decode", "prefill"}));

  // Idempotent: OK, was_running false, nothing sent again.
  was_running = client.Abort("r1");
  ASSERT_TRUE(was_running.ok());
  EXPECT_FALSE(*was_running);
  EXPECT_EQ(client.Abort("never-seen").status().code(), absl::StatusCode::kNotFound);
  EXPECT_EQ(client.Abort("").status().code(), absl::StatusCode::kInvalidArgument);
  manager.service->Shutdown(absl::Now() + absl::Seconds(1));
  EXPECT_EQ(manager.service->fanout_stats().sent, 2);
  EXPECT_EQ(manager.service->fanout_stats().succeeded, 2);
  EXPECT_EQ(peers.recorder.calls().size(), 2u);
}

TEST(KvManagerServiceTest, ExpiredLeaseAbortsOnTheWorkersWithinASecond) {
  ManagerConfig config = TestConfig();
  config.lease_ttl_ms = 200;
  ManagerServer manager(config, 0);
  WorkerPeers peers;
  KvManagerClient client(ManagerChannel(manager.address()));
  RegisterPeers(client, peers.address);
  absl::StatusOr<v1::Ticket> ticket = client.Admit(Request("r1"));
  ASSERT_TRUE(ticket.ok()) << ticket.status();
  const absl::Time admitted = absl::Now();

  // Nobody renews: within a second of the admission both workers are told.
  ASSERT_TRUE(peers.recorder.WaitFor(2, absl::Seconds(1) - (absl::Now() - admitted)));
  for (const AbortCall& c : peers.recorder.calls()) {
    EXPECT_EQ(c.request.transfer_id(), ticket->transfer_id());
    EXPECT_NE(c.request.reason().find("lease"), std::string::npos) << c.request.reason();
  }
  absl::StatusOr<v1::ServerInfo> info = client.GetServerInfo();
  ASSERT_TRUE(info.ok());
  EXPECT_EQ(info->requests_in_flight(), 0);
  ASSERT_EQ(info->requests_size(), 1);
  EXPECT_EQ(info->requests(0).phase(), v1::RequestState::ABORTED);
  EXPECT_EQ(client.RenewLease(ticket->lease_id()).status().code(), absl::StatusCode::kFailedPrecondition);
}

TEST(KvManagerServiceTest, SilentDecodeWorkerFailsItsRequestsAndTellsThePrefillWorker) {
  ManagerConfig config = TestConfig();
  config.worker_timeout_ms = 300;
  ManagerServer manager(config, 0);
  WorkerPeers peers;
  auto channel = ManagerChannel(manager.address());
  WorkerRegistration prefill(channel, WorkerInfo("p1", v1::PREFILL, peers.address), [] { return Capacity(0); });
  prefill.Start();
  ASSERT_TRUE(prefill.WaitRegistered(absl::Seconds(5))) << prefill.last_error();
  KvManagerClient client(channel);
  v1::RegisterWorkerRequest d = WorkerInfo("d1", v1::DECODE, peers.address);
  *d.mutable_capacity() = Capacity(1000);
  ASSERT_TRUE(client.RegisterWorker(d).ok());  // registers once, never heartbeats
  absl::StatusOr<v1::Ticket> ticket = client.Admit(Request("r1"));
  ASSERT_TRUE(ticket.ok()) << ticket.status();

  ASSERT_TRUE(peers.recorder.WaitFor(1, absl::Seconds(2)));
  const std::vector<AbortCall> calls = peers.recorder.calls();
  EXPECT_EQ(calls[0].service, "prefill");
  EXPECT_EQ(calls[0].request.transfer_id(), ticket->transfer_id());
  EXPECT_NE(calls[0].request.reason().find("d1"), std::string::npos) << calls[0].request.reason();
  absl::StatusOr<v1::ServerInfo> info = client.GetServerInfo();
  ASSERT_TRUE(info.ok());
  ASSERT_EQ(info->requests_size(), 1);
  EXPECT_EQ(info->requests(0).phase(), v1::RequestState::FAILED);
  EXPECT_EQ(info->kv_pages_total(), 0);  // d1 is gone
  EXPECT_TRUE(prefill.registered());     // p1 heartbeats: still there
}

TEST(KvManagerServiceTest, AbortToAnUnreachableWorkerIsGivenUpAndCounted) {
  ManagerServer manager(TestConfig(), 0);
  WorkerPeers peers;
  KvManagerClient client(ManagerChannel(manager.address()));
  v1::RegisterWorkerRequest p = WorkerInfo("p1", v1::PREFILL, peers.address);
  *p.mutable_capacity() = Capacity(0);
  ASSERT_TRUE(client.RegisterWorker(p).ok());
  v1::RegisterWorkerRequest d = WorkerInfo("d1", v1::DECODE, "127.0.0.1:1");  // nothing listens
  *d.mutable_capacity() = Capacity(1000);
  ASSERT_TRUE(client.RegisterWorker(d).ok());
  ASSERT_TRUE(client.Admit(Request("r1")).ok());
  ASSERT_TRUE(*client.Abort("r1"));
  ASSERT_TRUE(peers.recorder.WaitFor(1, absl::Seconds(5)));
  // Shutdown sends what is queued, waits for the calls in flight and retries no more.
  manager.service->Shutdown(absl::Now() + absl::Seconds(2));
  const FanoutStats stats = manager.service->fanout_stats();
  EXPECT_EQ(stats.succeeded, 1);
  EXPECT_EQ(stats.failed, 1);
  EXPECT_GE(stats.sent, 2);
  EXPECT_LE(stats.sent, 4);  // 1 + at most 3 attempts
}

TEST(KvManagerServiceTest, WorkerRegistersAgainAfterTheManagerRestarts) {
  ManagerConfig config = TestConfig();
  config.worker_timeout_ms = 500;
  auto first = std::make_unique<ManagerServer>(config, 0);
  const int port = first->port;
  auto channel = ManagerChannel(first->address());
  WorkerRegistration::Options options;
  options.retry_interval = absl::Milliseconds(50);
  options.rpc_timeout = absl::Milliseconds(500);
  WorkerRegistration decode(channel, WorkerInfo("d1", v1::DECODE, "127.0.0.1:1"), [] { return Capacity(64); },
                            options);
  decode.Start();
  ASSERT_TRUE(decode.WaitRegistered(absl::Seconds(5))) << decode.last_error();
  EXPECT_EQ(decode.registrations(), 1);
  ASSERT_EQ(first->service->state().Workers().size(), 1u);

  first.reset();  // the manager goes away, then comes back on the same port, empty
  ManagerServer second(config, port);
  ASSERT_EQ(second.port, port);
  ASSERT_TRUE(decode.WaitRegistrations(2, absl::Seconds(5))) << decode.last_error();
  EXPECT_TRUE(decode.registered());
  std::vector<WorkerSnapshot> workers = second.service->state().Workers();
  ASSERT_EQ(workers.size(), 1u);
  EXPECT_EQ(workers[0].worker_id, "d1");
  EXPECT_EQ(workers[0].capacity.kv_pages_total(), 64);
  decode.Stop();
  EXPECT_FALSE(decode.registered());
}

}  // namespace
}  // namespace kvgate::kv
