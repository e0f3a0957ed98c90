// `kvgate serve` (every role in one process: the embedded default) and the single-role
// commands `kvgate router`, `kvgate kv-manager`, `kvgate prefill`, `kvgate decode`: their
// flags, parsed into a serving::ServerConfig that serving::RunServer assembles.
#include <cstdlib>
#include <iostream>
#include <optional>
#include <set>
#include <type_traits>

#include "absl/strings/str_cat.h"
#include "cli/commands.h"
#include "cli/flags.h"
#include "common/grpc_edge.h"
#include "common/status_macros.h"
#include "kv_manager/manager_state.h"
#include "serving/run_server.h"
#include "serving/server_config.h"

namespace kvgate::cli {
namespace {

using serving::Role;
using serving::ServerConfig;

constexpr char kUsage[] =
    "usage: kvgate serve --model DIR [--port N=8000 (0 = any free port)] [--host ADDR=0.0.0.0]\n"
    "         [--transport inproc|tcp|cuda_ipc] [--backend cpu|cuda[:N]] [--metrics-port N]\n"
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
    "         [--transport tcp|cuda_ipc (cuda_ipc: K and V GPU to GPU, both on GPUs of one host)]\n"
    "       kvgate router --model DIR --kv-manager HOST:PORT [--port N]\n"
    "  The client token: --token-file F or $KVGATE_TOKEN (--token T still works but shows in ps).\n"
    "  Split roles: --internal-token-file F or $KVGATE_INTERNAL_TOKEN (the same on every\n"
    "  component), or mutual TLS (--tls-ca); --insecure-internal runs them unguarded.\n";

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
  if (c.transport != "inproc" && c.transport != "tcp" && c.transport != "cuda_ipc") {
    return absl::InvalidArgumentError(
        absl::StrCat("--transport must be inproc, tcp or cuda_ipc, got '", c.transport, "'"));
  }
  if (c.roles.size() == 4 && c.transport == "cuda_ipc") {
    return absl::InvalidArgumentError(
        "--transport cuda_ipc joins a prefill and a decode process; serve runs both in one: use inproc");
  }
  if (c.roles.size() < 4 && c.transport == "inproc") c.transport = "tcp";  // roles in other processes
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

int Run(const std::string& command, std::set<Role> roles, const std::vector<std::string>& args) {
  absl::StatusOr<ServerConfig> config = ParseServer(command, std::move(roles), args);
  if (!config.ok()) {
    std::cerr << "kvgate " << command << ": " << config.status().message() << "\n" << kUsage;
    return 2;
  }
  absl::Status status = serving::RunServer(*config);
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
