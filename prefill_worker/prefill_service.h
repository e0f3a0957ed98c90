// File: the kvgate.v1.PrefillWorker service over a PrefillEngine (the gRPC edge of the
// prefill worker).
#pragma once

#include <functional>
#include <memory>

#include "common/metrics.h"
#include "kvgate/v1/worker.grpc.pb.h"
#include "prefill_worker/prefill_engine.h"

namespace kvgate::prefill {

// Sends a progress report to the KV manager (best effort; never blocks the caller long).
using ProgressReporter = std::function<void(const v1::ProgressReport&)>;

class PrefillService final : public v1::PrefillWorker::CallbackService {
 public:
  PrefillService(PrefillEngine* engine, std::string worker_id, ProgressReporter report, Metrics* metrics)
      : engine_(engine), worker_id_(std::move(worker_id)), report_(std::move(report)), metrics_(metrics) {}

  // Calls must carry this internal token (common/auth.h); empty: no check (an in-process
  // server, or mutual TLS in front).
  void set_internal_token(std::string token) { internal_token_ = std::move(token); }

  grpc::ServerUnaryReactor* Prefill(grpc::CallbackServerContext* context, const v1::PrefillRequest* request,
                                    v1::PrefillResponse* response) override;
  grpc::ServerUnaryReactor* AbortRequest(grpc::CallbackServerContext* context, const v1::WorkerAbortRequest* request,
                                         v1::WorkerAbortResponse* response) override;

 private:
  PrefillEngine* engine_;
  std::string worker_id_;
  ProgressReporter report_;
  Metrics* metrics_;
  std::string internal_token_;
};

}  // namespace kvgate::prefill
