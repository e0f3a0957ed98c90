// File: the prefill worker's engine (architecture.md section 1, step 3), no gRPC: a queue
// of prefill jobs run one at a time on one engine thread. A job runs the prompt with the
// policy's gates attached, samples the first token, compresses the cache into this
// worker's pool per the plan, exports the kept rows with the decode state into a
// KvHandoff, frees its pages and sends the handoff through the KV transport to the decode
// worker named in the ticket.
#pragma once

#include <atomic>
#include <condition_variable>
#include <cstdint>
#include <deque>
#include <functional>
#include <memory>
#include <mutex>
#include <set>
#include <string>
#include <thread>
#include <vector>

#include "absl/status/statusor.h"
#include "absl/time/time.h"
#include "engine/kv_planner.h"
#include "engine/sampler.h"
#include "gates/eviction_spec.h"
#include "kv/transport/kv_transport.h"
#include "kv/worker/worker_runtime.h"

namespace kvgate::prefill {

struct PrefillJob {
  std::string request_id;
  std::string transfer_id;
  std::string decode_address;  // the decode worker's transport address
  // The KV transport the manager chose for the pair; "tcp" means host rows whatever the
  // sender could do. Empty: the sender decides by address.
  std::string transport;
  std::vector<int32_t> prompt;
  gates::EvictionSpec plan;
  engine::SamplingOptions sampling;
  absl::Time deadline = absl::InfiniteFuture();
};

struct PrefillResult {
  int32_t first_token = -1;
  engine::KvAccounting kv;
  int64_t bytes_transferred = 0;
  std::vector<int32_t> kept_per_head;  // [layers * kv_heads]
  int32_t next_pos = 0;
  double queue_ms = 0, prefill_ms = 0, transfer_ms = 0;
};

using PrefillDone = std::function<void(absl::StatusOr<PrefillResult>)>;

class PrefillEngine {
 public:
  static constexpr int32_t kDefaultMaxQueue = 256;
  // `sender` carries handoffs (not owned, outlives the engine). max_queue: jobs waiting
  // beyond it are refused with RESOURCE_EXHAUSTED. warmup_tokens > 0: before its first job
  // the engine thread runs one prefill of min(warmup_tokens, max context) dummy tokens, so
  // that the model's scratch, the BLAS buffers and the allocator's arenas reach their
  // working size outside any request's time to first token (jobs submitted meanwhile
  // wait in the queue; a failed warm-up is reported on stderr and serving goes on).
  PrefillEngine(kv::WorkerRuntime* runtime, kv::KvSender* sender, int32_t max_queue = kDefaultMaxQueue,
                int32_t warmup_tokens = 0);
  ~PrefillEngine();  // Shutdown()

  // Queues the job; `done` runs exactly once, on the engine thread (or inline for a
  // refused job). A job whose request was aborted ends with CANCELLED and holds nothing.
  void Submit(PrefillJob job, PrefillDone done);
  // Drops the request's job: removed from the queue, or stopped at the next safe point
  // (before compaction, before the transfer). Returns whether it was queued or running.
  bool Abort(const std::string& request_id);
  // Stops taking jobs, fails the queued ones with UNAVAILABLE and joins the thread.
  void Shutdown();

  // Blocks until the start-up warm-up is over (at once without one): `serve` registers
  // the worker with the KV manager only then, so no request waits behind it.
  void WaitUntilWarm();

  int32_t queued() const;
  int32_t running() const;
  int32_t pages_used() const;  // only while a job runs
  int32_t pages_total() const;

 private:
  struct Queued {
    PrefillJob job;
    PrefillDone done;
    absl::Time enqueued;
  };
  void Loop();
  void Warmup();
  absl::StatusOr<PrefillResult> Run(const PrefillJob& job);
  bool Aborted(const std::string& request_id);

  kv::WorkerRuntime* runtime_;
  kv::KvSender* sender_;
  const int32_t max_queue_;
  const int32_t warmup_tokens_;
  bool warm_ = false;  // guarded by mu_; signalled on wake_
  mutable std::mutex mu_;
  std::condition_variable wake_;
  std::deque<Queued> queue_;
  std::string running_request_;
  std::set<std::string> aborted_;  // requests aborted while running
  bool stopping_ = false;
  std::atomic<int32_t> pages_used_{0};
  std::thread thread_;
};

}  // namespace kvgate::prefill
