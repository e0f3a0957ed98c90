// The kvgate.v1.KvTransfer service (the tcp transport's receiving edge): one
// ServerReadReactor per Push stream reserves the payload in the inbox on the header,
// checks every chunk's CRC-32C, parses each layer as soon as its bytes are complete,
// validates the handoff at the trailer and delivers it at the sender's half-close (a chunk
// after the trailer is INVALID_ARGUMENT). A header naming device rows (cuda_ipc) has their
// copy into this worker's backend queued at once and awaited before the delivery. Any error or a cancelled stream gives
// the reservation back; no stream, however malformed, can crash the worker.
#include <grpcpp/grpcpp.h>

#include <cstdio>
#include <memory>
#include <string>
#include <string_view>
#include <utility>
#include <vector>

#include "absl/strings/str_cat.h"
#include "common/auth.h"
#include "common/crc32c.h"
#include "common/grpc_status.h"
#include "common/status_macros.h"
#include "kv/transport/handoff_proto.h"
#include "kv/transport/tcp_transport.h"
#include "kvgate/v1/worker.grpc.pb.h"

namespace kvgate::kv {
namespace {

class PushReactor final : public grpc::ServerReadReactor<v1::KvTransferChunk> {
 public:
  PushReactor(KvInbox* inbox, ops::Backend* device_backend, grpc::CallbackServerContext* context,
              v1::KvTransferAck* ack)
      : inbox_(inbox), device_backend_(device_backend), context_(context), ack_(ack) {
    StartRead(&chunk_);
  }

  void OnReadDone(bool ok) override {
    if (!ok) {
      // The client half-closed (after its trailer: the transfer is complete) or the call
      // ended.
      if (context_->IsCancelled()) {
        End(absl::CancelledError("kv transfer cancelled by the sender"));
      } else if (!trailer_seen_) {
        End(absl::DataLossError("kv transfer stream ended before its trailer"));
      } else {
        End(Deliver());
      }
      return;
    }
    if (trailer_seen_) {
      // Reading on until the half-close keeps a sender that writes past its trailer from
      // waiting forever on a stream nobody reads.
      End(absl::InvalidArgumentError(absl::StrCat(Where(), "a chunk after the trailer")));
      return;
    }
    absl::Status s;
    switch (chunk_.chunk_case()) {
      case v1::KvTransferChunk::kHeader:
        s = OnHeader(chunk_.header());
        break;
      case v1::KvTransferChunk::kLayer:
        s = OnLayer(chunk_.layer());
        break;
      case v1::KvTransferChunk::kTrailer:
        s = OnTrailer(chunk_.trailer());
        trailer_seen_ = s.ok();
        break;
      default:
        s = absl::InvalidArgumentError("empty kv transfer chunk");
        break;
    }
    if (!s.ok()) {
      End(s);
      return;
    }
    StartRead(&chunk_);
  }

  void OnDone() override {
    if (reserved_) inbox_->Unreserve(transfer_id_);
    delete this;
  }

 private:
  std::string Where() const { return absl::StrCat("kv transfer ", transfer_id_, ": "); }

  absl::Status OnHeader(const v1::KvTransferHeader& header) {
    if (have_header_) return absl::InvalidArgumentError(absl::StrCat(Where(), "duplicate header"));
    have_header_ = true;
    auto parsed = FromHeaderProto(header);
    if (!parsed.ok()) {
      return absl::InvalidArgumentError(
          absl::StrCat("kv transfer ", header.transfer_id(), ": ", parsed.status().message()));
    }
    transfer_id_ = parsed->shell.transfer_id;
    if (parsed->device_rows && device_backend_ == nullptr) {
      return absl::FailedPreconditionError(
          absl::StrCat(Where(), "its K and V rows are in the sender's GPU memory (cuda_ipc); this decode worker "
                                "takes host rows only"));
    }
    if (absl::Status s = inbox_->Reserve(transfer_id_, parsed->held_bytes()); !s.ok()) return s;
    reserved_ = true;
    header_ = std::move(*parsed);
    handoff_ = std::move(header_.shell);
    if (header_.device_rows) {
      absl::StatusOr<BackendRows> rows = CopyDeviceRows(*header_.device_rows);
      if (!rows.ok()) return absl::Status(rows.status().code(), absl::StrCat(Where(), rows.status().message()));
      device_bytes_ = static_cast<int64_t>(rows->k.bytes() + rows->v.bytes());
      handoff_.backend_rows = std::make_shared<const BackendRows>(*std::move(rows));
    }
    const size_t L = static_cast<size_t>(handoff_.num_layers);
    received_.assign(L, 0);
    parsed_.assign(L, false);
    buffers_.assign(L, std::string());
    // Tells the sender that data may flow (tcp_transport.h kTransferReservedKey).
    context_->AddInitialMetadata(kTransferReservedKey, "1");
    StartSendInitialMetadata();
    return absl::OkStatus();
  }

  // Maps the sender's K and V buffers (the backend keeps each slab of the sender mapped,
  // so only a first transfer pays the open) and queues their copy into buffers of this
  // worker's backend. The copy runs while the layers stream in; Deliver waits for it, so
  // the sender, which frees its buffers when this stream ends, never races it.
  absl::StatusOr<BackendRows> CopyDeviceRows(const DeviceRowsRef& ref) {
    const bool timing = TransferTimingEnabled();
    absl::Time t = absl::Now();
    auto lap = [&](const char* what) {
      if (!timing) return;
      const absl::Time now = absl::Now();
      absl::StrAppend(&phases_, " ", what, " ", absl::ToDoubleMilliseconds(now - t), " ms;");
      t = now;
    };
    BackendRows rows;
    rows.backend = std::string(device_backend_->Name());
    rows.rows = ref.rows;
    rows.head_dim = handoff_.head_dim;
    rows.dtype = ref.dtype;
    const size_t bytes = static_cast<size_t>(ref.buffer_bytes);
    KVGATE_ASSIGN_OR_RETURN(mapped_k_, device_backend_->OpenIpc(ref.k_name, bytes));
    KVGATE_ASSIGN_OR_RETURN(mapped_v_, device_backend_->OpenIpc(ref.v_name, bytes));
    lap("open");
    // From slabs the backend keeps: no cudaMalloc per transfer.
    KVGATE_ASSIGN_OR_RETURN(rows.k, device_backend_->AllocShareable(bytes));
    KVGATE_ASSIGN_OR_RETURN(rows.v, device_backend_->AllocShareable(bytes));
    lap("alloc");
    KVGATE_RETURN_IF_ERROR(device_backend_->CopyWithinBackend(rows.k.data(), mapped_k_.data(), bytes));
    KVGATE_RETURN_IF_ERROR(device_backend_->CopyWithinBackend(rows.v.data(), mapped_v_.data(), bytes));
    lap("queue copy");
    return rows;
  }

  // The queued copy of device rows is done (before the sender may free its buffers).
  absl::Status AwaitDeviceCopy() {
    if (mapped_k_.data() == nullptr && mapped_v_.data() == nullptr) return absl::OkStatus();
    const absl::Time t = absl::Now();
    absl::Status s = device_backend_->Synchronize();
    mapped_k_ = ops::DeviceBuffer();
    mapped_v_ = ops::DeviceBuffer();
    if (TransferTimingEnabled()) {
      std::fprintf(stderr, "receive %s:%s copy wait %.3f ms\n", transfer_id_.c_str(), phases_.c_str(),
                   absl::ToDoubleMilliseconds(absl::Now() - t));
    }
    if (!s.ok()) return absl::Status(s.code(), absl::StrCat(Where(), "copying the device rows: ", s.message()));
    return absl::OkStatus();
  }

  absl::Status OnLayer(const v1::KvLayerChunk& chunk) {
    if (!have_header_) return absl::InvalidArgumentError("kv transfer chunk before the header");
    if (absl::Status alive = inbox_->Touch(transfer_id_); !alive.ok()) {
      reserved_ = false;
      return alive;
    }
    const int32_t layer = chunk.layer();
    if (layer < 0 || layer >= handoff_.num_layers) {
      return absl::InvalidArgumentError(
          absl::StrCat(Where(), "chunk of layer ", layer, " outside [0, ", handoff_.num_layers, ")"));
    }
    const int64_t expected = header_.layer_bytes[layer];
    const int64_t size = static_cast<int64_t>(chunk.data().size());
    if (chunk.offset() != received_[layer] || parsed_[layer]) {
      return absl::InvalidArgumentError(absl::StrCat(Where(), "layer ", layer, " chunk at offset ", chunk.offset(),
                                                     ", expected ", received_[layer], " (chunks of a layer arrive in order, once)"));
    }
    if (size > expected - received_[layer]) {
      return absl::InvalidArgumentError(absl::StrCat(Where(), "layer ", layer, " chunk [", chunk.offset(), ", ",
                                                     chunk.offset() + size, ") beyond its payload of ", expected,
                                                     " bytes"));
    }
    if (Crc32c(chunk.data()) != chunk.crc32c()) {
      return absl::DataLossError(
          absl::StrCat(Where(), "layer ", layer, " chunk at offset ", chunk.offset(), " fails its CRC-32C"));
    }
    std::string& buffer = buffers_[layer];
    if (buffer.empty()) buffer.reserve(static_cast<size_t>(expected));
    buffer.append(chunk.data());
    received_[layer] += size;
    total_received_ += size;
    if (received_[layer] == expected) return ParseBuffered(layer);
    return absl::OkStatus();
  }

  absl::Status ParseBuffered(int32_t layer) {
    absl::Status s = ParseLayer(buffers_[layer], header_.lengths, layer, &handoff_);
    std::string().swap(buffers_[layer]);
    parsed_[layer] = true;
    if (!s.ok()) return absl::InvalidArgumentError(absl::StrCat(Where(), s.message()));
    return absl::OkStatus();
  }

  absl::Status OnTrailer(const v1::KvTransferTrailer& trailer) {
    if (!have_header_) return absl::InvalidArgumentError("kv transfer trailer before the header");
    if (trailer.layers_sent() != handoff_.num_layers) {
      return absl::DataLossError(absl::StrCat(Where(), "the sender sent ", trailer.layers_sent(), " of ",
                                              handoff_.num_layers, " layers"));
    }
    for (int32_t l = 0; l < handoff_.num_layers; ++l) {
      if (parsed_[l]) continue;
      if (header_.layer_bytes[l] != 0) {
        return absl::DataLossError(absl::StrCat(Where(), "layer ", l, ": ", received_[l], " of ",
                                                header_.layer_bytes[l], " bytes arrived before the trailer"));
      }
      if (absl::Status s = ParseBuffered(l); !s.ok()) return s;
    }
    return handoff_.Validate();
  }

  // At the half-close after a valid trailer: hands the transfer to the inbox.
  absl::Status Deliver() {
    if (absl::Status s = AwaitDeviceCopy(); !s.ok()) return s;
    if (absl::Status s = inbox_->Deliver(std::move(handoff_)); !s.ok()) return s;
    reserved_ = false;  // the delivered handoff holds the reservation now
    ack_->set_bytes_received(total_received_ + device_bytes_);
    return absl::OkStatus();
  }

  // Finishes the call once; an error first gives the reservation back, so that a sender
  // seeing the status sees the inbox already freed.
  void End(const absl::Status& status) {
    // A copy still queued must end before the sender learns the stream is over.
    if (!status.ok()) (void)AwaitDeviceCopy();
    if (!status.ok() && reserved_) {
      inbox_->Unreserve(transfer_id_);
      reserved_ = false;
    }
    Finish(ToGrpcStatus(status));
  }

  KvInbox* const inbox_;
  ops::Backend* const device_backend_;  // null: host rows only
  grpc::CallbackServerContext* const context_;
  v1::KvTransferAck* const ack_;
  v1::KvTransferChunk chunk_;
  bool have_header_ = false;
  bool trailer_seen_ = false;  // valid; the transfer is delivered at the half-close
  bool reserved_ = false;
  std::string transfer_id_;
  TransferHeader header_;
  KvHandoff handoff_;
  std::vector<int64_t> received_;     // [num_layers] bytes so far
  std::vector<bool> parsed_;          // [num_layers]
  std::vector<std::string> buffers_;  // [num_layers] bytes of a layer not yet complete
  int64_t total_received_ = 0;
  int64_t device_bytes_ = 0;  // K and V copied from the sender's device memory
  ops::DeviceBuffer mapped_k_, mapped_v_;  // the sender's rows while their copy is queued
  std::string phases_;                      // KVGATE_TRANSFER_TIMING
};

// Refuses a stream that lacks the internal token, before reading anything.
class RefusedPush final : public grpc::ServerReadReactor<v1::KvTransferChunk> {
 public:
  explicit RefusedPush(grpc::Status status) { Finish(std::move(status)); }
  void OnDone() override { delete this; }
};

class KvTransferService final : public v1::KvTransfer::CallbackService {
 public:
  KvTransferService(KvInbox* inbox, std::string internal_token, ops::Backend* device_backend)
      : inbox_(inbox), internal_token_(std::move(internal_token)), device_backend_(device_backend) {}

  grpc::ServerReadReactor<v1::KvTransferChunk>* Push(grpc::CallbackServerContext* context,
                                                     v1::KvTransferAck* ack) override {
    if (grpc::Status auth = CheckInternalToken(*context, internal_token_); !auth.ok()) return new RefusedPush(auth);
    return new PushReactor(inbox_, device_backend_, context, ack);
  }

 private:
  KvInbox* const inbox_;
  const std::string internal_token_;
  ops::Backend* const device_backend_;
};

}  // namespace

std::unique_ptr<grpc::Service> MakeKvTransferService(KvInbox* inbox, std::string internal_token,
                                                     ops::Backend* device_backend) {
  return std::make_unique<KvTransferService>(inbox, std::move(internal_token), device_backend);
}

}  // namespace kvgate::kv
