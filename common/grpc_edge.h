// File: what every kvgate gRPC server and client shares at the edge: TLS credentials
// (optional on every listener; a client CA turns on mTLS between components), the
// bearer token of the public API and the internal token of the components
// (common/auth.h), channels to peers (including "inproc", a peer inside this process),
// and starting a server with health checking and reflection.
#pragma once

#include <functional>
#include <map>
#include <mutex>
#include <memory>
#include <string>
#include <vector>

#include <grpcpp/grpcpp.h>
#include <grpcpp/impl/service_type.h>

#include "absl/status/statusor.h"
#include "common/channel_factory.h"

namespace kvgate {

// Address of a peer that lives in this process (kvgate serve): calls go through the
// server's in-process channel.
inline constexpr char kInprocAddress[] = "inproc";

struct TlsOptions {
  // Server side: certificate chain and private key (PEM files); empty = plaintext.
  std::string cert_file;
  std::string key_file;
  // Server side: when set, clients must present a certificate signed by this CA (mTLS).
  // Client side: the CA that signs the servers' certificates (enables TLS).
  std::string ca_file;
  // Client side, for mTLS: this component's certificate and key (usually cert_file /
  // key_file of its own listener).
  std::string client_cert_file;
  std::string client_key_file;

  bool server_enabled() const { return !cert_file.empty(); }
  bool client_enabled() const { return !ca_file.empty(); }
};

// NOT_FOUND / INVALID_ARGUMENT naming the file for unreadable or missing PEM files.
absl::StatusOr<std::shared_ptr<grpc::ServerCredentials>> MakeServerCredentials(const TlsOptions& tls);
absl::StatusOr<std::shared_ptr<grpc::ChannelCredentials>> MakeChannelCredentials(const TlsOptions& tls);

// A token read from a file (surrounding whitespace and the final newline dropped).
// NOT_FOUND for an unreadable file, INVALID_ARGUMENT for an empty token.
absl::StatusOr<std::string> ReadTokenFile(const std::string& path);

// 32 random bytes from the OS, in hex: an internal token for components of one process.
std::string RandomToken();

// host:port -> channel. Cached per address; "inproc" maps to the in-process channel set
// with SetInprocServer. Every channel adds `internal_token` (when not empty) to every
// call as kInternalTokenKey metadata, so the internal services of other processes accept
// the calls.
class ChannelPool {
 public:
  explicit ChannelPool(std::shared_ptr<grpc::ChannelCredentials> credentials, std::string internal_token = "")
      : credentials_(std::move(credentials)), internal_token_(std::move(internal_token)) {}
  void SetInprocServer(grpc::Server* server);
  std::shared_ptr<grpc::Channel> Get(const std::string& address);
  ChannelFactory AsFactory() {
    return [this](const std::string& address) { return Get(address); };
  }

 private:
  std::shared_ptr<grpc::ChannelCredentials> credentials_;
  const std::string internal_token_;
  std::mutex mu_;
  grpc::Server* inproc_server_ = nullptr;
  std::shared_ptr<grpc::Channel> inproc_channel_;
  std::map<std::string, std::shared_ptr<grpc::Channel>> channels_;
};

// UNAUTHENTICATED unless the call carries "authorization: Bearer <token>" (scheme in any
// case, constant-time comparison); OK when `token` is empty (no token configured).
grpc::Status CheckBearerToken(const grpc::ServerContext& context, const std::string& token);
grpc::Status CheckBearerToken(const grpc::CallbackServerContext& context, const std::string& token);

struct ServerSpec {
  // host:port; port 0 picks a free port. Empty: no listener at all (a server reached only
  // through its in-process channel, like the internal services of `kvgate serve`).
  std::string listen_address;
  TlsOptions tls;
  std::vector<grpc::Service*> services;  // not owned
  // Full names of `services` (e.g. "kvgate.v1.Inference"), for reflection v1's
  // list_services and per-service health.
  std::vector<std::string> service_names;
  int32_t max_receive_message_bytes = 8 << 20;
};

struct StartedServer {
  std::unique_ptr<grpc::Service> reflection_v1;  // outlives `server`
  std::unique_ptr<grpc::Server> server;
  int port = 0;  // the bound port
  std::vector<std::string> service_names;  // spec.service_names
};

// Builds and starts the server with grpc.health.v1 (overall status and every named
// service NOT_SERVING until the caller says otherwise) and server reflection, v1alpha
// (gRPC's plugin) and v1 (common/reflection_v1.h). UNAVAILABLE when the address cannot
// be bound.
absl::StatusOr<StartedServer> StartServer(const ServerSpec& spec);

// Health of the whole server ("" service) and of every named service (Kubernetes gRPC
// probes may name one, e.g. "kvgate.v1.Inference").
// Check of another name answers NOT_FOUND.
void SetServing(grpc::Server* server, bool serving, const std::vector<std::string>& service_names = {});

}  // namespace kvgate
