// File: the public kvgate.v1.Inference service (architecture.md section 1, step 1): it
// validates and tokenizes, asks the KV manager to admit, calls the ticket's prefill and
// decode workers concurrently, relays the decode stream and keeps the lease alive. It
// holds no model weights (tokenizer and config only) and no per-request state beyond the
// calls in flight, so routers scale out.
#pragma once

#include <atomic>
#include <condition_variable>
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
#include "kv_manager/manager/manager_client.h"
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
  // Starts probing the KV manager; `set_serving` gets the router's health on changes.
  void StartHealth(std::function<void(bool)> set_serving);
  // Fails new requests with UNAVAILABLE, ends the streams in flight by `deadline`
  // (cancelling them after it) and stops the health probe.
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
  struct InFlight;
  RouterService(RouterOptions options, ChannelPool* channels, Metrics* metrics)
      : options_(std::move(options)), channels_(channels), metrics_(metrics) {}
  void Serve(std::shared_ptr<InFlight> call);
  grpc::Status Run(const std::shared_ptr<InFlight>& call);
  kv::KvManagerClient Manager() const;

  RouterOptions options_;
  ChannelPool* channels_;
  Metrics* metrics_;
  std::unique_ptr<engine::Tokenizer> tokenizer_;
  engine::ModelConfig config_;
  std::atomic<bool> manager_reachable_{false};
  std::mutex mu_;
  std::condition_variable changed_;
  bool stopping_ = false;
  std::map<std::string, std::shared_ptr<InFlight>> in_flight_;  // by request id
  int32_t running_ = 0;  // request threads alive (detached; counted for Shutdown)
  std::thread health_;
  std::atomic<int64_t> next_id_{0};
};

}  // namespace kvgate::router
