#include "common/grpc_edge.h"

#include <fstream>
#include <random>
#include <sstream>

#include <grpcpp/support/client_interceptor.h>

#include <grpcpp/ext/proto_server_reflection_plugin.h>
#include <grpcpp/health_check_service_interface.h>

#include "absl/strings/match.h"
#include "absl/strings/ascii.h"
#include "absl/strings/str_cat.h"
#include "common/auth.h"
#include "common/reflection_v1.h"
#include "common/status_macros.h"

namespace kvgate {
namespace {

absl::StatusOr<std::string> ReadPem(const std::string& path, const char* what) {
  std::ifstream in(path, std::ios::binary);
  if (!in) return absl::NotFoundError(absl::StrCat(what, ": cannot read '", path, "'"));
  std::stringstream buffer;
  buffer << in.rdbuf();
  std::string text = buffer.str();
  if (!absl::StrContains(text, "-----BEGIN")) {
    return absl::InvalidArgumentError(absl::StrCat(what, ": '", path, "' is not a PEM file"));
  }
  return text;
}

// Adds one metadata entry to every call of a channel.
class AddMetadataInterceptor final : public grpc::experimental::Interceptor {
 public:
  AddMetadataInterceptor(const std::string* key, const std::string* value) : key_(key), value_(value) {}
  void Intercept(grpc::experimental::InterceptorBatchMethods* methods) override {
    if (methods->QueryInterceptionHookPoint(grpc::experimental::InterceptionHookPoints::PRE_SEND_INITIAL_METADATA)) {
      methods->GetSendInitialMetadata()->insert({*key_, *value_});
    }
    methods->Proceed();
  }

 private:
  const std::string* key_;
  const std::string* value_;
};

class AddMetadataFactory final : public grpc::experimental::ClientInterceptorFactoryInterface {
 public:
  AddMetadataFactory(std::string key, std::string value) : key_(std::move(key)), value_(std::move(value)) {}
  grpc::experimental::Interceptor* CreateClientInterceptor(grpc::experimental::ClientRpcInfo*) override {
    return new AddMetadataInterceptor(&key_, &value_);
  }

 private:
  const std::string key_, value_;
};

std::vector<std::unique_ptr<grpc::experimental::ClientInterceptorFactoryInterface>> TokenInterceptors(
    const std::string& token) {
  std::vector<std::unique_ptr<grpc::experimental::ClientInterceptorFactoryInterface>> out;
  if (!token.empty()) out.push_back(std::make_unique<AddMetadataFactory>(kInternalTokenKey, token));
  return out;
}

}  // namespace

absl::StatusOr<std::string> ReadTokenFile(const std::string& path) {
  std::ifstream in(path, std::ios::binary);
  if (!in) return absl::NotFoundError(absl::StrCat("cannot read token file '", path, "'"));
  std::stringstream buffer;
  buffer << in.rdbuf();
  std::string token(absl::StripAsciiWhitespace(buffer.str()));
  if (token.empty()) return absl::InvalidArgumentError(absl::StrCat("token file '", path, "' is empty"));
  return token;
}

std::string RandomToken() {
  std::random_device rd;
  std::string out;
  for (int i = 0; i < 8; ++i) absl::StrAppend(&out, absl::Hex(rd(), absl::kZeroPad8));
  return out;
}

absl::StatusOr<std::shared_ptr<grpc::ServerCredentials>> MakeServerCredentials(const TlsOptions& tls) {
  if (!tls.server_enabled()) return grpc::InsecureServerCredentials();
  if (tls.key_file.empty()) return absl::InvalidArgumentError("--tls-key is required with --tls-cert");
  grpc::SslServerCredentialsOptions options;
  KVGATE_ASSIGN_OR_RETURN(std::string cert, ReadPem(tls.cert_file, "--tls-cert"));
  KVGATE_ASSIGN_OR_RETURN(std::string key, ReadPem(tls.key_file, "--tls-key"));
  options.pem_key_cert_pairs.push_back({key, cert});
  if (!tls.ca_file.empty()) {
    KVGATE_ASSIGN_OR_RETURN(options.pem_root_certs, ReadPem(tls.ca_file, "--tls-ca"));
    options.client_certificate_request = GRPC_SSL_REQUEST_AND_REQUIRE_CLIENT_CERTIFICATE_AND_VERIFY;
  }
  return grpc::SslServerCredentials(options);
}

absl::StatusOr<std::shared_ptr<grpc::ChannelCredentials>> MakeChannelCredentials(const TlsOptions& tls) {
  if (!tls.client_enabled()) return grpc::InsecureChannelCredentials();
  grpc::SslCredentialsOptions options;
  KVGATE_ASSIGN_OR_RETURN(options.pem_root_certs, ReadPem(tls.ca_file, "--tls-ca"));
  if (!tls.client_cert_file.empty()) {
    KVGATE_ASSIGN_OR_RETURN(options.pem_cert_chain, ReadPem(tls.client_cert_file, "client certificate"));
    KVGATE_ASSIGN_OR_RETURN(options.pem_private_key, ReadPem(tls.client_key_file, "client key"));
  }
  return grpc::SslCredentials(options);
}

void ChannelPool::SetInprocServer(grpc::Server* server) {
  std::lock_guard<std::mutex> lock(mu_);
  inproc_server_ = server;
  inproc_channel_.reset();
}

std::shared_ptr<grpc::Channel> ChannelPool::Get(const std::string& address) {
  std::lock_guard<std::mutex> lock(mu_);
  if (address == kInprocAddress) {
    if (inproc_server_ == nullptr) return nullptr;
    if (!inproc_channel_) {
      inproc_channel_ = inproc_server_->experimental().InProcessChannelWithInterceptors(grpc::ChannelArguments(),
                                                                                      TokenInterceptors(internal_token_));
    }
    return inproc_channel_;
  }
  auto it = channels_.find(address);
  if (it != channels_.end()) return it->second;
  grpc::ChannelArguments args;
  args.SetMaxReceiveMessageSize(64 << 20);
  // Peers that vanish are noticed quickly (kill tests: UNAVAILABLE within 2 s).
  args.SetInt(GRPC_ARG_KEEPALIVE_TIME_MS, 1000);
  args.SetInt(GRPC_ARG_KEEPALIVE_TIMEOUT_MS, 1000);
  args.SetInt(GRPC_ARG_KEEPALIVE_PERMIT_WITHOUT_CALLS, 1);
  args.SetInt(GRPC_ARG_INITIAL_RECONNECT_BACKOFF_MS, 100);
  args.SetInt(GRPC_ARG_MIN_RECONNECT_BACKOFF_MS, 100);
  args.SetInt(GRPC_ARG_MAX_RECONNECT_BACKOFF_MS, 1000);
  auto channel = grpc::experimental::CreateCustomChannelWithInterceptors(address, credentials_, args,
                                                                         TokenInterceptors(internal_token_));
  channels_[address] = channel;
  return channel;
}

grpc::Status CheckBearerToken(const grpc::ServerContext& context, const std::string& token) {
  return CheckClientToken(context, token);
}
grpc::Status CheckBearerToken(const grpc::CallbackServerContext& context, const std::string& token) {
  return CheckClientToken(context, token);
}

absl::StatusOr<StartedServer> StartServer(const ServerSpec& spec) {
  grpc::EnableDefaultHealthCheckService(true);
  grpc::reflection::InitProtoReflectionServerBuilderPlugin();
  KVGATE_ASSIGN_OR_RETURN(std::shared_ptr<grpc::ServerCredentials> credentials, MakeServerCredentials(spec.tls));
  grpc::ServerBuilder builder;
  StartedServer started;
  const bool listens = !spec.listen_address.empty();
  if (listens) builder.AddListeningPort(spec.listen_address, credentials, &started.port);
  builder.SetMaxReceiveMessageSize(spec.max_receive_message_bytes);
  // Clients that ping to detect dead peers are welcome.
  builder.AddChannelArgument(GRPC_ARG_HTTP2_MIN_RECV_PING_INTERVAL_WITHOUT_DATA_MS, 500);
  builder.AddChannelArgument(GRPC_ARG_HTTP2_MAX_PING_STRIKES, 0);
  builder.AddChannelArgument(GRPC_ARG_KEEPALIVE_PERMIT_WITHOUT_CALLS, 1);
  for (grpc::Service* service : spec.services) builder.RegisterService(service);
  std::vector<std::string> listed = spec.service_names;
  for (const char* name : {"grpc.health.v1.Health", "grpc.reflection.v1alpha.ServerReflection",
                           "grpc.reflection.v1.ServerReflection"}) {
    listed.push_back(name);
  }
  started.reflection_v1 = MakeReflectionV1Service(std::move(listed));
  builder.RegisterService(started.reflection_v1.get());
  started.service_names = spec.service_names;
  started.server = builder.BuildAndStart();
  if (started.server == nullptr || (listens && started.port == 0)) {
    return absl::UnavailableError(absl::StrCat("cannot listen on ", spec.listen_address));
  }
  SetServing(started.server.get(), false, started.service_names);
  return started;
}

void SetServing(grpc::Server* server, bool serving, const std::vector<std::string>& service_names) {
  if (server == nullptr || server->GetHealthCheckService() == nullptr) return;
  server->GetHealthCheckService()->SetServingStatus(serving);
  for (const std::string& name : service_names) server->GetHealthCheckService()->SetServingStatus(name, serving);
}

}  // namespace kvgate
