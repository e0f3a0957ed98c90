// File: the KV manager's logic (architecture.md section 1), with no gRPC in it: the
// worker registry fed by heartbeats, admission (validation, plan, worker choice, page
// reservation), leases, each request's phase, Abort, and the ServerInfo view.
//
// Thread-safe: every method takes one mutex. Time comes from an injected Clock, so tests
// move it by hand. Work that has to reach the workers (abort a request on the prefill and
// decode worker that hold it) is never done here: the methods that cause it return
// AbortOrders and the caller (KvManagerService) sends them.
//
// Request life: Admit -> ADMITTED -> PREFILLING -> TRANSFERRING -> DECODING (reported by
// the workers through ReportProgress; a phase never goes back) -> DONE | ABORTED | FAILED
// (Finish from the router, a worker's report, Abort, a lease that expired, or a worker
// that stopped heartbeating). A finished request keeps its record for
// finished_grace_ms (Abort answers was_running = false, ServerInfo shows its last
// phase), then it is forgotten (Abort answers NOT_FOUND) but stays counted in totals.
//
// Decode pages. A decode worker reports kv_pages_free, the pages its pool does not hold.
// Each admitted request reserves its estimated pages on its decode worker (below); until
// the request ends, the manager subtracts from the reported free pages what the request
// may still take: reserved pages minus the pages_held the decode worker reported for it
// and that a later heartbeat already counted. So a request is never counted twice and
// never forgotten while it grows.
//
// Estimated pages of a request on a decode worker of (layers L, kv heads H, page_tokens
// P): sum over the L * H heads of ceil((kept + max_tokens) / P), where kept is the
// plan's keep_per_head (gates::ResolveBudget; prompt_tokens for `full`), at least the
// prompt positions the plan protects.
#pragma once

#include <cstdint>
#include <functional>
#include <map>
#include <memory>
#include <mutex>
#include <optional>
#include <random>
#include <string>
#include <vector>

#include "absl/status/status.h"
#include "absl/status/statusor.h"
#include "absl/time/time.h"
#include "gates/eviction_spec.h"
#include "kvgate/v1/inference.pb.h"
#include "kvgate/v1/kv_manager.pb.h"

namespace kvgate::kv {

// Returns the current time. absl::Now in production; tests pass a hand-moved clock.
using Clock = std::function<absl::Time()>;

// Longest request_id, bytes (inference.proto: GenerateRequest.request_id).
inline constexpr size_t kMaxRequestIdBytes = 256;
// Longest worker_id and address, bytes.
inline constexpr size_t kMaxWorkerIdBytes = 256;

struct ManagerConfig {
  // Told to every worker at registration; a worker silent for worker_timeout_ms is
  // dropped and its requests are failed.
  int32_t heartbeat_interval_ms = 1000;
  int32_t worker_timeout_ms = 5000;
  // A lease not renewed within lease_ttl_ms expires and its request is aborted.
  int32_t lease_ttl_ms = 10000;
  // How long a finished request stays visible (Abort: was_running false; ServerInfo: its
  // last phase) before it is forgotten, ms.
  int32_t finished_grace_ms = 60000;
  // At most this many finished requests are remembered; the oldest go first.
  int32_t max_finished_requests = 100000;
  // The plan of a request whose CompressionSpec.policy is empty.
  std::string default_policy = "full";
  // Applied when a request names no keep_ratio and no budget_tokens and its policy is
  // not `full`; 0 keeps the policy's own default (every token). In (0, 1] otherwise.
  float default_keep_ratio = 0.0f;
  // Prefix of transfer and lease ids, so that ids stay unique across manager restarts;
  // empty = 64 random bits in hex.
  std::string instance_id;
  // ServerInfo.version.
  std::string version;
};

// INVALID_ARGUMENT naming the field: non-positive intervals, timeout not above the
// heartbeat interval, an unknown default policy, default_keep_ratio outside [0, 1].
absl::Status ValidateManagerConfig(const ManagerConfig& config);

// One worker to tell "abort this request".
struct AbortTarget {
  std::string worker_id;
  v1::WorkerRole role = v1::WORKER_ROLE_UNSPECIFIED;
  std::string address;  // host:port or "inproc"
};

// A request to abort on the workers that still hold it: call AbortRequest(request_id,
// transfer_id, reason) on every target (PrefillWorker or DecodeWorker by role).
struct AbortOrder {
  std::string request_id;
  std::string transfer_id;
  std::string reason;
  std::vector<AbortTarget> targets;  // live workers only; may be empty
};

// What the manager knows of one request (for tests, operators and the service).
struct RequestSnapshot {
  std::string request_id;
  v1::RequestState::Phase phase = v1::RequestState::PHASE_UNSPECIFIED;
  std::string transfer_id;
  std::string lease_id;
  std::string prefill_worker_id;
  std::string decode_worker_id;
  v1::EvictionPlan plan;
  int32_t prompt_tokens = 0;
  int32_t max_tokens = 0;
  int32_t reserved_pages = 0;
  // From the workers' reports.
  int32_t pages_held = 0;
  int32_t generated_tokens = 0;
  int64_t kv_entries_full = 0;
  int64_t kv_entries_kept = 0;
  int64_t bytes_transferred = 0;
  std::vector<int32_t> kept_per_head;
  int32_t next_pos = 0;
  std::string error;  // FAILED / ABORTED: why
};

struct WorkerSnapshot {
  std::string worker_id;
  v1::WorkerRole role = v1::WORKER_ROLE_UNSPECIFIED;
  std::string address;
  v1::WorkerCapacity capacity;  // as last reported
  // Decode workers: capacity.kv_pages_free minus what admitted requests may still take.
  int32_t effective_free_pages = 0;
  // Requests in flight on this worker (prefill: until the transfer ends; decode: until
  // the request ends).
  int32_t active_requests = 0;
};

struct ManagerTotals {
  int64_t admitted = 0;  // = ServerInfo.requests_total
  int64_t done = 0;
  int64_t aborted = 0;  // Abort, lease expiry, a worker's ABORTED or Finish(ABORTED)
  int64_t failed = 0;   // a worker's FAILED, a worker lost, or Finish(FAILED)
  int64_t leases_expired = 0;
  int64_t workers_lost = 0;
  int64_t rejected = 0;  // Admit calls that returned an error
};

class ManagerState {
 public:
  // INVALID_ARGUMENT for a bad config (ValidateManagerConfig).
  static absl::StatusOr<std::unique_ptr<ManagerState>> Create(ManagerConfig config,
                                                              Clock clock = &absl::Now);

  ManagerState(const ManagerState&) = delete;
  ManagerState& operator=(const ManagerState&) = delete;

  const ManagerConfig& config() const { return config_; }

  // --- Workers ---

  // Adds the worker, or replaces the entry of the same worker_id (its requests stay: a
  // worker re-registers after the manager was unreachable, not only after a restart).
  // INVALID_ARGUMENT naming the field for a malformed call; FAILED_PRECONDITION when its
  // model (model_name, num_layers, num_kv_heads, head_dim) differs from the other live
  // workers'.
  absl::StatusOr<v1::RegisterWorkerResponse> RegisterWorker(const v1::RegisterWorkerRequest& request);
  // Updates the worker's capacity and liveness. registered = false (OK status) for a
  // worker the manager does not know: it must register again. A heartbeat that arrives
  // after worker_timeout_ms but before the next Sweep keeps the worker and its requests.
  absl::StatusOr<v1::HeartbeatResponse> Heartbeat(const v1::HeartbeatRequest& request);

  // --- Requests ---

  // Validates, fixes the plan, picks the workers, reserves decode pages and starts the
  // lease. INVALID_ARGUMENT naming the field (request_id, prompt_tokens, max_tokens,
  // compression.<field>); ALREADY_EXISTS for a request_id in flight; UNAVAILABLE when no
  // live serving worker of a role (or no pair that shares a KV transport) exists;
  // RESOURCE_EXHAUSTED when no decode worker has the pages. An error changes nothing.
  absl::StatusOr<v1::Ticket> Admit(const v1::AdmitRequest& request);

  // Extends the lease to now + lease_ttl_ms. NOT_FOUND for an unknown lease;
  // FAILED_PRECONDITION for a lease that expired or whose request ended.
  absl::StatusOr<v1::RenewLeaseResponse> RenewLease(const v1::RenewLeaseRequest& request);

  struct ProgressResult {
    v1::ProgressAck ack;               // active = false: stop working on the request
    std::optional<AbortOrder> abort;   // the worker ended the request: tell the other one
  };
  // A worker's phase change and layout. The phase only moves forward (an older report is
  // ignored, its counters still taken). FAILED / ABORTED / DONE end the request.
  // INVALID_ARGUMENT naming the field (request_id, worker_id not one of the request's
  // workers, phase, negative counters, kept_per_head not [layers * kv_heads]);
  // NOT_FOUND for a request never seen or forgotten.
  absl::StatusOr<ProgressResult> ReportProgress(const v1::ProgressReport& report);

  struct FinishResult {
    bool was_running = false;
    std::optional<AbortOrder> abort;  // Finish(ABORTED | FAILED) of a running request
  };
  // The router ends a request: DONE, ABORTED or FAILED (else INVALID_ARGUMENT naming
  // `phase`). Releases the lease and the reservation. Idempotent: a finished request
  // keeps its first end. NOT_FOUND for a request never seen or forgotten.
  absl::StatusOr<FinishResult> Finish(const v1::FinishRequest& request);

  struct AbortResult {
    bool was_running = false;
    std::optional<AbortOrder> abort;  // set when was_running
  };
  // Aborts a request everywhere. Idempotent: a finished request answers was_running =
  // false and orders nothing. INVALID_ARGUMENT for an empty request_id; NOT_FOUND for a
  // request never seen or forgotten.
  absl::StatusOr<AbortResult> Abort(const v1::AbortRequest& request);

  // Housekeeping, called every ~100 ms: drops workers silent for worker_timeout_ms
  // (failing their requests: a lost decode worker fails every request on it, a lost
  // prefill worker those not yet decoding), aborts requests whose lease expired, and
  // forgets requests finished more than finished_grace_ms ago. Returns the aborts to
  // send to the workers that are still alive.
  std::vector<AbortOrder> Sweep();

  // --- Views ---

  // requests: every request in flight plus the finished ones still remembered (with
  // their last phase), in admission order. kv_pages_total / kv_pages_free: summed over
  // live decode workers (free = effective free, after reservations).
  v1::ServerInfo GetServerInfo() const;
  std::optional<RequestSnapshot> GetRequest(const std::string& request_id) const;
  std::vector<WorkerSnapshot> Workers() const;  // live workers, by worker_id
  ManagerTotals totals() const;

 private:
  struct Worker {
    v1::RegisterWorkerRequest info;  // capacity kept current by heartbeats
    absl::Time last_seen;
    // Incremented by every registration and heartbeat (capacity report).
    int64_t capacity_seq = 0;
  };
  struct Request {
    RequestSnapshot s;
    int64_t order = 0;  // admission order
    int64_t num_heads = 0;  // num_layers * num_kv_heads of the decode worker
    absl::Time lease_expires;
    absl::Time finished_at;
    // pages_held as a heartbeat of the decode worker already counts it: the last report
    // before the worker's latest capacity report (see the file comment).
    int64_t held_reported_seq = -1;  // decode worker's capacity_seq at the last report
    int32_t held_confirmed = 0;
  };

  ManagerState(ManagerConfig config, Clock clock);

  static bool Terminal(v1::RequestState::Phase phase);
  bool Live(const Worker& w, absl::Time now) const;
  int32_t HeldCounted(const Request& r, const Worker& decode) const;
  // Pages each live decode worker may still lose to admitted requests.
  std::map<std::string, int64_t> OutstandingByDecodeWorker() const;
  int32_t ActiveOnWorker(const std::string& worker_id, v1::WorkerRole role) const;
  // Ends `r` with `phase` and releases its lease and reservation. Returns the abort of
  // the request on its live workers except `skip_worker_id`.
  AbortOrder End(Request& r, v1::RequestState::Phase phase, const std::string& reason,
                 const std::string& skip_worker_id, absl::Time now);
  // "<instance>-<kind>-<128 random bits in hex>"; mu_ held.
  std::string NextId(const char* kind);
  void Count(v1::RequestState::Phase phase);

  const ManagerConfig config_;
  const Clock clock_;
  const std::string instance_id_;

  mutable std::mutex mu_;
  std::map<std::string, Worker> workers_;
  std::map<std::string, Request> requests_;
  std::map<std::string, std::string> leases_;  // lease_id -> request_id
  int64_t next_id_ = 0;
  std::random_device random_;  // the OS's generator (getrandom), for ids
  int64_t next_order_ = 0;
  ManagerTotals totals_;
};

}  // namespace kvgate::kv
