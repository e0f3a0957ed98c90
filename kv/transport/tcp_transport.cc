// The tcp transport's sending edge: a client stream of KvTransferChunk through the
// generated kvgate.v1.KvTransfer stub (the service is kv_transfer_service.cc).
#include "kv/transport/tcp_transport.h"

#include <grpcpp/grpcpp.h>

#include <algorithm>
#include <cstdio>
#include <cstdlib>
#include <map>
#include <mutex>
#include <string_view>
#include <utility>

#include "absl/strings/str_cat.h"
#include "absl/time/clock.h"
#include "common/crc32c.h"
#include "common/grpc_status.h"
#include "kv/transport/handoff_proto.h"
#include "kvgate/v1/worker.grpc.pb.h"

namespace kvgate::kv {
namespace {

double MsSince(absl::Time start) { return absl::ToDoubleMilliseconds(absl::Now() - start); }

v1::KvRowDtype ToProto(ops::KvDtype dtype) {
  return dtype == ops::KvDtype::kBf16 ? v1::KV_ROW_DTYPE_BF16 : v1::KV_ROW_DTYPE_FLOAT32;
}

class TcpSender final : public KvSender {
 public:
  // `device_backend` set: the cuda_ipc transport (rows in its memory leave by name).
  TcpSender(ChannelFactory channels, int64_t chunk_bytes, ops::Backend* device_backend)
      : channels_(std::move(channels)),
        chunk_bytes_(chunk_bytes > 0 ? chunk_bytes : kDefaultTransferChunkBytes),
        device_backend_(device_backend) {}

  std::string BackendRowsFor(const std::string& address) const override {
    return device_backend_ != nullptr ? std::string(device_backend_->Name()) : std::string();
  }

  absl::StatusOr<int64_t> Send(const std::string& address, const KvHandoff& handoff, absl::Time deadline) override {
    const std::string what = absl::StrCat("kv transfer ", handoff.transfer_id, " to ", address, ": ");
    const absl::Time t0 = absl::Now();
    if (absl::Status s = handoff.Validate(); !s.ok()) return s;
    v1::KvTransferChunk chunk;
    *chunk.mutable_header() = ToHeaderProto(handoff);
    if (handoff.backend_rows != nullptr) {
      const BackendRows& rows = *handoff.backend_rows;
      if (device_backend_ == nullptr || rows.backend != device_backend_->Name()) {
        return absl::FailedPreconditionError(absl::StrCat(
            what, "its rows are in ", rows.backend, " memory; this transport carries ",
            device_backend_ == nullptr ? std::string("host rows") : std::string(device_backend_->Name()) + " rows"));
      }
      // The buffers stay alive (the caller holds the handoff) until Finish: the receiver
      // has copied them before it answers.
      v1::KvDeviceRows* device = chunk.mutable_header()->mutable_device_rows();
      absl::StatusOr<std::string> k_name = device_backend_->ExportIpc(rows.k);
      if (!k_name.ok()) return absl::Status(k_name.status().code(), absl::StrCat(what, k_name.status().message()));
      absl::StatusOr<std::string> v_name = device_backend_->ExportIpc(rows.v);
      if (!v_name.ok()) return absl::Status(v_name.status().code(), absl::StrCat(what, v_name.status().message()));
      device->set_k_name(*std::move(k_name));
      device->set_v_name(*std::move(v_name));
      device->set_rows(rows.rows);
      device->set_dtype(ToProto(rows.dtype));
    }
    std::shared_ptr<grpc::Channel> channel = Channel(address);
    if (channel == nullptr) return absl::UnavailableError(absl::StrCat(what, "no channel"));
    auto stub = v1::KvTransfer::NewStub(channel);
    grpc::ClientContext context;
    if (deadline != absl::InfiniteFuture()) context.set_deadline(absl::ToChronoTime(deadline));
    v1::KvTransferAck ack;
    std::unique_ptr<grpc::ClientWriter<v1::KvTransferChunk>> writer = stub->Push(&context, &ack);

    const absl::Time t_header = absl::Now();
    bool open = writer->Write(chunk);
    if (open) {
      // The receiver answers the header with initial metadata once it has reserved the
      // payload; a refusal (a full inbox) arrives as the call's status before any data flows.
      writer->WaitForInitialMetadata();
      const auto& metadata = context.GetServerInitialMetadata();
      open = metadata.find(kTransferReservedKey) != metadata.end();
    }
    const absl::Time t_reserved = absl::Now();
    // With K and V by name the layers are a few KB each: corked, they leave together with
    // the trailer instead of paying a round of the gRPC machinery each.
    grpc::WriteOptions layer_options;
    if (handoff.backend_rows != nullptr) layer_options.set_buffer_hint();
    for (int32_t layer = 0; open && layer < handoff.num_layers; ++layer) {
      const std::string payload = SerializeLayer(handoff, layer);
      const std::string_view bytes(payload);
      for (size_t offset = 0; open && offset < bytes.size(); offset += static_cast<size_t>(chunk_bytes_)) {
        const std::string_view data = bytes.substr(offset, static_cast<size_t>(chunk_bytes_));
        chunk.Clear();
        v1::KvLayerChunk* part = chunk.mutable_layer();
        part->set_layer(layer);
        part->set_offset(static_cast<int64_t>(offset));
        part->set_data(data.data(), data.size());
        part->set_crc32c(Crc32c(data));
        open = writer->Write(chunk, layer_options);
      }
    }
    if (open) {
      chunk.Clear();
      chunk.mutable_trailer()->set_layers_sent(handoff.num_layers);
      open = writer->Write(chunk);
    }
    const absl::Time t_layers = absl::Now();
    if (open) writer->WritesDone();
    const grpc::Status status = writer->Finish();
    if (TransferTimingEnabled()) {
      std::fprintf(stderr,
                   "transfer %s: validate, export, stream start %.3f ms, header until reserved %.3f ms, layers %.3f ms, "
                   "finish %.3f ms, total %.3f ms\n",
                   handoff.transfer_id.c_str(), absl::ToDoubleMilliseconds(t_header - t0),
                   absl::ToDoubleMilliseconds(t_reserved - t_header), absl::ToDoubleMilliseconds(t_layers - t_reserved),
                   MsSince(t_layers), MsSince(t0));
    }
    if (!status.ok()) {
      const absl::Status s = FromGrpcStatus(status);
      return absl::Status(s.code(), absl::StrCat(what, s.message()));
    }
    if (!open) return absl::InternalError(absl::StrCat(what, "the stream closed early with status OK"));
    return ack.bytes_received();
  }

 private:
  std::shared_ptr<grpc::Channel> Channel(const std::string& address) {
    std::lock_guard<std::mutex> lock(mu_);
    auto it = channels_by_address_.find(address);
    if (it != channels_by_address_.end()) return it->second;
    std::shared_ptr<grpc::Channel> channel = channels_(address);
    if (channel != nullptr) channels_by_address_.emplace(address, channel);
    return channel;
  }

  const ChannelFactory channels_;
  const int64_t chunk_bytes_;
  ops::Backend* const device_backend_;
  std::mutex mu_;
  std::map<std::string, std::shared_ptr<grpc::Channel>> channels_by_address_;
};

}  // namespace

bool TransferTimingEnabled() {
  static const bool on = [] {
    const char* v = std::getenv("KVGATE_TRANSFER_TIMING");
    return v != nullptr && std::string(v) == "1";
  }();
  return on;
}

std::unique_ptr<KvSender> MakeTcpSender(ChannelFactory channels, int64_t chunk_bytes) {
  return std::make_unique<TcpSender>(std::move(channels), chunk_bytes, nullptr);
}

std::unique_ptr<KvSender> MakeCudaIpcSender(ChannelFactory channels, ops::Backend* backend, int64_t chunk_bytes) {
  return std::make_unique<TcpSender>(std::move(channels), chunk_bytes, backend);
}

}  // namespace kvgate::kv
