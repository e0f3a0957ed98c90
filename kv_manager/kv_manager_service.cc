#include "kv_manager/kv_manager_service.h"

#include <algorithm>
#include <utility>
#include <vector>

#include "common/auth.h"
#include "common/grpc_status.h"
#include "kvgate/v1/worker.grpc.pb.h"

namespace kvgate::kv {

ChannelFactory InsecureChannelFactory() {
  return [](const std::string& address) -> std::shared_ptr<grpc::Channel> {
    if (address.empty() || address == "inproc") return nullptr;  // only the process itself reaches it
    return grpc::CreateChannel(address, grpc::InsecureChannelCredentials());
  };
}

struct KvManagerService::Call {
  Job job;
  grpc::ClientContext ctx;
  v1::WorkerAbortRequest request;
  v1::WorkerAbortResponse response;
  std::unique_ptr<v1::PrefillWorker::Stub> prefill;
  std::unique_ptr<v1::DecodeWorker::Stub> decode;
};

KvManagerService::KvManagerService(std::unique_ptr<ManagerState> state, ChannelFactory channels,
                                   KvManagerServiceOptions options)
    : state_(std::move(state)), channels_(std::move(channels)), options_(options) {
  thread_ = std::thread([this] { Loop(); });
}

KvManagerService::~KvManagerService() { Shutdown(absl::Now()); }

FanoutStats KvManagerService::fanout_stats() const {
  std::lock_guard<std::mutex> lock(mu_);
  return stats_;
}

// --- RPCs ------------------------------------------------------------------------------

grpc::ServerUnaryReactor* KvManagerService::RegisterWorker(grpc::CallbackServerContext* ctx,
                                                           const v1::RegisterWorkerRequest* request,
                                                           v1::RegisterWorkerResponse* response) {
  grpc::ServerUnaryReactor* reactor = ctx->DefaultReactor();
  if (grpc::Status auth = CheckInternalToken(*ctx, options_.internal_token); !auth.ok()) {
    reactor->Finish(auth);
    return reactor;
  }
  absl::StatusOr<v1::RegisterWorkerResponse> r = state_->RegisterWorker(*request);
  if (r.ok()) *response = *std::move(r);
  reactor->Finish(ToGrpcStatus(r.status()));
  return reactor;
}

grpc::ServerUnaryReactor* KvManagerService::Heartbeat(grpc::CallbackServerContext* ctx,
                                                      const v1::HeartbeatRequest* request,
                                                      v1::HeartbeatResponse* response) {
  grpc::ServerUnaryReactor* reactor = ctx->DefaultReactor();
  if (grpc::Status auth = CheckInternalToken(*ctx, options_.internal_token); !auth.ok()) {
    reactor->Finish(auth);
    return reactor;
  }
  absl::StatusOr<v1::HeartbeatResponse> r = state_->Heartbeat(*request);
  if (r.ok()) *response = *std::move(r);
  reactor->Finish(ToGrpcStatus(r.status()));
  return reactor;
}

grpc::ServerUnaryReactor* KvManagerService::Admit(grpc::CallbackServerContext* ctx, const v1::AdmitRequest* request,
                                                  v1::Ticket* response) {
  grpc::ServerUnaryReactor* reactor = ctx->DefaultReactor();
  if (grpc::Status auth = CheckInternalToken(*ctx, options_.internal_token); !auth.ok()) {
    reactor->Finish(auth);
    return reactor;
  }
  absl::StatusOr<v1::Ticket> r = state_->Admit(*request);
  if (r.ok()) *response = *std::move(r);
  reactor->Finish(ToGrpcStatus(r.status()));
  return reactor;
}

grpc::ServerUnaryReactor* KvManagerService::RenewLease(grpc::CallbackServerContext* ctx,
                                                       const v1::RenewLeaseRequest* request,
                                                       v1::RenewLeaseResponse* response) {
  grpc::ServerUnaryReactor* reactor = ctx->DefaultReactor();
  if (grpc::Status auth = CheckInternalToken(*ctx, options_.internal_token); !auth.ok()) {
    reactor->Finish(auth);
    return reactor;
  }
  absl::StatusOr<v1::RenewLeaseResponse> r = state_->RenewLease(*request);
  if (r.ok()) *response = *std::move(r);
  reactor->Finish(ToGrpcStatus(r.status()));
  return reactor;
}

grpc::ServerUnaryReactor* KvManagerService::ReportProgress(grpc::CallbackServerContext* ctx,
                                                           const v1::ProgressReport* request,
                                                           v1::ProgressAck* response) {
  grpc::ServerUnaryReactor* reactor = ctx->DefaultReactor();
  if (grpc::Status auth = CheckInternalToken(*ctx, options_.internal_token); !auth.ok()) {
    reactor->Finish(auth);
    return reactor;
  }
  absl::StatusOr<ManagerState::ProgressResult> r = state_->ReportProgress(*request);
  if (r.ok()) {
    *response = r->ack;
    if (r->abort.has_value()) Enqueue(*r->abort);
  }
  reactor->Finish(ToGrpcStatus(r.status()));
  return reactor;
}

grpc::ServerUnaryReactor* KvManagerService::Finish(grpc::CallbackServerContext* ctx, const v1::FinishRequest* request,
                                                   v1::FinishResponse* response) {
  grpc::ServerUnaryReactor* reactor = ctx->DefaultReactor();
  if (grpc::Status auth = CheckInternalToken(*ctx, options_.internal_token); !auth.ok()) {
    reactor->Finish(auth);
    return reactor;
  }
  absl::StatusOr<ManagerState::FinishResult> r = state_->Finish(*request);
  if (r.ok() && r->abort.has_value()) Enqueue(*r->abort);
  reactor->Finish(ToGrpcStatus(r.status()));
  return reactor;
}

grpc::ServerUnaryReactor* KvManagerService::Abort(grpc::CallbackServerContext* ctx, const v1::AbortRequest* request,
                                                  v1::AbortResponse* response) {
  grpc::ServerUnaryReactor* reactor = ctx->DefaultReactor();
  if (grpc::Status auth = CheckInternalToken(*ctx, options_.internal_token); !auth.ok()) {
    reactor->Finish(auth);
    return reactor;
  }
  absl::StatusOr<ManagerState::AbortResult> r = state_->Abort(*request);
  if (r.ok()) {
    response->set_was_running(r->was_running);
    if (r->abort.has_value()) Enqueue(*r->abort);
  }
  reactor->Finish(ToGrpcStatus(r.status()));
  return reactor;
}

grpc::ServerUnaryReactor* KvManagerService::GetServerInfo(grpc::CallbackServerContext* ctx,
                                                          const v1::GetServerInfoRequest* request,
                                                          v1::ServerInfo* response) {
  grpc::ServerUnaryReactor* reactor = ctx->DefaultReactor();
  if (grpc::Status auth = CheckInternalToken(*ctx, options_.internal_token); !auth.ok()) {
    reactor->Finish(auth);
    return reactor;
  }
  *response = state_->GetServerInfo();
  reactor->Finish(grpc::Status::OK);
  return reactor;
}

// --- Abort fan-out -----------------------------------------------------------------------

void KvManagerService::Enqueue(const AbortOrder& order) {
  {
    std::lock_guard<std::mutex> lock(mu_);
    for (const AbortTarget& target : order.targets) {
      if (stopping_) {
        ++stats_.failed;
        continue;
      }
      jobs_.push_back(Job{target, order.request_id, order.transfer_id, order.reason, 0, absl::InfinitePast()});
    }
  }
  wake_.notify_all();
}

void KvManagerService::Loop() {
  std::unique_lock<std::mutex> lock(mu_);
  absl::Time next_sweep = absl::Now();
  while (!stopping_) {
    absl::Time now = absl::Now();
    if (now >= next_sweep) {
      lock.unlock();
      std::vector<AbortOrder> orders = state_->Sweep();
      for (const AbortOrder& order : orders) Enqueue(order);
      lock.lock();
      next_sweep = now + options_.sweep_interval;
      if (stopping_) break;
    }
    StartDueJobs(absl::Now(), lock);
    if (stopping_) break;
    absl::Time wake_at = next_sweep;
    for (const Job& job : jobs_) wake_at = std::min(wake_at, job.not_before);
    const absl::Duration wait = std::max(wake_at - absl::Now(), absl::ZeroDuration());
    wake_.wait_for(lock, absl::ToChronoNanoseconds(wait));
  }
}

void KvManagerService::StartDueJobs(absl::Time now, std::unique_lock<std::mutex>& lock) {
  std::vector<std::shared_ptr<Call>> calls;
  for (auto it = jobs_.begin(); it != jobs_.end();) {
    if (it->not_before > now) {
      ++it;
      continue;
    }
    auto call = std::make_shared<Call>();
    call->job = std::move(*it);
    it = jobs_.erase(it);
    call->request.set_request_id(call->job.request_id);
    call->request.set_transfer_id(call->job.transfer_id);
    call->request.set_reason(call->job.reason);
    call->ctx.set_deadline(absl::ToChronoTime(absl::Now() + options_.abort_timeout));
    in_flight_[call.get()] = call;
    ++stats_.sent;
    calls.push_back(std::move(call));
  }
  if (calls.empty()) return;
  // Start the calls unlocked: a callback may run inline and takes mu_.
  lock.unlock();
  for (const std::shared_ptr<Call>& call : calls) {
    Call* c = call.get();
    std::shared_ptr<grpc::Channel> channel = ChannelFor(c->job.target.address);
    if (channel == nullptr) {
      // Not retried: the factory will not find one later either.
      OnCallDone(c, grpc::Status(grpc::StatusCode::FAILED_PRECONDITION,
                                 "no channel to worker address '" + c->job.target.address + "'"));
      continue;
    }
    auto done = [this, c](grpc::Status status) { OnCallDone(c, status); };
    if (c->job.target.role == v1::PREFILL) {
      c->prefill = v1::PrefillWorker::NewStub(channel);
      c->prefill->async()->AbortRequest(&c->ctx, &c->request, &c->response, std::move(done));
    } else {
      c->decode = v1::DecodeWorker::NewStub(channel);
      c->decode->async()->AbortRequest(&c->ctx, &c->request, &c->response, std::move(done));
    }
  }
  lock.lock();
}

void KvManagerService::OnCallDone(Call* call, const grpc::Status& status) {
  std::shared_ptr<Call> keep;
  {
    std::lock_guard<std::mutex> lock(mu_);
    auto it = in_flight_.find(call);
    if (it == in_flight_.end()) return;
    keep = std::move(it->second);
    in_flight_.erase(it);
    if (status.ok()) {
      ++stats_.succeeded;
    } else {
      const bool retryable = status.error_code() == grpc::StatusCode::UNAVAILABLE ||
                             status.error_code() == grpc::StatusCode::DEADLINE_EXCEEDED;
      if (retryable && !stopping_ && call->job.attempt + 1 < options_.abort_attempts) {
        Job job = call->job;
        job.not_before = absl::Now() + options_.abort_retry_backoff * (1 << std::min(job.attempt, 10));
        ++job.attempt;
        jobs_.push_back(std::move(job));
      } else {
        ++stats_.failed;
      }
    }
    // Notified under mu_: once Shutdown sees in_flight_ empty, this call touches `this`
    // no more (the service may be destroyed right after).
    wake_.notify_all();
  }
  // `keep` (the ClientContext with it) is destroyed here, after the call completed.
}

std::shared_ptr<grpc::Channel> KvManagerService::ChannelFor(const std::string& address) {
  {
    std::lock_guard<std::mutex> lock(mu_);
    auto it = channel_cache_.find(address);
    if (it != channel_cache_.end()) return it->second;
  }
  std::shared_ptr<grpc::Channel> channel = channels_ ? channels_(address) : nullptr;
  if (channel == nullptr) return nullptr;
  std::lock_guard<std::mutex> lock(mu_);
  return channel_cache_.emplace(address, std::move(channel)).first->second;
}

void KvManagerService::Shutdown(absl::Time deadline) {
  {
    std::lock_guard<std::mutex> lock(mu_);
    if (shut_down_) return;
    shut_down_ = true;
    stopping_ = true;
  }
  wake_.notify_all();
  if (thread_.joinable()) thread_.join();

  std::unique_lock<std::mutex> lock(mu_);
  StartDueJobs(absl::InfiniteFuture(), lock);  // what is still queued goes out now, once
  wake_.wait_for(lock, absl::ToChronoNanoseconds(std::max(deadline - absl::Now(), absl::ZeroDuration())),
                 [this] { return in_flight_.empty(); });
  std::vector<std::shared_ptr<Call>> left;
  for (auto& [ptr, call] : in_flight_) left.push_back(call);
  lock.unlock();
  for (const std::shared_ptr<Call>& call : left) call->ctx.TryCancel();
  left.clear();
  lock.lock();
  wake_.wait(lock, [this] { return in_flight_.empty(); });  // cancelled calls complete promptly
  stats_.failed += static_cast<int64_t>(jobs_.size());
  jobs_.clear();
}

}  // namespace kvgate::kv
