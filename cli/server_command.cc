// `kvgate serve` (every role in one process: the embedded default) and the single-role
// commands `kvgate router`, `kvgate kv-manager`, `kvgate prefill`, `kvgate decode`. They
// differ in which roles run here and how the roles reach each other (in-process channel
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
#include <condition_variable>
#include <csignal>
#include <cstdlib>
#include <deque>
#ifdef __GLIBC__
#include <malloc.h>
#endif
#include <iostream>
#include <mutex>
#include <optional>
#include <set>
#include <thread>

#include "absl/strings/str_cat.h"
#include "absl/strings/str_split.h"
#include "cli/commands.h"
#include "cli/flags.h"
#include "common/grpc_edge.h"
#include "common/grpc_status.h"
#include "common/metrics.h"
#include "common/status_macros.h"
#include "decode_worker/decode_engine.h"
#include "decode_worker/decode_service.h"
#include "gates/eviction_spec.h"
#include "kv_manager/kv_manager_service.h"
#include "kv_manager/manager_client.h"
#include "kv_manager/manager_state.h"
#include "kv/transport/tcp_transport.h"
#include "prefill_worker/prefill_engine.h"
#include "prefill_worker/prefill_service.h"
#include "router/router_service.h"

namespace kvgate::cli {
namespace {

constexpr char kUsage[] =
    "usage: kvgate serve --model DIR [--port N=8000 (0 = any free port)] [--host ADDR=0.0.0.0]\n"
    "         [--transport inproc|tcp] [--backend cpu|cuda[:N]] [--metrics-port N]\n"
    "         [--kv-pages N | --kv-sequences N=8] [--page-tokens N=16] [--default-policy NAME]\n"
    "         [--kv-cache-dtype auto|float32|bf16 (auto: bf16 on cuda, float32 on cpu)]\n"
    "         [--fast-kvzip-gate PATH] [--attention-gate PATH] [--random-gates SEED]\n"
    "         [--tls-cert F --tls-key F [--tls-ca F]] [--token-file F] [--shutdown-grace-ms N=5000]\n"
    "         [--heartbeat-ms N=250] [--worker-timeout-ms N=2000] [--lease-ttl-ms N=3000]\n"
    "         [--metrics-host ADDR=127.0.0.1] [--transfer-ttl-ms N=60000]\n"
    "         [--max-in-flight N=64] [--max-queued N=4096] [--queue-timeout-ms N=30000]\n"
    "         [--warmup-tokens N=2048 (a start-up prefill of N tokens; 0 = none)]\n"
    "         [--max-prompt-tokens N (0 = the model context; sizes the prefill worker's staging pool)]\n"
    "       kvgate kv-manager [--port N] [...manager flags]\n"
    "       kvgate prefill|decode --model DIR --kv-manager HOST:PORT [--port N] [--advertise HOST:PORT]\n"
    "       kvgate router --model DIR --kv-manager HOST:PORT [--port N]\n"
    "  The client token: --token-file F or $KVGATE_TOKEN (--token T still works but shows in ps).\n"
    "  Split roles: --internal-token-file F or $KVGATE_INTERNAL_TOKEN (the same on every\n"
    "  component), or mutual TLS (--tls-ca); --insecure-internal runs them unguarded.\n";

enum class Role { kRouter, kManager, kPrefill, kDecode };

struct ServerConfig {
  std::set<Role> roles;
  std::string command;
  std::string model_dir;
  std::string host = "0.0.0.0";
  int32_t port = 8000;
  std::string advertise;         // workers: how peers reach this process
  std::string manager_address;   // when the manager is elsewhere
  std::string transport = "inproc";
  std::optional<int32_t> metrics_port;
  std::string metrics_host = "127.0.0.1";
  kv::WorkerRuntimeOptions runtime;
  kv::ManagerConfig manager;
  TlsOptions tls;
  std::string token;           // the clients' bearer token; empty: none
  std::string internal_token;  // between components of split roles; empty: none
  bool insecure_internal = false;
  int32_t transfer_ttl_ms = 60000;
  // The router's admission (router/router_service.h).
  int32_t max_in_flight = 64;
  int32_t max_queued = 4096;
  int32_t queue_timeout_ms = 30000;
  int32_t shutdown_grace_ms = 5000;
  std::string worker_id;
  // The prefill worker's start-up prefill (prefill/prefill_engine.h); 0 = none.
  int32_t warmup_tokens = 2048;
  // The longest prompt, tokens (0 = the model context): the prefill worker's staging
  // pool holds one prompt of this many tokens, and the router refuses longer ones.
  int32_t max_prompt_tokens = 0;
};

absl::StatusOr<ServerConfig> ParseServer(const std::string& command, std::set<Role> roles,
                                         const std::vector<std::string>& args) {
  KVGATE_ASSIGN_OR_RETURN(
      Flags flags, Flags::Parse(args,
                                {"model", "port", "host", "advertise", "kv-manager", "transport", "backend",
                                 "metrics-port", "kv-pages", "kv-sequences", "page-tokens", "default-policy",
                                 "default-keep-ratio", "fast-kvzip-gate", "attention-gate", "random-gates",
                                 "tls-cert", "tls-key", "tls-ca", "token", "token-file", "internal-token-file",
                                 "metrics-host", "transfer-ttl-ms", "max-in-flight", "max-queued", "queue-timeout-ms", "shutdown-grace-ms", "heartbeat-ms",
                                 "worker-timeout-ms", "lease-ttl-ms", "worker-id", "warmup-tokens", "max-prompt-tokens",
                                 "kv-cache-dtype"},
                                {"insecure-internal"}));
  ServerConfig c;
  c.command = command;
  c.roles = std::move(roles);
  const bool needs_model = c.roles.count(Role::kRouter) || c.roles.count(Role::kPrefill) || c.roles.count(Role::kDecode);
  if (auto model = flags.String("model")) c.model_dir = *model;
  if (needs_model && c.model_dir.empty()) return absl::InvalidArgumentError("--model DIR is required");
  auto int_flag = [&](const char* name, int64_t lo, int64_t hi, auto* out) -> absl::Status {
    KVGATE_ASSIGN_OR_RETURN(auto value, flags.Int(name));
    if (!value) return absl::OkStatus();
    if (*value < lo || *value > hi) return absl::InvalidArgumentError(absl::StrCat("--", name, " must be in [", lo, ", ", hi, "]"));
    *out = static_cast<std::remove_reference_t<decltype(*out)>>(*value);
    return absl::OkStatus();
  };
  KVGATE_RETURN_IF_ERROR(int_flag("port", 0, 65535, &c.port));
  int32_t metrics_port = -1;
  KVGATE_RETURN_IF_ERROR(int_flag("metrics-port", 0, 65535, &metrics_port));
  if (metrics_port >= 0) c.metrics_port = metrics_port;
  KVGATE_RETURN_IF_ERROR(int_flag("kv-pages", 1, 1 << 30, &c.runtime.kv_pool_pages));
  KVGATE_RETURN_IF_ERROR(int_flag("kv-sequences", 1, 1 << 20, &c.runtime.kv_pool_sequences));
  KVGATE_RETURN_IF_ERROR(int_flag("page-tokens", 1, 1 << 16, &c.runtime.page_tokens));
  KVGATE_RETURN_IF_ERROR(int_flag("shutdown-grace-ms", 0, 3600000, &c.shutdown_grace_ms));
  KVGATE_RETURN_IF_ERROR(int_flag("transfer-ttl-ms", 100, 3600000, &c.transfer_ttl_ms));
  KVGATE_RETURN_IF_ERROR(int_flag("max-in-flight", 1, 1 << 20, &c.max_in_flight));
  KVGATE_RETURN_IF_ERROR(int_flag("max-queued", 0, 1 << 24, &c.max_queued));
  KVGATE_RETURN_IF_ERROR(int_flag("queue-timeout-ms", 0, 3600000, &c.queue_timeout_ms));
  KVGATE_RETURN_IF_ERROR(int_flag("warmup-tokens", 0, 1 << 20, &c.warmup_tokens));
  KVGATE_RETURN_IF_ERROR(int_flag("max-prompt-tokens", 0, 1 << 30, &c.max_prompt_tokens));
  if (auto host = flags.String("metrics-host")) c.metrics_host = *host;
  c.manager.heartbeat_interval_ms = 250;
  c.manager.worker_timeout_ms = 2000;
  c.manager.lease_ttl_ms = 3000;
  c.manager.finished_grace_ms = 10000;
  KVGATE_RETURN_IF_ERROR(int_flag("heartbeat-ms", 10, 600000, &c.manager.heartbeat_interval_ms));
  KVGATE_RETURN_IF_ERROR(int_flag("worker-timeout-ms", 20, 3600000, &c.manager.worker_timeout_ms));
  KVGATE_RETURN_IF_ERROR(int_flag("lease-ttl-ms", 50, 3600000, &c.manager.lease_ttl_ms));
  if (auto host = flags.String("host")) c.host = *host;
  if (auto advertise = flags.String("advertise")) c.advertise = *advertise;
  if (auto manager = flags.String("kv-manager")) c.manager_address = *manager;
  if (!c.roles.count(Role::kManager) && c.manager_address.empty()) {
    return absl::InvalidArgumentError("--kv-manager HOST:PORT is required (the KV manager runs elsewhere)");
  }
  if (auto transport = flags.String("transport")) c.transport = *transport;
  if (c.transport != "inproc" && c.transport != "tcp") {
    return absl::InvalidArgumentError(absl::StrCat("--transport must be inproc or tcp, got '", c.transport, "'"));
  }
  if (c.roles.size() < 4) c.transport = "tcp";  // roles in other processes
  c.runtime.model_dir = c.model_dir;
  if (auto backend = flags.String("backend")) c.runtime.backend = *backend;
  if (auto dtype = flags.String("kv-cache-dtype")) {
    KVGATE_ASSIGN_OR_RETURN(c.runtime.kv_dtype, kv::ParseKvCacheDtype(*dtype));
  }
  if (auto path = flags.String("fast-kvzip-gate")) c.runtime.gates.paths["fast_kvzip"] = *path;
  if (auto path = flags.String("attention-gate")) c.runtime.gates.paths["attention_gate"] = *path;
  KVGATE_ASSIGN_OR_RETURN(auto seed, flags.Int("random-gates"));
  if (seed) c.runtime.gates.random_seed = static_cast<uint64_t>(*seed);
  if (auto policy = flags.String("default-policy")) c.manager.default_policy = *policy;
  KVGATE_ASSIGN_OR_RETURN(auto keep, flags.Double("default-keep-ratio"));
  if (keep) c.manager.default_keep_ratio = static_cast<float>(*keep);
  KVGATE_RETURN_IF_ERROR(kv::ValidateManagerConfig(c.manager));
  if (auto f = flags.String("tls-cert")) c.tls.cert_file = *f;
  if (auto f = flags.String("tls-key")) c.tls.key_file = *f;
  if (auto f = flags.String("tls-ca")) c.tls.ca_file = *f;
  // Components present their own certificate to each other (mTLS when a CA is given).
  c.tls.client_cert_file = c.tls.ca_file.empty() ? "" : c.tls.cert_file;
  c.tls.client_key_file = c.tls.ca_file.empty() ? "" : c.tls.key_file;
  // The client token: a file or the environment (argv is visible to every local user).
  if (flags.Has("token") && flags.Has("token-file")) {
    return absl::InvalidArgumentError("give the client token once: --token-file or --token");
  }
  if (auto file = flags.String("token-file")) {
    KVGATE_ASSIGN_OR_RETURN(c.token, ReadTokenFile(*file));
  } else if (auto token = flags.String("token")) {
    c.token = *token;
  } else if (const char* env = std::getenv("KVGATE_TOKEN"); env != nullptr && *env != '\0') {
    c.token = env;
  }
  if (auto file = flags.String("internal-token-file")) {
    KVGATE_ASSIGN_OR_RETURN(c.internal_token, ReadTokenFile(*file));
  } else if (const char* env = std::getenv("KVGATE_INTERNAL_TOKEN"); env != nullptr && *env != '\0') {
    c.internal_token = env;
  }
  c.insecure_internal = flags.Has("insecure-internal");
  const bool split = c.roles.size() < 4;
  if (split && c.internal_token.empty() && c.tls.ca_file.empty() && !c.insecure_internal) {
    return absl::InvalidArgumentError(
        "the internal services of a split deployment need credentials: --internal-token-file F or "
        "$KVGATE_INTERNAL_TOKEN (the same on every component), or mutual TLS (--tls-cert, --tls-key, --tls-ca); "
        "--insecure-internal runs them unguarded (a trusted network only)");
  }
  if (auto id = flags.String("worker-id")) c.worker_id = *id;
  return c;
}

// The prefill side's sender: the in-process inbox for "inproc", tcp for host:port.
class AddressedSender final : public kv::KvSender {
 public:
  explicit AddressedSender(ChannelFactory channels)
      : inproc_(kv::MakeInprocSender()), tcp_(kv::MakeTcpSender(std::move(channels))) {}
  absl::StatusOr<int64_t> Send(const std::string& address, const kv::KvHandoff& handoff, absl::Time deadline) override {
    return (address == kInprocAddress ? inproc_ : tcp_)->Send(address, handoff, deadline);
  }
  std::string BackendRowsFor(const std::string& address) const override {
    return (address == kInprocAddress ? inproc_ : tcp_)->BackendRowsFor(address);
  }

 private:
  std::unique_ptr<kv::KvSender> inproc_, tcp_;
};

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
    sender = std::make_unique<AddressedSender>(channels.AsFactory());
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
    transfer_service = kv::MakeKvTransferService(&decode_engine->inbox(), internal_token);
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
      options.roles.push_back(role == Role::kRouter ? "router" : role == Role::kManager ? "kv_manager"
                                                    : role == Role::kPrefill ? "prefill" : "decode");
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

int Run(const std::string& command, std::set<Role> roles, const std::vector<std::string>& args) {
  absl::StatusOr<ServerConfig> config = ParseServer(command, std::move(roles), args);
  if (!config.ok()) {
    std::cerr << "kvgate " << command << ": " << config.status().message() << "\n" << kUsage;
    return 2;
  }
  absl::Status status = RunServer(*config);
  if (!status.ok()) {
    std::cerr << "kvgate " << command << ": " << absl::StatusCodeToString(status.code()) << ": " << status.message()
              << "\n";
    return 1;
  }
  return 0;
}

}  // namespace

int RunServe(const std::vector<std::string>& args) {
  return Run("serve", {Role::kRouter, Role::kManager, Role::kPrefill, Role::kDecode}, args);
}
int RunRouter(const std::vector<std::string>& args) { return Run("router", {Role::kRouter}, args); }
int RunKvManager(const std::vector<std::string>& args) { return Run("kv-manager", {Role::kManager}, args); }
int RunPrefill(const std::vector<std::string>& args) { return Run("prefill", {Role::kPrefill}, args); }
int RunDecode(const std::vector<std::string>& args) { return Run("decode", {Role::kDecode}, args); }

}  // namespace kvgate::cli
