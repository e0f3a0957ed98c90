#include "common/metrics.h"

#include <prometheus/counter.h>
#include <prometheus/gauge.h>
#include <prometheus/histogram.h>
#include <prometheus/registry.h>
#include <prometheus/text_serializer.h>

#include <prometheus/exposer.h>

#include <CivetServer.h>
#include <arpa/inet.h>

#include <exception>
#include <string_view>

#include "absl/strings/numbers.h"
#include "absl/strings/str_cat.h"

namespace kvgate {
namespace {

// civetweb reports why mg_start failed only through its log callback (prometheus-cpp then
// throws "null context when constructing CivetServer", which says nothing). Start-up
// runs on the calling thread, so its messages are collected per thread.
thread_local std::string civetweb_startup_log;

int CollectCivetwebLog(const mg_connection* /*connection*/, const char* message) {
  if (!civetweb_startup_log.empty()) civetweb_startup_log += "; ";
  civetweb_startup_log += message;
  return 1;  // handled: civetweb prints nothing itself
}

// A scrape that sends nothing cannot hold a civetweb worker for longer than this.
constexpr std::string_view kRequestTimeoutMs = "10000";

prometheus::Histogram::BucketBoundaries SecondsBuckets() {
  return {0.001, 0.0025, 0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1, 2.5, 5, 10, 30};
}

prometheus::Histogram* MakeHistogram(prometheus::Registry& registry, const std::string& name, const std::string& help,
                                     prometheus::Histogram::BucketBoundaries buckets) {
  return &prometheus::BuildHistogram().Name(name).Help(help).Register(registry).Add({}, std::move(buckets));
}

}  // namespace

Metrics::Metrics() : registry_(std::make_shared<prometheus::Registry>()) {
  prometheus::Registry& r = *registry_;
  ttft_ = MakeHistogram(r, "kvgate_time_to_first_token_seconds", "Request received to first token sent", SecondsBuckets());
  tpot_ = MakeHistogram(r, "kvgate_time_per_output_token_seconds", "Decode time per generated token after the first",
                        {0.0005, 0.001, 0.0025, 0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1});
  queue_ = MakeHistogram(r, "kvgate_queue_seconds", "Admission to start of prefill", SecondsBuckets());
  prefill_ = MakeHistogram(r, "kvgate_prefill_seconds", "Prefill forward, eviction and compaction", SecondsBuckets());
  transfer_ = MakeHistogram(r, "kvgate_transfer_seconds", "Compressed KV from prefill to decode worker", SecondsBuckets());
  keep_fraction_ = MakeHistogram(r, "kvgate_keep_fraction", "Fraction of prompt KV entries kept after eviction",
                                 {0.05, 0.1, 0.2, 0.3, 0.4, 0.5, 0.6, 0.7, 0.8, 0.9, 0.99, 1.0});
  transfer_bytes_ = &prometheus::BuildCounter()
                         .Name("kvgate_transfer_bytes_total")
                         .Help("Bytes of compressed KV moved from prefill to decode workers")
                         .Register(r)
                         .Add({});
  transfer_bytes_full_ = &prometheus::BuildCounter()
                              .Name("kvgate_transfer_bytes_full_total")
                              .Help("Bytes the uncompressed caches would have moved")
                              .Register(r)
                              .Add({});
  requests_ = &prometheus::BuildCounter().Name("kvgate_requests_total").Help("Requests by final gRPC status").Register(r);
  pages_used_ = &prometheus::BuildGauge().Name("kvgate_kv_pages_used").Help("KV pages in use").Register(r);
  pages_free_ = &prometheus::BuildGauge().Name("kvgate_kv_pages_free").Help("KV pages free").Register(r);
}

Metrics::~Metrics() = default;

absl::Status Metrics::Serve(const std::string& host_port) {
  const size_t colon = host_port.rfind(':');
  int port = 0;
  if (colon == std::string::npos || !absl::SimpleAtoi(host_port.substr(colon + 1), &port) || port < 0 || port > 65535) {
    return absl::InvalidArgumentError(absl::StrCat("metrics: '", host_port, "' is not host:port"));
  }
  const std::string host = colon == 0 ? "0.0.0.0" : host_port.substr(0, colon);
  in_addr parsed{};
  if (inet_pton(AF_INET, host.c_str(), &parsed) != 1) {
    return absl::InvalidArgumentError(absl::StrCat("metrics: '", host, "' is not an IPv4 address"));
  }
  static const CivetCallbacks callbacks = [] {
    CivetCallbacks c{};
    c.log_message = CollectCivetwebLog;
    return c;
  }();
  civetweb_startup_log.clear();
  try {
    exposer_ = std::make_unique<prometheus::Exposer>(
        std::vector<std::string>{"listening_ports", absl::StrCat(host, ":", port), "num_threads", "2",
                                 "request_timeout_ms", std::string(kRequestTimeoutMs)},
        &callbacks);
  } catch (const std::exception& e) {
    return absl::UnavailableError(absl::StrCat("metrics: cannot listen on ", host_port, ": ",
                                               civetweb_startup_log.empty() ? e.what() : civetweb_startup_log));
  }
  exposer_->RegisterCollectable(registry_);
  const std::vector<int> ports = exposer_->GetListeningPorts();
  bound_port_ = ports.empty() ? port : ports.front();
  return absl::OkStatus();
}

std::string Metrics::Render() const {
  prometheus::TextSerializer serializer;
  return serializer.Serialize(registry_->Collect());
}

void Metrics::ObserveTimeToFirstToken(double seconds) { ttft_->Observe(seconds); }
void Metrics::ObserveTimePerOutputToken(double seconds) { tpot_->Observe(seconds); }
void Metrics::ObserveQueue(double seconds) { queue_->Observe(seconds); }
void Metrics::ObservePrefill(double seconds) { prefill_->Observe(seconds); }
void Metrics::ObserveTransfer(double seconds, int64_t bytes, int64_t bytes_full) {
  transfer_->Observe(seconds);
  transfer_bytes_->Increment(static_cast<double>(bytes));
  transfer_bytes_full_->Increment(static_cast<double>(bytes_full));
}
void Metrics::ObserveKeepFraction(double fraction) { keep_fraction_->Observe(fraction); }
void Metrics::CountRequest(const std::string& status_code) { requests_->Add({{"status", status_code}}).Increment(); }
void Metrics::SetPages(const std::string& role, int64_t used, int64_t free) {
  pages_used_->Add({{"role", role}}).Set(static_cast<double>(used));
  pages_free_->Add({{"role", role}}).Set(static_cast<double>(free));
}

}  // namespace kvgate
