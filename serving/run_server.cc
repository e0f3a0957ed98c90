#include "serving/run_server.h"

// The roles of `kvgate serve` (every role in one process: the embedded default) and of
// the single-role commands `kvgate router`, `kvgate kv-manager`, `kvgate prefill`,
// `kvgate decode`. They differ in which roles run here and how the roles reach each other (in-process channel
// and inproc KV transport, or host:port and the tcp transport).
//
// Only the router's kvgate.v1.Inference faces clients. `serve` puts the internal services
// (KvManager, PrefillWorker, DecodeWorker, KvTransfer) on a second gRPC server: one with
// no listener at all (reached through its in-process channel) for --transport inproc, or
// one on a random loopback port guarded by a random internal token for --transport tcp.
// The split roles kv-manager, prefill and decode serve only internal services on their
// --port, and every call between components carries the internal token
// (--internal-token-file or $KVGATE_INTERNAL_TOKEN) unless mutual TLS (--tls-ca) guards
// them; without either they refuse to start (--insecure-internal overrides, for a
// trusted network only).
#include <atomic>
#include <csignal>
#include <cstdlib>
#ifdef __GLIBC__
#include <malloc.h>
#endif
#include <iostream>
#include <optional>
#include <thread>
#include <vector>

#include "absl/strings/str_cat.h"
#include "common/grpc_edge.h"
#include "common/metrics.h"
#include "common/status_macros.h"
#include "decode_worker/decode_engine.h"
#include "decode_worker/decode_service.h"
#include "kv/transport/tcp_transport.h"
#include "kv_manager/kv_manager_service.h"
#include "kv_manager/manager_client.h"
#include "prefill_worker/prefill_engine.h"
#include "prefill_worker/prefill_service.h"
#include "router/router_service.h"
#include "serving/progress_sender.h"

namespace kvgate::serving {
namespace {

// The prefill side's sender: the in-process inbox for "inproc", tcp (or cuda_ipc, when
// `device_backend` is set) for host:port.
class AddressedSender final : public kv::KvSender {
 public:
  AddressedSender(ChannelFactory channels, ops::Backend* device_backend)
      : inproc_(kv::MakeInprocSender()),
        tcp_(device_backend != nullptr ? kv::MakeCudaIpcSender(std::move(channels), device_backend)
                                       : kv::MakeTcpSender(std::move(channels))) {}
  absl::StatusOr<int64_t> Send(const std::string& address, const kv::KvHandoff& handoff, absl::Time deadline) override {
    return (address == kInprocAddress ? inproc_ : tcp_)->Send(address, handoff, deadline);
  }
  std::string BackendRowsFor(const std::string& address) const override {
    return (address == kInprocAddress ? inproc_ : tcp_)->BackendRowsFor(address);
  }

 private:
  std::unique_ptr<kv::KvSender> inproc_, tcp_;
};

sigset_t StopSignals() {
  sigset_t set;
  sigemptyset(&set);
  sigaddset(&set, SIGINT);
  sigaddset(&set, SIGTERM);
  return set;
}

// Per-request buffers of a few MiB (the prompt's KV cache, scores, gate activations) come
// and go with every prompt. glibc would mmap each one and unmap it on free, so every
// request would pay its page faults again (about 90 ms of kvgate-tiny's 1,950-token time
// to first token on the CPU). Served from the heap, and with the heap never trimmed, they
// reuse pages that the start-up warm-up and earlier requests already touched.
void KeepFreedBuffersForReuse() {
#ifdef __GLIBC__
  mallopt(M_MMAP_THRESHOLD, 32 << 20);  // glibc's largest
  mallopt(M_TRIM_THRESHOLD, 1 << 30);
#endif
}

}  // namespace

absl::Status RunServer(const ServerConfig& c) {
  KeepFreedBuffersForReuse();
  // Threads started from here on inherit the blocked signals; main waits for them.
  sigset_t stop = StopSignals();
  pthread_sigmask(SIG_BLOCK, &stop, nullptr);
  Metrics metrics;
  if (c.metrics_port) KVGATE_RETURN_IF_ERROR(metrics.Serve(absl::StrCat(c.metrics_host, ":", *c.metrics_port)));
  KVGATE_ASSIGN_OR_RETURN(std::shared_ptr<grpc::ChannelCredentials> credentials, MakeChannelCredentials(c.tls));
  const bool local_manager = c.roles.count(Role::kManager) > 0;
  const bool inproc = c.transport == "inproc";
  const bool cuda_ipc = c.transport == "cuda_ipc";
  const bool serve = c.roles.size() == 4;
  // `serve` over tcp: its internal listener (loopback) takes a token of its own unless
  // one was configured; in-process needs none (there is no listener).
  const std::string internal_token =
      !c.internal_token.empty() ? c.internal_token : (serve && !inproc ? RandomToken() : std::string());
  ChannelPool channels(credentials, internal_token);
  const std::string manager_address = local_manager ? (inproc ? kInprocAddress : "") : c.manager_address;

  // Internal services never share the clients' server (see the file comment).
  std::vector<grpc::Service*> services;           // the internal services
  std::vector<grpc::Service*> public_services;    // kvgate.v1.Inference
  std::unique_ptr<kv::KvManagerService> manager_service;
  if (local_manager) {
    KVGATE_ASSIGN_OR_RETURN(std::unique_ptr<kv::ManagerState> state, kv::ManagerState::Create(c.manager));
    kv::KvManagerServiceOptions manager_options;
    manager_options.internal_token = internal_token;
    manager_service = std::make_unique<kv::KvManagerService>(std::move(state), channels.AsFactory(), manager_options);
    services.push_back(manager_service.get());
  }
  // Progress reports go to the manager through the registration's client (set below),
  // from `progress`'s thread. Declared before the engines: those outlive neither.
  std::unique_ptr<kv::WorkerRegistration> prefill_registration, decode_registration;
  ProgressSender progress;
  std::unique_ptr<kv::WorkerRuntime> prefill_runtime, decode_runtime;
  std::unique_ptr<AddressedSender> sender;
  std::unique_ptr<prefill::PrefillEngine> prefill_engine;
  std::unique_ptr<prefill::PrefillService> prefill_service;
  std::unique_ptr<decode::DecodeEngine> decode_engine;
  std::unique_ptr<decode::DecodeService> decode_service;
  std::unique_ptr<ops::Backend> transfer_backend;  // cuda_ipc: the transfer service's copies
  std::unique_ptr<grpc::Service> transfer_service;
  auto reporter = [&progress](std::unique_ptr<kv::WorkerRegistration>* registration) {
    return [&progress, registration](const v1::ProgressReport& report) { progress.Send(registration, report); };
  };
  const std::string id_prefix = c.worker_id.empty() ? absl::StrCat(c.command, "-", getpid()) : c.worker_id;
  if (c.roles.count(Role::kPrefill)) {
    kv::WorkerRuntimeOptions options = c.runtime;
    options.kv_pool_sequences = 1;  // one prompt at a time; its pages leave with the transfer
    options.kv_pool_pages = 0;
    options.kv_pool_sequence_tokens = c.max_prompt_tokens;
    KVGATE_ASSIGN_OR_RETURN(prefill_runtime, kv::WorkerRuntime::Load(options));
    sender = std::make_unique<AddressedSender>(channels.AsFactory(),
                                               cuda_ipc ? &prefill_runtime->backend() : nullptr);
    prefill_engine = std::make_unique<prefill::PrefillEngine>(prefill_runtime.get(), sender.get(),
                                                              prefill::PrefillEngine::kDefaultMaxQueue, c.warmup_tokens);
    prefill_service = std::make_unique<prefill::PrefillService>(prefill_engine.get(), id_prefix + "/prefill",
                                                                 reporter(&prefill_registration), &metrics);
    prefill_service->set_internal_token(internal_token);
    services.push_back(prefill_service.get());
  }
  if (c.roles.count(Role::kDecode)) {
    // In one process (serve) the decode role runs on the prefill role's weights.
    KVGATE_ASSIGN_OR_RETURN(decode_runtime, kv::WorkerRuntime::Load(c.runtime, prefill_runtime.get()));
    decode_engine = std::make_unique<decode::DecodeEngine>(decode_runtime.get(), int64_t{1} << 30);
    decode_engine->inbox().set_unclaimed_ttl(absl::Milliseconds(c.transfer_ttl_ms));
    decode_service = std::make_unique<decode::DecodeService>(decode_engine.get(), id_prefix + "/decode",
                                                              reporter(&decode_registration), &metrics);
    decode_service->set_internal_token(internal_token);
    if (cuda_ipc) {
      // The transfer service copies arriving rows on gRPC threads: a backend instance of
      // its own (its own stream) on the decode worker's device, so that those copies never
      // land in the decode loop's stream, or in a graph it is recording. Rows it makes are
      // the same device's memory, which the decode pool imports (same Name()).
      KVGATE_ASSIGN_OR_RETURN(transfer_backend, ops::CreateBackend(decode_runtime->backend().Name()));
    }
    transfer_service = kv::MakeKvTransferService(&decode_engine->inbox(), internal_token, transfer_backend.get());
    services.push_back(decode_service.get());
    services.push_back(transfer_service.get());
    if (inproc) kv::RegisterInprocInbox(kInprocAddress, &decode_engine->inbox());
  }
  std::unique_ptr<router::RouterService> router_service;
  if (c.roles.count(Role::kRouter)) {
    router::RouterOptions options;
    options.model_dir = c.model_dir;
    options.bearer_token = c.token;
    options.max_in_flight = c.max_in_flight;
    options.max_queued = c.max_queued;
    options.queue_timeout = absl::Milliseconds(c.queue_timeout_ms);
    options.limits.default_policy = c.manager.default_policy;
    options.limits.max_prompt_tokens = c.max_prompt_tokens;
    options.backend = c.runtime.backend;
    options.roles.clear();
    for (Role role : c.roles) {
      options.roles.push_back(RoleName(role));
    }
    options.manager_address = manager_address;
    KVGATE_ASSIGN_OR_RETURN(router_service, router::RouterService::Create(options, &channels, &metrics));
    public_services.push_back(router_service.get());
  }
  // `server` listens on --host:--port: the router's public server, or (split kv-manager,
  // prefill, decode) the internal services. `inner`: serve's internal services.
  const std::string listen = absl::StrCat(c.host, ":", c.port);
  std::vector<std::string> internal_names;
  if (manager_service) internal_names.push_back("kvgate.v1.KvManager");
  if (prefill_service) internal_names.push_back("kvgate.v1.PrefillWorker");
  if (decode_service) internal_names.push_back("kvgate.v1.DecodeWorker");
  if (transfer_service) internal_names.push_back("kvgate.v1.KvTransfer");
  ServerSpec main_spec{listen, c.tls, router_service ? public_services : services,
                       router_service ? std::vector<std::string>{"kvgate.v1.Inference"} : internal_names};
  KVGATE_ASSIGN_OR_RETURN(StartedServer server, StartServer(main_spec));
  // Health per service name too (Kubernetes gRPC probes may name kvgate.v1.Inference).
  const std::vector<std::string> health_names = server.service_names;
  std::optional<StartedServer> inner;
  if (router_service && !services.empty()) {
    ServerSpec inner_spec{inproc ? std::string() : std::string("127.0.0.1:0"), c.tls, services, internal_names};
    KVGATE_ASSIGN_OR_RETURN(inner, StartServer(inner_spec));
  }
  grpc::Server* internal_server = inner ? inner->server.get() : server.server.get();
  channels.SetInprocServer(internal_server);
  const std::string self_address = absl::StrCat("127.0.0.1:", inner ? inner->port : server.port);
  // With tcp between roles of one process, they still reach each other over the socket.
  const std::string manager_target = manager_address.empty() ? self_address : manager_address;
  if (router_service && manager_address.empty()) router_service->SetManagerAddress(manager_target);
  const std::string advertise = !c.advertise.empty() ? c.advertise : inproc ? kInprocAddress : self_address;
  auto registration_request = [&](v1::WorkerRole role, const std::string& worker_id, kv::WorkerRuntime& runtime) {
    v1::RegisterWorkerRequest request;
    request.set_worker_id(worker_id);
    request.set_role(role);
    request.set_address(advertise);
    request.set_model_name(runtime.model_name());
    request.set_num_layers(runtime.config().num_layers);
    request.set_num_kv_heads(runtime.config().num_kv_heads);
    request.set_head_dim(runtime.config().head_dim);
    request.set_page_tokens(runtime.options().page_tokens);
    request.add_transports(inproc ? "inproc" : "tcp");
    if (cuda_ipc) request.add_transports("cuda_ipc");
    return request;
  };
  if (prefill_engine) {
    prefill_engine->WaitUntilWarm();
    prefill_registration = std::make_unique<kv::WorkerRegistration>(
        channels.Get(manager_target), registration_request(v1::PREFILL, id_prefix + "/prefill", *prefill_runtime),
        [&] {
          v1::WorkerCapacity capacity;
          capacity.set_kv_pages_total(prefill_engine->pages_total());
          capacity.set_kv_pages_free(prefill_engine->pages_total() - prefill_engine->pages_used());
          capacity.set_requests_active(prefill_engine->queued() + prefill_engine->running());
          capacity.set_serving(true);
          metrics.SetPages("prefill", prefill_engine->pages_used(), prefill_engine->pages_total() - prefill_engine->pages_used());
          return capacity;
        });
    prefill_registration->Start();
  }
  if (decode_engine) {
    decode_registration = std::make_unique<kv::WorkerRegistration>(
        channels.Get(manager_target), registration_request(v1::DECODE, id_prefix + "/decode", *decode_runtime), [&] {
          v1::WorkerCapacity capacity;
          capacity.set_kv_pages_total(decode_engine->pages_total());
          capacity.set_kv_pages_free(decode_engine->pages_total() - decode_engine->pages_used());
          capacity.set_requests_active(decode_engine->requests());
          capacity.set_serving(true);
          metrics.SetPages("decode", decode_engine->pages_used(), decode_engine->pages_total() - decode_engine->pages_used());
          return capacity;
        });
    decode_registration->Start();
  }
  // Health: SERVING once every local role is ready (weights loaded, registered with the
  // KV manager, the router able to reach it).
  std::atomic<bool> router_ok{router_service == nullptr};
  if (router_service) router_service->StartHealth([&](bool ok) { router_ok.store(ok); });
  std::atomic<bool> stopping{false};
  std::thread health([&] {
    bool last = false, first = true;
    while (!stopping.load()) {
      const bool ready = router_ok.load() && (!prefill_registration || prefill_registration->registered()) &&
                         (!decode_registration || decode_registration->registered());
      if (first || ready != last) SetServing(server.server.get(), ready, health_names);
      first = false;
      last = ready;
      std::this_thread::sleep_for(std::chrono::milliseconds(50));
    }
  });
  std::cout << "kvgate " << c.command << ": listening on " << c.host << ":" << server.port;
  if (c.metrics_port) std::cout << ", metrics on " << c.metrics_host << ":" << metrics.bound_port() << "/metrics";
  std::cout << std::endl;

  int signal = 0;
  sigwait(&stop, &signal);
  // A second SIGTERM/SIGINT (Kubernetes, a supervisor) must not kill the drain: threads
  // that libraries started before main (OpenBLAS) do not block the signals. The grace
  // period bounds the shutdown; SIGKILL still ends it at once.
  std::signal(SIGTERM, SIG_IGN);
  std::signal(SIGINT, SIG_IGN);
  std::cerr << "kvgate " << c.command << ": signal " << signal << ", shutting down (grace " << c.shutdown_grace_ms
            << " ms)\n";
  const absl::Time deadline = absl::Now() + absl::Milliseconds(c.shutdown_grace_ms);
  stopping.store(true);
  health.join();
  SetServing(server.server.get(), false, health_names);
  if (router_service) router_service->Shutdown(deadline);
  // The clients' server has nothing left to serve: its streams ended above (cut ones with
  // UNAVAILABLE). A moment more lets those final statuses reach the clients instead of
  // a CANCELLED from the server's own shutdown; no stream produces anything after the
  // grace period.
  if (inner) server.server->Shutdown(absl::ToChronoTime(std::max(deadline, absl::Now() + absl::Seconds(1))));
  if (manager_address == kInprocAddress) {
    // Every call between the roles goes through the server's in-process channel, and
    // gRPC crashes creating a call on it once the server is shut down: heartbeats,
    // progress reports and the manager's aborts stop first (the router has drained).
    if (prefill_registration) prefill_registration->Stop();
    if (decode_registration) decode_registration->Stop();
    progress.Stop();
    if (manager_service) manager_service->Shutdown(deadline);
  }
  internal_server->Shutdown(absl::ToChronoTime(
      router_service && !inner ? std::max(deadline, absl::Now() + absl::Seconds(1)) : deadline));
  if (prefill_registration) prefill_registration->Stop();
  if (decode_registration) decode_registration->Stop();
  if (prefill_engine) prefill_engine->Shutdown();
  if (decode_engine) decode_engine->Shutdown();
  progress.Stop();  // the engines' last reports are out (dropped after an earlier Stop)
  if (inproc && decode_engine) kv::UnregisterInprocInbox(kInprocAddress);
  if (manager_service) manager_service->Shutdown(deadline);
  if (inner) inner->server->Wait();
  server.server->Wait();
  return absl::OkStatus();
}

const char* RoleName(Role role) {
  switch (role) {
    case Role::kRouter:
      return "router";
    case Role::kManager:
      return "kv_manager";
    case Role::kPrefill:
      return "prefill";
    case Role::kDecode:
      return "decode";
  }
  return "unknown";
}

}  // namespace kvgate::serving
