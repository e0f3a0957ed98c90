// File: the Prometheus metrics of a kvgate process (one registry per process, shared by
// every role it runs), served over HTTP at /metrics. Times in seconds, sizes in bytes
// (Prometheus base units). The /metrics endpoint is a small HTTP responder of our own,
// not prometheus-cpp's civetweb Exposer: Debian's civetweb gives its threads a fixed
// 100 KiB stack (USE_STACK_SIZE 0x19000), and a CUDA-enabled kvgate carries about 170 KiB
// of static TLS (cuBLASLt 92 KiB, OpenBLAS 60 KiB, cuBLAS 12 KiB, cudart 4 KiB), which
// glibc must fit into every thread's stack. pthread_create then refuses, civetweb logs
// "Cannot create threads: error 0", and prometheus-cpp throws "null context when
// constructing CivetServer" (bench/results/sanitizers.md).
#pragma once

#include <cstdint>
#include <atomic>
#include <memory>
#include <string>
#include <thread>

#include "absl/status/statusor.h"

namespace prometheus {
class Registry;
class Histogram;
class Counter;
class Gauge;
template <typename T>
class Family;
}  // namespace prometheus

namespace kvgate {

class Metrics {
 public:
  Metrics();
  ~Metrics();

  // Serves /metrics on host:port (port 0 picks one; bound_port() says which).
  // UNAVAILABLE when it cannot bind.
  absl::Status Serve(const std::string& host_port);
  int bound_port() const { return bound_port_; }
  // Text exposition of every metric (what /metrics returns).
  std::string Render() const;

  void ObserveTimeToFirstToken(double seconds);
  void ObserveTimePerOutputToken(double seconds);
  void ObserveQueue(double seconds);
  void ObservePrefill(double seconds);
  void ObserveTransfer(double seconds, int64_t bytes, int64_t bytes_full);
  void ObserveKeepFraction(double fraction);
  // Requests by final gRPC status code name (OK, CANCELLED, ...), at the router.
  void CountRequest(const std::string& status_code);
  void SetPages(const std::string& role, int64_t used, int64_t free);

 private:
  std::shared_ptr<prometheus::Registry> registry_;
  int listen_fd_ = -1;
  std::atomic<bool> stopping_{false};
  std::thread server_;
  int bound_port_ = 0;
  prometheus::Histogram *ttft_, *tpot_, *queue_, *prefill_, *transfer_, *keep_fraction_;
  prometheus::Counter *transfer_bytes_, *transfer_bytes_full_;
  prometheus::Family<prometheus::Counter>* requests_;
  prometheus::Family<prometheus::Gauge>* pages_used_;
  prometheus::Family<prometheus::Gauge>* pages_free_;
};

}  // namespace kvgate
