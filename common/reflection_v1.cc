#include "common/reflection_v1.h"

#include <set>
#include <utility>

#include <google/protobuf/descriptor.h>
#include <google/protobuf/descriptor.pb.h>
#include <grpcpp/grpcpp.h>

#include "grpc/reflection/v1/reflection.grpc.pb.h"

namespace kvgate {
namespace {

namespace rv1 = ::grpc::reflection::v1;
using google::protobuf::DescriptorPool;
using google::protobuf::FileDescriptor;

// Adds `file` and, once each, every file it depends on (clients resolve the types of a
// file from one response, as gRPC's own reflection does).
void AddFile(const FileDescriptor* file, std::set<std::string>* seen, rv1::FileDescriptorResponse* out) {
  if (file == nullptr || !seen->insert(file->name()).second) return;
  google::protobuf::FileDescriptorProto proto;
  file->CopyTo(&proto);
  out->add_file_descriptor_proto(proto.SerializeAsString());
  for (int i = 0; i < file->dependency_count(); ++i) AddFile(file->dependency(i), seen, out);
}

void Error(rv1::ServerReflectionResponse* response, grpc::StatusCode code, const std::string& message) {
  response->mutable_error_response()->set_error_code(static_cast<int32_t>(code));
  response->mutable_error_response()->set_error_message(message);
}

// One answer per request, in order.
void Answer(const std::vector<std::string>& services, const rv1::ServerReflectionRequest& request,
            rv1::ServerReflectionResponse* response) {
  const DescriptorPool* pool = DescriptorPool::generated_pool();
  response->set_valid_host(request.host());
  *response->mutable_original_request() = request;
  std::set<std::string> seen;
  switch (request.message_request_case()) {
    case rv1::ServerReflectionRequest::kListServices:
      for (const std::string& name : services) response->mutable_list_services_response()->add_service()->set_name(name);
      return;
    case rv1::ServerReflectionRequest::kFileByFilename: {
      const FileDescriptor* file = pool->FindFileByName(request.file_by_filename());
      if (file == nullptr) return Error(response, grpc::StatusCode::NOT_FOUND, "file not found");
      return AddFile(file, &seen, response->mutable_file_descriptor_response());
    }
    case rv1::ServerReflectionRequest::kFileContainingSymbol: {
      const FileDescriptor* file = pool->FindFileContainingSymbol(request.file_containing_symbol());
      if (file == nullptr) return Error(response, grpc::StatusCode::NOT_FOUND, "symbol not found");
      return AddFile(file, &seen, response->mutable_file_descriptor_response());
    }
    case rv1::ServerReflectionRequest::kFileContainingExtension: {
      const auto* type = pool->FindMessageTypeByName(request.file_containing_extension().containing_type());
      const auto* extension =
          type == nullptr ? nullptr
                          : pool->FindExtensionByNumber(type, request.file_containing_extension().extension_number());
      if (extension == nullptr) return Error(response, grpc::StatusCode::NOT_FOUND, "extension not found");
      return AddFile(extension->file(), &seen, response->mutable_file_descriptor_response());
    }
    case rv1::ServerReflectionRequest::kAllExtensionNumbersOfType: {
      const auto* type = pool->FindMessageTypeByName(request.all_extension_numbers_of_type());
      if (type == nullptr) return Error(response, grpc::StatusCode::NOT_FOUND, "type not found");
      std::vector<const google::protobuf::FieldDescriptor*> extensions;
      pool->FindAllExtensions(type, &extensions);
      auto* numbers = response->mutable_all_extension_numbers_response();
      numbers->set_base_type_name(type->full_name());
      for (const auto* e : extensions) numbers->add_extension_number(e->number());
      return;
    }
    case rv1::ServerReflectionRequest::MESSAGE_REQUEST_NOT_SET:
      break;
  }
  Error(response, grpc::StatusCode::INVALID_ARGUMENT, "no message_request set");
}

class ReflectionReactor final : public grpc::ServerBidiReactor<rv1::ServerReflectionRequest, rv1::ServerReflectionResponse> {
 public:
  explicit ReflectionReactor(const std::vector<std::string>* services) : services_(services) { StartRead(&request_); }

  void OnReadDone(bool ok) override {
    if (!ok) {
      Finish(grpc::Status::OK);
      return;
    }
    response_.Clear();
    Answer(*services_, request_, &response_);
    StartWrite(&response_);
  }
  void OnWriteDone(bool ok) override {
    if (!ok) {
      Finish(grpc::Status(grpc::StatusCode::UNKNOWN, "write failed"));
      return;
    }
    StartRead(&request_);
  }
  void OnDone() override { delete this; }

 private:
  const std::vector<std::string>* services_;
  rv1::ServerReflectionRequest request_;
  rv1::ServerReflectionResponse response_;
};

class ReflectionV1Service final : public rv1::ServerReflection::CallbackService {
 public:
  explicit ReflectionV1Service(std::vector<std::string> services) : services_(std::move(services)) {}
  grpc::ServerBidiReactor<rv1::ServerReflectionRequest, rv1::ServerReflectionResponse>* ServerReflectionInfo(
      grpc::CallbackServerContext*) override {
    return new ReflectionReactor(&services_);
  }

 private:
  const std::vector<std::string> services_;
};

}  // namespace

std::unique_ptr<grpc::Service> MakeReflectionV1Service(std::vector<std::string> service_names) {
  return std::make_unique<ReflectionV1Service>(std::move(service_names));
}

}  // namespace kvgate
