#include "router/router_service.h"

#include <filesystem>
#include <random>

#include "absl/strings/str_cat.h"
#include "absl/strings/str_format.h"
#include "common/grpc_status.h"
#include "common/status_macros.h"
#include "common/stream_writer.h"
#include "engine/output_stream.h"
#include "kvgate/v1/worker.grpc.pb.h"
#include "kv_manager/proto_convert.h"

namespace kvgate::router {

struct RouterService::InFlight {
  std::string request_id;  // empty until validated
  v1::GenerateRequest request;
  QueuedStreamWriter<v1::GenerateResponse>* stream = nullptr;
  absl::Time received;
  absl::Time deadline = absl::InfiniteFuture();
  std::mutex mu;
  bool client_gone = false;   // cancelled by the client or its deadline
  bool aborted = false;       // Abort RPC
  grpc::ClientContext* prefill_context = nullptr;
  grpc::ClientContext* decode_context = nullptr;

  void CancelCalls() {
    std::lock_guard<std::mutex> lock(mu);
    if (prefill_context) prefill_context->TryCancel();
    if (decode_context) decode_context->TryCancel();
  }
};

namespace {

std::string NewRequestId(int64_t sequence) {
  static const uint64_t process_salt = std::random_device{}() ^ (uint64_t{std::random_device{}()} << 32);
  return absl::StrFormat("req-%016x-%d", process_salt, sequence);
}

void SetDeadline(grpc::ClientContext* context, absl::Time deadline) {
  if (deadline != absl::InfiniteFuture()) context->set_deadline(absl::ToChronoTime(deadline));
}

}  // namespace

absl::StatusOr<std::unique_ptr<RouterService>> RouterService::Create(RouterOptions options, ChannelPool* channels,
                                                                     Metrics* metrics) {
  namespace fs = std::filesystem;
  auto service = std::unique_ptr<RouterService>(new RouterService(std::move(options), channels, metrics));
  KVGATE_ASSIGN_OR_RETURN(service->config_, engine::LoadModelConfig(service->options_.model_dir));
  KVGATE_ASSIGN_OR_RETURN(service->tokenizer_, engine::Tokenizer::FromFile(
                                                   (fs::path(service->options_.model_dir) / "tokenizer.json").string()));
  return service;
}

RouterService::~RouterService() { Shutdown(); }

kv::KvManagerClient RouterService::Manager() const {
  return kv::KvManagerClient(channels_->Get(options_.manager_address), absl::Seconds(2));
}

void RouterService::StartHealth(std::function<void(bool)> set_serving) {
  health_ = std::thread([this, set_serving = std::move(set_serving)] {
    bool last = false;
    bool first = true;
    std::unique_lock<std::mutex> lock(mu_);
    while (!stopping_) {
      lock.unlock();
      kv::KvManagerClient manager(channels_->Get(options_.manager_address),
                                  absl::Milliseconds(std::max(100, options_.health_interval_ms)));
      absl::StatusOr<v1::ServerInfo> info = manager.GetServerInfo();
      const bool reachable = info.ok();
      manager_reachable_.store(reachable);
      if (set_serving && (first || reachable != last)) set_serving(reachable);
      first = false;
      last = reachable;
      lock.lock();
      changed_.wait_for(lock, std::chrono::milliseconds(options_.health_interval_ms), [this] { return stopping_; });
    }
    if (set_serving) set_serving(false);
  });
}

void RouterService::Shutdown(absl::Time deadline) {
  std::unique_lock<std::mutex> lock(mu_);
  stopping_ = true;
  changed_.notify_all();
  if (!changed_.wait_until(lock, absl::ToChronoTime(deadline), [this] { return running_ == 0; })) {
    for (auto& [id, call] : in_flight_) call->CancelCalls();
    changed_.wait(lock, [this] { return running_ == 0; });
  }
  lock.unlock();
  if (health_.joinable()) health_.join();
}

grpc::ServerWriteReactor<v1::GenerateResponse>* RouterService::Generate(grpc::CallbackServerContext* context,
                                                                         const v1::GenerateRequest* request) {
  auto* stream = new QueuedStreamWriter<v1::GenerateResponse>();
  grpc::Status auth = CheckBearerToken(*context, options_.bearer_token);
  if (!auth.ok()) {
    if (metrics_) metrics_->CountRequest("UNAUTHENTICATED");
    stream->Complete(auth);
    return stream;
  }
  auto call = std::make_shared<InFlight>();
  call->request = *request;
  call->stream = stream;
  call->received = absl::Now();
  const auto deadline = context->deadline();
  if (deadline != std::chrono::system_clock::time_point::max()) call->deadline = absl::FromChrono(deadline);
  stream->set_on_broken([weak = std::weak_ptr<InFlight>(call)] {
    if (auto c = weak.lock()) {
      {
        std::lock_guard<std::mutex> lock(c->mu);
        c->client_gone = true;
      }
      c->CancelCalls();
    }
  });
  {
    std::lock_guard<std::mutex> lock(mu_);
    if (stopping_) {
      stream->Complete(grpc::Status(grpc::StatusCode::UNAVAILABLE, "the router is shutting down"));
      return stream;
    }
    ++running_;
  }
  std::thread([this, call] { Serve(call); }).detach();
  return stream;
}

void RouterService::Serve(std::shared_ptr<InFlight> call) {
  grpc::Status status = Run(call);
  if (metrics_) metrics_->CountRequest(std::string(absl::StatusCodeToString(FromGrpcStatus(status).code())));
  call->stream->Complete(status);
  std::lock_guard<std::mutex> lock(mu_);
  if (!call->request_id.empty()) {
    auto it = in_flight_.find(call->request_id);
    if (it != in_flight_.end() && it->second == call) in_flight_.erase(it);
  }
  --running_;
  changed_.notify_all();
}

grpc::Status RouterService::Run(const std::shared_ptr<InFlight>& self) {
  InFlight& call = *self;
  if (!manager_reachable_.load()) {
    return grpc::Status(grpc::StatusCode::UNAVAILABLE, "the KV manager is unreachable; retry later");
  }
  absl::StatusOr<ValidatedRequest> validated = ValidateGenerateRequest(call.request, *tokenizer_, config_, options_.limits);
  if (!validated.ok()) return ToGrpcStatus(validated.status());
  ValidatedRequest& r = *validated;
  if (r.request_id.empty()) r.request_id = NewRequestId(next_id_.fetch_add(1));
  {
    std::lock_guard<std::mutex> lock(mu_);
    if (in_flight_.count(r.request_id) > 0) {
      return grpc::Status(grpc::StatusCode::ALREADY_EXISTS,
                          absl::StrCat("request_id: '", r.request_id, "' is already in flight"));
    }
    call.request_id = r.request_id;
    in_flight_[r.request_id] = self;
  }
  kv::KvManagerClient manager = Manager();
  v1::AdmitRequest admit;
  admit.set_request_id(r.request_id);
  admit.set_prompt_tokens(static_cast<int32_t>(r.prompt.size()));
  admit.set_max_tokens(r.options.max_tokens);
  *admit.mutable_compression() = kv::ToProto(r.eviction);
  absl::StatusOr<v1::Ticket> ticket = manager.Admit(admit);
  if (!ticket.ok()) return ToGrpcStatus(ticket.status());
  const absl::Time admitted = absl::Now();

  // The lease lives while this call does.
  std::mutex lease_mu;
  std::condition_variable lease_cv;
  bool lease_done = false;
  std::thread lease([&] {
    const auto interval = std::chrono::milliseconds(std::max(50, ticket->lease_ttl_ms() / 3));
    std::unique_lock<std::mutex> lock(lease_mu);
    while (!lease_cv.wait_for(lock, interval, [&] { return lease_done; })) {
      lock.unlock();
      (void)manager.RenewLease(ticket->lease_id());
      lock.lock();
    }
  });

  v1::SamplingParams sampling = kv::ToProto(r.options);
  // Prefill, concurrently with the decode stream.
  grpc::ClientContext prefill_context;
  SetDeadline(&prefill_context, call.deadline);
  v1::PrefillRequest prefill_request;
  *prefill_request.mutable_ticket() = *ticket;
  prefill_request.mutable_prompt()->Add(r.prompt.begin(), r.prompt.end());
  *prefill_request.mutable_sampling() = sampling;
  v1::PrefillResponse prefill_response;
  grpc::Status prefill_status;
  grpc::ClientContext decode_context;
  SetDeadline(&decode_context, call.deadline);
  {
    std::lock_guard<std::mutex> lock(call.mu);
    call.prefill_context = &prefill_context;
    call.decode_context = &decode_context;
  }
  if (call.client_gone) call.CancelCalls();
  std::shared_ptr<grpc::Channel> prefill_channel = channels_->Get(ticket->prefill().address());
  std::shared_ptr<grpc::Channel> decode_channel = channels_->Get(ticket->decode().address());
  if (!prefill_channel || !decode_channel) {
    (void)manager.Finish(r.request_id, v1::RequestState::FAILED);
    return grpc::Status(grpc::StatusCode::INTERNAL, "the ticket names a worker address this router cannot reach");
  }
  std::thread prefill([&] {
    auto stub = v1::PrefillWorker::NewStub(prefill_channel);
    prefill_status = stub->Prefill(&prefill_context, prefill_request, &prefill_response);
    if (!prefill_status.ok()) decode_context.TryCancel();  // decode would wait for a transfer that never comes
  });

  v1::DecodeRequest decode_request;
  *decode_request.mutable_ticket() = *ticket;
  *decode_request.mutable_sampling() = sampling;
  const size_t tail = std::min<size_t>(r.prompt.size(), engine::kDetokenizePrefixTokens);
  decode_request.mutable_prompt_tail()->Add(r.prompt.end() - tail, r.prompt.end());
  decode_request.set_skip_text(r.skip_text);
  auto decode_stub = v1::DecodeWorker::NewStub(decode_channel);
  std::unique_ptr<grpc::ClientReader<v1::DecodeResponse>> reader = decode_stub->Decode(&decode_context, decode_request);
  v1::DecodeResponse message;
  v1::DecodeComplete complete;
  bool completed = false;
  int32_t tokens = 0;
  double ttft_ms = 0;
  while (reader->Read(&message)) {
    if (message.has_chunk()) {
      if (tokens == 0) {
        ttft_ms = absl::ToDoubleMilliseconds(absl::Now() - call.received);
        if (metrics_) metrics_->ObserveTimeToFirstToken(ttft_ms / 1e3);
      }
      tokens += message.chunk().token_ids_size();
      v1::GenerateResponse out;
      *out.mutable_chunk() = message.chunk();
      call.stream->Write(std::move(out));
    } else if (message.has_complete()) {
      complete = message.complete();
      completed = true;
    }
  }
  grpc::Status decode_status = reader->Finish();
  prefill.join();
  {
    std::lock_guard<std::mutex> lock(call.mu);
    call.prefill_context = nullptr;
    call.decode_context = nullptr;
  }
  {
    std::lock_guard<std::mutex> lock(lease_mu);
    lease_done = true;
  }
  lease_cv.notify_all();
  lease.join();

  bool client_gone;
  {
    std::lock_guard<std::mutex> lock(call.mu);
    client_gone = call.client_gone;
  }
  if (client_gone || !decode_status.ok() || !prefill_status.ok() || !completed) {
    // Every worker drops what it holds of this request; the manager releases the lease.
    (void)manager.Abort(r.request_id);
    (void)manager.Finish(r.request_id, client_gone ? v1::RequestState::ABORTED : v1::RequestState::FAILED);
    if (client_gone) {
      if (absl::Now() >= call.deadline) {
        return grpc::Status(grpc::StatusCode::DEADLINE_EXCEEDED, "the request's deadline passed");
      }
      return grpc::Status(grpc::StatusCode::CANCELLED, "the client cancelled the request");
    }
    // The first failure explains the others (a failed prefill cancels the decode call).
    if (!prefill_status.ok() && prefill_status.error_code() != grpc::StatusCode::CANCELLED) {
      return grpc::Status(prefill_status.error_code(), absl::StrCat("prefill: ", prefill_status.error_message()));
    }
    if (!decode_status.ok()) {
      return grpc::Status(decode_status.error_code(), absl::StrCat("decode: ", decode_status.error_message()));
    }
    if (!prefill_status.ok()) {
      return grpc::Status(prefill_status.error_code(), absl::StrCat("prefill: ", prefill_status.error_message()));
    }
    return grpc::Status(grpc::StatusCode::INTERNAL, "decode stream ended without a complete message");
  }
  v1::GenerateResponse out;
  v1::GenerateComplete* done = out.mutable_complete();
  done->set_request_id(r.request_id);
  done->set_finish_reason(complete.finish_reason());
  done->set_matched_stop(complete.matched_stop());
  done->mutable_usage()->set_prompt_tokens(static_cast<int32_t>(r.prompt.size()));
  done->mutable_usage()->set_completion_tokens(complete.completion_tokens());
  *done->mutable_kv() = prefill_response.kv();
  done->mutable_kv()->set_pages_used(complete.pages_used());
  v1::Timings* t = done->mutable_timings();
  t->set_queue_ms(absl::ToDoubleMilliseconds(admitted - call.received) + prefill_response.queue_ms());
  t->set_prefill_ms(prefill_response.prefill_ms());
  t->set_transfer_ms(prefill_response.transfer_ms());
  t->set_time_to_first_token_ms(ttft_ms);
  t->set_decode_ms(complete.decode_ms());
  t->set_time_per_output_token_ms(complete.time_per_output_token_ms());
  call.stream->Write(std::move(out));
  (void)manager.Finish(r.request_id, complete.finish_reason() == v1::GenerateComplete::ABORTED
                                         ? v1::RequestState::ABORTED
                                         : v1::RequestState::DONE);
  return grpc::Status::OK;
}

grpc::ServerUnaryReactor* RouterService::Abort(grpc::CallbackServerContext* context, const v1::AbortRequest* request,
                                               v1::AbortResponse* response) {
  grpc::ServerUnaryReactor* reactor = context->DefaultReactor();
  grpc::Status auth = CheckBearerToken(*context, options_.bearer_token);
  if (!auth.ok()) {
    reactor->Finish(auth);
    return reactor;
  }
  if (request->request_id().empty()) {
    reactor->Finish(grpc::Status(grpc::StatusCode::INVALID_ARGUMENT, "request_id: required"));
    return reactor;
  }
  // The manager fans the abort out; the decode worker ends the stream with ABORTED.
  absl::StatusOr<bool> was_running = Manager().Abort(request->request_id());
  if (!was_running.ok()) {
    reactor->Finish(ToGrpcStatus(was_running.status()));
    return reactor;
  }
  response->set_was_running(*was_running);
  reactor->Finish(grpc::Status::OK);
  return reactor;
}

grpc::ServerUnaryReactor* RouterService::GetModelInfo(grpc::CallbackServerContext* context,
                                                      const v1::GetModelInfoRequest* request,
                                                      v1::ModelInfo* response) {
  grpc::ServerUnaryReactor* reactor = context->DefaultReactor();
  std::filesystem::path dir(options_.model_dir);
  if (dir.filename().empty()) dir = dir.parent_path();
  response->set_model_name(dir.filename().string());
  response->set_architecture(config_.architecture_name);
  response->set_vocab_size(config_.vocab_size);
  response->set_max_context_tokens(config_.max_context_tokens);
  response->set_num_layers(config_.num_layers);
  response->set_num_attention_heads(config_.num_heads);
  response->set_num_kv_heads(config_.num_kv_heads);
  response->set_head_dim(config_.head_dim);
  for (int32_t id : config_.eos_token_ids) response->add_eos_token_ids(id);
  response->set_kv_entry_bytes(static_cast<int32_t>(config_.KvEntryBytes()));
  for (const std::string& policy : AcceptedPolicies(options_.limits)) response->add_policies(policy);
  reactor->Finish(grpc::Status::OK);
  return reactor;
}

grpc::ServerUnaryReactor* RouterService::GetServerInfo(grpc::CallbackServerContext* context,
                                                       const v1::GetServerInfoRequest* request,
                                                       v1::ServerInfo* response) {
  grpc::ServerUnaryReactor* reactor = context->DefaultReactor();
  absl::StatusOr<v1::ServerInfo> info = Manager().GetServerInfo();
  if (!info.ok()) {
    reactor->Finish(ToGrpcStatus(absl::UnavailableError(absl::StrCat("KV manager: ", info.status().message()))));
    return reactor;
  }
  *response = *std::move(info);
  response->clear_roles();
  for (const std::string& role : options_.roles) response->add_roles(role);
  response->set_version(options_.version);
  if (!options_.backend.empty()) response->set_backend(options_.backend);
  reactor->Finish(grpc::Status::OK);
  return reactor;
}

}  // namespace kvgate::router
