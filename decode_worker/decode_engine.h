// File: the decode worker's engine (architecture.md section 1, step 4), no gRPC. It owns
// the inbox the KV transports deliver into and one decode loop thread that owns the
// model and the KV pool: sequences join as their compressed cache arrives, every loop
// iteration runs ONE engine decode step over every active sequence (continuous
// batching), each sequence samples, stops and streams on its own, and leaves (its pages
// released) when it finishes, is aborted or fails.
#pragma once

#include <atomic>
#include <condition_variable>
#include <cstdint>
#include <deque>
#include <functional>
#include <map>
#include <memory>
#include <mutex>
#include <string>
#include <thread>
#include <vector>

#include "absl/status/statusor.h"
#include "absl/time/time.h"
#include "engine/generator.h"
#include "engine/output_stream.h"
#include "engine/sampler.h"
#include "kv/decode_batch.h"
#include "kv/kv_handoff.h"
#include "kv/transport/kv_transport.h"
#include "kv/worker/worker_runtime.h"

namespace kvgate::decode {

struct DecodeJob {
  std::string request_id;
  std::string transfer_id;
  engine::GenerateOptions options;  // validated by the router
  std::vector<int32_t> prompt_tail;
  bool skip_text = false;
  // The transfer must arrive by then (DEADLINE_EXCEEDED otherwise).
  absl::Time transfer_deadline = absl::InfiniteFuture();
};

struct DecodeSummary {
  engine::FinishReason finish_reason = engine::FinishReason::kLength;
  std::string matched_stop;
  int32_t completion_tokens = 0;
  int32_t pages_used = 0;  // held at the end, before release
  double wait_transfer_ms = 0, decode_ms = 0, time_per_output_token_ms = 0;
};

struct DecodeCallbacks {
  // Tokens of one step (one token; the first call carries the prefill's token) and the
  // text they release. Runs on the loop thread: must not block.
  std::function<void(int32_t token, std::string_view text)> on_token;
  // Exactly once: the summary (finish reason ABORTED for an Abort) or the error.
  std::function<void(absl::StatusOr<DecodeSummary>)> on_done;
};

class DecodeEngine {
 public:
  // max_pending_transfer_bytes bounds the inbox.
  DecodeEngine(kv::WorkerRuntime* runtime, int64_t max_pending_transfer_bytes);
  ~DecodeEngine();  // Shutdown()

  kv::KvInbox& inbox() { return inbox_; }

  // Starts waiting for the job's transfer; the sequence joins the batch when it arrives.
  // ALREADY_EXISTS for a request id already active here.
  absl::Status Submit(DecodeJob job, DecodeCallbacks callbacks);
  // Ends the request: its transfer is cancelled or its sequence leaves at the next step
  // and on_done gets finish reason ABORTED. Returns whether anything was held.
  bool Abort(const std::string& request_id);
  void Shutdown();

  int32_t active_sequences() const { return active_count_.load(); }
  int32_t requests() const;  // waiting for a transfer + active
  int32_t pages_used() const { return pages_used_.load(); }
  int32_t pages_total() const { return pages_total_; }
  int64_t steps() const { return steps_.load(); }

 private:
  struct Request {
    DecodeJob job;
    DecodeCallbacks callbacks;
    absl::Time submitted;
    std::thread waiter;               // awaits the transfer
    bool abort = false;
  };
  struct Sequence {
    std::shared_ptr<Request> request;
    std::unique_ptr<kv::SequenceBatch> kv;
    std::unique_ptr<engine::Sampler> sampler;
    std::unique_ptr<engine::OutputStream> output;
    int32_t last_token = -1;
    absl::Time first_token_time;
    double wait_transfer_ms = 0;
  };
  void Loop();
  // Imports an arrived handoff and emits its first token; false when the sequence
  // finished (or failed) at once.
  absl::StatusOr<bool> Join(std::shared_ptr<Request> request, kv::KvHandoff handoff, Sequence* out);
  void Finish(Sequence& sequence, absl::StatusOr<DecodeSummary> summary);
  absl::StatusOr<DecodeSummary> Summarize(const Sequence& sequence, engine::FinishReason reason,
                                          std::string matched_stop) const;

  kv::WorkerRuntime* runtime_;
  kv::KvInbox inbox_;
  const int32_t pages_total_;
  mutable std::mutex mu_;
  std::condition_variable wake_;
  std::map<std::string, std::shared_ptr<Request>> requests_;  // by request id
  std::deque<std::pair<std::shared_ptr<Request>, absl::StatusOr<kv::KvHandoff>>> arrived_;
  std::vector<std::thread> finished_waiters_;
  bool stopping_ = false;
  std::atomic<int32_t> active_count_{0};
  std::atomic<int32_t> pages_used_{0};
  std::atomic<int64_t> steps_{0};
  std::thread loop_;
};

}  // namespace kvgate::decode
