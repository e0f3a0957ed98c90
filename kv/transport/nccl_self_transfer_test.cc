// The nccl transport's data path on one GPU: a sequence's kept rows packed from one pool
// (ExportSequence, RowsIn::kBackend: one gather per tensor), sent through a real NCCL
// communicator of one rank to itself (two ranks on one GPU are refused by NCCL) into
// fresh device buffers, and scattered into another pool's pages (ImportSequence of
// backend rows). The rows read back from the second pool equal those of the first, bit
// for bit, for float32 and bf16 pools. Skips without a GPU or without NCCL in the build.
#include <gtest/gtest.h>

#include <cstring>
#include <memory>
#include <vector>

#include "absl/time/clock.h"
#include "cuda/backend.h"
#include "cuda/cuda_backend.h"
#include "cuda/nccl/nccl_channel.h"
#include "kv/kv_handoff.h"
#include "kv/kv_pool.h"
#include "kv/transport/transport_test_util.h"

namespace kvgate::kv {
namespace {

TEST(NcclSelfTransferTest, PackedRowsCrossAndScatterBitExact) {
  if (ops::CudaDeviceCount() == 0) GTEST_SKIP() << "no CUDA device visible";
  auto id = ops::NcclChannel::NewUniqueId();
  if (id.status().code() == absl::StatusCode::kUnimplemented) GTEST_SKIP() << id.status();
  ASSERT_TRUE(id.ok()) << id.status();
  auto backend = ops::CreateCudaBackend(0);
  ASSERT_TRUE(backend.ok()) << backend.status();
  auto channel = ops::NcclChannel::Connect(*id, 1, 0, 0, absl::Now() + absl::Seconds(30));
  ASSERT_TRUE(channel.ok()) << channel.status();
  for (ops::KvDtype dtype : {ops::KvDtype::kFloat32, ops::KvDtype::kBf16}) {
    SCOPED_TRACE(ops::KvDtypeName(dtype));
    const KvHandoff coded = testing::CodedTransfer("nccl-self", 300, /*masks=*/true, /*scores=*/true, 4, 8, 128);
    auto sender_pool = KvPool::Create(backend->get(), 2048, 16, 128, dtype);
    auto receiver_pool = KvPool::Create(backend->get(), 2048, 16, 128, dtype);
    ASSERT_TRUE(sender_pool.ok() && receiver_pool.ok());
    auto sent_layout = ImportSequence(sender_pool->get(), coded);
    ASSERT_TRUE(sent_layout.ok()) << sent_layout.status();
    auto packed = ExportSequence(sender_pool->get(), *sent_layout, RowsIn::kBackend);
    ASSERT_TRUE(packed.ok()) << packed.status();
    const BackendRows& rows = *packed->backend_rows;
    auto arrived = std::make_shared<BackendRows>();
    arrived->backend = rows.backend;
    arrived->rows = rows.rows;
    arrived->head_dim = rows.head_dim;
    arrived->dtype = rows.dtype;
    auto k = (*backend)->Alloc(rows.k.bytes());
    auto v = (*backend)->Alloc(rows.v.bytes());
    ASSERT_TRUE(k.ok() && v.ok());
    arrived->k = std::move(*k);
    arrived->v = std::move(*v);
    using Op = ops::NcclChannel::Op;
    ASSERT_TRUE((*channel)
                    ->Transfer({{Op::kSend, 0, rows.k.data(), rows.k.bytes()},
                                {Op::kSend, 0, rows.v.data(), rows.v.bytes()},
                                {Op::kRecv, 0, arrived->k.data(), rows.k.bytes()},
                                {Op::kRecv, 0, arrived->v.data(), rows.v.bytes()}},
                               absl::Now() + absl::Seconds(30))
                    .ok());
    KvHandoff received = *packed;
    received.backend_rows = arrived;
    auto got_layout = ImportSequence(receiver_pool->get(), received);
    ASSERT_TRUE(got_layout.ok()) << got_layout.status();
    auto want = ExportSequence(sender_pool->get(), *sent_layout, RowsIn::kHost);
    auto got = ExportSequence(receiver_pool->get(), *got_layout, RowsIn::kHost);
    ASSERT_TRUE(want.ok() && got.ok());
    ASSERT_EQ(got->heads.size(), want->heads.size());
    for (size_t i = 0; i < want->heads.size(); ++i) {
      EXPECT_EQ(got->heads[i].positions, want->heads[i].positions) << "head " << i;
      EXPECT_EQ(got->heads[i].query_mask, want->heads[i].query_mask) << "head " << i;
      EXPECT_EQ(got->heads[i].scores, want->heads[i].scores) << "head " << i;
      ASSERT_EQ(got->heads[i].k.size(), want->heads[i].k.size());
      EXPECT_EQ(0, std::memcmp(got->heads[i].k.data(), want->heads[i].k.data(), got->heads[i].k.size() * 4));
      EXPECT_EQ(0, std::memcmp(got->heads[i].v.data(), want->heads[i].v.data(), got->heads[i].v.size() * 4));
    }
    ASSERT_TRUE((*sender_pool)->Release(&*sent_layout).ok());
    ASSERT_TRUE((*receiver_pool)->Release(&*got_layout).ok());
    EXPECT_EQ((*receiver_pool)->pages_used(), 0);
  }
}

}  // namespace
}  // namespace kvgate::kv
