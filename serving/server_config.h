// File: what one kvgate process serves: which roles run here and how they are set up.
// The CLI fills it from flags (cli/server_command.cc); RunServer (serving/run_server.h)
// assembles the roles from it.
#pragma once

#include <cstdint>
#include <optional>
#include <set>
#include <string>

#include "common/grpc_edge.h"
#include "kv/worker/worker_runtime.h"
#include "kv_manager/manager_state.h"

namespace kvgate::serving {

enum class Role { kRouter, kManager, kPrefill, kDecode };

struct ServerConfig {
  std::set<Role> roles;
  std::string command;
  std::string model_dir;
  std::string host = "0.0.0.0";
  int32_t port = 8000;
  std::string advertise;         // workers: how peers reach this process
  std::string manager_address;   // when the manager is elsewhere
  // "inproc" (serve), "tcp", or "cuda_ipc" (split roles on GPUs of one host: K and V go
  // GPU to GPU, the rest as tcp).
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

// The role's name in ServerInfo and the manager's registry: router, kv_manager, prefill, decode.
const char* RoleName(Role role);

}  // namespace kvgate::serving
