// File: QueuedStreamWriter, a server-streaming reactor (gRPC callback API) fed from
// other threads: messages are queued and written one at a time, and the stream finishes
// with the given status once everything queued is written. Used by the decode worker's
// Decode and the router's Generate, whose tokens come from engine threads.
#pragma once

#include <deque>
#include <functional>
#include <mutex>

#include <grpcpp/grpcpp.h>

namespace kvgate {

template <typename Response>
class QueuedStreamWriter : public grpc::ServerWriteReactor<Response> {
 public:
  // on_broken runs once (outside the lock) when the client cancels or a write fails:
  // the producer must stop and call Complete.
  explicit QueuedStreamWriter(std::function<void()> on_broken = nullptr) : on_broken_(std::move(on_broken)) {}

  void set_on_broken(std::function<void()> on_broken) {
    std::lock_guard<std::mutex> lock(mu_);
    on_broken_ = std::move(on_broken);
  }

  // Queues a message (dropped once the stream is broken or completed).
  void Write(Response message) {
    std::lock_guard<std::mutex> lock(mu_);
    if (broken_ || completed_) return;
    queue_.push_back(std::move(message));
    PumpLocked();
  }

  // Finishes the stream with `status` after the queued messages (only those, if OK).
  // The last call the producer makes; later calls are ignored.
  void Complete(grpc::Status status) {
    std::lock_guard<std::mutex> lock(mu_);
    if (completed_) return;
    completed_ = true;
    status_ = std::move(status);
    if (!status_.ok()) queue_.clear();  // an error ends the stream without more data
    PumpLocked();
  }

  void OnWriteDone(bool ok) override {
    std::function<void()> notify;
    {
      std::lock_guard<std::mutex> lock(mu_);
      writing_ = false;
      if (!ok && !broken_) {
        broken_ = true;
        queue_.clear();
        notify = on_broken_;
      }
      PumpLocked();
    }
    if (notify) notify();
  }

  void OnCancel() override {
    std::function<void()> notify;
    {
      std::lock_guard<std::mutex> lock(mu_);
      if (!broken_) {
        broken_ = true;
        queue_.clear();
        notify = on_broken_;
      }
    }
    if (notify) notify();
  }

  void OnDone() override {
    // Finish may have been called by a thread that still holds the lock.
    { std::lock_guard<std::mutex> lock(mu_); }
    delete this;
  }

 private:
  void PumpLocked() {
    if (writing_ || finished_) return;
    if (!queue_.empty()) {
      current_ = std::move(queue_.front());
      queue_.pop_front();
      writing_ = true;
      this->StartWrite(&current_);
      return;
    }
    if (completed_) {
      finished_ = true;
      this->Finish(status_);
    }
  }

  std::mutex mu_;
  std::function<void()> on_broken_;
  std::deque<Response> queue_;
  Response current_;
  grpc::Status status_;
  bool writing_ = false, completed_ = false, finished_ = false, broken_ = false;
};

}  // namespace kvgate
