#include "prefill_worker/prefill_service.h"

#include "absl/strings/str_cat.h"
#include "common/auth.h"
#include "common/grpc_status.h"
#include "kv_manager/plan_proto.h"
#include "kv_manager/proto_convert.h"

namespace kvgate::prefill {

grpc::ServerUnaryReactor* PrefillService::Prefill(grpc::CallbackServerContext* context,
                                                  const v1::PrefillRequest* request, v1::PrefillResponse* response) {
  grpc::ServerUnaryReactor* reactor = context->DefaultReactor();
  if (grpc::Status auth = CheckInternalToken(*context, internal_token_); !auth.ok()) {
    reactor->Finish(auth);
    return reactor;
  }
  const v1::Ticket& ticket = request->ticket();
  if (ticket.request_id().empty() || ticket.transfer_id().empty() || ticket.decode().address().empty()) {
    reactor->Finish(grpc::Status(grpc::StatusCode::INVALID_ARGUMENT,
                                 "ticket: request_id, transfer_id and decode.address are required"));
    return reactor;
  }
  if (request->prompt().empty()) {
    reactor->Finish(grpc::Status(grpc::StatusCode::INVALID_ARGUMENT, "prompt is empty"));
    return reactor;
  }
  PrefillJob job;
  job.request_id = ticket.request_id();
  job.transfer_id = ticket.transfer_id();
  job.decode_address = ticket.decode().address();
  job.transport = ticket.transport();
  job.prompt.assign(request->prompt().begin(), request->prompt().end());
  absl::StatusOr<gates::EvictionSpec> plan = kv::EvictionSpecFromPlan(ticket.plan());
  if (!plan.ok()) {
    reactor->Finish(ToGrpcStatus(plan.status()));
    return reactor;
  }
  job.plan = *std::move(plan);
  job.sampling = kv::FromProto(request->sampling()).sampling;
  const auto deadline = context->deadline();
  if (deadline != std::chrono::system_clock::time_point::max()) job.deadline = absl::FromChrono(deadline);
  if (report_) {
    v1::ProgressReport report;
    report.set_request_id(job.request_id);
    report.set_worker_id(worker_id_);
    report.set_phase(v1::RequestState::PREFILLING);
    report_(report);
  }
  engine_->Submit(std::move(job), [this, reactor, response, request_id = ticket.request_id()](
                                      absl::StatusOr<PrefillResult> result) {
    if (!result.ok()) {
      if (report_ && !absl::IsCancelled(result.status())) {
        v1::ProgressReport report;
        report.set_request_id(request_id);
        report.set_worker_id(worker_id_);
        report.set_phase(v1::RequestState::FAILED);
        report.set_error(std::string(result.status().message()));
        report_(report);
      }
      reactor->Finish(ToGrpcStatus(result.status()));
      return;
    }
    response->set_first_token(result->first_token);
    v1::KvStats* kv = response->mutable_kv();
    kv->set_policy(result->kv.policy);
    kv->set_kv_entries_full(result->kv.kv_entries_full);
    kv->set_kv_entries_kept(result->kv.kv_entries_kept);
    kv->set_keep_fraction(result->kv.keep_fraction);
    kv->set_bytes_transferred(result->bytes_transferred);
    kv->set_bytes_full(result->kv.bytes_full);
    response->set_queue_ms(result->queue_ms);
    response->set_prefill_ms(result->prefill_ms);
    response->set_transfer_ms(result->transfer_ms);
    if (metrics_ != nullptr) {
      metrics_->ObserveQueue(result->queue_ms / 1e3);
      metrics_->ObservePrefill(result->prefill_ms / 1e3);
      metrics_->ObserveTransfer(result->transfer_ms / 1e3, result->bytes_transferred, result->kv.bytes_full);
      metrics_->ObserveKeepFraction(result->kv.keep_fraction);
    }
    if (report_) {
      v1::ProgressReport report;
      report.set_request_id(request_id);
      report.set_worker_id(worker_id_);
      report.set_phase(v1::RequestState::TRANSFERRING);
      report.set_kv_entries_full(result->kv.kv_entries_full);
      report.set_kv_entries_kept(result->kv.kv_entries_kept);
      report.set_bytes_transferred(result->bytes_transferred);
      for (int32_t kept : result->kept_per_head) report.add_kept_per_head(kept);
      report.set_next_pos(result->next_pos);
      report_(report);
    }
    reactor->Finish(grpc::Status::OK);
  });
  return reactor;
}

grpc::ServerUnaryReactor* PrefillService::AbortRequest(grpc::CallbackServerContext* context,
                                                       const v1::WorkerAbortRequest* request,
                                                       v1::WorkerAbortResponse* response) {
  grpc::ServerUnaryReactor* reactor = context->DefaultReactor();
  if (grpc::Status auth = CheckInternalToken(*context, internal_token_); !auth.ok()) {
    reactor->Finish(auth);
    return reactor;
  }
  if (request->request_id().empty()) {
    reactor->Finish(grpc::Status(grpc::StatusCode::INVALID_ARGUMENT, "request_id is required"));
    return reactor;
  }
  response->set_was_running(engine_->Abort(request->request_id()));
  reactor->Finish(grpc::Status::OK);
  return reactor;
}

}  // namespace kvgate::prefill
