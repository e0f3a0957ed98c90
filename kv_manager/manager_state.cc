#include "kv_manager/manager_state.h"

#include <algorithm>
#include <cmath>
#include <limits>
#include <random>
#include <tuple>

#include "absl/strings/str_cat.h"
#include "absl/strings/str_join.h"
#include "common/status_macros.h"
#include "kv_manager/plan_proto.h"

namespace kvgate::kv {
namespace {

using Phase = v1::RequestState::Phase;

// KV transports a worker may name in RegisterWorkerRequest.transports.
const std::vector<std::string>& KnownTransports() {
  static const std::vector<std::string>* const kKnown =
      new std::vector<std::string>{"inproc", "tcp", "cuda_ipc", "nccl"};
  return *kKnown;
}

absl::Status WithField(const std::string& prefix, const absl::Status& s) {
  return absl::Status(s.code(), absl::StrCat(prefix, s.message()));
}

absl::Status CheckId(const std::string& field, const std::string& value, size_t max_bytes) {
  if (value.empty()) return absl::InvalidArgumentError(absl::StrCat(field, ": must not be empty"));
  if (value.size() > max_bytes) {
    return absl::InvalidArgumentError(
        absl::StrCat(field, ": ", value.size(), " bytes, at most ", max_bytes));
  }
  return absl::OkStatus();
}

absl::Status CheckCapacity(const v1::WorkerCapacity& c) {
  if (c.kv_pages_total() < 0) {
    return absl::InvalidArgumentError(
        absl::StrCat("capacity.kv_pages_total: must be >= 0, got ", c.kv_pages_total()));
  }
  if (c.kv_pages_free() < 0 || c.kv_pages_free() > c.kv_pages_total()) {
    return absl::InvalidArgumentError(absl::StrCat("capacity.kv_pages_free: must be in [0, ",
                                                   c.kv_pages_total(), "], got ", c.kv_pages_free()));
  }
  if (c.requests_active() < 0) {
    return absl::InvalidArgumentError(
        absl::StrCat("capacity.requests_active: must be >= 0, got ", c.requests_active()));
  }
  return absl::OkStatus();
}

absl::Status CheckPositive(const char* field, int64_t value) {
  if (value >= 1) return absl::OkStatus();
  return absl::InvalidArgumentError(absl::StrCat(field, ": must be >= 1, got ", value));
}

absl::Status CheckNonNegative(const char* field, int64_t value) {
  if (value >= 0) return absl::OkStatus();
  return absl::InvalidArgumentError(absl::StrCat(field, ": must be >= 0, got ", value));
}

bool Speaks(const v1::RegisterWorkerRequest& w, const std::string& transport) {
  if (w.transports().empty()) {  // unstated: tcp, and inproc inside the manager's process
    return transport == "tcp" || (transport == "inproc" && w.address() == "inproc");
  }
  return std::find(w.transports().begin(), w.transports().end(), transport) != w.transports().end();
}

// The KV transport between a prefill and a decode worker, "" when they share none.
// inproc needs one process: the same address.
std::string PairTransport(const v1::RegisterWorkerRequest& prefill,
                          const v1::RegisterWorkerRequest& decode) {
  if (prefill.address() == decode.address() && Speaks(prefill, "inproc") && Speaks(decode, "inproc")) {
    return "inproc";
  }
  // cuda_ipc: the operator puts both on GPUs of one host (the receiver refuses otherwise).
  if (Speaks(prefill, "cuda_ipc") && Speaks(decode, "cuda_ipc")) return "cuda_ipc";
  if (Speaks(prefill, "tcp") && Speaks(decode, "tcp")) return "tcp";
  return "";
}

int64_t CeilDiv(int64_t a, int64_t b) { return (a + b - 1) / b; }

std::string RandomInstanceId() {
  std::random_device rd;
  const uint64_t x = (static_cast<uint64_t>(rd()) << 32) ^ rd();
  return absl::StrCat(absl::Hex(x, absl::kZeroPad16));
}

}  // namespace

absl::Status ValidateManagerConfig(const ManagerConfig& c) {
  KVGATE_RETURN_IF_ERROR(CheckPositive("heartbeat_interval_ms", c.heartbeat_interval_ms));
  if (c.worker_timeout_ms <= c.heartbeat_interval_ms) {
    return absl::InvalidArgumentError(absl::StrCat("worker_timeout_ms: must exceed heartbeat_interval_ms (",
                                                   c.heartbeat_interval_ms, "), got ", c.worker_timeout_ms));
  }
  KVGATE_RETURN_IF_ERROR(CheckPositive("lease_ttl_ms", c.lease_ttl_ms));
  KVGATE_RETURN_IF_ERROR(CheckNonNegative("finished_grace_ms", c.finished_grace_ms));
  KVGATE_RETURN_IF_ERROR(CheckNonNegative("max_finished_requests", c.max_finished_requests));
  const std::vector<std::string>& names = gates::PolicyNames();
  if (std::find(names.begin(), names.end(), c.default_policy) == names.end()) {
    return absl::InvalidArgumentError(absl::StrCat("default_policy: unknown eviction policy '", c.default_policy,
                                                   "' (known: ", absl::StrJoin(names, ", "), ")"));
  }
  if (!(c.default_keep_ratio >= 0.0f && c.default_keep_ratio <= 1.0f)) {
    return absl::InvalidArgumentError(
        absl::StrCat("default_keep_ratio: must be in [0, 1] (0 = unset), got ", c.default_keep_ratio));
  }
  return absl::OkStatus();
}

absl::StatusOr<std::unique_ptr<ManagerState>> ManagerState::Create(ManagerConfig config, Clock clock) {
  KVGATE_RETURN_IF_ERROR(ValidateManagerConfig(config));
  if (!clock) clock = &absl::Now;
  return std::unique_ptr<ManagerState>(new ManagerState(std::move(config), std::move(clock)));
}

ManagerState::ManagerState(ManagerConfig config, Clock clock)
    : config_(std::move(config)),
      clock_(std::move(clock)),
      instance_id_(config_.instance_id.empty() ? RandomInstanceId() : config_.instance_id) {}

bool ManagerState::Terminal(Phase phase) {
  return phase == v1::RequestState::DONE || phase == v1::RequestState::ABORTED ||
         phase == v1::RequestState::FAILED;
}

bool ManagerState::Live(const Worker& w, absl::Time now) const {
  return now - w.last_seen <= absl::Milliseconds(config_.worker_timeout_ms);
}

std::string ManagerState::NextId(const char* kind) {
  // 128 random bits: a transfer or lease id is a capability (whoever knows it may renew
  // the lease or push the transfer), so it must not be guessable from earlier ones.
  ++next_id_;
  std::string out = absl::StrCat(instance_id_, "-", kind, "-");
  for (int i = 0; i < 4; ++i) absl::StrAppend(&out, absl::Hex(random_(), absl::kZeroPad8));
  return out;
}

void ManagerState::Count(Phase phase) {
  if (phase == v1::RequestState::DONE) ++totals_.done;
  if (phase == v1::RequestState::ABORTED) ++totals_.aborted;
  if (phase == v1::RequestState::FAILED) ++totals_.failed;
}

int32_t ManagerState::HeldCounted(const Request& r, const Worker& decode) const {
  // The last report counts once a capacity report arrived after it; until then the one
  // before it (already counted by an earlier heartbeat).
  if (r.held_reported_seq >= 0 && r.held_reported_seq < decode.capacity_seq) return r.s.pages_held;
  return r.held_confirmed;
}

std::map<std::string, int64_t> ManagerState::OutstandingByDecodeWorker() const {
  std::map<std::string, int64_t> out;
  for (const auto& [id, r] : requests_) {
    if (Terminal(r.s.phase)) continue;
    auto w = workers_.find(r.s.decode_worker_id);
    if (w == workers_.end()) continue;
    out[r.s.decode_worker_id] += std::max<int64_t>(0, r.s.reserved_pages - HeldCounted(r, w->second));
  }
  return out;
}

int32_t ManagerState::ActiveOnWorker(const std::string& worker_id, v1::WorkerRole role) const {
  int32_t n = 0;
  for (const auto& [id, r] : requests_) {
    if (Terminal(r.s.phase)) continue;
    if (role == v1::PREFILL && r.s.prefill_worker_id == worker_id && r.s.phase < v1::RequestState::DECODING) ++n;
    if (role == v1::DECODE && r.s.decode_worker_id == worker_id) ++n;
  }
  return n;
}

AbortOrder ManagerState::End(Request& r, Phase phase, const std::string& reason,
                             const std::string& skip_worker_id, absl::Time now) {
  r.s.phase = phase;
  if (r.s.error.empty()) r.s.error = reason;
  r.finished_at = now;
  Count(phase);
  AbortOrder order;
  order.request_id = r.s.request_id;
  order.transfer_id = r.s.transfer_id;
  order.reason = reason;
  for (const std::string* id : {&r.s.prefill_worker_id, &r.s.decode_worker_id}) {
    if (*id == skip_worker_id) continue;
    auto w = workers_.find(*id);
    if (w == workers_.end()) continue;
    order.targets.push_back(AbortTarget{*id, w->second.info.role(), w->second.info.address()});
  }
  return order;
}

// --- Workers -------------------------------------------------------------------------

absl::StatusOr<v1::RegisterWorkerResponse> ManagerState::RegisterWorker(
    const v1::RegisterWorkerRequest& request) {
  KVGATE_RETURN_IF_ERROR(CheckId("worker_id", request.worker_id(), kMaxWorkerIdBytes));
  if (request.role() != v1::PREFILL && request.role() != v1::DECODE) {
    return absl::InvalidArgumentError(
        absl::StrCat("role: must be PREFILL or DECODE, got ", static_cast<int>(request.role())));
  }
  KVGATE_RETURN_IF_ERROR(CheckId("address", request.address(), kMaxWorkerIdBytes));
  KVGATE_RETURN_IF_ERROR(CheckPositive("num_layers", request.num_layers()));
  KVGATE_RETURN_IF_ERROR(CheckPositive("num_kv_heads", request.num_kv_heads()));
  KVGATE_RETURN_IF_ERROR(CheckPositive("head_dim", request.head_dim()));
  KVGATE_RETURN_IF_ERROR(CheckPositive("page_tokens", request.page_tokens()));
  KVGATE_RETURN_IF_ERROR(CheckCapacity(request.capacity()));
  for (int i = 0; i < request.transports_size(); ++i) {
    const std::vector<std::string>& known = KnownTransports();
    if (std::find(known.begin(), known.end(), request.transports(i)) == known.end()) {
      return absl::InvalidArgumentError(absl::StrCat("transports[", i, "]: unknown KV transport '",
                                                     request.transports(i), "' (known: ",
                                                     absl::StrJoin(known, ", "), ")"));
    }
  }

  std::lock_guard<std::mutex> lock(mu_);
  const absl::Time now = clock_();
  for (const auto& entry : workers_) {
    // Not a structured binding: clang 14 cannot capture one in the lambda below.
    const std::string& id = entry.first;
    const auto& w = entry.second;
    if (id == request.worker_id() || !Live(w, now)) continue;
    const v1::RegisterWorkerRequest& o = w.info;
    const auto differs = [&](const char* field, const auto& mine, const auto& theirs) {
      return absl::FailedPreconditionError(absl::StrCat(field, ": '", mine, "' differs from '", theirs,
                                                        "' of registered worker '", id,
                                                        "' (all workers must serve one model)"));
    };
    if (o.model_name() != request.model_name()) return differs("model_name", request.model_name(), o.model_name());
    if (o.num_layers() != request.num_layers()) return differs("num_layers", request.num_layers(), o.num_layers());
    if (o.num_kv_heads() != request.num_kv_heads()) {
      return differs("num_kv_heads", request.num_kv_heads(), o.num_kv_heads());
    }
    if (o.head_dim() != request.head_dim()) return differs("head_dim", request.head_dim(), o.head_dim());
  }
  Worker& w = workers_[request.worker_id()];
  const int64_t seq = w.capacity_seq;
  w.info = request;
  w.last_seen = now;
  w.capacity_seq = seq + 1;
  v1::RegisterWorkerResponse response;
  response.set_heartbeat_interval_ms(config_.heartbeat_interval_ms);
  response.set_worker_timeout_ms(config_.worker_timeout_ms);
  return response;
}

absl::StatusOr<v1::HeartbeatResponse> ManagerState::Heartbeat(const v1::HeartbeatRequest& request) {
  KVGATE_RETURN_IF_ERROR(CheckId("worker_id", request.worker_id(), kMaxWorkerIdBytes));
  KVGATE_RETURN_IF_ERROR(CheckCapacity(request.capacity()));
  std::lock_guard<std::mutex> lock(mu_);
  v1::HeartbeatResponse response;
  auto it = workers_.find(request.worker_id());
  if (it == workers_.end()) {
    response.set_registered(false);
    return response;
  }
  Worker& w = it->second;
  *w.info.mutable_capacity() = request.capacity();
  w.last_seen = clock_();
  ++w.capacity_seq;
  response.set_registered(true);
  return response;
}

// --- Requests ------------------------------------------------------------------------

absl::StatusOr<v1::Ticket> ManagerState::Admit(const v1::AdmitRequest& request) {
  absl::StatusOr<v1::Ticket> ticket = [&]() -> absl::StatusOr<v1::Ticket> {
    KVGATE_RETURN_IF_ERROR(CheckId("request_id", request.request_id(), kMaxRequestIdBytes));
    KVGATE_RETURN_IF_ERROR(CheckPositive("prompt_tokens", request.prompt_tokens()));
    KVGATE_RETURN_IF_ERROR(CheckPositive("max_tokens", request.max_tokens()));

    absl::StatusOr<gates::EvictionSpec> parsed = EvictionSpecFromProto(request.compression());
    if (!parsed.ok()) return WithField("compression.", parsed.status());
    gates::EvictionSpec spec = *std::move(parsed);
    if (spec.policy.empty()) spec.policy = config_.default_policy;
    absl::StatusOr<gates::PolicyTraits> traits = gates::TraitsOfPolicy(spec.policy);
    if (!traits.ok()) return WithField("compression.policy: ", traits.status());
    if (spec.keep_ratio == 0.0f && spec.budget_tokens == 0 && traits->evicts) {
      spec.keep_ratio = config_.default_keep_ratio;
    }
    if (absl::Status s = gates::ValidateEvictionSpec(spec); !s.ok()) return WithField("compression.", s);

    absl::StatusOr<gates::ResolvedBudget> budget = gates::ResolveBudget(spec, request.prompt_tokens(),
                                                                        traits->default_sink, traits->default_recent);
    if (!budget.ok()) return WithField("compression.", budget.status());
    int64_t kept = request.prompt_tokens();
    if (traits->evicts) {
      const int64_t protected_count =
          std::count(budget->protected_mask.begin(), budget->protected_mask.end(), uint8_t{1});
      kept = std::max<int64_t>(budget->keep_per_head, protected_count);
    }

    std::lock_guard<std::mutex> lock(mu_);
    const absl::Time now = clock_();
    if (auto it = requests_.find(request.request_id()); it != requests_.end() && !Terminal(it->second.s.phase)) {
      return absl::AlreadyExistsError(absl::StrCat("request_id: '", request.request_id(),
                                                   "' is already in flight (phase ",
                                                   v1::RequestState::Phase_Name(it->second.s.phase), ")"));
    }

    // Candidates: live, serving workers of each role.
    std::vector<const Worker*> prefills, decodes;
    for (const auto& [id, w] : workers_) {
      if (!Live(w, now) || !w.info.capacity().serving()) continue;
      (w.info.role() == v1::PREFILL ? prefills : decodes).push_back(&w);
    }
    if (prefills.empty()) return absl::UnavailableError("no serving prefill worker is registered");
    if (decodes.empty()) return absl::UnavailableError("no serving decode worker is registered");

    const std::map<std::string, int64_t> outstanding = OutstandingByDecodeWorker();
    struct DecodeCandidate {
      const Worker* w;
      int64_t need_pages;
      int64_t free_pages;
      int32_t active;
    };
    std::vector<DecodeCandidate> fitting;
    int64_t most_free = std::numeric_limits<int64_t>::min(), need_example = 0;
    int32_t most_free_total = 0;
    for (const Worker* w : decodes) {
      const v1::RegisterWorkerRequest& d = w->info;
      const int64_t need = int64_t{d.num_layers()} * d.num_kv_heads() *
                           CeilDiv(kept + request.max_tokens(), d.page_tokens());
      auto o = outstanding.find(d.worker_id());
      const int64_t free_pages = d.capacity().kv_pages_free() - (o == outstanding.end() ? 0 : o->second);
      if (free_pages > most_free) {
        most_free = free_pages;
        most_free_total = d.capacity().kv_pages_total();
        need_example = need;
      }
      if (need <= free_pages && need <= std::numeric_limits<int32_t>::max()) {
        fitting.push_back({w, need, free_pages, ActiveOnWorker(d.worker_id(), v1::DECODE)});
      }
    }
    if (fitting.empty()) {
      return absl::ResourceExhaustedError(absl::StrCat(
          "no decode worker has the KV pages: the request needs ", need_example, " pages (", kept,
          " kept tokens per kv head + max_tokens ", request.max_tokens(), ", policy ", spec.policy,
          "); the most free on one decode worker is ", std::max<int64_t>(most_free, 0), " of ",
          most_free_total));
    }
    std::sort(fitting.begin(), fitting.end(), [](const DecodeCandidate& a, const DecodeCandidate& b) {
      return std::make_tuple(-a.free_pages, a.active, a.w->info.worker_id()) <
             std::make_tuple(-b.free_pages, b.active, b.w->info.worker_id());
    });
    const Worker* prefill = nullptr;
    const DecodeCandidate* decode = nullptr;
    std::string transport;
    for (const DecodeCandidate& d : fitting) {
      std::tuple<int32_t, int32_t, std::string> best_key;
      for (const Worker* p : prefills) {
        const std::string t = PairTransport(p->info, d.w->info);
        if (t.empty()) continue;
        auto key = std::make_tuple(ActiveOnWorker(p->info.worker_id(), v1::PREFILL),
                                   p->info.capacity().requests_active(), p->info.worker_id());
        if (prefill == nullptr || key < best_key) {
          prefill = p;
          best_key = key;
          transport = t;
        }
      }
      if (prefill != nullptr) {
        decode = &d;
        break;
      }
    }
    if (decode == nullptr) {
      return absl::UnavailableError(
          "no serving prefill worker shares a KV transport with a decode worker that has the pages");
    }

    Request& r = requests_[request.request_id()];
    if (!r.s.lease_id.empty()) leases_.erase(r.s.lease_id);  // a finished request of the same id
    r = Request{};
    r.order = next_order_++;
    r.num_heads = int64_t{decode->w->info.num_layers()} * decode->w->info.num_kv_heads();
    r.lease_expires = now + absl::Milliseconds(config_.lease_ttl_ms);
    RequestSnapshot& s = r.s;
    s.request_id = request.request_id();
    s.phase = v1::RequestState::ADMITTED;
    s.transfer_id = NextId("t");
    s.lease_id = NextId("l");
    s.prefill_worker_id = prefill->info.worker_id();
    s.decode_worker_id = decode->w->info.worker_id();
    s.plan = EvictionPlanToProto(spec);
    s.prompt_tokens = request.prompt_tokens();
    s.max_tokens = request.max_tokens();
    s.reserved_pages = static_cast<int32_t>(decode->need_pages);
    s.kept_per_head.clear();
    leases_[s.lease_id] = s.request_id;
    ++totals_.admitted;

    v1::Ticket t;
    t.set_request_id(s.request_id);
    t.set_transfer_id(s.transfer_id);
    t.set_lease_id(s.lease_id);
    t.set_lease_ttl_ms(config_.lease_ttl_ms);
    t.mutable_prefill()->set_worker_id(s.prefill_worker_id);
    t.mutable_prefill()->set_address(prefill->info.address());
    t.mutable_decode()->set_worker_id(s.decode_worker_id);
    t.mutable_decode()->set_address(decode->w->info.address());
    *t.mutable_plan() = s.plan;
    t.set_transport(transport);
    t.set_reserved_pages(s.reserved_pages);
    t.set_prompt_tokens(s.prompt_tokens);
    t.set_max_tokens(s.max_tokens);
    return t;
  }();
  if (!ticket.ok()) {
    std::lock_guard<std::mutex> lock(mu_);
    ++totals_.rejected;
  }
  return ticket;
}

absl::StatusOr<v1::RenewLeaseResponse> ManagerState::RenewLease(const v1::RenewLeaseRequest& request) {
  if (request.lease_id().empty()) return absl::InvalidArgumentError("lease_id: must not be empty");
  std::lock_guard<std::mutex> lock(mu_);
  const absl::Time now = clock_();
  auto l = leases_.find(request.lease_id());
  if (l == leases_.end()) {
    return absl::NotFoundError(absl::StrCat("lease_id: unknown lease '", request.lease_id(), "'"));
  }
  Request& r = requests_.at(l->second);
  if (Terminal(r.s.phase)) {
    return absl::FailedPreconditionError(absl::StrCat(
        "lease_id: the lease of request '", r.s.request_id, "' has ended (request ",
        v1::RequestState::Phase_Name(r.s.phase), r.s.error.empty() ? "" : ": ", r.s.error, ")"));
  }
  if (now > r.lease_expires) {
    return absl::FailedPreconditionError(absl::StrCat("lease_id: the lease of request '", r.s.request_id,
                                                      "' expired ", absl::FormatDuration(now - r.lease_expires),
                                                      " ago"));
  }
  r.lease_expires = now + absl::Milliseconds(config_.lease_ttl_ms);
  v1::RenewLeaseResponse response;
  response.set_lease_ttl_ms(config_.lease_ttl_ms);
  return response;
}

absl::StatusOr<ManagerState::ProgressResult> ManagerState::ReportProgress(const v1::ProgressReport& report) {
  KVGATE_RETURN_IF_ERROR(CheckId("request_id", report.request_id(), kMaxRequestIdBytes));
  KVGATE_RETURN_IF_ERROR(CheckId("worker_id", report.worker_id(), kMaxWorkerIdBytes));
  if (report.phase() == v1::RequestState::PHASE_UNSPECIFIED || !v1::RequestState::Phase_IsValid(report.phase())) {
    return absl::InvalidArgumentError(absl::StrCat("phase: must be one of ADMITTED..FAILED, got ",
                                                   static_cast<int>(report.phase())));
  }
  KVGATE_RETURN_IF_ERROR(CheckNonNegative("kv_entries_full", report.kv_entries_full()));
  KVGATE_RETURN_IF_ERROR(CheckNonNegative("kv_entries_kept", report.kv_entries_kept()));
  KVGATE_RETURN_IF_ERROR(CheckNonNegative("bytes_transferred", report.bytes_transferred()));
  KVGATE_RETURN_IF_ERROR(CheckNonNegative("next_pos", report.next_pos()));
  KVGATE_RETURN_IF_ERROR(CheckNonNegative("pages_held", report.pages_held()));
  KVGATE_RETURN_IF_ERROR(CheckNonNegative("generated_tokens", report.generated_tokens()));
  for (int i = 0; i < report.kept_per_head_size(); ++i) {
    if (report.kept_per_head(i) < 0) {
      return absl::InvalidArgumentError(
          absl::StrCat("kept_per_head[", i, "]: must be >= 0, got ", report.kept_per_head(i)));
    }
  }

  std::lock_guard<std::mutex> lock(mu_);
  const absl::Time now = clock_();
  auto it = requests_.find(report.request_id());
  if (it == requests_.end()) {
    return absl::NotFoundError(absl::StrCat("request_id: unknown request '", report.request_id(), "'"));
  }
  Request& r = it->second;
  const bool from_decode = report.worker_id() == r.s.decode_worker_id;
  if (!from_decode && report.worker_id() != r.s.prefill_worker_id) {
    return absl::InvalidArgumentError(absl::StrCat("worker_id: '", report.worker_id(),
                                                   "' is not a worker of request '", r.s.request_id,
                                                   "' (prefill '", r.s.prefill_worker_id, "', decode '",
                                                   r.s.decode_worker_id, "')"));
  }
  if (report.kept_per_head_size() != 0 && report.kept_per_head_size() != r.num_heads) {
    return absl::InvalidArgumentError(absl::StrCat("kept_per_head: ", report.kept_per_head_size(),
                                                   " values, expected num_layers * num_kv_heads = ", r.num_heads));
  }
  if (!from_decode && report.phase() == v1::RequestState::DONE) {
    return absl::InvalidArgumentError(
        "phase: DONE comes from the decode worker (or the router's Finish); a prefill worker reports "
        "PREFILLING, TRANSFERRING, ABORTED or FAILED");
  }

  ProgressResult result;
  if (Terminal(r.s.phase)) {
    result.ack.set_active(false);
    return result;
  }
  if (report.kv_entries_full() != 0) r.s.kv_entries_full = report.kv_entries_full();
  if (report.kv_entries_kept() != 0) r.s.kv_entries_kept = report.kv_entries_kept();
  if (report.bytes_transferred() != 0) r.s.bytes_transferred = report.bytes_transferred();
  if (report.kept_per_head_size() != 0) r.s.kept_per_head.assign(report.kept_per_head().begin(),
                                                                 report.kept_per_head().end());
  if (report.next_pos() != 0) r.s.next_pos = report.next_pos();
  if (from_decode) {
    auto d = workers_.find(r.s.decode_worker_id);
    if (d != workers_.end()) {
      if (r.held_reported_seq >= 0 && r.held_reported_seq < d->second.capacity_seq) r.held_confirmed = r.s.pages_held;
      r.held_reported_seq = d->second.capacity_seq;
    }
    r.s.pages_held = report.pages_held();
    r.s.generated_tokens = std::max(r.s.generated_tokens, report.generated_tokens());
  }

  const Phase phase = report.phase();
  if (Terminal(phase)) {
    const std::string reason =
        report.error().empty()
            ? absl::StrCat("worker '", report.worker_id(), "' reported ", v1::RequestState::Phase_Name(phase))
            : absl::StrCat("worker '", report.worker_id(), "': ", report.error());
    AbortOrder order = End(r, phase, reason, report.worker_id(), now);
    if (phase != v1::RequestState::DONE) result.abort = std::move(order);
    result.ack.set_active(false);
    return result;
  }
  if (phase > r.s.phase) r.s.phase = phase;
  result.ack.set_active(true);
  return result;
}

absl::StatusOr<ManagerState::FinishResult> ManagerState::Finish(const v1::FinishRequest& request) {
  KVGATE_RETURN_IF_ERROR(CheckId("request_id", request.request_id(), kMaxRequestIdBytes));
  if (!Terminal(request.phase())) {
    return absl::InvalidArgumentError(absl::StrCat("phase: must be DONE, ABORTED or FAILED, got ",
                                                   v1::RequestState::Phase_IsValid(request.phase())
                                                       ? v1::RequestState::Phase_Name(request.phase())
                                                       : absl::StrCat(static_cast<int>(request.phase()))));
  }
  std::lock_guard<std::mutex> lock(mu_);
  auto it = requests_.find(request.request_id());
  if (it == requests_.end()) {
    return absl::NotFoundError(absl::StrCat("request_id: unknown request '", request.request_id(), "'"));
  }
  FinishResult result;
  if (Terminal(it->second.s.phase)) return result;
  result.was_running = true;
  AbortOrder order = End(it->second, request.phase(),
                         absl::StrCat("finished by the router as ", v1::RequestState::Phase_Name(request.phase())),
                         /*skip_worker_id=*/"", clock_());
  if (request.phase() != v1::RequestState::DONE) result.abort = std::move(order);
  return result;
}

absl::StatusOr<ManagerState::AbortResult> ManagerState::Abort(const v1::AbortRequest& request) {
  KVGATE_RETURN_IF_ERROR(CheckId("request_id", request.request_id(), kMaxRequestIdBytes));
  std::lock_guard<std::mutex> lock(mu_);
  auto it = requests_.find(request.request_id());
  if (it == requests_.end()) {
    return absl::NotFoundError(absl::StrCat("request_id: unknown request '", request.request_id(), "'"));
  }
  AbortResult result;
  if (Terminal(it->second.s.phase)) return result;
  result.was_running = true;
  result.abort = End(it->second, v1::RequestState::ABORTED, "aborted", /*skip_worker_id=*/"", clock_());
  return result;
}

std::vector<AbortOrder> ManagerState::Sweep() {
  std::lock_guard<std::mutex> lock(mu_);
  const absl::Time now = clock_();
  std::vector<AbortOrder> orders;

  std::vector<std::string> lost;
  for (auto it = workers_.begin(); it != workers_.end();) {
    if (Live(it->second, now)) {
      ++it;
      continue;
    }
    lost.push_back(it->first);
    ++totals_.workers_lost;
    it = workers_.erase(it);
  }
  const auto is_lost = [&](const std::string& id) {
    return std::find(lost.begin(), lost.end(), id) != lost.end();
  };
  for (auto& [id, r] : requests_) {
    if (Terminal(r.s.phase)) continue;
    std::string reason;
    if (is_lost(r.s.decode_worker_id)) {
      reason = absl::StrCat("decode worker '", r.s.decode_worker_id, "' stopped heartbeating");
    } else if (is_lost(r.s.prefill_worker_id) && r.s.phase < v1::RequestState::DECODING) {
      reason = absl::StrCat("prefill worker '", r.s.prefill_worker_id, "' stopped heartbeating");
    } else if (now > r.lease_expires) {
      ++totals_.leases_expired;
      orders.push_back(End(r, v1::RequestState::ABORTED, absl::StrCat("lease '", r.s.lease_id, "' expired"),
                           /*skip_worker_id=*/"", now));
      continue;
    } else {
      continue;
    }
    orders.push_back(End(r, v1::RequestState::FAILED, reason, /*skip_worker_id=*/"", now));
  }

  // Forget finished requests after the grace period, and the oldest beyond the cap.
  std::vector<std::pair<absl::Time, std::string>> finished;
  for (auto it = requests_.begin(); it != requests_.end();) {
    const Request& r = it->second;
    if (Terminal(r.s.phase) && now - r.finished_at > absl::Milliseconds(config_.finished_grace_ms)) {
      leases_.erase(r.s.lease_id);
      it = requests_.erase(it);
      continue;
    }
    if (Terminal(r.s.phase)) finished.emplace_back(r.finished_at, it->first);
    ++it;
  }
  if (finished.size() > static_cast<size_t>(config_.max_finished_requests)) {
    std::sort(finished.begin(), finished.end());
    const size_t drop = finished.size() - static_cast<size_t>(config_.max_finished_requests);
    for (size_t i = 0; i < drop; ++i) {
      auto it = requests_.find(finished[i].second);
      leases_.erase(it->second.s.lease_id);
      requests_.erase(it);
    }
  }
  return orders;
}

// --- Views ---------------------------------------------------------------------------

v1::ServerInfo ManagerState::GetServerInfo() const {
  std::lock_guard<std::mutex> lock(mu_);
  const absl::Time now = clock_();
  v1::ServerInfo info;
  info.set_version(config_.version);
  info.add_roles("kv_manager");
  const std::map<std::string, int64_t> outstanding = OutstandingByDecodeWorker();
  int64_t pages_total = 0, pages_free = 0;
  int32_t prefill_workers = 0, decode_workers = 0;
  for (const auto& [id, w] : workers_) {
    if (!Live(w, now) || !w.info.capacity().serving()) continue;
    if (w.info.role() == v1::PREFILL) ++prefill_workers;
    if (w.info.role() == v1::DECODE) ++decode_workers;
  }
  info.set_prefill_workers(prefill_workers);
  info.set_decode_workers(decode_workers);
  for (const auto& [id, w] : workers_) {
    if (w.info.role() != v1::DECODE || !Live(w, now)) continue;
    pages_total += w.info.capacity().kv_pages_total();
    auto o = outstanding.find(id);
    pages_free += std::max<int64_t>(0, w.info.capacity().kv_pages_free() - (o == outstanding.end() ? 0 : o->second));
  }
  const int64_t kMax = std::numeric_limits<int32_t>::max();
  info.set_kv_pages_total(static_cast<int32_t>(std::min(pages_total, kMax)));
  info.set_kv_pages_free(static_cast<int32_t>(std::min(pages_free, kMax)));

  std::vector<const Request*> ordered;
  int32_t in_flight = 0, leases = 0, transfers = 0;
  for (const auto& [id, r] : requests_) {
    ordered.push_back(&r);
    if (Terminal(r.s.phase)) continue;
    ++in_flight;
    if (now <= r.lease_expires) ++leases;
    if (r.s.phase == v1::RequestState::TRANSFERRING) ++transfers;
  }
  info.set_requests_in_flight(in_flight);
  info.set_requests_total(totals_.admitted);
  info.set_leases_active(leases);
  info.set_transfers_active(transfers);
  std::sort(ordered.begin(), ordered.end(), [](const Request* a, const Request* b) { return a->order < b->order; });
  for (const Request* r : ordered) {
    v1::RequestState* s = info.add_requests();
    s->set_request_id(r->s.request_id);
    s->set_phase(r->s.phase);
    s->set_prompt_tokens(r->s.prompt_tokens);
    s->set_generated_tokens(r->s.generated_tokens);
    s->set_pages_held(r->s.pages_held);
  }
  return info;
}

std::optional<RequestSnapshot> ManagerState::GetRequest(const std::string& request_id) const {
  std::lock_guard<std::mutex> lock(mu_);
  auto it = requests_.find(request_id);
  if (it == requests_.end()) return std::nullopt;
  return it->second.s;
}

std::vector<WorkerSnapshot> ManagerState::Workers() const {
  std::lock_guard<std::mutex> lock(mu_);
  const absl::Time now = clock_();
  const std::map<std::string, int64_t> outstanding = OutstandingByDecodeWorker();
  std::vector<WorkerSnapshot> out;
  for (const auto& [id, w] : workers_) {
    if (!Live(w, now)) continue;
    WorkerSnapshot s;
    s.worker_id = id;
    s.role = w.info.role();
    s.address = w.info.address();
    s.capacity = w.info.capacity();
    if (s.role == v1::DECODE) {
      auto o = outstanding.find(id);
      s.effective_free_pages = static_cast<int32_t>(
          std::max<int64_t>(0, s.capacity.kv_pages_free() - (o == outstanding.end() ? 0 : o->second)));
    }
    s.active_requests = ActiveOnWorker(id, s.role);
    out.push_back(std::move(s));
  }
  return out;
}

ManagerTotals ManagerState::totals() const {
  std::lock_guard<std::mutex> lock(mu_);
  return totals_;
}

}  // namespace kvgate::kv
