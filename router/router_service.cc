#include "router/router_service.h"

#include <algorithm>
#include <filesystem>
#include <random>
#include <set>

#include "absl/strings/str_cat.h"
#include "absl/strings/str_format.h"
#include "common/grpc_status.h"
#include "common/status_macros.h"
#include "common/stream_writer.h"
#include "engine/output_stream.h"
#include "kvgate/v1/worker.grpc.pb.h"
#include "kv_manager/proto_convert.h"

namespace kvgate::router {

// One Generate call from its validation to its last message. Shared by the server
// reactor's callbacks, the async manager calls and the worker calls; mu guards the
// mutable state below it.
struct RouterService::Call {
  QueuedStreamWriter<v1::GenerateResponse>* stream = nullptr;
  ValidatedRequest r;
  absl::Time received;
  absl::Time deadline = absl::InfiniteFuture();  // the client's
  absl::Time queue_deadline;                     // when waiting for admission ends

  std::mutex mu;
  enum class State { kQueued, kAdmitting, kRunning, kDone } state = State::kQueued;
  bool client_gone = false;   // cancelled by the client or its deadline
  bool cut = false;           // ended by the shutdown's hard limit
  // One context per Admit attempt; kept until the call ends, so that CancelCalls may
  // cancel the latest without racing a retry.
  std::vector<std::unique_ptr<grpc::ClientContext>> admit_contexts;
  v1::AdmitRequest admit;
  v1::Ticket ticket;
  absl::Time admitted;
  absl::Time next_renew = absl::InfiniteFuture();
  grpc::ClientContext prefill_context;
  v1::PrefillRequest prefill_request;
  v1::PrefillResponse prefill_response;
  grpc::Status prefill_status;
  bool prefill_done = false;
  grpc::ClientContext decode_context;
  v1::DecodeRequest decode_request;
  grpc::Status decode_status;
  bool decode_done = false;
  v1::DecodeComplete complete;
  bool completed = false;
  int32_t tokens = 0;
  double ttft_ms = 0;

  // Cancels the calls in flight. Never under mu: a cancelled call may complete (and take
  // mu) on this thread.
  void CancelCalls() {
    grpc::ClientContext* admit = nullptr;
    bool running;
    {
      std::lock_guard<std::mutex> lock(mu);
      if (!admit_contexts.empty()) admit = admit_contexts.back().get();
      running = state == State::kRunning;
    }
    if (admit) admit->TryCancel();
    if (running) {
      prefill_context.TryCancel();
      decode_context.TryCancel();
    }
  }
};

// Relays the decode worker's stream to the client's; deletes itself when done.
class RouterService::DecodeRelay final : public grpc::ClientReadReactor<v1::DecodeResponse> {
 public:
  DecodeRelay(RouterService* router, std::shared_ptr<Call> call) : router_(router), call_(std::move(call)) {}

  void Start(v1::DecodeWorker::Stub* stub) {
    stub->async()->Decode(&call_->decode_context, &call_->decode_request, this);
    StartRead(&message_);
    StartCall();
  }

  void OnReadDone(bool ok) override {
    if (!ok) return;  // OnDone follows with the status
    Call& call = *call_;
    if (message_.has_chunk()) {
      bool first = false;
      {
        std::lock_guard<std::mutex> lock(call.mu);
        first = call.tokens == 0;
        call.tokens += message_.chunk().token_ids_size();
        if (first) call.ttft_ms = absl::ToDoubleMilliseconds(absl::Now() - call.received);
      }
      if (first && router_->metrics_) router_->metrics_->ObserveTimeToFirstToken(call.ttft_ms / 1e3);
      v1::GenerateResponse out;
      *out.mutable_chunk() = std::move(*message_.mutable_chunk());
      call.stream->Write(std::move(out));
    } else if (message_.has_complete()) {
      std::lock_guard<std::mutex> lock(call.mu);
      call.complete = message_.complete();
      call.completed = true;
    }
    StartRead(&message_);
  }

  void OnDone(const grpc::Status& status) override {
    {
      std::lock_guard<std::mutex> lock(call_->mu);
      call_->decode_status = status;
      call_->decode_done = true;
    }
    router_->MaybeFinish(call_);
    delete this;
  }

 private:
  RouterService* const router_;
  const std::shared_ptr<Call> call_;
  v1::DecodeResponse message_;
};

namespace {

// 128 random bits from the OS: a server-assigned id must not be guessable.
std::string NewRequestId() {
  std::random_device rd;
  return absl::StrFormat("req-%08x%08x%08x%08x", rd(), rd(), rd(), rd());
}

absl::Time Earliest(absl::Time a, absl::Time b) { return a < b ? a : b; }

// A fire-and-forget unary call: owns its context and messages until the callback.
template <typename Request, typename Response>
struct SideCall {
  grpc::ClientContext context;
  Request request;
  Response response;
  std::unique_ptr<v1::KvManager::Stub> stub;
};

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

std::unique_ptr<v1::KvManager::Stub> RouterService::ManagerStub() const {
  std::shared_ptr<grpc::Channel> channel = channels_->Get(options_.manager_address);
  return channel ? v1::KvManager::NewStub(channel) : nullptr;
}

void RouterService::StartHealth(std::function<void(bool)> set_serving) {
  health_ = std::thread([this, set_serving = std::move(set_serving)] {
    bool last = false;
    bool first = true;
    int failures = 0;
    std::unique_lock<std::mutex> lock(mu_);
    while (!stopping_) {
      lock.unlock();
      // A generous deadline: a busy machine answers late, not never. Two failed probes
      // in a row (or a manager without live workers) mean NOT_SERVING.
      kv::KvManagerClient manager(channels_->Get(options_.manager_address),
                                  absl::Milliseconds(std::max(1000, 4 * options_.health_interval_ms)));
      absl::StatusOr<v1::ServerInfo> info = manager.GetServerInfo();
      bool serving = last;
      if (info.ok()) {
        failures = 0;
        manager_reachable_.store(true);
        serving = info->prefill_workers() > 0 && info->decode_workers() > 0;
      } else if (++failures >= 2 || first) {
        manager_reachable_.store(false);
        serving = false;
      }
      if (set_serving && (first || serving != last)) set_serving(serving);
      first = false;
      last = serving;
      lock.lock();
      changed_.wait_for(lock, std::chrono::milliseconds(options_.health_interval_ms), [this] { return stopping_; });
    }
    if (set_serving) set_serving(false);
  });
  ticker_ = std::thread([this] {
    std::unique_lock<std::mutex> lock(mu_);
    while (!threads_stopped_) {
      changed_.wait_for(lock, std::chrono::milliseconds(20), [this] { return threads_stopped_; });
      if (threads_stopped_) break;
      lock.unlock();
      Tick();
      lock.lock();
    }
  });
}

void RouterService::Shutdown(absl::Time deadline) {
  std::vector<std::shared_ptr<Call>> queued;
  {
    std::lock_guard<std::mutex> lock(mu_);
    if (threads_stopped_ && !health_.joinable() && !ticker_.joinable() && running_ == 0 && queue_.empty()) return;
    stopping_ = true;
    queued.assign(queue_.begin(), queue_.end());
    queue_.clear();
  }
  changed_.notify_all();
  for (const std::shared_ptr<Call>& call : queued) {
    Complete(call, grpc::Status(grpc::StatusCode::UNAVAILABLE, "the server is shutting down; retry elsewhere"), false);
  }
  std::unique_lock<std::mutex> lock(mu_);
  if (!changed_.wait_until(lock, absl::ToChronoTime(deadline), [this] { return running_ == 0; })) {
    // The grace period is a hard limit: what still runs ends now, with UNAVAILABLE.
    std::vector<std::shared_ptr<Call>> cut;
    for (auto& [id, call] : in_flight_) {
      std::lock_guard<std::mutex> call_lock(call->mu);
      call->cut = true;
      cut.push_back(call);
    }
    lock.unlock();
    for (const std::shared_ptr<Call>& call : cut) call->CancelCalls();
    lock.lock();
    changed_.wait(lock, [this] { return running_ == 0; });  // cancelled calls end promptly
  }
  threads_stopped_ = true;
  lock.unlock();
  {
    // The last Finish / Abort calls to the manager, until the deadline (their callbacks
    // touch only `side_`, so they may outlive this service).
    std::unique_lock<std::mutex> side_lock(side_->mu);
    side_->idle.wait_until(side_lock, absl::ToChronoTime(std::max(deadline, absl::Now() + absl::Milliseconds(200))),
                           [this] { return side_->count == 0; });
  }
  changed_.notify_all();
  if (health_.joinable()) health_.join();
  if (ticker_.joinable()) ticker_.join();
}

void RouterService::Tick() {
  const absl::Time now = absl::Now();
  std::vector<std::shared_ptr<Call>> expired;
  std::vector<std::string> renew;
  bool dispatch = false;
  {
    std::lock_guard<std::mutex> lock(mu_);
    for (auto it = queue_.begin(); it != queue_.end();) {
      if ((*it)->queue_deadline <= now) {
        expired.push_back(*it);
        it = queue_.erase(it);
      } else {
        ++it;
      }
    }
    if (capacity_blocked_ && now - blocked_since_ >= options_.admission_retry) {
      capacity_blocked_ = false;
      dispatch = true;
    }
    for (auto& [id, call] : in_flight_) {
      std::lock_guard<std::mutex> call_lock(call->mu);
      if (call->state != Call::State::kRunning || now < call->next_renew) continue;
      call->next_renew = now + absl::Milliseconds(std::max(50, call->ticket.lease_ttl_ms() / 3));
      renew.push_back(call->ticket.lease_id());
    }
  }
  for (const std::shared_ptr<Call>& call : expired) {
    const bool own_deadline = absl::Now() >= call->deadline;
    Complete(call,
             own_deadline ? grpc::Status(grpc::StatusCode::DEADLINE_EXCEEDED,
                                         "the request's deadline passed while it waited for admission")
                          : grpc::Status(grpc::StatusCode::RESOURCE_EXHAUSTED,
                                         absl::StrCat("no capacity within the admission wait of ",
                                                      absl::ToInt64Milliseconds(options_.queue_timeout),
                                                      " ms; back off and retry")),
             false);
  }
  for (const std::string& lease : renew) SideRenew(lease);
  if (dispatch || !expired.empty()) Dispatch();
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
  auto fail = [&](grpc::Status status) {
    if (metrics_) metrics_->CountRequest(std::string(absl::StatusCodeToString(FromGrpcStatus(status).code())));
    stream->Complete(std::move(status));
    return stream;
  };
  if (!manager_reachable_.load()) {
    return fail(grpc::Status(grpc::StatusCode::UNAVAILABLE, "the KV manager is unreachable; retry later"));
  }
  absl::StatusOr<ValidatedRequest> validated = ValidateGenerateRequest(*request, *tokenizer_, config_, options_.limits);
  if (!validated.ok()) return fail(ToGrpcStatus(validated.status()));
  auto call = std::make_shared<Call>();
  call->stream = stream;
  call->r = *std::move(validated);
  if (call->r.request_id.empty()) call->r.request_id = NewRequestId();
  call->received = absl::Now();
  const auto deadline = context->deadline();
  if (deadline != std::chrono::system_clock::time_point::max()) call->deadline = absl::FromChrono(deadline);
  call->queue_deadline = Earliest(call->deadline, call->received + options_.queue_timeout);
  {
    std::lock_guard<std::mutex> lock(mu_);
    if (stopping_) return fail(grpc::Status(grpc::StatusCode::UNAVAILABLE, "the router is shutting down"));
    if (in_flight_.count(call->r.request_id) > 0) {
      return fail(grpc::Status(grpc::StatusCode::ALREADY_EXISTS,
                               absl::StrCat("request_id: '", call->r.request_id, "' is already in flight")));
    }
    const bool runs_now = queue_.empty() && !capacity_blocked_ && running_ < options_.max_in_flight;
    if (!runs_now && static_cast<int32_t>(queue_.size()) >= options_.max_queued) {
      return fail(grpc::Status(grpc::StatusCode::RESOURCE_EXHAUSTED,
                               absl::StrCat("the admission queue is full (", options_.max_queued,
                                            " requests wait); back off and retry")));
    }
    in_flight_[call->r.request_id] = call;
    queue_.push_back(call);
  }
  stream->set_on_broken([this, weak = std::weak_ptr<Call>(call)] {
    if (auto c = weak.lock()) OnClientGone(c);
  });
  Dispatch();
  return stream;
}

void RouterService::OnClientGone(const std::shared_ptr<Call>& call) {
  bool was_queued = false;
  {
    std::lock_guard<std::mutex> lock(mu_);
    auto it = std::find(queue_.begin(), queue_.end(), call);
    if (it != queue_.end()) {
      queue_.erase(it);
      was_queued = true;
    }
  }
  {
    std::lock_guard<std::mutex> lock(call->mu);
    call->client_gone = true;
  }
  if (!was_queued) call->CancelCalls();
  if (was_queued) Complete(call, grpc::Status(grpc::StatusCode::CANCELLED, "the client cancelled the request"), false);
}

void RouterService::Dispatch() {
  std::vector<std::shared_ptr<Call>> start;
  {
    std::lock_guard<std::mutex> lock(mu_);
    while (!queue_.empty() && !capacity_blocked_ && running_ < options_.max_in_flight && !stopping_) {
      start.push_back(queue_.front());
      queue_.pop_front();
      ++running_;
    }
  }
  for (const std::shared_ptr<Call>& call : start) StartAdmit(call);
}

void RouterService::StartAdmit(const std::shared_ptr<Call>& call) {
  std::unique_ptr<v1::KvManager::Stub> stub = ManagerStub();
  grpc::ClientContext* context = nullptr;
  bool cancelled = false;
  {
    std::lock_guard<std::mutex> lock(call->mu);
    call->state = Call::State::kAdmitting;
    call->admit.set_request_id(call->r.request_id);
    call->admit.set_prompt_tokens(static_cast<int32_t>(call->r.prompt.size()));
    call->admit.set_max_tokens(call->r.options.max_tokens);
    *call->admit.mutable_compression() = kv::ToProto(call->r.eviction);
    call->admit_contexts.push_back(std::make_unique<grpc::ClientContext>());
    context = call->admit_contexts.back().get();
    context->set_deadline(absl::ToChronoTime(Earliest(call->deadline, absl::Now() + options_.manager_timeout)));
    cancelled = call->client_gone || call->cut;
  }
  if (cancelled) context->TryCancel();  // starts cancelled
  if (!stub) {
    OnAdmitted(call, grpc::Status(grpc::StatusCode::UNAVAILABLE, "no channel to the KV manager"));
    return;
  }
  v1::KvManager::Stub* raw = stub.release();
  raw->async()->Admit(context, &call->admit, &call->ticket, [this, call, raw](grpc::Status s) {
    delete raw;
    OnAdmitted(call, std::move(s));
  });
}

void RouterService::OnAdmitted(const std::shared_ptr<Call>& call, grpc::Status status) {
  bool gone, cut;
  {
    std::lock_guard<std::mutex> lock(call->mu);
    gone = call->client_gone;
    cut = call->cut;
  }
  if (status.ok() && (gone || cut)) {
    // Admitted after all: give the reservation back.
    SideAbort(call->r.request_id);
    SideFinish(call->r.request_id, v1::RequestState::ABORTED);
  }
  if (cut) return Complete(call, grpc::Status(grpc::StatusCode::UNAVAILABLE, "the server is shutting down"), true);
  if (gone) return Complete(call, grpc::Status(grpc::StatusCode::CANCELLED, "the client cancelled the request"), true);
  if (status.error_code() == grpc::StatusCode::RESOURCE_EXHAUSTED) {
    // No capacity now: back to the head of the queue until a request ends.
    std::unique_lock<std::mutex> lock(mu_);
    if (!stopping_ && absl::Now() < call->queue_deadline) {
      {
        std::lock_guard<std::mutex> call_lock(call->mu);
        call->state = Call::State::kQueued;
        call->ticket.Clear();
      }
      --running_;
      queue_.push_front(call);
      if (!capacity_blocked_) blocked_since_ = absl::Now();
      capacity_blocked_ = true;
      changed_.notify_all();
      return;
    }
    lock.unlock();
    return Complete(call,
                    grpc::Status(grpc::StatusCode::RESOURCE_EXHAUSTED,
                                 absl::StrCat(status.error_message(), " (after waiting ",
                                              absl::ToInt64Milliseconds(absl::Now() - call->received),
                                              " ms for admission)")),
                    true);
  }
  if (!status.ok()) return Complete(call, status, true);
  StartWorkers(call);
}

void RouterService::StartWorkers(const std::shared_ptr<Call>& call) {
  Call& c = *call;
  std::shared_ptr<grpc::Channel> prefill_channel = channels_->Get(c.ticket.prefill().address());
  std::shared_ptr<grpc::Channel> decode_channel = channels_->Get(c.ticket.decode().address());
  if (!prefill_channel || !decode_channel) {
    SideFinish(c.r.request_id, v1::RequestState::FAILED);
    return Complete(call, grpc::Status(grpc::StatusCode::INTERNAL, "the ticket names a worker address this router cannot reach"),
                    true);
  }
  const v1::SamplingParams sampling = kv::ToProto(c.r.options);
  {
    std::lock_guard<std::mutex> lock(c.mu);
    c.admitted = absl::Now();
    c.next_renew = c.admitted + absl::Milliseconds(std::max(50, c.ticket.lease_ttl_ms() / 3));
    if (c.deadline != absl::InfiniteFuture()) {
      c.prefill_context.set_deadline(absl::ToChronoTime(c.deadline));
      c.decode_context.set_deadline(absl::ToChronoTime(c.deadline));
    }
    *c.prefill_request.mutable_ticket() = c.ticket;
    c.prefill_request.mutable_prompt()->Add(c.r.prompt.begin(), c.r.prompt.end());
    *c.prefill_request.mutable_sampling() = sampling;
    *c.decode_request.mutable_ticket() = c.ticket;
    *c.decode_request.mutable_sampling() = sampling;
    const size_t tail = std::min<size_t>(c.r.prompt.size(), engine::kDetokenizePrefixTokens);
    c.decode_request.mutable_prompt_tail()->Add(c.r.prompt.end() - tail, c.r.prompt.end());
    c.decode_request.set_skip_text(c.r.skip_text);
    c.state = Call::State::kRunning;
    if (c.client_gone || c.cut) {  // cancelled before they start
      c.prefill_context.TryCancel();
      c.decode_context.TryCancel();
    }
  }
  // Prefill and decode concurrently; a failed prefill cancels the decode call (it would
  // wait for a transfer that never comes).
  auto* prefill_stub = v1::PrefillWorker::NewStub(prefill_channel).release();
  prefill_stub->async()->Prefill(&c.prefill_context, &c.prefill_request, &c.prefill_response,
                                 [this, call, prefill_stub](grpc::Status s) {
                                   delete prefill_stub;
                                   {
                                     std::lock_guard<std::mutex> lock(call->mu);
                                     call->prefill_status = s;
                                     call->prefill_done = true;
                                   }
                                   if (!s.ok()) call->decode_context.TryCancel();
                                   MaybeFinish(call);
                                 });
  // The stub only starts the call; the relay holds the call until its OnDone.
  std::unique_ptr<v1::DecodeWorker::Stub> decode_stub = v1::DecodeWorker::NewStub(decode_channel);
  (new DecodeRelay(this, call))->Start(decode_stub.get());
}

void RouterService::MaybeFinish(const std::shared_ptr<Call>& call) {
  Call& c = *call;
  bool client_gone, cut;
  {
    std::lock_guard<std::mutex> lock(c.mu);
    if (!c.prefill_done || !c.decode_done || c.state == Call::State::kDone) return;
    c.state = Call::State::kDone;
    client_gone = c.client_gone;
    cut = c.cut;
  }
  const std::string& id = c.r.request_id;
  if (cut || client_gone || !c.decode_status.ok() || !c.prefill_status.ok() || !c.completed) {
    // Every worker drops what it holds of this request; the manager releases the lease.
    SideAbort(id);
    SideFinish(id, client_gone ? v1::RequestState::ABORTED : v1::RequestState::FAILED);
    grpc::Status status;
    if (cut) {
      status = grpc::Status(grpc::StatusCode::UNAVAILABLE, "the server is shutting down; the stream was cut at the "
                                                           "end of its grace period");
    } else if (client_gone) {
      status = absl::Now() >= c.deadline
                   ? grpc::Status(grpc::StatusCode::DEADLINE_EXCEEDED, "the request's deadline passed")
                   : grpc::Status(grpc::StatusCode::CANCELLED, "the client cancelled the request");
    } else if (!c.prefill_status.ok() && c.prefill_status.error_code() != grpc::StatusCode::CANCELLED) {
      // The first failure explains the others (a failed prefill cancels the decode call).
      status = grpc::Status(c.prefill_status.error_code(), absl::StrCat("prefill: ", c.prefill_status.error_message()));
    } else if (!c.decode_status.ok()) {
      status = grpc::Status(c.decode_status.error_code(), absl::StrCat("decode: ", c.decode_status.error_message()));
    } else if (!c.prefill_status.ok()) {
      status = grpc::Status(c.prefill_status.error_code(), absl::StrCat("prefill: ", c.prefill_status.error_message()));
    } else {
      status = grpc::Status(grpc::StatusCode::INTERNAL, "decode stream ended without a complete message");
    }
    return Complete(call, status, true);
  }
  v1::GenerateResponse out;
  v1::GenerateComplete* done = out.mutable_complete();
  done->set_request_id(id);
  done->set_finish_reason(c.complete.finish_reason());
  done->set_matched_stop(c.complete.matched_stop());
  done->mutable_usage()->set_prompt_tokens(static_cast<int32_t>(c.r.prompt.size()));
  done->mutable_usage()->set_completion_tokens(c.complete.completion_tokens());
  *done->mutable_kv() = c.prefill_response.kv();
  done->mutable_kv()->set_pages_used(c.complete.pages_used());
  v1::Timings* t = done->mutable_timings();
  t->set_queue_ms(absl::ToDoubleMilliseconds(c.admitted - c.received) + c.prefill_response.queue_ms());
  t->set_prefill_ms(c.prefill_response.prefill_ms());
  t->set_transfer_ms(c.prefill_response.transfer_ms());
  t->set_time_to_first_token_ms(c.ttft_ms);
  t->set_decode_ms(c.complete.decode_ms());
  t->set_time_per_output_token_ms(c.complete.time_per_output_token_ms());
  c.stream->Write(std::move(out));
  SideFinish(id, c.complete.finish_reason() == v1::GenerateComplete::ABORTED ? v1::RequestState::ABORTED
                                                                             : v1::RequestState::DONE);
  Complete(call, grpc::Status::OK, true);
}

void RouterService::Complete(const std::shared_ptr<Call>& call, grpc::Status status, bool was_running) {
  {
    std::lock_guard<std::mutex> lock(call->mu);
    call->state = Call::State::kDone;
  }
  if (metrics_) metrics_->CountRequest(std::string(absl::StatusCodeToString(FromGrpcStatus(status).code())));
  call->stream->Complete(std::move(status));
  std::vector<std::shared_ptr<Call>> start;
  {
    std::lock_guard<std::mutex> lock(mu_);
    auto it = in_flight_.find(call->r.request_id);
    if (it != in_flight_.end() && it->second == call) in_flight_.erase(it);
    if (was_running) {
      --running_;
      capacity_blocked_ = false;  // a request ended: its pages come back
      while (!queue_.empty() && running_ < options_.max_in_flight && !stopping_) {
        start.push_back(queue_.front());
        queue_.pop_front();
        ++running_;
      }
    }
    // Under the lock: once Shutdown sees running_ == 0 this call touches `this` no more.
    changed_.notify_all();
  }
  for (const std::shared_ptr<Call>& next : start) StartAdmit(next);  // running_ > 0: `this` lives
}

// --- Fire-and-forget calls to the KV manager ------------------------------------------

void RouterService::SideCalls::Add() {
  std::lock_guard<std::mutex> lock(mu);
  ++count;
}

void RouterService::SideCalls::Done() {
  std::lock_guard<std::mutex> lock(mu);
  --count;
  idle.notify_all();
}

void RouterService::SideFinish(const std::string& request_id, v1::RequestState::Phase phase) {
  auto* side = new SideCall<v1::FinishRequest, v1::FinishResponse>();
  side->stub = ManagerStub();
  if (!side->stub) {
    delete side;
    return;
  }
  side->context.set_deadline(absl::ToChronoTime(absl::Now() + options_.manager_timeout));
  side->request.set_request_id(request_id);
  side->request.set_phase(phase);
  side_->Add();
  side->stub->async()->Finish(&side->context, &side->request, &side->response, [counter = side_, side](grpc::Status) {
    delete side;
    counter->Done();
  });
}

void RouterService::SideAbort(const std::string& request_id) {
  auto* side = new SideCall<v1::AbortRequest, v1::AbortResponse>();
  side->stub = ManagerStub();
  if (!side->stub) {
    delete side;
    return;
  }
  side->context.set_deadline(absl::ToChronoTime(absl::Now() + options_.manager_timeout));
  side->request.set_request_id(request_id);
  side_->Add();
  side->stub->async()->Abort(&side->context, &side->request, &side->response, [counter = side_, side](grpc::Status) {
    delete side;
    counter->Done();
  });
}

void RouterService::SideRenew(const std::string& lease_id) {
  auto* side = new SideCall<v1::RenewLeaseRequest, v1::RenewLeaseResponse>();
  side->stub = ManagerStub();
  if (!side->stub) {
    delete side;
    return;
  }
  side->context.set_deadline(absl::ToChronoTime(absl::Now() + options_.manager_timeout));
  side->request.set_lease_id(lease_id);
  side_->Add();
  side->stub->async()->RenewLease(&side->context, &side->request, &side->response, [counter = side_, side](grpc::Status) {
    delete side;
    counter->Done();
  });
}

// --- Unary RPCs ------------------------------------------------------------------------

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
  auto side = std::make_shared<SideCall<v1::AbortRequest, v1::AbortResponse>>();
  side->stub = ManagerStub();
  if (!side->stub) {
    reactor->Finish(grpc::Status(grpc::StatusCode::UNAVAILABLE, "no channel to the KV manager"));
    return reactor;
  }
  side->context.set_deadline(absl::ToChronoTime(absl::Now() + options_.manager_timeout));
  side->request.set_request_id(request->request_id());
  side->stub->async()->Abort(&side->context, &side->request, &side->response,
                             [reactor, response, side](grpc::Status s) {
                               if (s.ok()) response->set_was_running(side->response.was_running());
                               reactor->Finish(s);
                             });
  return reactor;
}

grpc::ServerUnaryReactor* RouterService::GetModelInfo(grpc::CallbackServerContext* context,
                                                      const v1::GetModelInfoRequest* request,
                                                      v1::ModelInfo* response) {
  grpc::ServerUnaryReactor* reactor = context->DefaultReactor();
  if (grpc::Status auth = CheckBearerToken(*context, options_.bearer_token); !auth.ok()) {
    reactor->Finish(auth);
    return reactor;
  }
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
  if (grpc::Status auth = CheckBearerToken(*context, options_.bearer_token); !auth.ok()) {
    reactor->Finish(auth);
    return reactor;
  }
  auto side = std::make_shared<SideCall<v1::GetServerInfoRequest, v1::ServerInfo>>();
  side->stub = ManagerStub();
  if (!side->stub) {
    reactor->Finish(grpc::Status(grpc::StatusCode::UNAVAILABLE, "no channel to the KV manager"));
    return reactor;
  }
  side->context.set_deadline(absl::ToChronoTime(absl::Now() + options_.manager_timeout));
  // Only the requests the caller names: request ids are not for everyone to see.
  std::set<std::string> wanted(request->request_ids().begin(), request->request_ids().end());
  side->stub->async()->GetServerInfo(
      &side->context, &side->request, &side->response,
      [this, reactor, response, side, wanted = std::move(wanted)](grpc::Status s) {
        if (!s.ok()) {
          reactor->Finish(grpc::Status(grpc::StatusCode::UNAVAILABLE, absl::StrCat("KV manager: ", s.error_message())));
          return;
        }
        *response = std::move(side->response);
        google::protobuf::RepeatedPtrField<v1::RequestState> all = std::move(*response->mutable_requests());
        response->clear_requests();
        for (v1::RequestState& state : all) {
          if (wanted.count(state.request_id()) > 0) *response->add_requests() = std::move(state);
        }
        response->clear_roles();
        for (const std::string& role : options_.roles) response->add_roles(role);
        response->set_version(options_.version);
        if (!options_.backend.empty()) response->set_backend(options_.backend);
        reactor->Finish(grpc::Status::OK);
      });
  return reactor;
}

}  // namespace kvgate::router
