// File: ChannelFactory, how a component reaches a peer by address ("host:port", or
// "inproc" for a peer in the same process): the caller decides credentials and caching
// (common/grpc_edge.h ChannelPool). A header of its own so that code which only passes
// factories around needs no gRPC headers.
#pragma once

#include <functional>
#include <memory>
#include <string>

namespace grpc {
class Channel;
}  // namespace grpc

namespace kvgate {

// Returns the channel to `address`; null when there is none.
using ChannelFactory = std::function<std::shared_ptr<grpc::Channel>(const std::string& address)>;

}  // namespace kvgate
