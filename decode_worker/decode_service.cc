#include "decode_worker/decode_service.h"

#include "absl/strings/str_cat.h"
#include "common/auth.h"
#include "common/grpc_status.h"
#include "common/stream_writer.h"
#include "kv_manager/proto_convert.h"

namespace kvgate::decode {
namespace {

v1::GenerateComplete::FinishReason ToProto(engine::FinishReason reason) {
  switch (reason) {
    case engine::FinishReason::kStop: return v1::GenerateComplete::STOP;
    case engine::FinishReason::kLength: return v1::GenerateComplete::LENGTH;
    case engine::FinishReason::kAborted: return v1::GenerateComplete::ABORTED;
  }
  return v1::GenerateComplete::FINISH_REASON_UNSPECIFIED;
}

}  // namespace

grpc::ServerWriteReactor<v1::DecodeResponse>* DecodeService::Decode(grpc::CallbackServerContext* context,
                                                                     const v1::DecodeRequest* request) {
  auto* stream = new QueuedStreamWriter<v1::DecodeResponse>();
  if (grpc::Status auth = CheckInternalToken(*context, internal_token_); !auth.ok()) {
    stream->Complete(auth);
    return stream;
  }
  const v1::Ticket& ticket = request->ticket();
  if (ticket.request_id().empty() || ticket.transfer_id().empty()) {
    stream->Complete(grpc::Status(grpc::StatusCode::INVALID_ARGUMENT, "ticket: request_id and transfer_id are required"));
    return stream;
  }
  DecodeJob job;
  job.request_id = ticket.request_id();
  job.transfer_id = ticket.transfer_id();
  job.options = kv::FromProto(request->sampling());
  job.prompt_tail.assign(request->prompt_tail().begin(), request->prompt_tail().end());
  job.skip_text = request->skip_text();
  // The transfer may take as long as the call and the lease live: the prefill worker
  // runs one job at a time, so under load a transfer arrives long after one lease_ttl_ms
  // (while the router keeps renewing the lease). A lease that expires is aborted here by
  // the KV manager (AbortRequest cancels the wait), so no timer of our own is needed.
  const auto deadline = context->deadline();
  if (deadline != std::chrono::system_clock::time_point::max()) job.transfer_deadline = absl::FromChrono(deadline);
  const std::string request_id = job.request_id;
  DecodeCallbacks callbacks;
  auto reported_decoding = std::make_shared<bool>(false);
  callbacks.on_token = [this, stream, request_id, reported_decoding](int32_t token, std::string_view text) {
    if (!*reported_decoding && report_) {
      *reported_decoding = true;
      v1::ProgressReport report;
      report.set_request_id(request_id);
      report.set_worker_id(worker_id_);
      report.set_phase(v1::RequestState::DECODING);
      report_(report);
    }
    v1::DecodeResponse response;
    response.mutable_chunk()->add_token_ids(token);
    response.mutable_chunk()->set_text(std::string(text));
    stream->Write(std::move(response));
  };
  callbacks.on_done = [this, stream, request_id](absl::StatusOr<DecodeSummary> summary) {
    if (!summary.ok()) {
      if (report_) {
        v1::ProgressReport report;
        report.set_request_id(request_id);
        report.set_worker_id(worker_id_);
        report.set_phase(v1::RequestState::FAILED);
        report.set_error(std::string(summary.status().message()));
        report_(report);
      }
      stream->Complete(ToGrpcStatus(summary.status()));
      return;
    }
    if (metrics_ != nullptr && summary->completion_tokens > 1) {
      metrics_->ObserveTimePerOutputToken(summary->time_per_output_token_ms / 1e3);
    }
    v1::DecodeResponse response;
    v1::DecodeComplete* complete = response.mutable_complete();
    complete->set_finish_reason(ToProto(summary->finish_reason));
    complete->set_matched_stop(summary->matched_stop);
    complete->set_completion_tokens(summary->completion_tokens);
    complete->set_pages_used(summary->pages_used);
    complete->set_wait_transfer_ms(summary->wait_transfer_ms);
    complete->set_decode_ms(summary->decode_ms);
    complete->set_time_per_output_token_ms(summary->time_per_output_token_ms);
    stream->Write(std::move(response));
    stream->Complete(grpc::Status::OK);
  };
  stream->set_on_broken([this, request_id] { engine_->Abort(request_id); });
  absl::Status submitted = engine_->Submit(std::move(job), std::move(callbacks));
  if (!submitted.ok()) stream->Complete(ToGrpcStatus(submitted));
  return stream;
}

grpc::ServerUnaryReactor* DecodeService::AbortRequest(grpc::CallbackServerContext* context,
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
  bool was_running = engine_->Abort(request->request_id());
  // A transfer that arrives after the abort must be refused, even if Decode never came.
  if (!request->transfer_id().empty()) was_running = engine_->inbox().Cancel(request->transfer_id()) || was_running;
  response->set_was_running(was_running);
  reactor->Finish(grpc::Status::OK);
  return reactor;
}

}  // namespace kvgate::decode
