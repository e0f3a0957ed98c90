// File: the workers' progress reports to the KV manager, sent from a thread of their own.
#pragma once

#include <condition_variable>
#include <deque>
#include <memory>
#include <mutex>
#include <thread>
#include <utility>

#include "kv_manager/manager_client.h"

namespace kvgate::serving {

// Sends the workers' progress reports to the KV manager from a thread of its own, in the
// order they were made. The reporters are gRPC handlers and the decode loop: a blocking
// ReportProgress there would hold a callback thread (or every decoding sequence) for a
// round trip, and in `serve` the manager answers on the same server's callback threads,
// so a burst of Prefill calls could starve the manager (and the router's health probe).
class ProgressSender {
 public:
  ProgressSender() : thread_([this] { Loop(); }) {}
  ~ProgressSender() { Stop(); }

  // Queues `report` for the manager through `*registration` (dropped while it is null).
  void Send(std::unique_ptr<kv::WorkerRegistration>* registration, v1::ProgressReport report) {
    {
      std::lock_guard<std::mutex> lock(mu_);
      if (stopping_) return;
      queue_.emplace_back(registration, std::move(report));
    }
    changed_.notify_one();
  }
  // Sends what is queued, then stops; later reports are dropped. Idempotent.
  void Stop() {
    {
      std::lock_guard<std::mutex> lock(mu_);
      stopping_ = true;
    }
    changed_.notify_one();
    if (thread_.joinable()) thread_.join();
  }

 private:
  void Loop() {
    std::unique_lock<std::mutex> lock(mu_);
    while (true) {
      changed_.wait(lock, [this] { return stopping_ || !queue_.empty(); });
      if (queue_.empty()) return;  // stopping
      auto [registration, report] = std::move(queue_.front());
      queue_.pop_front();
      lock.unlock();
      if (*registration) (void)(*registration)->ReportProgress(report);
      lock.lock();
    }
  }

  std::mutex mu_;
  std::condition_variable changed_;
  std::deque<std::pair<std::unique_ptr<kv::WorkerRegistration>*, v1::ProgressReport>> queue_;
  bool stopping_ = false;
  std::thread thread_;  // last: starts after the members it uses
};

}  // namespace kvgate::serving
