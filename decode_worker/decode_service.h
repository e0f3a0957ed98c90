// File: the kvgate.v1.DecodeWorker service over a DecodeEngine (the gRPC edge of the
// decode worker). The KvTransfer service that feeds the engine's inbox comes from
// kv/transport/tcp_transport.h.
#pragma once

#include <functional>

#include "common/metrics.h"
#include "decode_worker/decode_engine.h"
#include "kvgate/v1/worker.grpc.pb.h"

namespace kvgate::decode {

using ProgressReporter = std::function<void(const v1::ProgressReport&)>;

class DecodeService final : public v1::DecodeWorker::CallbackService {
 public:
  DecodeService(DecodeEngine* engine, std::string worker_id, ProgressReporter report, Metrics* metrics)
      : engine_(engine), worker_id_(std::move(worker_id)), report_(std::move(report)), metrics_(metrics) {}

  // Calls must carry this internal token (common/auth.h); empty: no check (an in-process
  // server, or mutual TLS in front).
  void set_internal_token(std::string token) { internal_token_ = std::move(token); }

  grpc::ServerWriteReactor<v1::DecodeResponse>* Decode(grpc::CallbackServerContext* context,
                                                        const v1::DecodeRequest* request) override;
  grpc::ServerUnaryReactor* AbortRequest(grpc::CallbackServerContext* context, const v1::WorkerAbortRequest* request,
                                         v1::WorkerAbortResponse* response) override;

 private:
  DecodeEngine* engine_;
  std::string worker_id_;
  ProgressReporter report_;
  Metrics* metrics_;
  std::string internal_token_;
};

}  // namespace kvgate::decode
