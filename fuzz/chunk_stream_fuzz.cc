// File: libFuzzer target for the tcp transport's receiving edge: a kvgate.v1.KvTransfer
// Push stream of worker.proto KvTransferChunk into the real service
// (kv/transport/tcp_transport.h MakeKvTransferService) over an in-process gRPC
// channel, into a KvInbox.
//
// Input: records of a little-endian uint16 size n and n bytes of KvTransferChunk, sent
// in order, then the stream is half-closed. To get past the CRC-32C check, a layer
// chunk's crc32c is replaced by the data's true checksum unless it is 0xFFFFFFFF; a
// header's transfer_id gets a per-run suffix so the inbox's duplicate-id memory does
// not turn every later run into ALREADY_EXISTS.
// Properties: the stream ends with OK (and the inbox then holds a handoff that
// validates) or with INVALID_ARGUMENT / DATA_LOSS / RESOURCE_EXHAUSTED (FAILED_PRECONDITION
// for a header naming device rows: this receiver takes host rows only); afterwards the
// inbox holds nothing (no reservation leaks).
// KVGATE_FUZZ_WRITE_SEEDS=DIR writes the seed corpus to DIR and exits.
#include <grpcpp/grpcpp.h>

#include <cstdint>
#include <cstdlib>
#include <cstring>
#include <filesystem>
#include <fstream>
#include <memory>
#include <string>
#include <vector>

#include "common/crc32c.h"
#include "fuzz/fuzz_util.h"
#include "fuzz/handoff_fuzz_util.h"
#include "kv/kv_handoff.h"
#include "kv/transport/handoff_proto.h"
#include "kv/transport/kv_transport.h"
#include "kv/transport/tcp_transport.h"
#include "kvgate/v1/worker.grpc.pb.h"

namespace {

using kvgate::v1::KvTransferChunk;

struct Receiver {
  kvgate::kv::KvInbox inbox{int64_t{64} << 20};
  std::unique_ptr<grpc::Service> service = kvgate::kv::MakeKvTransferService(&inbox);
  std::unique_ptr<grpc::Server> server;
  std::unique_ptr<kvgate::v1::KvTransfer::Stub> stub;
  Receiver() {
    grpc::ServerBuilder builder;
    builder.RegisterService(service.get());
    int port = 0;
    builder.AddListeningPort("127.0.0.1:0", grpc::InsecureServerCredentials(), &port);
    server = builder.BuildAndStart();
    stub = kvgate::v1::KvTransfer::NewStub(
        grpc::CreateChannel(absl::StrCat("127.0.0.1:", port), grpc::InsecureChannelCredentials()));
  }
};

Receiver& TheReceiver() {
  static Receiver* receiver = new Receiver();  // never destroyed: libFuzzer exits
  return *receiver;
}

void AppendRecord(const KvTransferChunk& chunk, std::string* out) {
  const std::string bytes = chunk.SerializeAsString();
  const uint16_t n = static_cast<uint16_t>(bytes.size());
  out->append(reinterpret_cast<const char*>(&n), 2);
  out->append(bytes);
}

// A whole transfer of `handoff` as the tcp sender sends it, in chunks of `chunk_bytes`.
std::string Stream(const kvgate::kv::KvHandoff& handoff, size_t chunk_bytes, bool trailer) {
  std::string out;
  KvTransferChunk chunk;
  *chunk.mutable_header() = kvgate::kv::ToHeaderProto(handoff);
  AppendRecord(chunk, &out);
  for (int32_t l = 0; l < handoff.num_layers; ++l) {
    const std::string payload = kvgate::kv::SerializeLayer(handoff, l);
    for (size_t at = 0; at < payload.size(); at += chunk_bytes) {
      KvTransferChunk c;
      c.mutable_layer()->set_layer(l);
      c.mutable_layer()->set_offset(static_cast<int64_t>(at));
      c.mutable_layer()->set_data(payload.substr(at, chunk_bytes));
      c.mutable_layer()->set_crc32c(kvgate::Crc32c(c.layer().data()));
      AppendRecord(c, &out);
    }
  }
  if (trailer) {
    KvTransferChunk t;
    t.mutable_trailer()->set_layers_sent(handoff.num_layers);
    AppendRecord(t, &out);
  }
  return out;
}

void WriteSeeds(const std::string& dir) {
  std::filesystem::create_directories(dir);
  std::ofstream(dir + "/plain", std::ios::binary) << Stream(kvgate::fuzz::SeedHandoff(false), 1 << 20, true);
  std::ofstream(dir + "/masks_scores_chunked", std::ios::binary)
      << Stream(kvgate::fuzz::SeedHandoff(true), 40, true);
  std::ofstream(dir + "/no_trailer", std::ios::binary) << Stream(kvgate::fuzz::SeedHandoff(true), 64, false);
  // A cuda_ipc header (K and V named, not sent): refused by this host-rows receiver.
  std::string device = Stream(kvgate::fuzz::SeedHandoff(false), 1 << 20, true);
  KvTransferChunk header;
  uint16_t n = 0;
  std::memcpy(&n, device.data(), 2);
  header.ParseFromString(device.substr(2, n));
  kvgate::v1::KvDeviceRows* rows = header.mutable_header()->mutable_device_rows();
  rows->set_k_name("k-ipc-name");
  rows->set_v_name("v-ipc-name");
  int64_t total = 0;
  for (int32_t length : header.header().lengths()) total += length;
  rows->set_rows(total);
  rows->set_dtype(kvgate::v1::KV_ROW_DTYPE_BF16);
  header.mutable_header()->set_payload_bytes(total * 4);  // positions only (no masks, scores)
  std::string out;
  AppendRecord(header, &out);
  std::ofstream(dir + "/device_rows_header", std::ios::binary) << out + device.substr(2 + n);
}

}  // namespace

extern "C" int LLVMFuzzerInitialize(int*, char***) {
  if (const char* dir = std::getenv("KVGATE_FUZZ_WRITE_SEEDS")) {
    WriteSeeds(dir);
    std::exit(0);
  }
  TheReceiver();
  return 0;
}

extern "C" int LLVMFuzzerTestOneInput(const uint8_t* data, size_t size) {
  if (size > 256 * 1024) return 0;
  static uint64_t run = 0;
  ++run;
  std::vector<KvTransferChunk> chunks;
  std::string transfer_id;
  bool device_rows = false;  // some header names device rows
  for (size_t at = 0; at + 2 <= size && chunks.size() < 256;) {
    uint16_t n = 0;
    std::memcpy(&n, data + at, 2);
    at += 2;
    if (n > size - at) break;
    KvTransferChunk chunk;
    if (!chunk.ParseFromArray(data + at, n)) break;
    at += n;
    if (chunk.has_header()) {
      device_rows = device_rows || chunk.header().has_device_rows();
      chunk.mutable_header()->set_transfer_id(absl::StrCat(chunk.header().transfer_id(), "#", run));
      if (transfer_id.empty()) transfer_id = chunk.header().transfer_id();
    }
    if (chunk.has_layer() && chunk.layer().crc32c() != 0xFFFFFFFFu) {
      chunk.mutable_layer()->set_crc32c(kvgate::Crc32c(chunk.layer().data()));
    }
    chunks.push_back(std::move(chunk));
  }
  if (chunks.empty()) return 0;

  Receiver& r = TheReceiver();
  grpc::ClientContext context;
  kvgate::v1::KvTransferAck ack;
  auto writer = r.stub->Push(&context, &ack);
  for (const KvTransferChunk& chunk : chunks) {
    if (!writer->Write(chunk)) break;  // the receiver ended the stream
  }
  writer->WritesDone();
  const grpc::Status status = writer->Finish();
  switch (status.error_code()) {
    case grpc::StatusCode::OK: {
      KVGATE_FUZZ_CHECK(!transfer_id.empty());
      auto handoff = r.inbox.Await(transfer_id, absl::Now());
      KVGATE_FUZZ_CHECK(handoff.ok(), handoff.status().ToString());
      KVGATE_FUZZ_CHECK(handoff->Validate().ok());
      break;
    }
    case grpc::StatusCode::INVALID_ARGUMENT:
    case grpc::StatusCode::DATA_LOSS:
    case grpc::StatusCode::RESOURCE_EXHAUSTED:
      break;
    case grpc::StatusCode::FAILED_PRECONDITION:
      // A well-formed header naming device rows (cuda_ipc): this receiver has no device.
      KVGATE_FUZZ_CHECK(device_rows, "FAILED_PRECONDITION without device rows: ", status.error_message());
      break;
    default:
      KVGATE_FUZZ_CHECK(false, "status ", status.error_code(), ": ", status.error_message());
  }
  KVGATE_FUZZ_CHECK(r.inbox.pending() == 0 && r.inbox.pending_bytes() == 0, "pending ", r.inbox.pending(),
                    " bytes ", r.inbox.pending_bytes());
  return 0;
}
