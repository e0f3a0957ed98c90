// File: the client side of kvgate.v1.KvManager, for the router and the workers.
//
//   KvManagerClient     one blocking call per RPC, absl::Status results (the router:
//                       Admit, RenewLease, Finish, Abort, GetServerInfo; the workers:
//                       ReportProgress).
//   WorkerRegistration  a worker's registration kept alive: registers, heartbeats its
//                       capacity every heartbeat_interval_ms from a thread, registers again
//                       when the manager forgot it (HeartbeatResponse.registered false:
//                       the manager restarted) or was unreachable, and says registered()
//                       so that the worker's health turns SERVING only once registered.
//
// Channels are the caller's (credentials, in-process channel). Give a channel to the
// manager short reconnect backoffs (ManagerChannelArguments) so that a restarted manager
// is found again within about a heartbeat.
#pragma once

#include <atomic>
#include <condition_variable>
#include <cstdint>
#include <functional>
#include <memory>
#include <mutex>
#include <string>
#include <thread>

#include <grpcpp/channel.h>
#include <grpcpp/support/channel_arguments.h>

#include "absl/status/status.h"
#include "absl/status/statusor.h"
#include "absl/time/time.h"
#include "kvgate/v1/kv_manager.grpc.pb.h"

namespace kvgate::kv {

// Reconnect backoff capped at `max_backoff` (gRPC's default grows to 120 s).
grpc::ChannelArguments ManagerChannelArguments(absl::Duration max_backoff = absl::Seconds(1));

// Cheap to create (a stub over a shared channel) and movable; one instance may serve
// several threads at once.
class KvManagerClient {
 public:
  // Every call gets `timeout` as its deadline.
  explicit KvManagerClient(std::shared_ptr<grpc::Channel> channel, absl::Duration timeout = absl::Seconds(5));

  // The manager's status codes, as documented in kv_manager.proto; UNAVAILABLE /
  // DEADLINE_EXCEEDED when the manager cannot be reached in time.
  absl::StatusOr<v1::Ticket> Admit(const v1::AdmitRequest& request);
  // Returns the lease's ttl, ms.
  absl::StatusOr<int32_t> RenewLease(const std::string& lease_id);
  absl::Status Finish(const std::string& request_id, v1::RequestState::Phase phase);
  // Returns was_running.
  absl::StatusOr<bool> Abort(const std::string& request_id);
  absl::StatusOr<v1::ServerInfo> GetServerInfo();

  absl::StatusOr<v1::RegisterWorkerResponse> RegisterWorker(const v1::RegisterWorkerRequest& request);
  absl::StatusOr<v1::HeartbeatResponse> Heartbeat(const v1::HeartbeatRequest& request);
  // Returns ProgressAck.active: false when the worker should drop the request. A request
  // the manager does not know (NOT_FOUND: forgotten, or the manager restarted) is
  // reported as false too.
  absl::StatusOr<bool> ReportProgress(const v1::ProgressReport& report);

 private:
  std::unique_ptr<v1::KvManager::Stub> stub_;  // movable: no const members
  absl::Duration timeout_;
};

class WorkerRegistration {
 public:
  // The worker's current capacity, called before every registration and heartbeat (from
  // the registration thread).
  using CapacityFn = std::function<v1::WorkerCapacity()>;

  struct Options {
    // Deadline of one RegisterWorker / Heartbeat call.
    absl::Duration rpc_timeout = absl::Seconds(2);
    // Wait between failed registration attempts.
    absl::Duration retry_interval = absl::Milliseconds(250);
  };

  // `request` is the registration (its capacity is refreshed from `capacity`).
  WorkerRegistration(std::shared_ptr<grpc::Channel> channel, v1::RegisterWorkerRequest request,
                     CapacityFn capacity, Options options);
  WorkerRegistration(std::shared_ptr<grpc::Channel> channel, v1::RegisterWorkerRequest request,
                     CapacityFn capacity)
      : WorkerRegistration(std::move(channel), std::move(request), std::move(capacity), Options()) {}
  // Stop().
  ~WorkerRegistration();

  WorkerRegistration(const WorkerRegistration&) = delete;
  WorkerRegistration& operator=(const WorkerRegistration&) = delete;

  // Starts the thread; the first registration attempt happens at once. Once only.
  void Start();
  // Stops the thread (cancelling a call in flight). The manager drops the worker after its
  // timeout. Idempotent.
  void Stop();

  // True from a successful registration until the manager forgot the worker or has been
  // unreachable for longer than its worker_timeout_ms.
  bool registered() const { return registered_.load(); }
  // Waits until registered() (true) or `timeout` passed (false).
  bool WaitRegistered(absl::Duration timeout);
  // Successful RegisterWorker calls so far (re-registrations included).
  int64_t registrations() const;
  // Waits until registrations() >= count (true) or `timeout` passed (false).
  bool WaitRegistrations(int64_t count, absl::Duration timeout);
  // The last failure (OK when the last call succeeded).
  absl::Status last_error() const;

  const std::string& worker_id() const { return request_.worker_id(); }
  // ReportProgress with worker_id filled in.
  absl::StatusOr<bool> ReportProgress(v1::ProgressReport report);
  KvManagerClient& client() { return client_; }

 private:
  void Loop();
  // One RPC with the deadline rpc_timeout, cancellable by Stop().
  template <typename Req, typename Resp, typename Method>
  absl::Status Call(Method method, const Req& req, Resp* resp);

  std::shared_ptr<grpc::Channel> channel_;
  const std::unique_ptr<v1::KvManager::Stub> stub_;
  KvManagerClient client_;
  const v1::RegisterWorkerRequest request_;
  const CapacityFn capacity_;
  const Options options_;

  std::atomic<bool> registered_{false};
  mutable std::mutex mu_;
  std::condition_variable changed_;
  bool stopping_ = false;
  bool started_ = false;
  grpc::ClientContext* current_ = nullptr;  // the call in flight, for Stop()
  int64_t registrations_ = 0;
  absl::Status last_error_;
  std::thread thread_;
};

}  // namespace kvgate::kv
