// ManagerState with a hand-moved clock: admission by free pages after compression,
// reservations, leases, worker timeouts, Abort, validation, ServerInfo.
//
// Model shape of every worker here: 2 layers x 2 kv heads, 16 tokens per page. A request
// of prompt n and max_tokens m keeping k tokens per head reserves 4 * ceil((k + m) / 16)
// pages: full at n = 1000, m = 24 -> 4 * 64 = 256; snapkv keep 0.3 -> 4 * ceil(324 / 16)
// = 84.
#include "kv_manager/manager_state.h"

#include <cmath>
#include <functional>
#include <limits>
#include <map>
#include <string>
#include <vector>

#include <gtest/gtest.h>

#include <regex>

namespace kvgate::kv {
namespace {

using Phase = v1::RequestState::Phase;

constexpr int32_t kFullPages = 256;    // full, n = 1000, m = 24
constexpr int32_t kSnapkvPages = 84;   // snapkv keep 0.3, n = 1000, m = 24

// The status has `want_code` and its message names `field`.
#define EXPECT_STATUS(expr, want_code, field)                                  \
  do {                                                                         \
    const absl::Status s_ = (expr);                                            \
    EXPECT_EQ(s_.code(), (want_code)) << s_;                                   \
    EXPECT_NE(std::string(s_.message()).find(field), std::string::npos)        \
        << "message does not name '" << (field) << "': " << s_;                \
  } while (0)

class ManagerStateTest : public ::testing::Test {
 protected:
  void SetUp() override { Make(DefaultConfig()); }

  static ManagerConfig DefaultConfig() {
    ManagerConfig c;
    c.heartbeat_interval_ms = 100;
    c.worker_timeout_ms = 1000;
    c.lease_ttl_ms = 2000;
    c.finished_grace_ms = 5000;
    c.instance_id = "test";
    c.version = "0.test";
    return c;
  }

  void Make(ManagerConfig config) {
    alive_.clear();
    absl::StatusOr<std::unique_ptr<ManagerState>> s = ManagerState::Create(config, [this] { return now_; });
    ASSERT_TRUE(s.ok()) << s.status();
    state_ = *std::move(s);
  }

  static v1::RegisterWorkerRequest WorkerInfo(const std::string& id, v1::WorkerRole role, int32_t free_pages,
                                              int32_t total_pages, const std::string& address = "") {
    v1::RegisterWorkerRequest r;
    r.set_worker_id(id);
    r.set_role(role);
    r.set_address(address.empty() ? id + ":50051" : address);
    r.set_model_name("tiny");
    r.set_num_layers(2);
    r.set_num_kv_heads(2);
    r.set_head_dim(8);
    r.set_page_tokens(16);
    r.mutable_capacity()->set_kv_pages_total(total_pages);
    r.mutable_capacity()->set_kv_pages_free(free_pages);
    r.mutable_capacity()->set_serving(true);
    return r;
  }

  void Register(const std::string& id, v1::WorkerRole role, int32_t free_pages = 0, int32_t total_pages = 0) {
    total_pages = std::max(free_pages, total_pages);
    auto r = state_->RegisterWorker(WorkerInfo(id, role, free_pages, total_pages));
    ASSERT_TRUE(r.ok()) << r.status();
    alive_[id] = {free_pages, total_pages};
    EXPECT_EQ(r->heartbeat_interval_ms(), 100);
    EXPECT_EQ(r->worker_timeout_ms(), 1000);
  }

  void Heartbeat(const std::string& id, int32_t free_pages, int32_t total_pages, bool serving = true) {
    v1::HeartbeatRequest h;
    h.set_worker_id(id);
    h.mutable_capacity()->set_kv_pages_total(total_pages);
    h.mutable_capacity()->set_kv_pages_free(free_pages);
    h.mutable_capacity()->set_serving(serving);
    auto r = state_->Heartbeat(h);
    ASSERT_TRUE(r.ok()) << r.status();
    EXPECT_TRUE(r->registered());
    if (serving) alive_[id] = {free_pages, total_pages};
  }

  // Moves the clock by `ms` in steps of at most 250 ms; every worker in alive_ heartbeats
  // after each step (remove one from alive_ to silence it).
  void Advance(int64_t ms) {
    while (ms > 0) {
      const int64_t step = std::min<int64_t>(ms, 250);
      now_ += absl::Milliseconds(step);
      ms -= step;
      for (const auto& [id, cap] : alive_) Heartbeat(id, cap.first, cap.second);
    }
  }

  static v1::AdmitRequest Request(const std::string& id, const std::string& policy = "full", float keep = 0.0f,
                                  int32_t prompt = 1000, int32_t max_tokens = 24) {
    v1::AdmitRequest r;
    r.set_request_id(id);
    r.set_prompt_tokens(prompt);
    r.set_max_tokens(max_tokens);
    r.mutable_compression()->set_policy(policy);
    r.mutable_compression()->set_keep_ratio(keep);
    return r;
  }

  v1::Ticket Admit(const v1::AdmitRequest& request) {
    absl::StatusOr<v1::Ticket> t = state_->Admit(request);
    EXPECT_TRUE(t.ok()) << t.status();
    return t.ok() ? *t : v1::Ticket();
  }

  absl::StatusOr<ManagerState::ProgressResult> Report(const std::string& request_id, const std::string& worker_id,
                                                      Phase phase, int32_t pages_held = 0,
                                                      int32_t generated = 0) {
    v1::ProgressReport r;
    r.set_request_id(request_id);
    r.set_worker_id(worker_id);
    r.set_phase(phase);
    r.set_pages_held(pages_held);
    r.set_generated_tokens(generated);
    return state_->ReportProgress(r);
  }

  absl::Status Finish(const std::string& request_id, Phase phase) {
    v1::FinishRequest f;
    f.set_request_id(request_id);
    f.set_phase(phase);
    return state_->Finish(f).status();
  }

  absl::StatusOr<ManagerState::AbortResult> Abort(const std::string& request_id) {
    v1::AbortRequest a;
    a.set_request_id(request_id);
    return state_->Abort(a);
  }

  int32_t EffectiveFree(const std::string& worker_id) const {
    for (const WorkerSnapshot& w : state_->Workers()) {
      if (w.worker_id == worker_id) return w.effective_free_pages;
    }
    ADD_FAILURE() << "no worker " << worker_id;
    return -1;
  }

  Phase PhaseOf(const std::string& request_id) const {
    std::optional<RequestSnapshot> r = state_->GetRequest(request_id);
    return r.has_value() ? r->phase : v1::RequestState::PHASE_UNSPECIFIED;
  }

  absl::Time now_ = absl::FromUnixSeconds(1700000000);
  std::unique_ptr<ManagerState> state_;
  std::map<std::string, std::pair<int32_t, int32_t>> alive_;  // id -> (free, total) pages
};

// --- Admission ---------------------------------------------------------------------------

TEST_F(ManagerStateTest, CompressedRequestFitsWhereFullDoesNot) {
  Register("p1", v1::PREFILL);
  Register("d1", v1::DECODE, 200);
  absl::StatusOr<v1::Ticket> full = state_->Admit(Request("a"));
  EXPECT_STATUS(full.status(), absl::StatusCode::kResourceExhausted, "256 pages");

  v1::Ticket t = Admit(Request("a", "snapkv", 0.3f));
  EXPECT_EQ(t.request_id(), "a");
  EXPECT_EQ(t.reserved_pages(), kSnapkvPages);
  EXPECT_EQ(t.prefill().worker_id(), "p1");
  EXPECT_EQ(t.prefill().address(), "p1:50051");
  EXPECT_EQ(t.decode().worker_id(), "d1");
  EXPECT_EQ(t.decode().address(), "d1:50051");
  EXPECT_EQ(t.transport(), "tcp");
  EXPECT_EQ(t.plan().policy(), "snapkv");
  EXPECT_FLOAT_EQ(t.plan().keep_ratio(), 0.3f);
  EXPECT_EQ(t.lease_ttl_ms(), 2000);
  EXPECT_EQ(t.prompt_tokens(), 1000);
  EXPECT_EQ(t.max_tokens(), 24);
  // Unguessable: the instance, the kind, then 128 random bits (32 hex digits).
  EXPECT_TRUE(std::regex_match(t.transfer_id(), std::regex("test-t-[0-9a-f]{32}"))) << t.transfer_id();
  EXPECT_TRUE(std::regex_match(t.lease_id(), std::regex("test-l-[0-9a-f]{32}"))) << t.lease_id();
  EXPECT_EQ(EffectiveFree("d1"), 200 - kSnapkvPages);
  EXPECT_EQ(state_->totals().rejected, 1);
  EXPECT_EQ(state_->totals().admitted, 1);
}

TEST_F(ManagerStateTest, DecodeWorkerWithMostFreePagesAfterReservations) {
  Register("p1", v1::PREFILL);
  Register("d1", v1::DECODE, 200);
  Register("d2", v1::DECODE, 150);
  EXPECT_EQ(Admit(Request("a", "snapkv", 0.3f)).decode().worker_id(), "d1");  // d1 116, d2 150
  EXPECT_EQ(Admit(Request("b", "snapkv", 0.3f)).decode().worker_id(), "d2");  // d1 116, d2 66
  EXPECT_EQ(Admit(Request("c", "snapkv", 0.3f)).decode().worker_id(), "d1");  // d1 32, d2 66
  EXPECT_EQ(EffectiveFree("d1"), 200 - 2 * kSnapkvPages);
  EXPECT_EQ(EffectiveFree("d2"), 150 - kSnapkvPages);
  EXPECT_STATUS(state_->Admit(Request("d", "snapkv", 0.3f)).status(), absl::StatusCode::kResourceExhausted,
                "84 pages");
  // Finishing a releases its reservation.
  ASSERT_TRUE(Finish("a", v1::RequestState::DONE).ok());
  EXPECT_EQ(EffectiveFree("d1"), 200 - kSnapkvPages);
  EXPECT_EQ(Admit(Request("d", "snapkv", 0.3f)).decode().worker_id(), "d1");
}

TEST_F(ManagerStateTest, HeldPagesCountOnceAcrossReportsAndHeartbeats) {
  Register("p1", v1::PREFILL);
  Register("d1", v1::DECODE, 200);
  Admit(Request("a", "snapkv", 0.3f));
  EXPECT_EQ(EffectiveFree("d1"), 116);
  // The decode worker imported the cache (76 pages) and says so before its pool's free
  // count reaches the manager: the reservation still counts whole.
  ASSERT_TRUE(Report("a", "d1", v1::RequestState::DECODING, 76).ok());
  EXPECT_EQ(EffectiveFree("d1"), 116);
  Heartbeat("d1", 200 - 76, 200);
  EXPECT_EQ(EffectiveFree("d1"), 116);
  // Grown to 80 pages; the heartbeat lags behind again.
  ASSERT_TRUE(Report("a", "d1", v1::RequestState::DECODING, 80).ok());
  EXPECT_EQ(EffectiveFree("d1"), 116);
  Heartbeat("d1", 200 - 80, 200);
  EXPECT_EQ(EffectiveFree("d1"), 116);
  EXPECT_EQ(state_->GetServerInfo().kv_pages_free(), 116);
  // Done: the pages come back with the worker's next report.
  ASSERT_TRUE(Finish("a", v1::RequestState::DONE).ok());
  EXPECT_EQ(EffectiveFree("d1"), 120);
  Heartbeat("d1", 200, 200);
  EXPECT_EQ(EffectiveFree("d1"), 200);
}

TEST_F(ManagerStateTest, PrefillWorkerWithFewestActiveRequests) {
  Register("p1", v1::PREFILL);
  Register("p2", v1::PREFILL);
  Register("d1", v1::DECODE, 10000);
  EXPECT_EQ(Admit(Request("a")).prefill().worker_id(), "p1");
  EXPECT_EQ(Admit(Request("b")).prefill().worker_id(), "p2");
  // a has left its prefill worker once decoding.
  ASSERT_TRUE(Report("a", "d1", v1::RequestState::DECODING).ok());
  EXPECT_EQ(Admit(Request("c")).prefill().worker_id(), "p1");
  EXPECT_EQ(Admit(Request("d")).prefill().worker_id(), "p1");  // tie 1-1: by id
  EXPECT_EQ(Admit(Request("e")).prefill().worker_id(), "p2");
}

TEST_F(ManagerStateTest, NoLiveServingWorkerIsUnavailable) {
  EXPECT_STATUS(state_->Admit(Request("a")).status(), absl::StatusCode::kUnavailable, "prefill");
  Register("p1", v1::PREFILL);
  EXPECT_STATUS(state_->Admit(Request("a")).status(), absl::StatusCode::kUnavailable, "decode");
  Register("d1", v1::DECODE, 1000);
  Heartbeat("d1", 1000, 1000, /*serving=*/false);  // draining
  EXPECT_STATUS(state_->Admit(Request("a")).status(), absl::StatusCode::kUnavailable, "decode");
  Heartbeat("d1", 1000, 1000, /*serving=*/true);
  Admit(Request("a"));
  // Silent past the timeout, not yet swept: not chosen either.
  now_ += absl::Milliseconds(1001);
  EXPECT_STATUS(state_->Admit(Request("b")).status(), absl::StatusCode::kUnavailable, "prefill");
}

TEST_F(ManagerStateTest, TransportInprocOnlyInsideOneProcess) {
  auto inproc = [](const std::string& id, v1::WorkerRole role) {
    v1::RegisterWorkerRequest r = WorkerInfo(id, role, 1000, 1000, "inproc");
    r.add_transports("inproc");
    return r;
  };
  ASSERT_TRUE(state_->RegisterWorker(inproc("p1", v1::PREFILL)).ok());
  ASSERT_TRUE(state_->RegisterWorker(inproc("d1", v1::DECODE)).ok());
  EXPECT_EQ(Admit(Request("a")).transport(), "inproc");

  // A remote tcp-only decode worker shares no transport with the inproc-only prefill.
  Make(DefaultConfig());
  ASSERT_TRUE(state_->RegisterWorker(inproc("p1", v1::PREFILL)).ok());
  v1::RegisterWorkerRequest d = WorkerInfo("d1", v1::DECODE, 1000, 1000);
  d.add_transports("tcp");
  ASSERT_TRUE(state_->RegisterWorker(d).ok());
  EXPECT_STATUS(state_->Admit(Request("a")).status(), absl::StatusCode::kUnavailable, "KV transport");
  // A prefill worker speaking tcp too pairs with it.
  v1::RegisterWorkerRequest p2 = WorkerInfo("p2", v1::PREFILL, 0, 0);
  p2.add_transports("tcp");
  ASSERT_TRUE(state_->RegisterWorker(p2).ok());
  v1::Ticket t = Admit(Request("a"));
  EXPECT_EQ(t.prefill().worker_id(), "p2");
  EXPECT_EQ(t.transport(), "tcp");
}

TEST_F(ManagerStateTest, DefaultPolicyAndKeepRatioComeFromConfig) {
  ManagerConfig c = DefaultConfig();
  c.default_policy = "snapkv";
  c.default_keep_ratio = 0.5f;
  Make(c);
  Register("p1", v1::PREFILL);
  Register("d1", v1::DECODE, 10000);
  v1::AdmitRequest empty = Request("a", "");
  empty.clear_compression();
  v1::Ticket t = Admit(empty);
  EXPECT_EQ(t.plan().policy(), "snapkv");
  EXPECT_FLOAT_EQ(t.plan().keep_ratio(), 0.5f);
  EXPECT_EQ(t.reserved_pages(), 4 * 33);  // ceil((500 + 24) / 16) = 33
  // An explicit budget wins; full never takes the default ratio.
  v1::AdmitRequest budget = Request("b", "sage_kv");
  budget.mutable_compression()->set_budget_tokens(64);
  t = Admit(budget);
  EXPECT_EQ(t.plan().keep_ratio(), 0.0f);
  EXPECT_EQ(t.plan().budget_tokens(), 64);
  EXPECT_EQ(t.reserved_pages(), 4 * 6);  // ceil((64 + 24) / 16) = 6
  t = Admit(Request("c", "full"));
  EXPECT_EQ(t.plan().keep_ratio(), 0.0f);
  EXPECT_EQ(t.reserved_pages(), kFullPages);
}

TEST_F(ManagerStateTest, ProtectedPositionsCountTowardKept) {
  Register("p1", v1::PREFILL);
  Register("d1", v1::DECODE, 10000);
  v1::AdmitRequest r = Request("a", "snapkv", 0.1f);  // 100 per head, but 500 protected
  v1::TokenRange* range = r.mutable_compression()->add_protected_ranges();
  range->set_begin(0);
  range->set_end(500);
  EXPECT_EQ(Admit(r).reserved_pages(), 4 * 33);
  EXPECT_EQ(Admit(Request("b", "snapkv", 0.1f)).reserved_pages(), 4 * 8);  // ceil(124 / 16)
}

// --- Leases ------------------------------------------------------------------------------

TEST_F(ManagerStateTest, LeaseRenewalAndExpiry) {
  Register("p1", v1::PREFILL);
  Register("d1", v1::DECODE, 1000);
  const v1::Ticket t = Admit(Request("a", "snapkv", 0.3f));
  v1::RenewLeaseRequest renew;
  renew.set_lease_id(t.lease_id());

  Advance(1500);
  absl::StatusOr<v1::RenewLeaseResponse> r = state_->RenewLease(renew);
  ASSERT_TRUE(r.ok()) << r.status();
  EXPECT_EQ(r->lease_ttl_ms(), 2000);
  Advance(1500);  // 3 s after admission, 1.5 s after the renewal
  EXPECT_TRUE(state_->Sweep().empty());
  EXPECT_EQ(PhaseOf("a"), v1::RequestState::ADMITTED);
  EXPECT_EQ(state_->GetServerInfo().leases_active(), 1);

  Advance(501);  // 2.001 s after the renewal
  // Expired but not swept yet: no renewal.
  EXPECT_STATUS(state_->RenewLease(renew).status(), absl::StatusCode::kFailedPrecondition, "lease_id");
  EXPECT_EQ(state_->GetServerInfo().leases_active(), 0);
  std::vector<AbortOrder> orders = state_->Sweep();
  ASSERT_EQ(orders.size(), 1u);
  EXPECT_EQ(orders[0].request_id, "a");
  EXPECT_EQ(orders[0].transfer_id, t.transfer_id());
  EXPECT_NE(orders[0].reason.find("lease"), std::string::npos) << orders[0].reason;
  ASSERT_EQ(orders[0].targets.size(), 2u);
  EXPECT_EQ(orders[0].targets[0].worker_id, "p1");
  EXPECT_EQ(orders[0].targets[0].role, v1::PREFILL);
  EXPECT_EQ(orders[0].targets[0].address, "p1:50051");
  EXPECT_EQ(orders[0].targets[1].worker_id, "d1");
  EXPECT_EQ(orders[0].targets[1].role, v1::DECODE);
  EXPECT_EQ(PhaseOf("a"), v1::RequestState::ABORTED);
  EXPECT_EQ(state_->totals().leases_expired, 1);
  EXPECT_EQ(EffectiveFree("d1"), 1000);  // reservation released
  EXPECT_STATUS(state_->RenewLease(renew).status(), absl::StatusCode::kFailedPrecondition, "ABORTED");
  // The workers learn it from their next report too.
  absl::StatusOr<ManagerState::ProgressResult> ack = Report("a", "p1", v1::RequestState::PREFILLING);
  ASSERT_TRUE(ack.ok());
  EXPECT_FALSE(ack->ack.active());
  EXPECT_TRUE(state_->Sweep().empty());  // once only

  renew.set_lease_id("no-such-lease");
  EXPECT_STATUS(state_->RenewLease(renew).status(), absl::StatusCode::kNotFound, "lease_id");
}

TEST_F(ManagerStateTest, FinishedRequestLeaseCannotBeRenewed) {
  Register("p1", v1::PREFILL);
  Register("d1", v1::DECODE, 1000);
  const v1::Ticket t = Admit(Request("a", "snapkv", 0.3f));
  ASSERT_TRUE(Finish("a", v1::RequestState::DONE).ok());
  v1::RenewLeaseRequest renew;
  renew.set_lease_id(t.lease_id());
  EXPECT_STATUS(state_->RenewLease(renew).status(), absl::StatusCode::kFailedPrecondition, "DONE");
  Advance(5001);
  state_->Sweep();
  EXPECT_STATUS(state_->RenewLease(renew).status(), absl::StatusCode::kNotFound, "lease_id");
}

// --- Worker timeouts ----------------------------------------------------------------------

TEST_F(ManagerStateTest, SilentDecodeWorkerFailsEveryRequestOnIt) {
  Register("p1", v1::PREFILL);
  Register("d1", v1::DECODE, 1000);
  Register("d2", v1::DECODE, 950);
  const v1::Ticket a = Admit(Request("a", "snapkv", 0.3f));  // d1
  ASSERT_EQ(a.decode().worker_id(), "d1");
  ASSERT_EQ(Admit(Request("b", "snapkv", 0.3f)).decode().worker_id(), "d2");
  ASSERT_EQ(Admit(Request("c", "snapkv", 0.3f)).decode().worker_id(), "d1");
  ASSERT_TRUE(Report("a", "d1", v1::RequestState::DECODING, 10, 3).ok());

  alive_.erase("d1");
  Advance(1000);
  EXPECT_TRUE(state_->Sweep().empty());  // silent for exactly the timeout: still there
  Advance(1);
  std::vector<AbortOrder> orders = state_->Sweep();
  ASSERT_EQ(orders.size(), 2u);
  for (const AbortOrder& o : orders) {
    EXPECT_TRUE(o.request_id == "a" || o.request_id == "c") << o.request_id;
    ASSERT_EQ(o.targets.size(), 1u);  // only the worker still alive
    EXPECT_EQ(o.targets[0].worker_id, "p1");
    EXPECT_NE(o.reason.find("d1"), std::string::npos) << o.reason;
  }
  EXPECT_EQ(orders[0].transfer_id, a.transfer_id());
  EXPECT_EQ(PhaseOf("a"), v1::RequestState::FAILED);
  EXPECT_EQ(PhaseOf("c"), v1::RequestState::FAILED);
  EXPECT_EQ(PhaseOf("b"), v1::RequestState::ADMITTED);
  EXPECT_EQ(state_->totals().workers_lost, 1);
  EXPECT_EQ(state_->totals().failed, 2);
  EXPECT_EQ(state_->Workers().size(), 2u);
  EXPECT_EQ(state_->GetServerInfo().kv_pages_total(), 950);
  // The lost worker's heartbeat is answered "register again".
  v1::HeartbeatRequest h;
  h.set_worker_id("d1");
  EXPECT_FALSE(state_->Heartbeat(h)->registered());
}

TEST_F(ManagerStateTest, SilentPrefillWorkerFailsOnlyRequestsNotYetDecoding) {
  Register("p1", v1::PREFILL);
  Register("d1", v1::DECODE, 1000);
  Admit(Request("a", "snapkv", 0.3f));
  Admit(Request("b", "snapkv", 0.3f));
  ASSERT_TRUE(Report("b", "d1", v1::RequestState::DECODING).ok());
  alive_.erase("p1");
  Advance(1001);
  std::vector<AbortOrder> orders = state_->Sweep();
  ASSERT_EQ(orders.size(), 1u);
  EXPECT_EQ(orders[0].request_id, "a");
  ASSERT_EQ(orders[0].targets.size(), 1u);
  EXPECT_EQ(orders[0].targets[0].worker_id, "d1");
  EXPECT_EQ(PhaseOf("a"), v1::RequestState::FAILED);
  EXPECT_EQ(PhaseOf("b"), v1::RequestState::DECODING);
}

TEST_F(ManagerStateTest, ReRegistrationReplacesTheEntryAndKeepsItsRequests) {
  Register("p1", v1::PREFILL);
  Register("d1", v1::DECODE, 1000);
  Admit(Request("a", "snapkv", 0.3f));
  ASSERT_TRUE(state_->RegisterWorker(WorkerInfo("d1", v1::DECODE, 500, 500, "d1-new:50052")).ok());
  EXPECT_EQ(state_->Workers().size(), 2u);
  EXPECT_EQ(PhaseOf("a"), v1::RequestState::ADMITTED);
  EXPECT_EQ(EffectiveFree("d1"), 500 - kSnapkvPages);
  absl::StatusOr<ManagerState::AbortResult> r = Abort("a");
  ASSERT_TRUE(r.ok());
  ASSERT_TRUE(r->abort.has_value());
  ASSERT_EQ(r->abort->targets.size(), 2u);
  EXPECT_EQ(r->abort->targets[1].address, "d1-new:50052");
}

TEST_F(ManagerStateTest, HeartbeatOfUnknownWorkerAsksToRegister) {
  v1::HeartbeatRequest h;
  h.set_worker_id("ghost");
  absl::StatusOr<v1::HeartbeatResponse> r = state_->Heartbeat(h);
  ASSERT_TRUE(r.ok()) << r.status();
  EXPECT_FALSE(r->registered());
}

// --- Phases, Finish, Abort ---------------------------------------------------------------

TEST_F(ManagerStateTest, PhasesMoveForwardOnly) {
  Register("p1", v1::PREFILL);
  Register("d1", v1::DECODE, 1000);
  Admit(Request("a", "snapkv", 0.3f));
  EXPECT_TRUE(Report("a", "p1", v1::RequestState::PREFILLING)->ack.active());
  EXPECT_EQ(PhaseOf("a"), v1::RequestState::PREFILLING);
  EXPECT_TRUE(Report("a", "d1", v1::RequestState::DECODING, 5, 1)->ack.active());
  // The prefill worker's TRANSFERRING arrives after the decode worker's DECODING.
  EXPECT_TRUE(Report("a", "p1", v1::RequestState::TRANSFERRING)->ack.active());
  EXPECT_EQ(PhaseOf("a"), v1::RequestState::DECODING);
  absl::StatusOr<ManagerState::ProgressResult> done = Report("a", "d1", v1::RequestState::DONE, 6, 24);
  ASSERT_TRUE(done.ok());
  EXPECT_FALSE(done->ack.active());
  EXPECT_FALSE(done->abort.has_value());
  EXPECT_EQ(PhaseOf("a"), v1::RequestState::DONE);
  EXPECT_EQ(state_->GetRequest("a")->generated_tokens, 24);
  EXPECT_EQ(state_->totals().done, 1);
}

TEST_F(ManagerStateTest, WorkerFailureReachesTheOtherWorker) {
  Register("p1", v1::PREFILL);
  Register("d1", v1::DECODE, 1000);
  const v1::Ticket t = Admit(Request("a", "snapkv", 0.3f));
  v1::ProgressReport r;
  r.set_request_id("a");
  r.set_worker_id("p1");
  r.set_phase(v1::RequestState::FAILED);
  r.set_error("CUDA error: out of memory");
  absl::StatusOr<ManagerState::ProgressResult> res = state_->ReportProgress(r);
  ASSERT_TRUE(res.ok()) << res.status();
  EXPECT_FALSE(res->ack.active());
  ASSERT_TRUE(res->abort.has_value());
  EXPECT_EQ(res->abort->transfer_id, t.transfer_id());
  ASSERT_EQ(res->abort->targets.size(), 1u);
  EXPECT_EQ(res->abort->targets[0].worker_id, "d1");
  EXPECT_EQ(PhaseOf("a"), v1::RequestState::FAILED);
  EXPECT_NE(state_->GetRequest("a")->error.find("out of memory"), std::string::npos);
}

TEST_F(ManagerStateTest, FinishOfAbortedOrFailedFansOutButDoneDoesNot) {
  Register("p1", v1::PREFILL);
  Register("d1", v1::DECODE, 1000);
  Admit(Request("a"));
  Admit(Request("b"));
  v1::FinishRequest f;
  f.set_request_id("a");
  f.set_phase(v1::RequestState::DONE);
  absl::StatusOr<ManagerState::FinishResult> r = state_->Finish(f);
  ASSERT_TRUE(r.ok());
  EXPECT_TRUE(r->was_running);
  EXPECT_FALSE(r->abort.has_value());
  f.set_request_id("b");
  f.set_phase(v1::RequestState::FAILED);
  r = state_->Finish(f);
  ASSERT_TRUE(r.ok());
  ASSERT_TRUE(r->abort.has_value());
  EXPECT_EQ(r->abort->targets.size(), 2u);
  // Idempotent: the first end stays.
  f.set_phase(v1::RequestState::DONE);
  r = state_->Finish(f);
  ASSERT_TRUE(r.ok());
  EXPECT_FALSE(r->was_running);
  EXPECT_EQ(PhaseOf("b"), v1::RequestState::FAILED);
}

TEST_F(ManagerStateTest, AbortIsIdempotentThenNotFoundOnceForgotten) {
  Register("p1", v1::PREFILL);
  Register("d1", v1::DECODE, 1000);
  const v1::Ticket t = Admit(Request("a", "snapkv", 0.3f));
  absl::StatusOr<ManagerState::AbortResult> r = Abort("a");
  ASSERT_TRUE(r.ok()) << r.status();
  EXPECT_TRUE(r->was_running);
  ASSERT_TRUE(r->abort.has_value());
  EXPECT_EQ(r->abort->request_id, "a");
  EXPECT_EQ(r->abort->transfer_id, t.transfer_id());
  EXPECT_EQ(r->abort->targets.size(), 2u);
  EXPECT_EQ(EffectiveFree("d1"), 1000);

  r = Abort("a");
  ASSERT_TRUE(r.ok());
  EXPECT_FALSE(r->was_running);
  EXPECT_FALSE(r->abort.has_value());
  EXPECT_TRUE(Finish("a", v1::RequestState::DONE).ok());
  EXPECT_EQ(PhaseOf("a"), v1::RequestState::ABORTED);
  EXPECT_STATUS(Abort("never-seen").status(), absl::StatusCode::kNotFound, "request_id");

  Advance(4000);
  state_->Sweep();
  EXPECT_FALSE(Abort("a")->was_running);  // still within the grace period
  Advance(1001);
  state_->Sweep();
  EXPECT_STATUS(Abort("a").status(), absl::StatusCode::kNotFound, "request_id");
  EXPECT_STATUS(Finish("a", v1::RequestState::DONE), absl::StatusCode::kNotFound, "request_id");
  EXPECT_STATUS(Report("a", "p1", v1::RequestState::PREFILLING).status(), absl::StatusCode::kNotFound, "request_id");
  EXPECT_FALSE(state_->GetRequest("a").has_value());
  const v1::ServerInfo info = state_->GetServerInfo();
  EXPECT_EQ(info.requests_total(), 1);  // forgotten, still counted
  EXPECT_EQ(info.requests_size(), 0);
  EXPECT_EQ(state_->totals().aborted, 1);
}

TEST_F(ManagerStateTest, RequestIdInFlightIsAlreadyExistsAndReusableAfterItEnds) {
  Register("p1", v1::PREFILL);
  Register("d1", v1::DECODE, 1000);
  const v1::Ticket first = Admit(Request("a", "snapkv", 0.3f));
  EXPECT_STATUS(state_->Admit(Request("a", "snapkv", 0.3f)).status(), absl::StatusCode::kAlreadyExists,
                "request_id");
  EXPECT_EQ(EffectiveFree("d1"), 1000 - kSnapkvPages);  // the refused call reserved nothing
  ASSERT_TRUE(Finish("a", v1::RequestState::DONE).ok());
  const v1::Ticket second = Admit(Request("a", "snapkv", 0.3f));
  EXPECT_NE(second.transfer_id(), first.transfer_id());
  EXPECT_NE(second.lease_id(), first.lease_id());
  v1::RenewLeaseRequest renew;
  renew.set_lease_id(first.lease_id());
  EXPECT_STATUS(state_->RenewLease(renew).status(), absl::StatusCode::kNotFound, "lease_id");
  EXPECT_EQ(state_->totals().admitted, 2);
}

TEST_F(ManagerStateTest, FinishedRequestsBeyondTheCapAreForgottenOldestFirst) {
  ManagerConfig c = DefaultConfig();
  c.max_finished_requests = 2;
  Make(c);
  Register("p1", v1::PREFILL);
  Register("d1", v1::DECODE, 10000);
  for (const char* id : {"a", "b", "c"}) {
    Admit(Request(id));
    ASSERT_TRUE(Finish(id, v1::RequestState::DONE).ok());
    Advance(1);
  }
  state_->Sweep();
  EXPECT_FALSE(state_->GetRequest("a").has_value());
  EXPECT_TRUE(state_->GetRequest("b").has_value());
  EXPECT_TRUE(state_->GetRequest("c").has_value());
}

// --- ServerInfo ----------------------------------------------------------------------------

TEST_F(ManagerStateTest, ServerInfoCounters) {
  Register("p1", v1::PREFILL);
  Register("d1", v1::DECODE, 1000);
  Register("d2", v1::DECODE, 400, 500);
  Admit(Request("a", "snapkv", 0.3f));  // d1
  Admit(Request("b", "snapkv", 0.3f));  // d1 (916 > 400)
  Admit(Request("c", "snapkv", 0.3f));  // d1 (832 > 400)
  v1::ProgressReport layout;
  layout.set_request_id("a");
  layout.set_worker_id("p1");
  layout.set_phase(v1::RequestState::TRANSFERRING);
  layout.set_kv_entries_full(4000);
  layout.set_kv_entries_kept(1200);
  layout.set_bytes_transferred(123456);
  for (int32_t k : {300, 310, 290, 300}) layout.add_kept_per_head(k);
  layout.set_next_pos(1001);
  ASSERT_TRUE(state_->ReportProgress(layout).ok());
  ASSERT_TRUE(Report("b", "d1", v1::RequestState::DECODING, 76, 5).ok());
  ASSERT_TRUE(Finish("c", v1::RequestState::DONE).ok());

  const v1::ServerInfo info = state_->GetServerInfo();
  EXPECT_EQ(info.version(), "0.test");
  ASSERT_EQ(info.roles_size(), 1);
  EXPECT_EQ(info.roles(0), "kv_manager");
  EXPECT_EQ(info.requests_in_flight(), 2);
  EXPECT_EQ(info.requests_total(), 3);
  EXPECT_EQ(info.leases_active(), 2);
  EXPECT_EQ(info.transfers_active(), 1);
  EXPECT_EQ(info.kv_pages_total(), 1500);
  EXPECT_EQ(info.kv_pages_free(), 1000 - 2 * kSnapkvPages + 400);
  ASSERT_EQ(info.requests_size(), 3);
  EXPECT_EQ(info.requests(0).request_id(), "a");
  EXPECT_EQ(info.requests(0).phase(), v1::RequestState::TRANSFERRING);
  EXPECT_EQ(info.requests(0).prompt_tokens(), 1000);
  EXPECT_EQ(info.requests(1).request_id(), "b");
  EXPECT_EQ(info.requests(1).phase(), v1::RequestState::DECODING);
  EXPECT_EQ(info.requests(1).generated_tokens(), 5);
  EXPECT_EQ(info.requests(1).pages_held(), 76);
  EXPECT_EQ(info.requests(2).request_id(), "c");
  EXPECT_EQ(info.requests(2).phase(), v1::RequestState::DONE);

  const std::optional<RequestSnapshot> a = state_->GetRequest("a");
  ASSERT_TRUE(a.has_value());
  EXPECT_EQ(a->kv_entries_full, 4000);
  EXPECT_EQ(a->kv_entries_kept, 1200);
  EXPECT_EQ(a->bytes_transferred, 123456);
  EXPECT_EQ(a->kept_per_head, (std::vector<int32_t>{300, 310, 290, 300}));
  EXPECT_EQ(a->next_pos, 1001);
  EXPECT_EQ(a->prefill_worker_id, "p1");
  EXPECT_EQ(a->decode_worker_id, "d1");
}

// --- Every bad input: a clear status naming the field, and nothing changed ----------------

TEST_F(ManagerStateTest, BadAdmitRequestsNameTheFieldAndChangeNothing) {
  Register("p1", v1::PREFILL);
  Register("d1", v1::DECODE, 1000);
  struct Case {
    const char* name;
    std::function<void(v1::AdmitRequest&)> mutate;
    const char* field;
  };
  const std::vector<Case> cases = {
      {"empty id", [](v1::AdmitRequest& r) { r.set_request_id(""); }, "request_id"},
      {"long id", [](v1::AdmitRequest& r) { r.set_request_id(std::string(257, 'x')); }, "request_id"},
      {"zero prompt", [](v1::AdmitRequest& r) { r.set_prompt_tokens(0); }, "prompt_tokens"},
      {"negative prompt", [](v1::AdmitRequest& r) { r.set_prompt_tokens(-5); }, "prompt_tokens"},
      {"zero max_tokens", [](v1::AdmitRequest& r) { r.set_max_tokens(0); }, "max_tokens"},
      {"unknown policy", [](v1::AdmitRequest& r) { r.mutable_compression()->set_policy("h2o"); },
       "compression.policy"},
      {"keep_ratio > 1", [](v1::AdmitRequest& r) { r.mutable_compression()->set_keep_ratio(1.5f); },
       "compression.keep_ratio"},
      {"keep_ratio NaN",
       [](v1::AdmitRequest& r) { r.mutable_compression()->set_keep_ratio(std::nanf("")); },
       "compression.keep_ratio"},
      {"negative budget",
       [](v1::AdmitRequest& r) {
         r.mutable_compression()->set_keep_ratio(0);
         r.mutable_compression()->set_budget_tokens(-1);
       },
       "compression.budget_tokens"},
      {"ratio and budget", [](v1::AdmitRequest& r) { r.mutable_compression()->set_budget_tokens(10); },
       "compression.keep_ratio"},
      {"negative sink", [](v1::AdmitRequest& r) { r.mutable_compression()->set_sink_tokens(-1); },
       "compression.sink_tokens"},
      {"negative recent", [](v1::AdmitRequest& r) { r.mutable_compression()->set_recent_tokens(-1); },
       "compression.recent_tokens"},
      {"empty range",
       [](v1::AdmitRequest& r) {
         v1::TokenRange* range = r.mutable_compression()->add_protected_ranges();
         range->set_begin(5);
         range->set_end(5);
       },
       "compression.protected_ranges[0]"},
      {"adaptive streaming_llm",
       [](v1::AdmitRequest& r) {
         r.mutable_compression()->set_policy("streaming_llm");
         r.mutable_compression()->set_head_budget(v1::CompressionSpec::ADAPTIVE);
       },
       "compression.head_budget"},
      {"head_budget out of enum",
       [](v1::AdmitRequest& r) {
         r.mutable_compression()->set_head_budget(static_cast<v1::CompressionSpec::HeadBudget>(7));
       },
       "compression.head_budget"},
  };
  const v1::ServerInfo before = state_->GetServerInfo();
  int64_t rejected = 0;
  for (const Case& c : cases) {
    SCOPED_TRACE(c.name);
    v1::AdmitRequest r = Request("ok", "snapkv", 0.3f);
    c.mutate(r);
    EXPECT_STATUS(state_->Admit(r).status(), absl::StatusCode::kInvalidArgument, c.field);
    ++rejected;
    const v1::ServerInfo after = state_->GetServerInfo();
    EXPECT_EQ(after.requests_in_flight(), 0);
    EXPECT_EQ(after.requests_total(), 0);
    EXPECT_EQ(after.kv_pages_free(), before.kv_pages_free());
    EXPECT_EQ(state_->totals().rejected, rejected);
  }
  // The same request, fixed, goes through.
  Admit(Request("ok", "snapkv", 0.3f));
}

TEST_F(ManagerStateTest, BadRegistrationsNameTheField) {
  struct Case {
    const char* name;
    std::function<void(v1::RegisterWorkerRequest&)> mutate;
    absl::StatusCode code;
    const char* field;
  };
  const auto invalid = absl::StatusCode::kInvalidArgument;
  const std::vector<Case> cases = {
      {"empty id", [](v1::RegisterWorkerRequest& r) { r.set_worker_id(""); }, invalid, "worker_id"},
      {"no role", [](v1::RegisterWorkerRequest& r) { r.set_role(v1::WORKER_ROLE_UNSPECIFIED); }, invalid, "role"},
      {"empty address", [](v1::RegisterWorkerRequest& r) { r.set_address(""); }, invalid, "address"},
      {"zero layers", [](v1::RegisterWorkerRequest& r) { r.set_num_layers(0); }, invalid, "num_layers"},
      {"zero kv heads", [](v1::RegisterWorkerRequest& r) { r.set_num_kv_heads(0); }, invalid, "num_kv_heads"},
      {"zero head_dim", [](v1::RegisterWorkerRequest& r) { r.set_head_dim(0); }, invalid, "head_dim"},
      {"zero page_tokens", [](v1::RegisterWorkerRequest& r) { r.set_page_tokens(0); }, invalid, "page_tokens"},
      {"negative total", [](v1::RegisterWorkerRequest& r) { r.mutable_capacity()->set_kv_pages_total(-1); },
       invalid, "capacity.kv_pages_total"},
      {"free above total", [](v1::RegisterWorkerRequest& r) { r.mutable_capacity()->set_kv_pages_free(2000); },
       invalid, "capacity.kv_pages_free"},
      {"negative active", [](v1::RegisterWorkerRequest& r) { r.mutable_capacity()->set_requests_active(-1); },
       invalid, "capacity.requests_active"},
      {"unknown transport", [](v1::RegisterWorkerRequest& r) { r.add_transports("rdma"); }, invalid,
       "transports[0]"},
      {"other model", [](v1::RegisterWorkerRequest& r) { r.set_model_name("llama"); },
       absl::StatusCode::kFailedPrecondition, "model_name"},
      {"other shape", [](v1::RegisterWorkerRequest& r) { r.set_num_layers(3); },
       absl::StatusCode::kFailedPrecondition, "num_layers"},
  };
  Register("p1", v1::PREFILL);
  for (const Case& c : cases) {
    SCOPED_TRACE(c.name);
    v1::RegisterWorkerRequest r = WorkerInfo("d1", v1::DECODE, 1000, 1000);
    c.mutate(r);
    EXPECT_STATUS(state_->RegisterWorker(r).status(), c.code, c.field);
    EXPECT_EQ(state_->Workers().size(), 1u);
  }
  // The only worker may come back with another model (a rolling model change).
  v1::RegisterWorkerRequest p = WorkerInfo("p1", v1::PREFILL, 0, 0);
  p.set_model_name("llama");
  EXPECT_TRUE(state_->RegisterWorker(p).ok());

  v1::HeartbeatRequest h;
  EXPECT_STATUS(state_->Heartbeat(h).status(), invalid, "worker_id");
  h.set_worker_id("p1");
  h.mutable_capacity()->set_kv_pages_free(-1);
  EXPECT_STATUS(state_->Heartbeat(h).status(), invalid, "capacity.kv_pages_free");
}

TEST_F(ManagerStateTest, BadReportsFinishesAbortsAndRenewalsNameTheField) {
  Register("p1", v1::PREFILL);
  Register("d1", v1::DECODE, 1000);
  Admit(Request("a", "snapkv", 0.3f));
  const auto invalid = absl::StatusCode::kInvalidArgument;
  struct Case {
    const char* name;
    std::function<void(v1::ProgressReport&)> mutate;
    absl::StatusCode code;
    const char* field;
  };
  const std::vector<Case> cases = {
      {"empty request_id", [](v1::ProgressReport& r) { r.set_request_id(""); }, invalid, "request_id"},
      {"empty worker_id", [](v1::ProgressReport& r) { r.set_worker_id(""); }, invalid, "worker_id"},
      {"no phase", [](v1::ProgressReport& r) { r.set_phase(v1::RequestState::PHASE_UNSPECIFIED); }, invalid,
       "phase"},
      {"phase out of enum", [](v1::ProgressReport& r) { r.set_phase(static_cast<Phase>(99)); }, invalid, "phase"},
      {"negative pages", [](v1::ProgressReport& r) { r.set_pages_held(-1); }, invalid, "pages_held"},
      {"negative generated", [](v1::ProgressReport& r) { r.set_generated_tokens(-1); }, invalid,
       "generated_tokens"},
      {"negative entries", [](v1::ProgressReport& r) { r.set_kv_entries_kept(-1); }, invalid, "kv_entries_kept"},
      {"negative bytes", [](v1::ProgressReport& r) { r.set_bytes_transferred(-1); }, invalid,
       "bytes_transferred"},
      {"kept_per_head size", [](v1::ProgressReport& r) { r.add_kept_per_head(1); }, invalid, "kept_per_head"},
      {"kept_per_head negative",
       [](v1::ProgressReport& r) {
         for (int32_t k : {1, -1, 1, 1}) r.add_kept_per_head(k);
       },
       invalid, "kept_per_head[1]"},
      {"foreign worker", [](v1::ProgressReport& r) { r.set_worker_id("p9"); }, invalid, "worker_id"},
      {"DONE from prefill", [](v1::ProgressReport& r) { r.set_phase(v1::RequestState::DONE); }, invalid, "phase"},
      {"unknown request", [](v1::ProgressReport& r) { r.set_request_id("zz"); }, absl::StatusCode::kNotFound,
       "request_id"},
  };
  for (const Case& c : cases) {
    SCOPED_TRACE(c.name);
    v1::ProgressReport r;
    r.set_request_id("a");
    r.set_worker_id("p1");
    r.set_phase(v1::RequestState::PREFILLING);
    c.mutate(r);
    EXPECT_STATUS(state_->ReportProgress(r).status(), c.code, c.field);
    EXPECT_EQ(PhaseOf("a"), v1::RequestState::ADMITTED);
  }
  EXPECT_STATUS(Finish("a", v1::RequestState::DECODING), invalid, "phase");
  EXPECT_STATUS(Finish("a", v1::RequestState::PHASE_UNSPECIFIED), invalid, "phase");
  EXPECT_STATUS(Finish("", v1::RequestState::DONE), invalid, "request_id");
  EXPECT_STATUS(Abort("").status(), invalid, "request_id");
  EXPECT_STATUS(state_->RenewLease(v1::RenewLeaseRequest()).status(), invalid, "lease_id");
  EXPECT_EQ(PhaseOf("a"), v1::RequestState::ADMITTED);
  EXPECT_EQ(state_->GetServerInfo().requests_in_flight(), 1);
}

TEST(ManagerConfigTest, BadConfigsNameTheField) {
  const auto expect = [](std::function<void(ManagerConfig&)> mutate, const char* field) {
    ManagerConfig c;
    mutate(c);
    absl::Status s = ManagerState::Create(c).status();
    EXPECT_EQ(s.code(), absl::StatusCode::kInvalidArgument) << s;
    EXPECT_NE(std::string(s.message()).find(field), std::string::npos) << s;
  };
  expect([](ManagerConfig& c) { c.heartbeat_interval_ms = 0; }, "heartbeat_interval_ms");
  expect([](ManagerConfig& c) { c.worker_timeout_ms = c.heartbeat_interval_ms; }, "worker_timeout_ms");
  expect([](ManagerConfig& c) { c.lease_ttl_ms = 0; }, "lease_ttl_ms");
  expect([](ManagerConfig& c) { c.finished_grace_ms = -1; }, "finished_grace_ms");
  expect([](ManagerConfig& c) { c.default_policy = "h2o"; }, "default_policy");
  expect([](ManagerConfig& c) { c.default_keep_ratio = 2.0f; }, "default_keep_ratio");
  EXPECT_TRUE(ManagerState::Create(ManagerConfig()).ok());
}

}  // namespace
}  // namespace kvgate::kv
