// File: the kvgate.v1.KvManager gRPC service (callback API) over ManagerState, and the
// fan-out of aborts to the workers.
//
// Every RPC is one ManagerState call and one ToGrpcStatus at the end. A background thread
// runs ManagerState::Sweep every sweep_interval (worker timeouts, lease expiry,
// forgetting) and sends the resulting aborts, and those of Abort / Finish / a worker's
// FAILED report, as AbortRequest calls to kvgate.v1.PrefillWorker / DecodeWorker at the
// worker's registered address. Channels come from a ChannelFactory: in `kvgate serve`
// the workers register as "inproc" and the factory returns the process's in-process
// channel; across processes it creates a (TLS or insecure) channel to host:port.
// An AbortRequest that fails UNAVAILABLE / DEADLINE_EXCEEDED is retried a few times;
// workers treat AbortRequest as idempotent, so a retry is safe.
#pragma once

#include <condition_variable>
#include <cstdint>
#include <deque>
#include <functional>
#include <map>
#include <memory>
#include <mutex>
#include <string>
#include <thread>

#include <grpcpp/grpcpp.h>

#include "absl/time/time.h"
#include "common/channel_factory.h"
#include "kv_manager/manager_state.h"
#include "kvgate/v1/kv_manager.grpc.pb.h"

namespace kvgate::kv {

// Workers are reached through a kvgate::ChannelFactory (common/channel_factory.h); a
// null channel drops the abort to that worker and counts it as failed.

// grpc::CreateChannel(address, InsecureChannelCredentials()) for every address.
ChannelFactory InsecureChannelFactory();

struct KvManagerServiceOptions {
  absl::Duration sweep_interval = absl::Milliseconds(100);
  // Deadline of one AbortRequest call to a worker.
  absl::Duration abort_timeout = absl::Seconds(2);
  // Attempts per worker for an AbortRequest that fails UNAVAILABLE or DEADLINE_EXCEEDED,
  // spaced by abort_retry_backoff (doubling).
  int32_t abort_attempts = 3;
  absl::Duration abort_retry_backoff = absl::Milliseconds(200);
  // Every call must carry this internal token (common/auth.h); empty: no check (the
  // in-process server of `kvgate serve`, or mutual TLS in front).
  std::string internal_token;
};

struct FanoutStats {
  int64_t sent = 0;       // AbortRequest calls started (retries included)
  int64_t succeeded = 0;  // calls that returned OK
  int64_t failed = 0;     // (worker, request) pairs given up on
};

class KvManagerService final : public v1::KvManager::CallbackService {
 public:
  // Starts the background thread. `state` must outlive nothing else: the service owns it.
  KvManagerService(std::unique_ptr<ManagerState> state, ChannelFactory channels,
                   KvManagerServiceOptions options = {});
  // Shutdown(absl::Now()) if not done yet.
  ~KvManagerService() override;

  KvManagerService(const KvManagerService&) = delete;
  KvManagerService& operator=(const KvManagerService&) = delete;

  // Stops the background thread, sends the aborts still queued and waits for the
  // AbortRequest calls in flight until `deadline`, then cancels the rest. Idempotent.
  // Call after the grpc::Server stopped taking RPCs (Server::Shutdown) or before it is
  // destroyed; RPCs arriving later still work but send no aborts.
  void Shutdown(absl::Time deadline);

  ManagerState& state() { return *state_; }
  FanoutStats fanout_stats() const;

  // kvgate.v1.KvManager
  grpc::ServerUnaryReactor* RegisterWorker(grpc::CallbackServerContext* ctx, const v1::RegisterWorkerRequest* request,
                                           v1::RegisterWorkerResponse* response) override;
  grpc::ServerUnaryReactor* Heartbeat(grpc::CallbackServerContext* ctx, const v1::HeartbeatRequest* request,
                                      v1::HeartbeatResponse* response) override;
  grpc::ServerUnaryReactor* Admit(grpc::CallbackServerContext* ctx, const v1::AdmitRequest* request,
                                  v1::Ticket* response) override;
  grpc::ServerUnaryReactor* RenewLease(grpc::CallbackServerContext* ctx, const v1::RenewLeaseRequest* request,
                                       v1::RenewLeaseResponse* response) override;
  grpc::ServerUnaryReactor* ReportProgress(grpc::CallbackServerContext* ctx, const v1::ProgressReport* request,
                                           v1::ProgressAck* response) override;
  grpc::ServerUnaryReactor* Finish(grpc::CallbackServerContext* ctx, const v1::FinishRequest* request,
                                   v1::FinishResponse* response) override;
  grpc::ServerUnaryReactor* Abort(grpc::CallbackServerContext* ctx, const v1::AbortRequest* request,
                                  v1::AbortResponse* response) override;
  grpc::ServerUnaryReactor* GetServerInfo(grpc::CallbackServerContext* ctx, const v1::GetServerInfoRequest* request,
                                          v1::ServerInfo* response) override;

 private:
  // One AbortRequest to one worker.
  struct Job {
    AbortTarget target;
    std::string request_id;
    std::string transfer_id;
    std::string reason;
    int32_t attempt = 0;
    absl::Time not_before;
  };
  struct Call;

  void Enqueue(const AbortOrder& order);
  void Loop();
  // Starts the calls of every due job; mu_ held.
  void StartDueJobs(absl::Time now, std::unique_lock<std::mutex>& lock);
  void OnCallDone(Call* call, const grpc::Status& status);
  std::shared_ptr<grpc::Channel> ChannelFor(const std::string& address);

  const std::unique_ptr<ManagerState> state_;
  const ChannelFactory channels_;
  const KvManagerServiceOptions options_;

  mutable std::mutex mu_;
  std::condition_variable wake_;
  std::deque<Job> jobs_;
  std::map<Call*, std::shared_ptr<Call>> in_flight_;  // shared: Shutdown cancels outside mu_
  std::map<std::string, std::shared_ptr<grpc::Channel>> channel_cache_;
  FanoutStats stats_;
  bool stopping_ = false;
  bool shut_down_ = false;
  std::thread thread_;
};

}  // namespace kvgate::kv
