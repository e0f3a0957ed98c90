// File: the KV transport interface (architecture.md section 5): how a KvHandoff gets from
// a prefill worker to a decode worker. A transfer is keyed by its globally unique
// transfer id. The decode side owns a KvInbox; transports deliver into it:
//   inproc  same process: the sender finds the inbox by address and copies the handoff
//           in (one copy of host rows; none of backend rows, which are shared)
//   tcp     a chunked, checksummed client stream to the decode worker's KvTransfer
//           service (tcp_transport.h), which delivers into its inbox
//   cuda_ipc  tcp's stream for everything but K and V, which stay in the sender's GPU
//           memory: the header names them (Backend::ExportIpc) and the receiver copies
//           them into its own (tcp_transport.h MakeCudaIpcSender)
//   nccl    GPU to GPU across hosts, behind the same KvSender: its data path is
//           ops::NcclChannel (cuda/nccl/), proven one rank to itself
//           (nccl_self_transfer_test); the pairing through the KV manager is not built
#pragma once

#include <condition_variable>
#include <cstdint>
#include <deque>
#include <functional>
#include <map>
#include <memory>
#include <mutex>
#include <set>
#include <string>

#include "absl/status/status.h"
#include "absl/status/statusor.h"
#include "absl/time/time.h"
#include "kv/kv_handoff.h"

namespace kvgate::kv {

// Transfers that have arrived at a decode worker, waiting for their Decode call.
// Thread-safe. Memory is bounded: handoffs held at once may total at most
// max_pending_bytes (KvHandoff::HeldBytes: payload and backend rows). Unclaimed transfers expire: a delivered handoff that
// no Await took within unclaimed_ttl of its delivery, and a reservation whose stream made
// no progress (Touch) for unclaimed_ttl, are dropped and their id refused from then on
// (as if cancelled). Expiry is checked on every Deliver, Reserve, Touch and pending*().
class KvInbox {
 public:
  static constexpr absl::Duration kDefaultUnclaimedTtl = absl::Seconds(60);
  explicit KvInbox(int64_t max_pending_bytes, absl::Duration unclaimed_ttl = kDefaultUnclaimedTtl,
                   std::function<absl::Time()> clock = &absl::Now)
      : max_pending_bytes_(max_pending_bytes), unclaimed_ttl_(unclaimed_ttl), clock_(std::move(clock)) {}

  void set_unclaimed_ttl(absl::Duration ttl) {
    std::lock_guard<std::mutex> lock(mu_);
    unclaimed_ttl_ = ttl;
  }
  // The backend (ops::Backend::Name()) of the pool that imports what arrives here:
  // in-process senders may then hand over rows in that backend's memory
  // (KvHandoff::backend_rows) instead of host rows. Empty (the default): host rows only.
  void set_rows_backend(std::string backend) {
    std::lock_guard<std::mutex> lock(mu_);
    rows_backend_ = std::move(backend);
  }
  std::string rows_backend() const {
    std::lock_guard<std::mutex> lock(mu_);
    return rows_backend_;
  }

  // Takes a complete, validated handoff. ALREADY_EXISTS for a transfer id delivered
  // before (held, or already taken by Await: ids are remembered for the most recent
  // kRememberedIds, so a retried send cannot park data no one will take); CANCELLED for a
  // transfer id that was cancelled (its data is dropped); RESOURCE_EXHAUSTED when it
  // would exceed max_pending_bytes; INVALID_ARGUMENT for an empty transfer id. On error
  // the handoff is dropped and any reservation of the id stays (the caller unreserves).
  absl::Status Deliver(KvHandoff handoff);
  // Reserves room for a transfer of `bytes` before its data streams in (tcp), so that a
  // receiver never buffers more than the cap; Deliver of that id then uses the
  // reservation. RESOURCE_EXHAUSTED when there is no room; CANCELLED as above;
  // ALREADY_EXISTS when the id is already reserved, held or taken (a duplicate stream).
  absl::Status Reserve(const std::string& transfer_id, int64_t bytes);
  // Gives back a reservation whose data never completed; a no-op when none is held.
  void Unreserve(const std::string& transfer_id);
  // The reservation's stream made progress: its expiry starts again. CANCELLED when the
  // reservation is gone (cancelled, or expired unclaimed): the stream should end.
  absl::Status Touch(const std::string& transfer_id);
  // Waits for the transfer and removes it from the inbox. DEADLINE_EXCEEDED at
  // `deadline`; CANCELLED when Cancel was called for it (before or while waiting).
  absl::StatusOr<KvHandoff> Await(const std::string& transfer_id, absl::Time deadline);
  // Drops the transfer's data or reservation, wakes its waiter and refuses a later
  // delivery. Returns true when something was held or waited for.
  bool Cancel(const std::string& transfer_id);

  int32_t pending() const;         // handoffs delivered and not yet awaited
  int64_t pending_bytes() const;   // their held bytes plus reservations
  int32_t waiting() const;         // Await calls in progress
  int64_t expired() const;         // transfers and reservations dropped unclaimed so far

 private:
  // Drops what expired; mu_ held.
  void ExpireLocked() const;

  const int64_t max_pending_bytes_;
  absl::Duration unclaimed_ttl_;
  const std::function<absl::Time()> clock_;
  mutable std::mutex mu_;
  std::condition_variable changed_;
  // Mutable: the const views expire entries too.
  mutable std::map<std::string, KvHandoff> delivered_;
  mutable std::map<std::string, int64_t> reserved_;
  // When each delivered handoff arrived / each reservation last made progress.
  mutable std::map<std::string, absl::Time> since_;
  mutable int64_t expired_ = 0;
  // Transfer ids that must not be taken again, remembered for the most recent
  // kRememberedIds each: the oldest are forgotten.
  struct RecentIds {
    std::set<std::string> ids;
    std::deque<std::string> order;
    bool contains(const std::string& id) const { return ids.count(id) > 0; }
    void Add(const std::string& id);
  };
  static constexpr size_t kRememberedIds = 4096;
  mutable RecentIds cancelled_;  // Cancel was called, or the transfer expired
  RecentIds taken_;      // delivered and awaited: a later delivery is a duplicate
  std::map<std::string, int> waiters_;
  mutable int64_t bytes_ = 0;
  std::string rows_backend_;
};

class KvSender {
 public:
  virtual ~KvSender() = default;
  // Sends `handoff` to the decode worker at `address` and returns once the receiver
  // holds it (the bytes moved). UNAVAILABLE when the receiver is unreachable or gone,
  // DEADLINE_EXCEEDED at `deadline`, the receiver's status otherwise (RESOURCE_EXHAUSTED,
  // CANCELLED, DATA_LOSS).
  virtual absl::StatusOr<int64_t> Send(const std::string& address, const KvHandoff& handoff,
                                       absl::Time deadline) = 0;
  // The backend (ops::Backend::Name()) in whose memory the receiver at `address` takes
  // K and V rows (ExportSequence with RowsIn::kBackend: no host copy on either side);
  // empty when it takes host rows only, as every receiver in another process does.
  virtual std::string BackendRowsFor(const std::string& address) const { return ""; }
};

// The in-process transport: decode workers register their inbox under their address
// (process-wide registry); Send copies the handoff into it. UNAVAILABLE for an address
// with no registered inbox.
void RegisterInprocInbox(const std::string& address, KvInbox* inbox);
void UnregisterInprocInbox(const std::string& address);
std::unique_ptr<KvSender> MakeInprocSender();

}  // namespace kvgate::kv
