// The tcp transport over a real loopback socket: the KvTransfer service on 127.0.0.1:0
// delivering into a KvInbox, the tcp sender, and raw streams written with the generated
// stub to check that malformed, corrupted or cancelled transfers fail with the right code
// and never leave a reservation behind.
#include "kv/transport/tcp_transport.h"

#include <grpcpp/grpcpp.h>
#include <gtest/gtest.h>

#include <fstream>
#include <iterator>
#include <thread>
#include <vector>

#include "absl/strings/str_cat.h"
#include "absl/time/clock.h"
#include "common/crc32c.h"
#include "kv/tiny_decode_test_util.h"
#include "kv/transport/handoff_proto.h"
#include "kv/transport/transport_test_util.h"
#include "tests/testing/paths.h"
#include "kvgate/v1/worker.grpc.pb.h"

namespace kvgate::kv {
namespace {

using testing::CodedTransfer;
using testing::ExpectSameHandoff;
using testing::WithBackendRows;

absl::Time In(absl::Duration d) { return absl::Now() + d; }

std::shared_ptr<grpc::Channel> Insecure(const std::string& address) {
  return grpc::CreateChannel(address, grpc::InsecureChannelCredentials());
}

class TcpTransportTest : public ::testing::Test {
 protected:
  // `device_backend`: the service takes device rows (cuda_ipc) on it.
  void StartServer(int64_t inbox_bytes, ops::Backend* device_backend = nullptr) {
    StopServer();
    inbox_ = std::make_unique<KvInbox>(inbox_bytes);
    service_ = MakeKvTransferService(inbox_.get(), "", device_backend);
    grpc::ServerBuilder builder;
    int port = 0;
    builder.AddListeningPort("127.0.0.1:0", grpc::InsecureServerCredentials(), &port);
    builder.RegisterService(service_.get());
    server_ = builder.BuildAndStart();
    ASSERT_NE(server_, nullptr);
    ASSERT_GT(port, 0);
    address_ = absl::StrCat("127.0.0.1:", port);
  }
  void StopServer() {
    if (server_ != nullptr) server_->Shutdown(absl::ToChronoTime(In(absl::Seconds(5))));
    server_.reset();
  }
  void SetUp() override { StartServer(int64_t{64} << 20); }
  void TearDown() override { StopServer(); }

  // The server gives a failed stream's reservation back before it finishes the call,
  // but a client-side cancel returns before the server has seen it: wait for it then.
  void ExpectInboxEmpty() {
    const absl::Time give_up = In(absl::Seconds(10));
    while (inbox_->pending_bytes() != 0 && absl::Now() < give_up) std::this_thread::yield();
    EXPECT_EQ(inbox_->pending_bytes(), 0) << "a reservation was left behind";
    EXPECT_EQ(inbox_->pending(), 0);
  }

  std::unique_ptr<v1::KvTransfer::Stub> Stub() { return v1::KvTransfer::NewStub(Insecure(address_)); }

  std::unique_ptr<KvInbox> inbox_;
  std::unique_ptr<grpc::Service> service_;
  std::unique_ptr<grpc::Server> server_;
  std::string address_;
};

// A raw Push written chunk by chunk; Finish gives the server's status.
struct RawPush {
  grpc::ClientContext context;
  v1::KvTransferAck ack;
  std::unique_ptr<grpc::ClientWriter<v1::KvTransferChunk>> writer;

  explicit RawPush(v1::KvTransfer::Stub* stub) {
    context.set_deadline(absl::ToChronoTime(In(absl::Seconds(20))));
    writer = stub->Push(&context, &ack);
  }
  bool Header(const v1::KvTransferHeader& header) {
    v1::KvTransferChunk chunk;
    *chunk.mutable_header() = header;
    return writer->Write(chunk);
  }
  bool Layer(int32_t layer, int64_t offset, const std::string& data, uint32_t crc) {
    v1::KvTransferChunk chunk;
    chunk.mutable_layer()->set_layer(layer);
    chunk.mutable_layer()->set_offset(offset);
    chunk.mutable_layer()->set_data(data);
    chunk.mutable_layer()->set_crc32c(crc);
    return writer->Write(chunk);
  }
  bool Layer(int32_t layer, int64_t offset, const std::string& data) {
    return Layer(layer, offset, data, Crc32c(data));
  }
  bool Trailer(int32_t layers) {
    v1::KvTransferChunk chunk;
    chunk.mutable_trailer()->set_layers_sent(layers);
    return writer->Write(chunk);
  }
  // True when the receiver reserved the transfer (tcp_transport.h kTransferReservedKey).
  bool Reserved() {
    writer->WaitForInitialMetadata();
    const auto& metadata = context.GetServerInitialMetadata();
    return metadata.find(kTransferReservedKey) != metadata.end();
  }
  absl::StatusCode Finish() {
    writer->WritesDone();
    return static_cast<absl::StatusCode>(writer->Finish().error_code());
  }
};

TEST_F(TcpTransportTest, RealSnapkvHandoffArrivesIdentical) {
  auto worker = testing::TinyWorker::Create(256);
  ASSERT_TRUE(worker.ok()) << worker.status();
  auto tokenizer = testing::LoadTinyTokenizer();
  ASSERT_TRUE(tokenizer.ok());
  auto prompt = testing::TinyText((*worker)->model.get(), tokenizer->get(), "Once upon a time", 100, 9);
  ASSERT_TRUE(prompt.ok()) << prompt.status();
  testing::TinyGates gates((*worker)->shape());
  testing::PolicyCase snapkv = testing::DecodePolicyCases(gates)[2];
  ASSERT_EQ(snapkv.name, "snapkv");
  auto prefilled = testing::PrefillAndCommit(*(*worker)->model, (*worker)->pool.get(), snapkv, *prompt);
  ASSERT_TRUE(prefilled.ok()) << prefilled.status();
  auto handoff = ExportSequence((*worker)->pool.get(), prefilled->sequence->layout());
  ASSERT_TRUE(handoff.ok()) << handoff.status();
  handoff->transfer_id = "snapkv-1";
  handoff->request_id = "req-7";
  handoff->first_token = testing::Argmax(prefilled->logits);
  handoff->sampler_state = std::string("sampler\0state", 13);
  CarryDecodeEviction(prefilled->sequence->evictor(), &*handoff);

  std::unique_ptr<KvSender> sender = MakeTcpSender(Insecure);
  auto bytes = sender->Send(address_, *handoff, In(absl::Seconds(20)));
  ASSERT_TRUE(bytes.ok()) << bytes.status();
  EXPECT_EQ(*bytes, handoff->PayloadBytes());
  auto got = inbox_->Await("snapkv-1", In(absl::Seconds(5)));
  ASSERT_TRUE(got.ok()) << got.status();
  ExpectSameHandoff(*handoff, *got);
  EXPECT_EQ(inbox_->pending_bytes(), 0);

  // A second send of the same transfer id is refused at the header.
  EXPECT_EQ(sender->Send(address_, *handoff, In(absl::Seconds(20))).status().code(),
            absl::StatusCode::kAlreadyExists);
  ExpectInboxEmpty();
}

// tcp carries host rows; a handoff whose rows stayed in backend memory is refused
// before anything is sent.
TEST_F(TcpTransportTest, BackendRowsAreRefused) {
  auto backend = ops::CreateBackend("cpu");
  ASSERT_TRUE(backend.ok()) << backend.status();
  const KvHandoff sent = WithBackendRows(CodedTransfer("backend-rows", 5), backend->get());
  std::unique_ptr<KvSender> sender = MakeTcpSender(Insecure);
  EXPECT_EQ(sender->BackendRowsFor(address_), "");
  auto bytes = sender->Send(address_, sent, In(absl::Seconds(20)));
  EXPECT_EQ(bytes.status().code(), absl::StatusCode::kFailedPrecondition) << bytes.status();
  ExpectInboxEmpty();
}

// The cuda_ipc sender on a backend without inter-process memory: it offers its backend's
// rows (BackendRowsFor), cannot name them (UNIMPLEMENTED, before any stream starts), and
// sends host rows as tcp does.
TEST_F(TcpTransportTest, CudaIpcSenderWithoutInterProcessMemory) {
  auto backend = ops::CreateBackend("cpu");
  ASSERT_TRUE(backend.ok()) << backend.status();
  std::unique_ptr<KvSender> sender = MakeCudaIpcSender(Insecure, backend->get());
  EXPECT_EQ(sender->BackendRowsFor(address_), "cpu");
  const KvHandoff host = CodedTransfer("ipc-host", 7, /*masks=*/true, /*scores=*/false);
  auto bytes = sender->Send(address_, WithBackendRows(host, backend->get()), In(absl::Seconds(20)));
  EXPECT_EQ(bytes.status().code(), absl::StatusCode::kUnimplemented) << bytes.status();
  ExpectInboxEmpty();
  bytes = sender->Send(address_, host, In(absl::Seconds(20)));
  ASSERT_TRUE(bytes.ok()) << bytes.status();
  EXPECT_EQ(*bytes, host.PayloadBytes());
  auto got = inbox_->Await("ipc-host", In(absl::Seconds(5)));
  ASSERT_TRUE(got.ok()) << got.status();
  ExpectSameHandoff(host, *got);
}

// A header naming device rows: a receiver that takes host rows only refuses it before
// reserving anything; one with a backend that cannot map them gives the reservation
// back. Neither leaves anything in the inbox.
TEST_F(TcpTransportTest, DeviceRowsTheReceiverCannotTakeAreRefused) {
  auto backend = ops::CreateBackend("cpu");
  ASSERT_TRUE(backend.ok()) << backend.status();
  const KvHandoff sent = WithBackendRows(CodedTransfer("ipc-refused", 4), backend->get());
  v1::KvTransferHeader header = ToHeaderProto(sent);
  header.mutable_device_rows()->set_k_name("not a handle");
  header.mutable_device_rows()->set_v_name("not a handle");
  header.mutable_device_rows()->set_rows(sent.backend_rows->rows);
  header.mutable_device_rows()->set_dtype(v1::KV_ROW_DTYPE_FLOAT32);
  {
    auto stub = Stub();
    RawPush push(stub.get());
    push.Header(header);
    EXPECT_EQ(push.Finish(), absl::StatusCode::kFailedPrecondition);
    ExpectInboxEmpty();
  }
  // The same stream to a receiver whose backend is cpu.
  StartServer(int64_t{64} << 20, backend->get());
  {
    auto stub = Stub();
    RawPush push(stub.get());
    push.Header(header);
    EXPECT_EQ(push.Finish(), absl::StatusCode::kUnimplemented);
    ExpectInboxEmpty();
  }
}

TEST_F(TcpTransportTest, SmallChunksSplitCorrectly) {
  for (int64_t chunk_bytes : {int64_t{4096}, int64_t{1000}, int64_t{1}}) {
    SCOPED_TRACE(chunk_bytes);
    // Layers of ~30 KB (masks and scores included) in many chunks; chunk size 1 on a
    // smaller one.
    const int32_t rows = chunk_bytes == 1 ? 3 : 200;
    const KvHandoff sent = CodedTransfer(absl::StrCat("chunks-", chunk_bytes), rows, /*masks=*/true,
                                         /*scores=*/true, 2, 3, 16);
    if (chunk_bytes > 1) {
      ASSERT_GT(sent.LayerPayloadBytes(1), 5 * chunk_bytes);
    }
    std::unique_ptr<KvSender> sender = MakeTcpSender(Insecure, chunk_bytes);
    auto bytes = sender->Send(address_, sent, In(absl::Seconds(20)));
    ASSERT_TRUE(bytes.ok()) << bytes.status();
    EXPECT_EQ(*bytes, sent.PayloadBytes());
    auto got = inbox_->Await(sent.transfer_id, In(absl::Seconds(5)));
    ASSERT_TRUE(got.ok()) << got.status();
    ExpectSameHandoff(sent, *got);
  }
}

TEST_F(TcpTransportTest, CorruptedChunkIsDataLossAndFreesTheReservation) {
  const KvHandoff sent = CodedTransfer("corrupt", 50);
  auto stub = Stub();
  RawPush push(stub.get());
  ASSERT_TRUE(push.Header(ToHeaderProto(sent)));
  ASSERT_TRUE(push.Reserved());
  EXPECT_EQ(inbox_->pending_bytes(), sent.PayloadBytes()) << "reserved while streaming";
  std::string layer = SerializeLayer(sent, 0);
  const uint32_t crc = Crc32c(layer);
  layer[layer.size() / 2] ^= 0x01;  // one flipped bit in flight
  push.Layer(0, 0, layer, crc);
  EXPECT_EQ(push.Finish(), absl::StatusCode::kDataLoss);
  ExpectInboxEmpty();
}

TEST_F(TcpTransportTest, MalformedStreamsFailCleanly) {
  const KvHandoff sent = CodedTransfer("bad", 10);
  const v1::KvTransferHeader header = ToHeaderProto(sent);
  const std::string layer0 = SerializeLayer(sent, 0), layer1 = SerializeLayer(sent, 1);
  auto stub = Stub();
  struct Case {
    const char* name;
    std::function<void(RawPush&)> write;
    absl::StatusCode code;
  };
  const std::vector<Case> cases = {
      {"chunk before header", [&](RawPush& p) { p.Layer(0, 0, layer0); }, absl::StatusCode::kInvalidArgument},
      {"trailer before header", [&](RawPush& p) { p.Trailer(2); }, absl::StatusCode::kInvalidArgument},
      {"empty chunk", [&](RawPush& p) { p.writer->Write(v1::KvTransferChunk()); }, absl::StatusCode::kInvalidArgument},
      {"bad header", [&](RawPush& p) {
         v1::KvTransferHeader bad = header;
         bad.set_payload_bytes(1);
         p.Header(bad);
       }, absl::StatusCode::kInvalidArgument},
      {"duplicate header", [&](RawPush& p) { p.Header(header), p.Header(header); }, absl::StatusCode::kInvalidArgument},
      {"layer out of range", [&](RawPush& p) { p.Header(header), p.Layer(2, 0, layer0); },
       absl::StatusCode::kInvalidArgument},
      {"negative layer", [&](RawPush& p) { p.Header(header), p.Layer(-1, 0, layer0); },
       absl::StatusCode::kInvalidArgument},
      {"offset beyond payload", [&](RawPush& p) { p.Header(header), p.Layer(1, layer1.size() + 8, "abcd"); },
       absl::StatusCode::kInvalidArgument},
      {"data beyond payload", [&](RawPush& p) { p.Header(header), p.Layer(1, 0, layer1 + "tail"); },
       absl::StatusCode::kInvalidArgument},
      {"chunk twice", [&](RawPush& p) {
         p.Header(header), p.Layer(1, 0, layer1.substr(0, 64)), p.Layer(1, 0, layer1.substr(0, 64));
       }, absl::StatusCode::kInvalidArgument},
      {"missing data at trailer", [&](RawPush& p) {
         p.Header(header), p.Layer(0, 0, layer0), p.Layer(1, 0, layer1.substr(0, 64)), p.Trailer(2);
       }, absl::StatusCode::kDataLoss},
      {"layers_sent short", [&](RawPush& p) { p.Header(header), p.Layer(0, 0, layer0), p.Trailer(1); },
       absl::StatusCode::kDataLoss},
      {"no trailer", [&](RawPush& p) { p.Header(header), p.Layer(0, 0, layer0), p.Layer(1, 0, layer1); },
       absl::StatusCode::kDataLoss},
      // A complete transfer that writes on: refused, and nothing delivered (the sender
      // below could not deliver "bad" again otherwise).
      {"chunk after trailer", [&](RawPush& p) {
         p.Header(header), p.Layer(0, 0, layer0), p.Layer(1, 0, layer1), p.Trailer(2), p.Trailer(2);
       }, absl::StatusCode::kInvalidArgument},
      {"empty chunk after trailer", [&](RawPush& p) {
         p.Header(header), p.Layer(0, 0, layer0), p.Layer(1, 0, layer1), p.Trailer(2);
         p.writer->Write(v1::KvTransferChunk());
       }, absl::StatusCode::kInvalidArgument},
  };
  for (const Case& c : cases) {
    SCOPED_TRACE(c.name);
    RawPush push(stub.get());
    c.write(push);
    EXPECT_EQ(push.Finish(), c.code);
    ExpectInboxEmpty();
  }
  // The service still works after all of that.
  std::unique_ptr<KvSender> sender = MakeTcpSender(Insecure);
  ASSERT_TRUE(sender->Send(address_, sent, In(absl::Seconds(20))).ok());
  EXPECT_TRUE(inbox_->Await("bad", In(absl::Seconds(5))).ok());
}

// chunk_stream_fuzz found it (testdata/chunk_stream_fuzz-chunks_after_trailer.bin: a
// valid transfer, its trailer, then two empty chunks; records of a little-endian uint16
// size and a KvTransferChunk, read as the fuzz target reads them). The service finished the
// call at the trailer and stopped reading, and the client's third write after it blocked
// forever on an in-process channel. Now it reads on and refuses the extra chunks.
TEST(TcpTransportRegressionTest, ChunksAfterTheTrailerAreRefusedNotLeftUnread) {
  std::ifstream in(kvgate::testing::SourceDir() / "kv" / "transport" / "testdata" /
                       "chunk_stream_fuzz-chunks_after_trailer.bin",
                   std::ios::binary);
  ASSERT_TRUE(in.good());
  const std::string bytes((std::istreambuf_iterator<char>(in)), std::istreambuf_iterator<char>());
  std::vector<v1::KvTransferChunk> chunks;
  for (size_t at = 0; at + 2 <= bytes.size();) {
    const size_t n = static_cast<uint8_t>(bytes[at]) | (static_cast<size_t>(static_cast<uint8_t>(bytes[at + 1])) << 8);
    at += 2;
    if (n > bytes.size() - at) break;
    v1::KvTransferChunk chunk;
    ASSERT_TRUE(chunk.ParseFromArray(bytes.data() + at, static_cast<int>(n)));
    at += n;
    // The fuzz target stamps each layer chunk with its data's true CRC-32C.
    if (chunk.has_layer()) chunk.mutable_layer()->set_crc32c(Crc32c(chunk.layer().data()));
    chunks.push_back(std::move(chunk));
  }
  ASSERT_EQ(chunks.size(), 6u);
  ASSERT_TRUE(chunks[3].has_trailer());
  KvInbox inbox(int64_t{64} << 20);
  std::unique_ptr<grpc::Service> service = MakeKvTransferService(&inbox);
  grpc::ServerBuilder builder;
  builder.RegisterService(service.get());
  std::unique_ptr<grpc::Server> server = builder.BuildAndStart();
  std::unique_ptr<v1::KvTransfer::Stub> stub = v1::KvTransfer::NewStub(server->InProcessChannel({}));
  grpc::ClientContext context;
  context.set_deadline(absl::ToChronoTime(In(absl::Seconds(20))));  // a regression fails, not hangs
  v1::KvTransferAck ack;
  std::unique_ptr<grpc::ClientWriter<v1::KvTransferChunk>> writer = stub->Push(&context, &ack);
  for (const v1::KvTransferChunk& chunk : chunks) {
    if (!writer->Write(chunk)) break;
  }
  writer->WritesDone();
  const grpc::Status status = writer->Finish();
  EXPECT_EQ(status.error_code(), grpc::StatusCode::INVALID_ARGUMENT) << status.error_message();
  EXPECT_NE(status.error_message().find("after the trailer"), std::string::npos) << status.error_message();
  EXPECT_EQ(inbox.pending(), 0);
  EXPECT_EQ(inbox.pending_bytes(), 0);
  EXPECT_FALSE(inbox.Await(chunks[0].header().transfer_id(), absl::Now()).ok()) << "nothing was delivered";
  // Without the extra chunks the same transfer is delivered at the half-close.
  grpc::ClientContext again;
  again.set_deadline(absl::ToChronoTime(In(absl::Seconds(20))));
  std::unique_ptr<grpc::ClientWriter<v1::KvTransferChunk>> up_to_trailer = stub->Push(&again, &ack);
  for (size_t i = 0; i < 4; ++i) ASSERT_TRUE(up_to_trailer->Write(chunks[i]));
  up_to_trailer->WritesDone();
  const grpc::Status delivered = up_to_trailer->Finish();
  ASSERT_TRUE(delivered.ok()) << delivered.error_message();
  EXPECT_TRUE(inbox.Await(chunks[0].header().transfer_id(), absl::Now()).ok());
  server->Shutdown();
}

TEST_F(TcpTransportTest, CancelledTransfersFreeTheReservation) {
  const KvHandoff sent = CodedTransfer("cancel", 40);
  auto stub = Stub();
  {
    // The sender gives up mid-stream.
    RawPush push(stub.get());
    ASSERT_TRUE(push.Header(ToHeaderProto(sent)));
    ASSERT_TRUE(push.Reserved());
    ASSERT_TRUE(push.Layer(0, 0, SerializeLayer(sent, 0)));
    EXPECT_EQ(inbox_->pending_bytes(), sent.PayloadBytes());
    push.context.TryCancel();
    EXPECT_EQ(push.Finish(), absl::StatusCode::kCancelled);
    ExpectInboxEmpty();
  }
  {
    // The decode side cancels the transfer while it streams (the request was aborted).
    KvHandoff other = sent;
    other.transfer_id = "cancel-2";
    RawPush push(stub.get());
    ASSERT_TRUE(push.Header(ToHeaderProto(other)));
    ASSERT_TRUE(push.Reserved());
    EXPECT_TRUE(inbox_->Cancel("cancel-2"));
    EXPECT_EQ(inbox_->pending_bytes(), 0);
    push.Layer(0, 0, SerializeLayer(other, 0));
    push.Layer(1, 0, SerializeLayer(other, 1));
    push.Trailer(2);
    EXPECT_EQ(push.Finish(), absl::StatusCode::kCancelled);
    ExpectInboxEmpty();
    // And the sender sees CANCELLED for a transfer cancelled before it started.
    std::unique_ptr<KvSender> sender = MakeTcpSender(Insecure);
    EXPECT_EQ(sender->Send(address_, other, In(absl::Seconds(20))).status().code(), absl::StatusCode::kCancelled);
  }
  // The deadline of the sender's ClientContext: a transfer past it never starts.
  std::unique_ptr<KvSender> sender = MakeTcpSender(Insecure);
  EXPECT_EQ(sender->Send(address_, sent, absl::Now() - absl::Seconds(1)).status().code(),
            absl::StatusCode::kDeadlineExceeded);
  ExpectInboxEmpty();
}

TEST_F(TcpTransportTest, InboxCapRefusesAtTheHeaderBeforeDataFlows) {
  const KvHandoff sent = CodedTransfer("big", 300, /*masks=*/false, /*scores=*/false, 2, 3, 16);
  StartServer(sent.PayloadBytes() / 2);  // a second server on its own port and inbox
  auto stub = Stub();
  RawPush push(stub.get());
  ASSERT_TRUE(push.Header(ToHeaderProto(sent)));
  EXPECT_FALSE(push.Reserved()) << "the receiver must refuse before any layer byte";
  EXPECT_EQ(push.Finish(), absl::StatusCode::kResourceExhausted);
  std::unique_ptr<KvSender> sender = MakeTcpSender(Insecure, 4096);
  EXPECT_EQ(sender->Send(address_, sent, In(absl::Seconds(20))).status().code(),
            absl::StatusCode::kResourceExhausted);
  ExpectInboxEmpty();
  // A transfer that fits goes through.
  const KvHandoff small = CodedTransfer("small", 20);
  ASSERT_LT(small.PayloadBytes(), sent.PayloadBytes() / 2);
  EXPECT_TRUE(sender->Send(address_, small, In(absl::Seconds(20))).ok());
}

TEST_F(TcpTransportTest, UnreachableReceiverIsUnavailable) {
  // A port that was just served and is closed now.
  const std::string gone = address_;
  StopServer();
  std::unique_ptr<KvSender> sender = MakeTcpSender(Insecure);
  EXPECT_EQ(sender->Send(gone, CodedTransfer("nobody", 3), In(absl::Seconds(10))).status().code(),
            absl::StatusCode::kUnavailable);
}

}  // namespace
}  // namespace kvgate::kv
