// File: gRPC server reflection v1 (grpc.reflection.v1.ServerReflection) served from this
// process's generated descriptor pool. gRPC 1.51 (Debian 12) serves only v1alpha through
// its reflection plugin; clients such as newer grpcurl and Postman ask for v1 first.
// StartServer (common/grpc_edge.h) registers it on every server.
#pragma once

#include <memory>
#include <string>
#include <vector>

namespace grpc {
class Service;
}  // namespace grpc

namespace kvgate {

// The reflection v1 service; list_services answers `service_names` (full names).
std::unique_ptr<grpc::Service> MakeReflectionV1Service(std::vector<std::string> service_names);

}  // namespace kvgate
