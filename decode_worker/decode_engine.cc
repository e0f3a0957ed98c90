#include "decode_worker/decode_engine.h"

#include <algorithm>
#include <cstdlib>
#include <cstring>

#include "absl/strings/str_cat.h"
#include "common/status_macros.h"

namespace kvgate::decode {
namespace {

// KVGATE_DEVICE_GREEDY=0 brings a greedy batch's logits to the host sampler, as before
// Model::DecodeStepGreedy (benchmark A/B runs); the tokens are the same either way.
bool DeviceGreedyEnabled() {
  const char* value = std::getenv("KVGATE_DEVICE_GREEDY");
  return value == nullptr || std::strcmp(value, "0") != 0;
}

}  // namespace

DecodeEngine::DecodeEngine(kv::WorkerRuntime* runtime, int64_t max_pending_transfer_bytes)
    : runtime_(runtime), inbox_(max_pending_transfer_bytes), pages_total_(runtime->pool().num_pages()) {
  inbox_.set_rows_backend(std::string(runtime->backend().Name()));
  loop_ = std::thread([this] { Loop(); });
}

DecodeEngine::~DecodeEngine() { Shutdown(); }

absl::Status DecodeEngine::Submit(DecodeJob job, DecodeCallbacks callbacks) {
  std::lock_guard<std::mutex> lock(mu_);
  if (stopping_) return absl::UnavailableError("decode worker is shutting down");
  if (requests_.count(job.request_id) > 0) {
    return absl::AlreadyExistsError(absl::StrCat("request ", job.request_id, " is already decoding on this worker"));
  }
  auto request = std::make_shared<Request>();
  request->job = std::move(job);
  request->callbacks = std::move(callbacks);
  request->submitted = absl::Now();
  requests_[request->job.request_id] = request;
  request->waiter = std::thread([this, request] {
    absl::StatusOr<kv::KvHandoff> handoff = inbox_.Await(request->job.transfer_id, request->job.transfer_deadline);
    std::lock_guard<std::mutex> lock(mu_);
    arrived_.emplace_back(request, std::move(handoff));
    wake_.notify_all();
  });
  return absl::OkStatus();
}

bool DecodeEngine::Abort(const std::string& request_id) {
  std::string transfer_id;
  {
    std::lock_guard<std::mutex> lock(mu_);
    auto it = requests_.find(request_id);
    if (it == requests_.end()) return false;
    it->second->abort = true;
    transfer_id = it->second->job.transfer_id;
    wake_.notify_all();
  }
  inbox_.Cancel(transfer_id);  // wakes a waiter still waiting for the cache
  return true;
}

void DecodeEngine::Shutdown() {
  std::vector<std::string> transfers;
  {
    std::lock_guard<std::mutex> lock(mu_);
    if (stopping_ && !loop_.joinable()) return;
    stopping_ = true;
    for (auto& [id, request] : requests_) transfers.push_back(request->job.transfer_id);
    wake_.notify_all();
  }
  for (const std::string& transfer : transfers) inbox_.Cancel(transfer);
  if (loop_.joinable()) loop_.join();
}

int32_t DecodeEngine::requests() const {
  std::lock_guard<std::mutex> lock(mu_);
  return static_cast<int32_t>(requests_.size());
}

absl::StatusOr<DecodeSummary> DecodeEngine::Summarize(const Sequence& sequence, engine::FinishReason reason,
                                                      std::string matched_stop) const {
  DecodeSummary summary;
  summary.finish_reason = reason;
  summary.matched_stop = std::move(matched_stop);
  summary.completion_tokens = sequence.output ? static_cast<int32_t>(sequence.output->token_ids().size()) : 0;
  summary.pages_used = sequence.kv ? static_cast<int32_t>(sequence.kv->layout().NumPages()) : 0;
  summary.wait_transfer_ms = sequence.wait_transfer_ms;
  if (summary.completion_tokens > 0) {
    summary.decode_ms = absl::ToDoubleMilliseconds(absl::Now() - sequence.first_token_time);
    if (summary.completion_tokens > 1) summary.time_per_output_token_ms = summary.decode_ms / (summary.completion_tokens - 1);
  }
  return summary;
}

void DecodeEngine::Finish(Sequence& sequence, absl::StatusOr<DecodeSummary> summary) {
  sequence.kv.reset();  // pages back to the pool
  DecodeCallbacks callbacks;
  {
    std::lock_guard<std::mutex> lock(mu_);
    requests_.erase(sequence.request->job.request_id);
    callbacks = std::move(sequence.request->callbacks);
  }
  if (callbacks.on_done) callbacks.on_done(std::move(summary));
}

absl::StatusOr<bool> DecodeEngine::Join(std::shared_ptr<Request> request, kv::KvHandoff handoff, Sequence* out) {
  const engine::ModelConfig& c = runtime_->config();
  if (handoff.num_layers != c.num_layers || handoff.num_kv_heads != c.num_kv_heads || handoff.head_dim != c.head_dim) {
    return absl::InternalError(absl::StrCat("transfer ", handoff.transfer_id, " has shape ", handoff.num_layers, "x",
                                            handoff.num_kv_heads, "x", handoff.head_dim, ", this worker's model is ",
                                            c.num_layers, "x", c.num_kv_heads, "x", c.head_dim));
  }
  Sequence& seq = *out;
  seq.request = request;
  seq.wait_transfer_ms = absl::ToDoubleMilliseconds(absl::Now() - request->submitted);
  KVGATE_ASSIGN_OR_RETURN(std::unique_ptr<gates::DecodeEvictor> evictor,
                          gates::RestoreDecodeEvictor(handoff.eviction_policy, handoff.eviction_state,
                                                      runtime_->policy_options(), runtime_->policy_shape()));
  seq.sampler = std::make_unique<engine::Sampler>(request->job.options.sampling);
  KVGATE_RETURN_IF_ERROR(seq.sampler->RestoreState(handoff.sampler_state));
  KVGATE_ASSIGN_OR_RETURN(engine::OutputStream output,
                          engine::OutputStream::Create(&runtime_->tokenizer(), request->job.prompt_tail,
                                                       request->job.options, c.eos_token_ids, request->job.skip_text));
  seq.output = std::make_unique<engine::OutputStream>(std::move(output));
  KVGATE_ASSIGN_OR_RETURN(kv::SequenceLayout layout, kv::ImportSequence(&runtime_->pool(), handoff));
  seq.kv = std::make_unique<kv::SequenceBatch>(&runtime_->pool(), std::move(layout), c.sliding_window, std::move(evictor));
  seq.first_token_time = absl::Now();
  seq.last_token = handoff.first_token;
  KVGATE_ASSIGN_OR_RETURN(engine::TokenOutcome outcome, seq.output->Push(handoff.first_token));
  if (request->callbacks.on_token) request->callbacks.on_token(handoff.first_token, outcome.new_text);
  if (outcome.finished) {
    Finish(seq, Summarize(seq, outcome.finish_reason, outcome.matched_stop));
    return false;
  }
  return true;
}

void DecodeEngine::Loop() {
  std::vector<Sequence> active;
  engine::Model& model = runtime_->model();
  const int32_t vocab = model.config().vocab_size;
  // One batch object for the loop's life: its step tables keep their device address, so
  // the model replays its recorded step graphs while the batch composition holds.
  kv::DecodeBatch batch(&runtime_->pool());
  while (true) {
    std::deque<std::pair<std::shared_ptr<Request>, absl::StatusOr<kv::KvHandoff>>> arrived;
    {
      std::unique_lock<std::mutex> lock(mu_);
      if (active.empty()) wake_.wait(lock, [&] { return stopping_ || !arrived_.empty(); });
      if (stopping_) break;
      arrived.swap(arrived_);
    }
    for (auto& [request, handoff] : arrived) {
      if (request->waiter.joinable()) request->waiter.join();
      Sequence seq;
      seq.request = request;
      bool aborted;
      {
        std::lock_guard<std::mutex> lock(mu_);
        aborted = request->abort;
      }
      if (aborted) {
        Finish(seq, Summarize(seq, engine::FinishReason::kAborted, ""));
        continue;
      }
      if (!handoff.ok()) {
        Finish(seq, absl::Status(handoff.status().code(),
                                 absl::StrCat("waiting for the KV transfer: ", handoff.status().message())));
        continue;
      }
      absl::StatusOr<bool> joined = Join(request, *std::move(handoff), &seq);
      if (!joined.ok()) {
        Finish(seq, joined.status());
      } else if (*joined) {
        active.push_back(std::move(seq));
      }
    }
    // Aborted sequences leave before the step.
    for (Sequence& seq : active) {
      bool aborted;
      {
        std::lock_guard<std::mutex> lock(mu_);
        aborted = seq.request->abort;
      }
      if (aborted) Finish(seq, Summarize(seq, engine::FinishReason::kAborted, ""));
    }
    active.erase(std::remove_if(active.begin(), active.end(), [](const Sequence& s) { return s.kv == nullptr; }),
                 active.end());
    if (!active.empty()) {
      std::vector<kv::SequenceBatch*> members;
      std::vector<int32_t> tokens;
      static const bool device_greedy = DeviceGreedyEnabled();
      bool all_greedy = device_greedy;
      for (Sequence& seq : active) {
        members.push_back(seq.kv.get());
        tokens.push_back(seq.last_token);
        all_greedy = all_greedy && seq.sampler->greedy();
      }
      batch.SetSequences(members);
      // A greedy batch takes its argmax on the backend: token ids, not logits, come back.
      absl::StatusOr<std::vector<float>> logits;
      absl::StatusOr<std::vector<int32_t>> greedy_ids;
      if (all_greedy) {
        greedy_ids = model.DecodeStepGreedy(tokens, &batch);
      } else {
        logits = model.DecodeStep(tokens, &batch);
      }
      const absl::Status stepped = all_greedy ? greedy_ids.status() : logits.status();
      steps_.fetch_add(1);
      if (!stepped.ok()) {
        const absl::Status failed = absl::InternalError(
            absl::StrCat("decode step over ", active.size(), " sequences failed: ", stepped.message()));
        for (Sequence& seq : active) Finish(seq, failed);
        active.clear();
      } else {
        for (size_t s = 0; s < active.size(); ++s) {
          Sequence& seq = active[s];
          const int32_t token = all_greedy ? (*greedy_ids)[s]
                                           : seq.sampler->Sample(absl::MakeConstSpan(*logits).subspan(s * vocab, vocab));
          absl::StatusOr<engine::TokenOutcome> outcome = seq.output->Push(token);
          if (!outcome.ok()) {
            Finish(seq, outcome.status());
            continue;
          }
          seq.last_token = token;
          if (seq.request->callbacks.on_token) seq.request->callbacks.on_token(token, outcome->new_text);
          if (outcome->finished) Finish(seq, Summarize(seq, outcome->finish_reason, outcome->matched_stop));
        }
        active.erase(std::remove_if(active.begin(), active.end(), [](const Sequence& s) { return s.kv == nullptr; }),
                     active.end());
      }
    }
    active_count_.store(static_cast<int32_t>(active.size()));
    pages_used_.store(runtime_->pool().pages_used());
  }
  // Shutting down: everything still held ends UNAVAILABLE.
  const absl::Status gone = absl::UnavailableError("decode worker is shutting down");
  for (Sequence& seq : active) Finish(seq, gone);
  std::vector<std::shared_ptr<Request>> waiting;
  {
    std::lock_guard<std::mutex> lock(mu_);
    for (auto& [id, request] : requests_) waiting.push_back(request);
  }
  for (auto& request : waiting) {
    inbox_.Cancel(request->job.transfer_id);
    if (request->waiter.joinable()) request->waiter.join();
    Sequence seq;
    seq.request = request;
    Finish(seq, gone);
  }
  active_count_.store(0);
  pages_used_.store(runtime_->pool().pages_used());
}

}  // namespace kvgate::decode
