#include "kv/transport/kv_transport.h"

#include <algorithm>
#include <chrono>
#include <utility>

#include "absl/strings/str_cat.h"
#include "common/status_macros.h"

namespace kvgate::kv {

void KvInbox::RecentIds::Add(const std::string& id) {
  if (!ids.insert(id).second) return;
  order.push_back(id);
  if (order.size() > kRememberedIds) {
    ids.erase(order.front());
    order.pop_front();
  }
}

void KvInbox::ExpireLocked() const {
  if (unclaimed_ttl_ == absl::InfiniteDuration() || since_.empty()) return;
  const absl::Time now = clock_();
  for (auto it = since_.begin(); it != since_.end();) {
    const std::string& id = it->first;
    if (now - it->second < unclaimed_ttl_ || waiters_.count(id) > 0) {
      ++it;
      continue;
    }
    if (auto d = delivered_.find(id); d != delivered_.end()) {
      bytes_ -= d->second.HeldBytes();
      delivered_.erase(d);
    }
    if (auto r = reserved_.find(id); r != reserved_.end()) {
      bytes_ -= r->second;
      reserved_.erase(r);
    }
    cancelled_.Add(id);
    ++expired_;
    it = since_.erase(it);
  }
}

absl::Status KvInbox::Deliver(KvHandoff handoff) {
  const std::string id = handoff.transfer_id;
  if (id.empty()) return absl::InvalidArgumentError("kv transfer without a transfer id");
  const int64_t bytes = handoff.HeldBytes();
  std::lock_guard<std::mutex> lock(mu_);
  ExpireLocked();
  if (cancelled_.contains(id)) return absl::CancelledError(absl::StrCat("kv transfer ", id, " was cancelled"));
  if (delivered_.count(id) > 0 || taken_.contains(id)) {
    return absl::AlreadyExistsError(absl::StrCat("kv transfer ", id, " was delivered before"));
  }
  auto reservation = reserved_.find(id);
  const int64_t held = reservation != reserved_.end() ? reservation->second : 0;
  if (bytes_ - held + bytes > max_pending_bytes_) {
    return absl::ResourceExhaustedError(absl::StrCat("kv inbox full: transfer ", id, " of ", bytes, " bytes, ",
                                                     bytes_, " of ", max_pending_bytes_, " bytes held"));
  }
  bytes_ += bytes - held;
  if (reservation != reserved_.end()) reserved_.erase(reservation);
  delivered_.emplace(id, std::move(handoff));
  since_[id] = clock_();
  changed_.notify_all();
  return absl::OkStatus();
}

absl::Status KvInbox::Reserve(const std::string& transfer_id, int64_t bytes) {
  if (transfer_id.empty()) return absl::InvalidArgumentError("kv transfer without a transfer id");
  if (bytes < 0) return absl::InvalidArgumentError(absl::StrCat("reservation of ", bytes, " bytes"));
  std::lock_guard<std::mutex> lock(mu_);
  ExpireLocked();
  if (cancelled_.contains(transfer_id)) {
    return absl::CancelledError(absl::StrCat("kv transfer ", transfer_id, " was cancelled"));
  }
  if (delivered_.count(transfer_id) > 0 || taken_.contains(transfer_id) || reserved_.count(transfer_id) > 0) {
    return absl::AlreadyExistsError(absl::StrCat("kv transfer ", transfer_id, " is already held or under way"));
  }
  if (bytes_ + bytes > max_pending_bytes_) {
    return absl::ResourceExhaustedError(absl::StrCat("kv inbox full: transfer ", transfer_id, " of ", bytes,
                                                     " bytes, ", bytes_, " of ", max_pending_bytes_,
                                                     " bytes held"));
  }
  reserved_.emplace(transfer_id, bytes);
  since_[transfer_id] = clock_();
  bytes_ += bytes;
  return absl::OkStatus();
}

absl::Status KvInbox::Touch(const std::string& transfer_id) {
  std::lock_guard<std::mutex> lock(mu_);
  ExpireLocked();
  if (reserved_.count(transfer_id) == 0) {
    return absl::CancelledError(absl::StrCat("kv transfer ", transfer_id, " was cancelled or expired unclaimed"));
  }
  since_[transfer_id] = clock_();
  return absl::OkStatus();
}

int64_t KvInbox::expired() const {
  std::lock_guard<std::mutex> lock(mu_);
  ExpireLocked();
  return expired_;
}

void KvInbox::Unreserve(const std::string& transfer_id) {
  std::lock_guard<std::mutex> lock(mu_);
  auto it = reserved_.find(transfer_id);
  if (it == reserved_.end()) return;
  bytes_ -= it->second;
  reserved_.erase(it);
  since_.erase(transfer_id);
}

absl::StatusOr<KvHandoff> KvInbox::Await(const std::string& transfer_id, absl::Time deadline) {
  std::unique_lock<std::mutex> lock(mu_);
  ++waiters_[transfer_id];
  struct Leave {  // runs under the lock, before it is released
    std::map<std::string, int>& waiters;
    const std::string& id;
    ~Leave() {
      if (--waiters[id] == 0) waiters.erase(id);
    }
  } leave{waiters_, transfer_id};
  while (true) {
    if (cancelled_.contains(transfer_id)) {
      return absl::CancelledError(absl::StrCat("kv transfer ", transfer_id, " was cancelled"));
    }
    auto it = delivered_.find(transfer_id);
    if (it != delivered_.end()) {
      KvHandoff handoff = std::move(it->second);
      delivered_.erase(it);
      since_.erase(transfer_id);
      bytes_ -= handoff.HeldBytes();
      taken_.Add(transfer_id);
      return handoff;
    }
    const absl::Duration left = deadline - absl::Now();
    if (left <= absl::ZeroDuration()) {
      return absl::DeadlineExceededError(absl::StrCat("kv transfer ", transfer_id, " did not arrive in time"));
    }
    // Bounded waits: an infinite deadline must not overflow the clock arithmetic.
    changed_.wait_for(lock, absl::ToChronoNanoseconds(std::min(left, absl::Hours(1))));
  }
}

bool KvInbox::Cancel(const std::string& transfer_id) {
  std::lock_guard<std::mutex> lock(mu_);
  bool held = false;
  if (auto it = delivered_.find(transfer_id); it != delivered_.end()) {
    bytes_ -= it->second.HeldBytes();
    delivered_.erase(it);
    held = true;
  }
  if (auto it = reserved_.find(transfer_id); it != reserved_.end()) {
    bytes_ -= it->second;
    reserved_.erase(it);
    held = true;
  }
  if (waiters_.count(transfer_id) > 0) held = true;
  since_.erase(transfer_id);
  cancelled_.Add(transfer_id);
  changed_.notify_all();
  return held;
}

int32_t KvInbox::pending() const {
  std::lock_guard<std::mutex> lock(mu_);
  ExpireLocked();
  return static_cast<int32_t>(delivered_.size());
}

int64_t KvInbox::pending_bytes() const {
  std::lock_guard<std::mutex> lock(mu_);
  ExpireLocked();
  return bytes_;
}

int32_t KvInbox::waiting() const {
  std::lock_guard<std::mutex> lock(mu_);
  int32_t total = 0;
  for (const auto& [id, count] : waiters_) total += count;
  return total;
}

namespace {

struct InprocRegistry {
  std::mutex mu;
  std::map<std::string, KvInbox*> inboxes;
};

InprocRegistry& Registry() {
  static InprocRegistry* registry = new InprocRegistry();  // never destroyed: senders may outlive main
  return *registry;
}

class InprocSender final : public KvSender {
 public:
  absl::StatusOr<int64_t> Send(const std::string& address, const KvHandoff& handoff, absl::Time deadline) override {
    if (absl::Now() >= deadline) {
      return absl::DeadlineExceededError(absl::StrCat("kv transfer ", handoff.transfer_id, " to ", address,
                                                      ": deadline passed"));
    }
    KVGATE_RETURN_IF_ERROR(handoff.Validate());
    KvHandoff copy = handoff;  // the one copy, made outside the registry lock
    const int64_t bytes = copy.HeldBytes();
    InprocRegistry& registry = Registry();
    // Held while delivering, so UnregisterInprocInbox waits for a delivery in flight.
    std::lock_guard<std::mutex> lock(registry.mu);
    auto it = registry.inboxes.find(address);
    if (it == registry.inboxes.end()) {
      return absl::UnavailableError(absl::StrCat("no in-process decode worker at ", address));
    }
    if (copy.backend_rows != nullptr && copy.backend_rows->backend != it->second->rows_backend()) {
      return absl::FailedPreconditionError(absl::StrCat("kv transfer ", handoff.transfer_id, " holds rows in ",
                                                        copy.backend_rows->backend, " memory; the worker at ",
                                                        address, " takes ",
                                                        it->second->rows_backend().empty()
                                                            ? std::string("host rows only")
                                                            : it->second->rows_backend() + " rows"));
    }
    KVGATE_RETURN_IF_ERROR(it->second->Deliver(std::move(copy)));
    return bytes;
  }

  std::string BackendRowsFor(const std::string& address) const override {
    InprocRegistry& registry = Registry();
    std::lock_guard<std::mutex> lock(registry.mu);
    auto it = registry.inboxes.find(address);
    return it == registry.inboxes.end() ? std::string() : it->second->rows_backend();
  }
};

}  // namespace

void RegisterInprocInbox(const std::string& address, KvInbox* inbox) {
  InprocRegistry& registry = Registry();
  std::lock_guard<std::mutex> lock(registry.mu);
  registry.inboxes[address] = inbox;
}

void UnregisterInprocInbox(const std::string& address) {
  InprocRegistry& registry = Registry();
  std::lock_guard<std::mutex> lock(registry.mu);
  registry.inboxes.erase(address);
}

std::unique_ptr<KvSender> MakeInprocSender() { return std::make_unique<InprocSender>(); }

}  // namespace kvgate::kv
