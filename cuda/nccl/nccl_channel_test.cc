// NcclChannel on one GPU: a one-rank communicator sending to itself (two ranks on one GPU
// are refused by NCCL, "Duplicate GPU detected"). Bytes received equal bytes sent for
// coded values, several sends and receives in one group; bad ops are refused; an
// aborted channel stays broken. Skips without a GPU or without NCCL in the build.
#include "cuda/nccl/nccl_channel.h"

#include <gtest/gtest.h>

#include <cstdint>
#include <vector>

#include "absl/time/clock.h"
#include "cuda/backend.h"
#include "cuda/cuda_backend.h"

namespace kvgate::ops {
namespace {

class NcclChannelTest : public ::testing::Test {
 protected:
  void SetUp() override {
    if (CudaDeviceCount() == 0) GTEST_SKIP() << "no CUDA device visible";
    auto id = NcclChannel::NewUniqueId();
    if (id.status().code() == absl::StatusCode::kUnimplemented) GTEST_SKIP() << id.status();
    ASSERT_TRUE(id.ok()) << id.status();
    auto backend = CreateCudaBackend(0);
    ASSERT_TRUE(backend.ok()) << backend.status();
    backend_ = std::move(*backend);
    auto channel = NcclChannel::Connect(*id, 1, 0, 0, absl::Now() + absl::Seconds(30));
    ASSERT_TRUE(channel.ok()) << channel.status();
    channel_ = std::move(*channel);
  }

  DeviceBuffer Coded(size_t bytes, uint32_t seed) {
    std::vector<uint8_t> host(bytes);
    for (size_t i = 0; i < bytes; ++i) host[i] = static_cast<uint8_t>((i * 2654435761u + seed) >> 13);
    auto buffer = backend_->Alloc(bytes);
    EXPECT_TRUE(buffer.ok());
    EXPECT_TRUE(backend_->CopyToBackend(buffer->data(), host.data(), bytes).ok());
    EXPECT_TRUE(backend_->Synchronize().ok());
    return std::move(*buffer);
  }
  std::vector<uint8_t> Host(const DeviceBuffer& buffer) {
    std::vector<uint8_t> host(buffer.bytes());
    EXPECT_TRUE(backend_->CopyToHost(host.data(), buffer.data(), host.size()).ok());
    return host;
  }

  std::unique_ptr<Backend> backend_;
  std::unique_ptr<NcclChannel> channel_;
};

TEST_F(NcclChannelTest, BytesSentToItselfArriveUnchanged) {
  EXPECT_EQ(channel_->rank(), 0);
  EXPECT_EQ(channel_->nranks(), 1);
  const size_t sizes[] = {1, 4096, (size_t{64} << 20) + 3};  // an odd size and 64 MiB
  std::vector<DeviceBuffer> sent, got;
  std::vector<NcclChannel::Op> ops;
  for (size_t i = 0; i < 3; ++i) {
    sent.push_back(Coded(sizes[i], static_cast<uint32_t>(i)));
    got.push_back(Coded(sizes[i], 99));
    ops.push_back({NcclChannel::Op::kSend, 0, sent.back().data(), sizes[i]});
    ops.push_back({NcclChannel::Op::kRecv, 0, got.back().data(), sizes[i]});
  }
  ops.push_back({NcclChannel::Op::kSend, 0, nullptr, 0});  // nothing to send: skipped
  ASSERT_TRUE(channel_->Transfer(ops, absl::Now() + absl::Seconds(30)).ok());
  for (size_t i = 0; i < 3; ++i) EXPECT_EQ(Host(got[i]), Host(sent[i])) << "buffer " << i;
}

TEST_F(NcclChannelTest, BadOpsAreRefusedAndAnAbortedChannelStaysBroken) {
  DeviceBuffer a = Coded(256, 1);
  EXPECT_EQ(channel_->Transfer({{NcclChannel::Op::kSend, 1, a.data(), 256}}, absl::Now() + absl::Seconds(5)).code(),
            absl::StatusCode::kInvalidArgument);
  EXPECT_EQ(channel_->Transfer({{NcclChannel::Op::kRecv, 0, nullptr, 16}}, absl::Now() + absl::Seconds(5)).code(),
            absl::StatusCode::kInvalidArgument);
  EXPECT_FALSE(channel_->broken());
  channel_->Abort();
  EXPECT_TRUE(channel_->broken());
  EXPECT_EQ(channel_->Transfer({{NcclChannel::Op::kSend, 0, a.data(), 256}}, absl::Now() + absl::Seconds(5)).code(),
            absl::StatusCode::kFailedPrecondition);
}

TEST(NcclChannelIdTest, MalformedIdsAndRanksAreInvalid) {
  const absl::Time soon = absl::Now() + absl::Seconds(1);
  auto bad = NcclChannel::Connect("short", 1, 0, 0, soon);
  if (bad.status().code() == absl::StatusCode::kUnimplemented) GTEST_SKIP() << bad.status();
  EXPECT_EQ(bad.status().code(), absl::StatusCode::kInvalidArgument);
  EXPECT_EQ(NcclChannel::Connect(std::string(128, 'x'), 2, 2, 0, soon).status().code(),
            absl::StatusCode::kInvalidArgument);
}

}  // namespace
}  // namespace kvgate::ops
