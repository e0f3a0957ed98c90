#include "cli/inference_client.h"

#include <grpcpp/grpcpp.h>

#include <chrono>
#include <fstream>
#include <sstream>

#include "absl/strings/str_cat.h"
#include "common/grpc_status.h"
#include "common/status_macros.h"
#include "kvgate/v1/inference.grpc.pb.h"

namespace kvgate::cli {
namespace {

absl::StatusOr<std::string> ReadPem(const std::string& what, const std::string& path) {
  std::ifstream in(path, std::ios::binary);
  if (!in) return absl::NotFoundError(absl::StrCat(what, ": cannot read '", path, "'"));
  std::ostringstream text;
  text << in.rdbuf();
  return text.str();
}

class GrpcInferenceClient final : public InferenceClient {
 public:
  GrpcInferenceClient(std::unique_ptr<kvgate::v1::Inference::Stub> stub, std::string token)
      : stub_(std::move(stub)), token_(std::move(token)) {}

  absl::StatusOr<RemoteCompletion> Complete(const kvgate::v1::GenerateRequest& request, int64_t timeout_ms) override {
    grpc::ClientContext context;
    if (!token_.empty()) context.AddMetadata("authorization", absl::StrCat("Bearer ", token_));
    if (timeout_ms > 0) context.set_deadline(std::chrono::system_clock::now() + std::chrono::milliseconds(timeout_ms));
    std::unique_ptr<grpc::ClientReader<kvgate::v1::GenerateResponse>> reader = stub_->Generate(&context, request);
    RemoteCompletion completion;
    bool complete = false;
    kvgate::v1::GenerateResponse response;
    while (reader->Read(&response)) {
      if (response.has_chunk()) {
        completion.text += response.chunk().text();
        completion.token_ids.insert(completion.token_ids.end(), response.chunk().token_ids().begin(),
                                    response.chunk().token_ids().end());
      } else if (response.has_complete()) {
        completion.complete = response.complete();
        complete = true;
      }
    }
    const grpc::Status status = reader->Finish();
    if (!status.ok()) return FromGrpcStatus(status);
    if (!complete) return absl::InternalError("the server ended the stream without a complete message");
    return completion;
  }

 private:
  std::unique_ptr<kvgate::v1::Inference::Stub> stub_;
  const std::string token_;
};

}  // namespace

absl::StatusOr<std::shared_ptr<grpc::ChannelCredentials>> ChannelCredentialsFor(const ClientSecurity& security) {
  if (security.tls_ca_file.empty()) return grpc::InsecureChannelCredentials();
  grpc::SslCredentialsOptions options;
  KVGATE_ASSIGN_OR_RETURN(options.pem_root_certs, ReadPem("--tls-ca", security.tls_ca_file));
  if (!security.tls_cert_file.empty()) {
    KVGATE_ASSIGN_OR_RETURN(options.pem_cert_chain, ReadPem("--tls-cert", security.tls_cert_file));
    KVGATE_ASSIGN_OR_RETURN(options.pem_private_key, ReadPem("--tls-key", security.tls_key_file));
  }
  return grpc::SslCredentials(options);
}

absl::StatusOr<std::unique_ptr<InferenceClient>> InferenceClient::Connect(const std::string& server,
                                                                           const ClientSecurity& security) {
  KVGATE_ASSIGN_OR_RETURN(std::shared_ptr<grpc::ChannelCredentials> credentials, ChannelCredentialsFor(security));
  return std::make_unique<GrpcInferenceClient>(
      kvgate::v1::Inference::NewStub(grpc::CreateChannel(server, credentials)), security.token);
}

}  // namespace kvgate::cli
