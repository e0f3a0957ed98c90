#include "kv_manager/manager_client.h"

#include <algorithm>
#include <utility>

#include <grpcpp/client_context.h>

#include "common/grpc_status.h"

namespace kvgate::kv {
namespace {

void SetDeadline(grpc::ClientContext* ctx, absl::Duration timeout) {
  ctx->set_deadline(absl::ToChronoTime(absl::Now() + timeout));
}

}  // namespace

grpc::ChannelArguments ManagerChannelArguments(absl::Duration max_backoff) {
  grpc::ChannelArguments args;
  const int max_ms = static_cast<int>(std::max<int64_t>(1, absl::ToInt64Milliseconds(max_backoff)));
  args.SetInt(GRPC_ARG_MIN_RECONNECT_BACKOFF_MS, std::min(max_ms, 100));
  args.SetInt(GRPC_ARG_INITIAL_RECONNECT_BACKOFF_MS, std::min(max_ms, 100));
  args.SetInt(GRPC_ARG_MAX_RECONNECT_BACKOFF_MS, max_ms);
  return args;
}

// --- KvManagerClient ---------------------------------------------------------------------

KvManagerClient::KvManagerClient(std::shared_ptr<grpc::Channel> channel, absl::Duration timeout)
    : stub_(v1::KvManager::NewStub(std::move(channel))), timeout_(timeout) {}

absl::StatusOr<v1::Ticket> KvManagerClient::Admit(const v1::AdmitRequest& request) {
  grpc::ClientContext ctx;
  SetDeadline(&ctx, timeout_);
  v1::Ticket ticket;
  grpc::Status s = stub_->Admit(&ctx, request, &ticket);
  if (!s.ok()) return FromGrpcStatus(s);
  return ticket;
}

absl::StatusOr<int32_t> KvManagerClient::RenewLease(const std::string& lease_id) {
  grpc::ClientContext ctx;
  SetDeadline(&ctx, timeout_);
  v1::RenewLeaseRequest request;
  request.set_lease_id(lease_id);
  v1::RenewLeaseResponse response;
  grpc::Status s = stub_->RenewLease(&ctx, request, &response);
  if (!s.ok()) return FromGrpcStatus(s);
  return response.lease_ttl_ms();
}

absl::Status KvManagerClient::Finish(const std::string& request_id, v1::RequestState::Phase phase) {
  grpc::ClientContext ctx;
  SetDeadline(&ctx, timeout_);
  v1::FinishRequest request;
  request.set_request_id(request_id);
  request.set_phase(phase);
  v1::FinishResponse response;
  return FromGrpcStatus(stub_->Finish(&ctx, request, &response));
}

absl::StatusOr<bool> KvManagerClient::Abort(const std::string& request_id) {
  grpc::ClientContext ctx;
  SetDeadline(&ctx, timeout_);
  v1::AbortRequest request;
  request.set_request_id(request_id);
  v1::AbortResponse response;
  grpc::Status s = stub_->Abort(&ctx, request, &response);
  if (!s.ok()) return FromGrpcStatus(s);
  return response.was_running();
}

absl::StatusOr<v1::ServerInfo> KvManagerClient::GetServerInfo() {
  grpc::ClientContext ctx;
  SetDeadline(&ctx, timeout_);
  v1::ServerInfo info;
  grpc::Status s = stub_->GetServerInfo(&ctx, v1::GetServerInfoRequest(), &info);
  if (!s.ok()) return FromGrpcStatus(s);
  return info;
}

absl::StatusOr<v1::RegisterWorkerResponse> KvManagerClient::RegisterWorker(const v1::RegisterWorkerRequest& request) {
  grpc::ClientContext ctx;
  SetDeadline(&ctx, timeout_);
  v1::RegisterWorkerResponse response;
  grpc::Status s = stub_->RegisterWorker(&ctx, request, &response);
  if (!s.ok()) return FromGrpcStatus(s);
  return response;
}

absl::StatusOr<v1::HeartbeatResponse> KvManagerClient::Heartbeat(const v1::HeartbeatRequest& request) {
  grpc::ClientContext ctx;
  SetDeadline(&ctx, timeout_);
  v1::HeartbeatResponse response;
  grpc::Status s = stub_->Heartbeat(&ctx, request, &response);
  if (!s.ok()) return FromGrpcStatus(s);
  return response;
}

absl::StatusOr<bool> KvManagerClient::ReportProgress(const v1::ProgressReport& report) {
  grpc::ClientContext ctx;
  SetDeadline(&ctx, timeout_);
  v1::ProgressAck ack;
  grpc::Status s = stub_->ReportProgress(&ctx, report, &ack);
  if (s.error_code() == grpc::StatusCode::NOT_FOUND) return false;
  if (!s.ok()) return FromGrpcStatus(s);
  return ack.active();
}

// --- WorkerRegistration ------------------------------------------------------------------

WorkerRegistration::WorkerRegistration(std::shared_ptr<grpc::Channel> channel, v1::RegisterWorkerRequest request,
                                       CapacityFn capacity, Options options)
    : channel_(std::move(channel)),
      stub_(v1::KvManager::NewStub(channel_)),
      client_(channel_, options.rpc_timeout),
      request_(std::move(request)),
      capacity_(std::move(capacity)),
      options_(options) {}

WorkerRegistration::~WorkerRegistration() { Stop(); }

void WorkerRegistration::Start() {
  std::lock_guard<std::mutex> lock(mu_);
  if (started_ || stopping_) return;
  started_ = true;
  thread_ = std::thread([this] { Loop(); });
}

void WorkerRegistration::Stop() {
  {
    std::lock_guard<std::mutex> lock(mu_);
    stopping_ = true;
    if (current_ != nullptr) current_->TryCancel();
  }
  changed_.notify_all();
  if (thread_.joinable()) thread_.join();
  registered_.store(false);
}

bool WorkerRegistration::WaitRegistered(absl::Duration timeout) {
  std::unique_lock<std::mutex> lock(mu_);
  return changed_.wait_for(lock, absl::ToChronoNanoseconds(timeout),
                           [this] { return registered_.load() || stopping_; }) &&
         registered_.load();
}

int64_t WorkerRegistration::registrations() const {
  std::lock_guard<std::mutex> lock(mu_);
  return registrations_;
}

bool WorkerRegistration::WaitRegistrations(int64_t count, absl::Duration timeout) {
  std::unique_lock<std::mutex> lock(mu_);
  return changed_.wait_for(lock, absl::ToChronoNanoseconds(timeout),
                           [&] { return registrations_ >= count || stopping_; }) &&
         registrations_ >= count;
}

absl::Status WorkerRegistration::last_error() const {
  std::lock_guard<std::mutex> lock(mu_);
  return last_error_;
}

absl::StatusOr<bool> WorkerRegistration::ReportProgress(v1::ProgressReport report) {
  report.set_worker_id(request_.worker_id());
  return client_.ReportProgress(report);
}

template <typename Req, typename Resp, typename Method>
absl::Status WorkerRegistration::Call(Method method, const Req& req, Resp* resp) {
  grpc::ClientContext ctx;
  SetDeadline(&ctx, options_.rpc_timeout);
  {
    std::lock_guard<std::mutex> lock(mu_);
    if (stopping_) return absl::CancelledError("stopping");
    current_ = &ctx;
  }
  grpc::Status s = ((*stub_).*method)(&ctx, req, resp);
  std::lock_guard<std::mutex> lock(mu_);
  current_ = nullptr;
  last_error_ = FromGrpcStatus(s);
  return last_error_;
}

void WorkerRegistration::Loop() {
  using Stub = v1::KvManager::Stub;
  absl::Duration interval = options_.retry_interval;
  absl::Duration worker_timeout = absl::InfiniteDuration();
  absl::Time last_ok = absl::InfinitePast();
  bool need_register = true;

  // Waits `d` unless stopping; returns false when stopping.
  const auto wait = [this](absl::Duration d) {
    std::unique_lock<std::mutex> lock(mu_);
    return !changed_.wait_for(lock, absl::ToChronoNanoseconds(d), [this] { return stopping_; });
  };
  const auto set_registered = [this](bool value) {
    {
      std::lock_guard<std::mutex> lock(mu_);
      registered_.store(value);
    }
    changed_.notify_all();
  };
  // After a failure: the manager dropped us once it has not heard from us for its
  // worker timeout.
  const auto failed = [&]() {
    need_register = true;
    if (absl::Now() - last_ok > worker_timeout) set_registered(false);
  };

  while (true) {
    if (need_register) {
      v1::RegisterWorkerRequest req = request_;
      if (capacity_) *req.mutable_capacity() = capacity_();
      v1::RegisterWorkerResponse resp;
      absl::Status s = Call<v1::RegisterWorkerRequest, v1::RegisterWorkerResponse>(&Stub::RegisterWorker, req, &resp);
      if (s.ok()) {
        need_register = false;
        last_ok = absl::Now();
        interval = absl::Milliseconds(std::max(1, resp.heartbeat_interval_ms()));
        worker_timeout = absl::Milliseconds(std::max(1, resp.worker_timeout_ms()));
        {
          std::lock_guard<std::mutex> lock(mu_);
          ++registrations_;
        }
        set_registered(true);
      } else {
        if (absl::IsCancelled(s)) {
          std::lock_guard<std::mutex> lock(mu_);
          if (stopping_) break;
        }
        failed();
        if (!wait(std::min(options_.retry_interval, interval))) break;
        continue;
      }
    } else {
      v1::HeartbeatRequest req;
      req.set_worker_id(request_.worker_id());
      if (capacity_) *req.mutable_capacity() = capacity_();
      v1::HeartbeatResponse resp;
      absl::Status s = Call<v1::HeartbeatRequest, v1::HeartbeatResponse>(&Stub::Heartbeat, req, &resp);
      if (s.ok() && resp.registered()) {
        last_ok = absl::Now();
      } else if (s.ok()) {  // the manager does not know us (it restarted): register now
        need_register = true;
        set_registered(false);
        continue;
      } else {
        failed();
        if (!wait(std::min(options_.retry_interval, interval))) break;
        continue;
      }
    }
    if (!wait(interval)) break;
  }
}

}  // namespace kvgate::kv
