// File: the public kvgate.v1.Inference service (architecture.md section 1, step 1): it
// validates and tokenizes, asks the KV manager to admit, calls the ticket's prefill and
// decode workers concurrently, relays the decode stream and keeps the lease alive. It
// holds no model weights (tokenizer and config only) and no per-request state beyond the
// calls in flight, so routers scale out.
//
// Concurrency: no thread per request. Every call is a callback reactor; the calls to the
// KV manager and the workers are asynchronous (callback stubs, a ClientReadReactor
// relaying the decode stream), so a burst of clients holds no threads and cannot starve
// the internal calls. One ticker thread renews leases and runs the admission queue's
// timers; one health thread probes the KV manager.
//
// Admission: at most max_in_flight admitted requests run at once; the rest wait in a
// FIFO queue (at most max_queued). A request the KV manager refuses for capacity
// (RESOURCE_EXHAUSTED) goes back to the head of the queue and is retried when a request
// ends (or every admission_retry); it sheds with RESOURCE_EXHAUSTED only once it waited
// queue_timeout (or its own deadline passed). A full queue is RESOURCE_EXHAUSTED at once.
#pragma once

#include <atomic>
#include <condition_variable>
#include <deque>
#include <map>
#include <memory>
#include <mutex>
#include <string>
#include <thread>
#include <vector>

#include "common/grpc_edge.h"
#include "common/metrics.h"
#include "engine/model_config.h"
#include "engine/tokenizer.h"
#include "kv_manager/manager_client.h"
#include "kvgate/v1/inference.grpc.pb.h"
#include "router/request_validation.h"

namespace kvgate::router {

struct RouterOptions {
  std::string model_dir;          // tokenizer.json + config.json (no weights)
  std::string manager_address;    // host:port or "inproc"
  std::string bearer_token;       // empty = no token required
  ValidationLimits limits;
  std::vector<std::string> roles = {"router"};  // reported by GetServerInfo
  std::string backend;            // reported by GetServerInfo (the workers' backend)
  std::string version = "0.4.0";
  int32_t health_interval_ms = 250;
  // Admission (file comment).
  int32_t max_in_flight = 64;      // admitted requests running at once
  int32_t max_queued = 4096;       // requests waiting for admission
  absl::Duration queue_timeout = absl::Seconds(30);     // longest wait for admission
  absl::Duration admission_retry = absl::Milliseconds(100);  // retry after RESOURCE_EXHAUSTED
  absl::Duration manager_timeout = absl::Seconds(5);    // deadline of one KV manager call
};

class RouterService final : public v1::Inference::CallbackService {
 public:
  // Loads the tokenizer and config. `channels` reaches the manager and the workers.
  static absl::StatusOr<std::unique_ptr<RouterService>> Create(RouterOptions options, ChannelPool* channels,
                                                               Metrics* metrics);
  ~RouterService() override;  // Shutdown()

  // Where the KV manager is, when only known after this server bound its port (a `serve`
  // whose roles talk over tcp). Call before StartHealth.
  void SetManagerAddress(std::string address) { options_.manager_address = std::move(address); }
  // Starts probing the KV manager and the ticker; `set_serving` gets the router's health
  // on changes: SERVING while the manager answers and knows a live prefill and decode
  // worker.
  void StartHealth(std::function<void(bool)> set_serving);
  // Fails new and queued requests with UNAVAILABLE, lets the streams in flight finish
  // until `deadline` and ends the rest then with UNAVAILABLE (a hard limit), and stops
  // the threads.
  void Shutdown(absl::Time deadline = absl::Now());
  bool manager_reachable() const { return manager_reachable_.load(); }

  grpc::ServerWriteReactor<v1::GenerateResponse>* Generate(grpc::CallbackServerContext* context,
                                                            const v1::GenerateRequest* request) override;
  grpc::ServerUnaryReactor* Abort(grpc::CallbackServerContext* context, const v1::AbortRequest* request,
                                  v1::AbortResponse* response) override;
  grpc::ServerUnaryReactor* GetModelInfo(grpc::CallbackServerContext* context, const v1::GetModelInfoRequest* request,
                                         v1::ModelInfo* response) override;
  grpc::ServerUnaryReactor* GetServerInfo(grpc::CallbackServerContext* context,
                                          const v1::GetServerInfoRequest* request, v1::ServerInfo* response) override;

 private:
  struct Call;
  class DecodeRelay;
  RouterService(RouterOptions options, ChannelPool* channels, Metrics* metrics)
      : options_(std::move(options)), channels_(channels), metrics_(metrics) {}

  std::unique_ptr<v1::KvManager::Stub> ManagerStub() const;
  // Admission queue.
  void Enqueue(const std::shared_ptr<Call>& call);
  void Dispatch();
  void StartAdmit(const std::shared_ptr<Call>& call);
  void OnAdmitted(const std::shared_ptr<Call>& call, grpc::Status status);
  void StartWorkers(const std::shared_ptr<Call>& call);
  // Ends the call once both worker calls are done.
  void MaybeFinish(const std::shared_ptr<Call>& call);
  // Completes the client stream with `status` and forgets the call.
  void Complete(const std::shared_ptr<Call>& call, grpc::Status status, bool was_running);
  void OnClientGone(const std::shared_ptr<Call>& call);
  // Fire-and-forget KV manager calls (Finish, Abort, RenewLease), counted so that
  // Shutdown waits for them.
  void SideFinish(const std::string& request_id, v1::RequestState::Phase phase);
  void SideAbort(const std::string& request_id);
  void SideRenew(const std::string& lease_id);
  struct SideCalls {
    std::mutex mu;
    std::condition_variable idle;
    int32_t count = 0;
    void Add();
    void Done();
  };
  void Tick();

  RouterOptions options_;
  ChannelPool* channels_;
  Metrics* metrics_;
  std::unique_ptr<engine::Tokenizer> tokenizer_;
  engine::ModelConfig config_;
  std::atomic<bool> manager_reachable_{false};

  std::mutex mu_;
  std::condition_variable changed_;
  bool stopping_ = false;
  bool threads_stopped_ = false;
  std::map<std::string, std::shared_ptr<Call>> in_flight_;  // by request id: queued and running
  std::deque<std::shared_ptr<Call>> queue_;                  // waiting for admission, FIFO
  int32_t running_ = 0;        // calls past the queue (admitting or running)
  bool capacity_blocked_ = false;  // the manager refused for capacity; wait for a release
  absl::Time blocked_since_;
  const std::shared_ptr<SideCalls> side_ = std::make_shared<SideCalls>();  // fire-and-forget calls in flight
  std::thread health_;
  std::thread ticker_;
};

}  // namespace kvgate::router
