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
#include "cuda/backend.h"
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

// KVGATE_TRANSFER_TIMING=1: the senders and the KvTransfer service print each
// transfer's phases to stderr (benchmark breakdowns, bench/kv_transfer_bench).
bool TransferTimingEnabled();

// Channels are cached per address. chunk_bytes <= 0 means the default; keep it well under
// the receiver's max receive message size (gRPC's default is 4 MiB).
std::unique_ptr<KvSender> MakeTcpSender(ChannelFactory channels, int64_t chunk_bytes = kDefaultTransferChunkBytes);

// The cuda_ipc transport: the tcp stream, except that a handoff whose K and V rows are in
// `backend`'s memory (RowsIn::kBackend: BackendRowsFor names `backend` for every
// address) sends them by name (Backend::ExportIpc, header.device_rows) and the layer
// payloads carry positions, masks and scores only. The receiver, another process on a
// GPU that can reach this one, copies the rows into its own memory before it answers;
// Send returns after that answer, so the rows need live only as long as the call.
// Host-row handoffs go as over tcp. `backend` (not owned) must outlive the sender.
std::unique_ptr<KvSender> MakeCudaIpcSender(ChannelFactory channels, ops::Backend* backend,
                                            int64_t chunk_bytes = kDefaultTransferChunkBytes);

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
// `device_backend` (not owned; null: none) takes transfers whose rows come by name
// (cuda_ipc): it maps them (Backend::OpenIpc), copies them into buffers of its own and
// delivers those as the handoff's backend_rows, so it must be on the device of the pool
// that imports them (the same Name()). It is used from gRPC threads, several streams at
// once: give the service an instance no other thread runs ops on (a decode loop's
// instance may be recording a graph of its stream). Without it such a transfer is FAILED_PRECONDITION before anything
// is reserved. The reservation then counts the copies too (TransferHeader::held_bytes).
std::unique_ptr<grpc::Service> MakeKvTransferService(KvInbox* inbox, std::string internal_token = "",
                                                     ops::Backend* device_backend = nullptr);

}  // namespace kvgate::kv
