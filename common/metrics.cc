#include "common/metrics.h"

#include <prometheus/counter.h>
#include <prometheus/gauge.h>
#include <prometheus/histogram.h>
#include <prometheus/registry.h>
#include <prometheus/text_serializer.h>

#include <arpa/inet.h>
#include <netinet/in.h>
#include <sys/socket.h>
#include <sys/time.h>
#include <unistd.h>

#include <exception>

#include "absl/strings/numbers.h"
#include "absl/strings/str_cat.h"

namespace kvgate {
namespace {

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

Metrics::~Metrics() {
  if (listen_fd_ >= 0) {
    stopping_.store(true);
    shutdown(listen_fd_, SHUT_RDWR);  // wakes accept()
    if (server_.joinable()) server_.join();
    close(listen_fd_);
  }
}

absl::Status Metrics::Serve(const std::string& host_port) {
  const size_t colon = host_port.rfind(':');
  int port = 0;
  if (colon == std::string::npos || !absl::SimpleAtoi(host_port.substr(colon + 1), &port) || port < 0 || port > 65535) {
    return absl::InvalidArgumentError(absl::StrCat("metrics: '", host_port, "' is not host:port"));
  }
  const std::string host = host_port.substr(0, colon);
  const int fd = socket(AF_INET, SOCK_STREAM, 0);
  if (fd < 0) return absl::UnavailableError("metrics: cannot create a socket");
  const int one = 1;
  setsockopt(fd, SOL_SOCKET, SO_REUSEADDR, &one, sizeof(one));
  sockaddr_in address{};
  address.sin_family = AF_INET;
  address.sin_port = htons(static_cast<uint16_t>(port));
  if (inet_pton(AF_INET, host.empty() ? "0.0.0.0" : host.c_str(), &address.sin_addr) != 1) {
    close(fd);
    return absl::InvalidArgumentError(absl::StrCat("metrics: '", host, "' is not an IPv4 address"));
  }
  socklen_t length = sizeof(address);
  if (bind(fd, reinterpret_cast<sockaddr*>(&address), sizeof(address)) != 0 || listen(fd, 64) != 0 ||
      getsockname(fd, reinterpret_cast<sockaddr*>(&address), &length) != 0) {
    close(fd);
    return absl::UnavailableError(absl::StrCat("metrics: cannot listen on ", host_port));
  }
  bound_port_ = ntohs(address.sin_port);
  listen_fd_ = fd;
  // A minimal HTTP/1.1 responder: every request gets the text exposition (Prometheus
  // scrapes GET /metrics); one connection at a time is plenty for scrapes.
  server_ = std::thread([this] {
    while (true) {
      const int client = accept(listen_fd_, nullptr, nullptr);
      if (client < 0) {
        if (stopping_.load()) return;
        continue;
      }
      // A client that connects and sends nothing holds the responder for at most this long.
      const timeval timeout{2, 0};
      setsockopt(client, SOL_SOCKET, SO_RCVTIMEO, &timeout, sizeof(timeout));
      setsockopt(client, SOL_SOCKET, SO_SNDTIMEO, &timeout, sizeof(timeout));
      char request[4096];
      (void)recv(client, request, sizeof(request), 0);
      const std::string body = Render();
      const std::string response = absl::StrCat("HTTP/1.1 200 OK\r\nContent-Type: text/plain; version=0.0.4\r\n",
                                                "Content-Length: ", body.size(), "\r\nConnection: close\r\n\r\n", body);
      size_t sent = 0;
      while (sent < response.size()) {
        const ssize_t n = send(client, response.data() + sent, response.size() - sent, MSG_NOSIGNAL);
        if (n <= 0) break;
        sent += static_cast<size_t>(n);
      }
      close(client);
    }
  });
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
