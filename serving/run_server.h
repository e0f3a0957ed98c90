// File: runs the roles of one kvgate process (serving/server_config.h) until SIGINT or
// SIGTERM, then drains them within the configured grace period.
#pragma once

#include "absl/status/status.h"
#include "serving/server_config.h"

namespace kvgate::serving {

// Assembles and serves every role of `config`: the KV manager, the prefill and decode
// workers (their engines, services, KV transport and registration with the manager) and
// the router; health turns SERVING once every local role is ready. Blocks SIGINT and
// SIGTERM in the calling thread and returns after the first one has drained the roles.
absl::Status RunServer(const ServerConfig& config);

}  // namespace kvgate::serving
