#include "prefill_worker/prefill_engine.h"

#include <algorithm>
#include <chrono>
#include <iostream>

#include "absl/strings/str_cat.h"
#include "common/status_macros.h"
#include "kv/kv_handoff.h"
#include "kv/policy_planner.h"

namespace kvgate::prefill {
namespace {

double MillisBetween(absl::Time from, absl::Time to) { return absl::ToDoubleMilliseconds(to - from); }

}  // namespace

PrefillEngine::PrefillEngine(kv::WorkerRuntime* runtime, kv::KvSender* sender, int32_t max_queue,
                             int32_t warmup_tokens)
    : runtime_(runtime), sender_(sender), max_queue_(max_queue), warmup_tokens_(warmup_tokens) {
  thread_ = std::thread([this] { Loop(); });
}

PrefillEngine::~PrefillEngine() { Shutdown(); }

void PrefillEngine::Submit(PrefillJob job, PrefillDone done) {
  std::unique_lock<std::mutex> lock(mu_);
  if (stopping_) {
    lock.unlock();
    done(absl::UnavailableError("prefill worker is shutting down"));
    return;
  }
  if (static_cast<int64_t>(job.prompt.size()) > runtime_->max_sequence_tokens()) {
    lock.unlock();
    done(absl::InvalidArgumentError(absl::StrCat("prompt of ", job.prompt.size(), " tokens is longer than the ",
                                                 runtime_->max_sequence_tokens(),
                                                 " this prefill worker stages (--max-prompt-tokens)")));
    return;
  }
  if (static_cast<int32_t>(queue_.size()) >= max_queue_) {
    lock.unlock();
    done(absl::ResourceExhaustedError(absl::StrCat("prefill queue is full (", max_queue_, " jobs)")));
    return;
  }
  aborted_.erase(job.request_id);
  queue_.push_back({std::move(job), std::move(done), absl::Now()});
  wake_.notify_all();  // the loop and WaitUntilWarm share wake_
}

bool PrefillEngine::Abort(const std::string& request_id) {
  PrefillDone done;
  {
    std::lock_guard<std::mutex> lock(mu_);
    for (auto it = queue_.begin(); it != queue_.end(); ++it) {
      if (it->job.request_id == request_id) {
        done = std::move(it->done);
        queue_.erase(it);
        break;
      }
    }
    if (!done && running_request_ == request_id) {
      aborted_.insert(request_id);
      return true;
    }
  }
  if (!done) return false;
  done(absl::CancelledError(absl::StrCat("request ", request_id, " was aborted")));
  return true;
}

bool PrefillEngine::Aborted(const std::string& request_id) {
  std::lock_guard<std::mutex> lock(mu_);
  return aborted_.count(request_id) > 0;
}

void PrefillEngine::Shutdown() {
  std::deque<Queued> refused;
  {
    std::lock_guard<std::mutex> lock(mu_);
    if (stopping_ && !thread_.joinable()) return;
    stopping_ = true;
    refused.swap(queue_);
    wake_.notify_all();
  }
  for (Queued& q : refused) q.done(absl::UnavailableError("prefill worker is shutting down"));
  if (thread_.joinable()) thread_.join();
}

int32_t PrefillEngine::queued() const {
  std::lock_guard<std::mutex> lock(mu_);
  return static_cast<int32_t>(queue_.size());
}

int32_t PrefillEngine::running() const {
  std::lock_guard<std::mutex> lock(mu_);
  return running_request_.empty() ? 0 : 1;
}

int32_t PrefillEngine::pages_used() const { return pages_used_.load(); }
int32_t PrefillEngine::pages_total() const { return runtime_->pool().num_pages(); }

void PrefillEngine::Warmup() {
  engine::Model& model = runtime_->model();
  const engine::ModelConfig& c = model.config();
  const int32_t n = std::min(warmup_tokens_, runtime_->max_sequence_tokens());
  if (n <= 0) return;
  std::vector<int32_t> tokens(n);
  for (int32_t i = 0; i < n; ++i) tokens[i] = i % c.vocab_size;
  const absl::Time start = absl::Now();
  absl::StatusOr<std::unique_ptr<engine::KvCache>> cache = model.NewCache(n);
  absl::Status status = cache.status();
  if (status.ok()) status = model.Forward(tokens, cache->get()).status();
  if (!status.ok()) {
    std::cerr << "prefill warm-up of " << n << " tokens failed (serving goes on): " << status << "\n";
    return;
  }
  std::cerr << "prefill warm-up: " << n << " tokens in " << MillisBetween(start, absl::Now()) << " ms\n";
}

void PrefillEngine::WaitUntilWarm() {
  std::unique_lock<std::mutex> lock(mu_);
  wake_.wait(lock, [this] { return warm_ || stopping_; });
}

void PrefillEngine::Loop() {
  if (warmup_tokens_ > 0) Warmup();
  {
    std::lock_guard<std::mutex> lock(mu_);
    warm_ = true;
  }
  wake_.notify_all();
  while (true) {
    Queued next;
    {
      std::unique_lock<std::mutex> lock(mu_);
      wake_.wait(lock, [this] { return stopping_ || !queue_.empty(); });
      if (queue_.empty()) return;  // stopping
      next = std::move(queue_.front());
      queue_.pop_front();
      running_request_ = next.job.request_id;
    }
    const absl::Time started = absl::Now();
    absl::StatusOr<PrefillResult> result = Run(next.job);
    if (result.ok()) result->queue_ms = MillisBetween(next.enqueued, started);
    {
      std::lock_guard<std::mutex> lock(mu_);
      running_request_.clear();
      aborted_.erase(next.job.request_id);
    }
    pages_used_.store(runtime_->pool().pages_used());
    next.done(std::move(result));
  }
}

absl::StatusOr<PrefillResult> PrefillEngine::Run(const PrefillJob& job) {
  const absl::Time start = absl::Now();
  auto check = [&]() -> absl::Status {
    if (Aborted(job.request_id)) return absl::CancelledError(absl::StrCat("request ", job.request_id, " was aborted"));
    if (absl::Now() > job.deadline) {
      return absl::DeadlineExceededError(absl::StrCat("request ", job.request_id, " passed its deadline in prefill"));
    }
    return absl::OkStatus();
  };
  KVGATE_RETURN_IF_ERROR(check());
  engine::Model& model = runtime_->model();
  const engine::ModelConfig& c = model.config();
  KVGATE_ASSIGN_OR_RETURN(std::unique_ptr<engine::KvPlanner> planner,
                          kv::CreatePolicyPlanner(model, &runtime_->pool(), job.plan, runtime_->policy_options(),
                                                  &runtime_->tokenizer()));
  const int32_t n = static_cast<int32_t>(job.prompt.size());
  KVGATE_ASSIGN_OR_RETURN(std::unique_ptr<engine::KvCache> cache, model.NewCache(n));
  engine::PrefillCapture capture;
  KVGATE_ASSIGN_OR_RETURN(std::vector<float> logits, planner->Prefill(model, job.prompt, cache.get(), &capture));
  engine::Sampler sampler(job.sampling);
  PrefillResult result;
  result.first_token = sampler.Sample(logits);
  KVGATE_RETURN_IF_ERROR(check());
  KVGATE_ASSIGN_OR_RETURN(std::unique_ptr<engine::PagedKvBatch> batch, planner->Commit(job.prompt, *cache, capture, &result.kv));
  cache.reset();
  auto* sequence = dynamic_cast<kv::SequenceBatch*>(batch.get());
  if (sequence == nullptr) return absl::InternalError("the policy planner returned a batch that is not a SequenceBatch");
  pages_used_.store(runtime_->pool().pages_used());
  // A decode worker of this process on the same device (inproc), or of this host's GPUs
  // (cuda_ipc), takes the rows where they are.
  const kv::RowsIn rows_in = job.transport != "tcp" &&
                                     sender_->BackendRowsFor(job.decode_address) == runtime_->backend().Name()
                                 ? kv::RowsIn::kBackend
                                 : kv::RowsIn::kHost;
  KVGATE_ASSIGN_OR_RETURN(kv::KvHandoff handoff,
                          kv::ExportSequence(&runtime_->pool(), sequence->layout(), rows_in));
  handoff.transfer_id = job.transfer_id;
  handoff.request_id = job.request_id;
  handoff.first_token = result.first_token;
  handoff.sampler_state = sampler.SaveState();
  kv::CarryDecodeEviction(sequence->evictor(), &handoff);
  result.kept_per_head = handoff.Lengths();
  result.next_pos = handoff.next_pos;
  batch.reset();  // the rows live in the handoff now; the pages go back
  pages_used_.store(runtime_->pool().pages_used());
  result.prefill_ms = MillisBetween(start, absl::Now());
  KVGATE_RETURN_IF_ERROR(check());
  const absl::Time transfer_start = absl::Now();
  KVGATE_ASSIGN_OR_RETURN(result.bytes_transferred, sender_->Send(job.decode_address, handoff, job.deadline));
  result.transfer_ms = MillisBetween(transfer_start, absl::Now());
  (void)c;
  return result;
}

}  // namespace kvgate::prefill
