// File: the tcp KV transport: a client stream of worker.proto KvTransferChunk to the
// decode worker's kvgate.v1.KvTransfer service. The header goes first (the receiver
// reserves the payload's bytes in its inbox, so memory stays bounded), then every
// layer's payload in chunks of at most chunk_bytes, each with its CRC-32C, then a
// trailer; the receiver validates and delivers the complete handoff. A checksum
// mismatch is DATA_LOSS, a cancelled or disconnected stream frees the reservation.
// Only this file's .cc and the service include gRPC headers.
#pragma once

#include <functional>
#include <memory>
#include <string>

#include "kv_manager/transport/kv_transport.h"

namespace grpc {
class Channel;
class Service;
}  // namespace grpc

namespace kvgate::kv {

inline constexpr int64_t kDefaultTransferChunkBytes = int64_t{1} << 20;

// Opens a channel to host:port (with the caller's credentials: plaintext or TLS).
using ChannelFactory = std::function<std::shared_ptr<grpc::Channel>(const std::string& address)>;

// Channels are cached per address.
std::unique_ptr<KvSender> MakeTcpSender(ChannelFactory channels, int64_t chunk_bytes = kDefaultTransferChunkBytes);

// The kvgate.v1.KvTransfer service delivering into `inbox` (not owned; must outlive the
// service). Register it on the decode worker's server.
std::unique_ptr<grpc::Service> MakeKvTransferService(KvInbox* inbox);

}  // namespace kvgate::kv
