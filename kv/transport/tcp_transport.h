// File: the tcp KV transport: a client stream of worker.proto KvTransferChunk to the
// decode worker's kvgate.v1.KvTransfer service. The header goes first (the receiver
// reserves the payload's bytes in its inbox, so memory stays bounded), then every
// layer's payload in chunks of at most chunk_bytes, each with its CRC-32C, then a
// trailer and the half-close; the receiver validates the complete handoff at the trailer
// and delivers it at the half-close. A checksum mismatch is DATA_LOSS, a cancelled or
// disconnected stream frees the reservation.
// Only this file's .cc and the service include gRPC headers.
#pragma once

#include <functional>
#include <memory>
#include <string>

#include "common/channel_factory.h"
#include "kv/transport/kv_transport.h"

namespace grpc {
class Channel;
class Service;
}  // namespace grpc

namespace kvgate::kv {

inline constexpr int64_t kDefaultTransferChunkBytes = int64_t{1} << 20;
// Initial-metadata key the receiver sends once it has reserved a transfer's payload: the
// sender waits for it after the header, so a refused transfer (RESOURCE_EXHAUSTED) sends
// no data.
inline constexpr char kTransferReservedKey[] = "kvgate-transfer-reserved";

// Channels are cached per address. chunk_bytes <= 0 means the default; keep it well under
// the receiver's max receive message size (gRPC's default is 4 MiB).
std::unique_ptr<KvSender> MakeTcpSender(ChannelFactory channels, int64_t chunk_bytes = kDefaultTransferChunkBytes);

// The kvgate.v1.KvTransfer service delivering into `inbox` (not owned; must outlive the
// service). Register it on the decode worker's server. The header travels as one
// message, so the server's max receive message size must fit it: lengths (4 bytes a
// head), the sampler state and, for attention_gate, the gate's causal state (2 * heads'
// * d' floats per prompt token per layer; grpc::ServerBuilder::SetMaxReceiveMessageSize).
// Errors end the stream: a chunk before the header, a duplicate header, a layer or
// offset out of range or out of order, a malformed header or handoff, a chunk after the
// trailer are INVALID_ARGUMENT; a CRC mismatch or data missing at the trailer is DATA_LOSS; the
// inbox's RESOURCE_EXHAUSTED / CANCELLED / ALREADY_EXISTS pass through. Any error or a
// cancelled stream gives the reservation back. A non-empty `internal_token` is required on
// every stream (common/auth.h; UNAUTHENTICATED before anything is reserved).
std::unique_ptr<grpc::Service> MakeKvTransferService(KvInbox* inbox, std::string internal_token = "");

}  // namespace kvgate::kv
