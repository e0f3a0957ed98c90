// KvInbox (thread-safe waiting, deadlines, cancellation, the byte cap, duplicates,
// reservations) and the in-process transport.
#include "kv/transport/kv_transport.h"

#include <gtest/gtest.h>

#include <atomic>
#include <thread>
#include <vector>

#include "absl/strings/str_cat.h"
#include "absl/time/clock.h"
#include "kv/transport/transport_test_util.h"

namespace kvgate::kv {
namespace {

using testing::CodedTransfer;
using testing::ExpectSameHandoff;
using testing::WithBackendRows;

absl::Time In(absl::Duration d) { return absl::Now() + d; }

// Spins (yielding) until `inbox` has `count` waiters: the waiter thread is blocked in
// Await before the test goes on.
void WaitForWaiters(const KvInbox& inbox, int32_t count) {
  const absl::Time give_up = In(absl::Seconds(10));
  while (inbox.waiting() < count && absl::Now() < give_up) std::this_thread::yield();
  ASSERT_EQ(inbox.waiting(), count);
}

TEST(KvInboxTest, AwaitAfterDelivery) {
  KvInbox inbox(1 << 20);
  const KvHandoff sent = CodedTransfer("a", 5, /*masks=*/true, /*scores=*/true);
  ASSERT_TRUE(inbox.Deliver(sent).ok());
  EXPECT_EQ(inbox.pending(), 1);
  EXPECT_EQ(inbox.pending_bytes(), sent.PayloadBytes());
  auto got = inbox.Await("a", In(absl::Seconds(5)));
  ASSERT_TRUE(got.ok()) << got.status();
  ExpectSameHandoff(sent, *got);
  EXPECT_EQ(inbox.pending(), 0);
  EXPECT_EQ(inbox.pending_bytes(), 0);
  EXPECT_EQ(inbox.waiting(), 0);
}

TEST(KvInboxTest, AwaitBeforeDelivery) {
  KvInbox inbox(1 << 20);
  const KvHandoff sent = CodedTransfer("b", 7);
  absl::StatusOr<KvHandoff> got = absl::UnknownError("not run");
  std::thread waiter([&] { got = inbox.Await("b", In(absl::Seconds(10))); });
  WaitForWaiters(inbox, 1);
  ASSERT_TRUE(inbox.Deliver(sent).ok());
  waiter.join();
  ASSERT_TRUE(got.ok()) << got.status();
  ExpectSameHandoff(sent, *got);
  EXPECT_EQ(inbox.waiting(), 0);
  EXPECT_EQ(inbox.pending_bytes(), 0);
}

TEST(KvInboxTest, DeadlineExceeded) {
  KvInbox inbox(1 << 20);
  const absl::Time start = absl::Now();
  EXPECT_EQ(inbox.Await("late", In(absl::Milliseconds(50))).status().code(), absl::StatusCode::kDeadlineExceeded);
  EXPECT_GE(absl::Now() - start, absl::Milliseconds(50));
  EXPECT_EQ(inbox.Await("late", absl::InfinitePast()).status().code(), absl::StatusCode::kDeadlineExceeded);
  EXPECT_EQ(inbox.waiting(), 0);
  // The transfer may still arrive and be taken later.
  ASSERT_TRUE(inbox.Deliver(CodedTransfer("late", 2)).ok());
  EXPECT_TRUE(inbox.Await("late", absl::InfinitePast()).ok());
}

TEST(KvInboxTest, CancelBeforeDelivery) {
  KvInbox inbox(1 << 20);
  EXPECT_FALSE(inbox.Cancel("c")) << "nothing was held or awaited";
  EXPECT_EQ(inbox.Deliver(CodedTransfer("c", 3)).code(), absl::StatusCode::kCancelled);
  EXPECT_EQ(inbox.Reserve("c", 10).code(), absl::StatusCode::kCancelled);
  EXPECT_EQ(inbox.Await("c", In(absl::Seconds(5))).status().code(), absl::StatusCode::kCancelled);
  EXPECT_EQ(inbox.pending(), 0);
  EXPECT_EQ(inbox.pending_bytes(), 0);
}

TEST(KvInboxTest, CancelWakesTheWaiter) {
  KvInbox inbox(1 << 20);
  absl::StatusOr<KvHandoff> got = absl::UnknownError("not run");
  std::thread waiter([&] { got = inbox.Await("d", absl::InfiniteFuture()); });
  WaitForWaiters(inbox, 1);
  EXPECT_TRUE(inbox.Cancel("d"));
  waiter.join();
  EXPECT_EQ(got.status().code(), absl::StatusCode::kCancelled);
  EXPECT_EQ(inbox.Deliver(CodedTransfer("d", 3)).code(), absl::StatusCode::kCancelled);
  EXPECT_EQ(inbox.pending_bytes(), 0);
}

TEST(KvInboxTest, CancelAfterDeliveryDropsTheData) {
  KvInbox inbox(1 << 20);
  ASSERT_TRUE(inbox.Deliver(CodedTransfer("e", 9)).ok());
  EXPECT_GT(inbox.pending_bytes(), 0);
  EXPECT_TRUE(inbox.Cancel("e"));
  EXPECT_EQ(inbox.pending(), 0);
  EXPECT_EQ(inbox.pending_bytes(), 0);
  EXPECT_EQ(inbox.Await("e", In(absl::Seconds(5))).status().code(), absl::StatusCode::kCancelled);
}

TEST(KvInboxTest, ByteCapBoundsWhatIsHeld) {
  const KvHandoff one = CodedTransfer("f1", 20);
  const int64_t bytes = one.PayloadBytes();
  KvInbox inbox(bytes + bytes / 2);
  ASSERT_TRUE(inbox.Deliver(one).ok());
  KvHandoff two = one;
  two.transfer_id = "f2";
  EXPECT_EQ(inbox.Deliver(two).code(), absl::StatusCode::kResourceExhausted);
  EXPECT_EQ(inbox.Reserve("f3", bytes).code(), absl::StatusCode::kResourceExhausted);
  EXPECT_EQ(inbox.pending_bytes(), bytes);
  ASSERT_TRUE(inbox.Await("f1", absl::InfinitePast()).ok());
  EXPECT_TRUE(inbox.Deliver(two).ok()) << "room again once the first was taken";
}

TEST(KvInboxTest, DuplicateDeliveryIsAlreadyExists) {
  KvInbox inbox(1 << 20);
  const KvHandoff sent = CodedTransfer("g", 4);
  ASSERT_TRUE(inbox.Deliver(sent).ok());
  EXPECT_EQ(inbox.Deliver(sent).code(), absl::StatusCode::kAlreadyExists);
  EXPECT_EQ(inbox.Reserve("g", 1).code(), absl::StatusCode::kAlreadyExists);
  EXPECT_EQ(inbox.pending_bytes(), sent.PayloadBytes());
  ASSERT_TRUE(inbox.Await("g", absl::InfinitePast()).ok());
  // A retry after the decode side took it must not sit in the inbox forever.
  EXPECT_EQ(inbox.Deliver(sent).code(), absl::StatusCode::kAlreadyExists);
  EXPECT_EQ(inbox.pending(), 0);
  EXPECT_EQ(inbox.Deliver(CodedTransfer("", 4)).code(), absl::StatusCode::kInvalidArgument);
}

TEST(KvInboxTest, ReservationFlow) {
  const KvHandoff sent = CodedTransfer("h", 30, /*masks=*/true);
  const int64_t bytes = sent.PayloadBytes();
  KvInbox inbox(bytes + 100);
  ASSERT_TRUE(inbox.Reserve("h", bytes).ok());
  EXPECT_EQ(inbox.pending_bytes(), bytes);
  EXPECT_EQ(inbox.pending(), 0);
  EXPECT_EQ(inbox.Reserve("h", bytes).code(), absl::StatusCode::kAlreadyExists) << "a second stream of one id";
  EXPECT_EQ(inbox.Reserve("other", 200).code(), absl::StatusCode::kResourceExhausted);
  EXPECT_EQ(inbox.Reserve("other", -1).code(), absl::StatusCode::kInvalidArgument);
  // The delivery uses the reservation: the bytes are not counted twice.
  ASSERT_TRUE(inbox.Deliver(sent).ok());
  EXPECT_EQ(inbox.pending_bytes(), bytes);
  inbox.Unreserve("h");  // no reservation any more: a no-op
  EXPECT_EQ(inbox.pending_bytes(), bytes);
  ASSERT_TRUE(inbox.Await("h", absl::InfinitePast()).ok());
  EXPECT_EQ(inbox.pending_bytes(), 0);

  // A transfer that never completes gives its reservation back.
  ASSERT_TRUE(inbox.Reserve("i", bytes).ok());
  inbox.Unreserve("i");
  EXPECT_EQ(inbox.pending_bytes(), 0);
  // Cancel drops a reservation and refuses the data.
  ASSERT_TRUE(inbox.Reserve("j", bytes).ok());
  EXPECT_TRUE(inbox.Cancel("j"));
  EXPECT_EQ(inbox.pending_bytes(), 0);
  KvHandoff late = sent;
  late.transfer_id = "j";
  EXPECT_EQ(inbox.Deliver(late).code(), absl::StatusCode::kCancelled);
}

// A transfer nobody claims (a Push with no Decode behind it) and a reservation whose
// stream stalls are dropped after the TTL, their bytes freed and their ids refused; a
// transfer somebody waits for never expires. The clock is moved by hand.
TEST(KvInboxTest, UnclaimedTransfersExpire) {
  absl::Time now = absl::FromUnixSeconds(1000);
  const KvHandoff stray = CodedTransfer("stray", 5, /*masks=*/false, /*scores=*/false);
  const int64_t bytes = stray.PayloadBytes();
  KvInbox inbox(2 * bytes + 10, absl::Seconds(60), [&now] { return now; });
  ASSERT_TRUE(inbox.Deliver(stray).ok());
  ASSERT_TRUE(inbox.Reserve("stalled", bytes).ok());
  // Full: a third transfer does not fit.
  EXPECT_EQ(inbox.Reserve("real", bytes).code(), absl::StatusCode::kResourceExhausted);
  now += absl::Seconds(59);
  EXPECT_TRUE(inbox.Touch("stalled").ok());  // progress restarts its clock
  now += absl::Seconds(2);              // "stray" is 61 s old, "stalled" 2 s since progress
  ASSERT_TRUE(inbox.Reserve("real", bytes).ok()) << "the unclaimed transfer still holds its bytes";
  EXPECT_EQ(inbox.pending(), 0);
  EXPECT_EQ(inbox.expired(), 1);
  EXPECT_EQ(inbox.Await("stray", absl::InfiniteFuture()).status().code(), absl::StatusCode::kCancelled);
  EXPECT_EQ(inbox.Deliver(stray).code(), absl::StatusCode::kCancelled) << "an expired id came back";
  now += absl::Seconds(60);
  EXPECT_EQ(inbox.Touch("stalled").code(), absl::StatusCode::kCancelled) << "a stalled reservation outlived the TTL";
  EXPECT_EQ(inbox.expired(), 3);  // "real" made no progress either
  EXPECT_EQ(inbox.pending_bytes(), 0);
}

TEST(KvInboxTest, ManyThreadsDeliverAndAwait) {
  KvInbox inbox(int64_t{1} << 30);
  constexpr int kTransfers = 64;
  std::vector<KvHandoff> sent;
  for (int i = 0; i < kTransfers; ++i) sent.push_back(CodedTransfer(absl::StrCat("m", i), 1 + i % 7));
  std::atomic<int> received{0};
  std::vector<std::thread> threads;
  for (int t = 0; t < 4; ++t) {
    threads.emplace_back([&, t] {
      for (int i = t; i < kTransfers; i += 4) {
        auto got = inbox.Await(absl::StrCat("m", i), In(absl::Seconds(20)));
        if (got.ok() && SerializeLayer(*got, 0) == SerializeLayer(sent[i], 0) &&
            SerializeLayer(*got, 1) == SerializeLayer(sent[i], 1)) {
          ++received;
        }
      }
    });
    threads.emplace_back([&, t] {
      for (int i = kTransfers - 1 - t; i >= 0; i -= 4) EXPECT_TRUE(inbox.Deliver(sent[i]).ok());
    });
  }
  for (std::thread& thread : threads) thread.join();
  EXPECT_EQ(received.load(), kTransfers);
  EXPECT_EQ(inbox.pending(), 0);
  EXPECT_EQ(inbox.pending_bytes(), 0);
}

TEST(InprocTransportTest, SendsIntoTheRegisteredInbox) {
  KvInbox inbox(1 << 20);
  RegisterInprocInbox("inproc://decode-0", &inbox);
  std::unique_ptr<KvSender> sender = MakeInprocSender();
  const KvHandoff sent = CodedTransfer("x1", 6, /*masks=*/true, /*scores=*/true);
  auto bytes = sender->Send("inproc://decode-0", sent, In(absl::Seconds(5)));
  ASSERT_TRUE(bytes.ok()) << bytes.status();
  EXPECT_EQ(*bytes, sent.PayloadBytes());
  auto got = inbox.Await("x1", absl::InfinitePast());
  ASSERT_TRUE(got.ok());
  ExpectSameHandoff(sent, *got);

  EXPECT_EQ(sender->Send("inproc://decode-0", sent, In(absl::Seconds(5))).status().code(),
            absl::StatusCode::kAlreadyExists);
  EXPECT_EQ(sender->Send("inproc://nobody", CodedTransfer("x2", 1), In(absl::Seconds(5))).status().code(),
            absl::StatusCode::kUnavailable);
  EXPECT_EQ(sender->Send("inproc://decode-0", CodedTransfer("x3", 1), absl::InfinitePast()).status().code(),
            absl::StatusCode::kDeadlineExceeded);
  KvHandoff bad = CodedTransfer("x4", 3);
  bad.heads[1].positions.pop_back();
  EXPECT_EQ(sender->Send("inproc://decode-0", bad, In(absl::Seconds(5))).status().code(),
            absl::StatusCode::kInvalidArgument);
  KvInbox tiny(10);
  RegisterInprocInbox("inproc://decode-1", &tiny);
  EXPECT_EQ(sender->Send("inproc://decode-1", CodedTransfer("x5", 3), In(absl::Seconds(5))).status().code(),
            absl::StatusCode::kResourceExhausted);
  UnregisterInprocInbox("inproc://decode-1");
  UnregisterInprocInbox("inproc://decode-0");
  EXPECT_EQ(sender->Send("inproc://decode-0", CodedTransfer("x6", 1), In(absl::Seconds(5))).status().code(),
            absl::StatusCode::kUnavailable);
  EXPECT_EQ(inbox.pending(), 0);
}

// Rows left in backend memory cross in-process only to an inbox whose pool is on that
// backend, and cross shared, not copied.
TEST(InprocTransportTest, BackendRowsGoOnlyToAnInboxOnTheirBackend) {
  auto backend = ops::CreateBackend("cpu");
  ASSERT_TRUE(backend.ok()) << backend.status();
  KvInbox host_only(1 << 20);
  KvInbox on_cpu(1 << 20);
  on_cpu.set_rows_backend("cpu");
  RegisterInprocInbox("inproc://host-only", &host_only);
  RegisterInprocInbox("inproc://cpu", &on_cpu);
  std::unique_ptr<KvSender> sender = MakeInprocSender();
  EXPECT_EQ(sender->BackendRowsFor("inproc://host-only"), "");
  EXPECT_EQ(sender->BackendRowsFor("inproc://cpu"), "cpu");
  EXPECT_EQ(sender->BackendRowsFor("inproc://nobody"), "");

  const KvHandoff host = CodedTransfer("b1", 6, /*masks=*/true);
  const KvHandoff sent = WithBackendRows(host, backend->get());
  ASSERT_TRUE(sent.Validate().ok()) << sent.Validate();
  auto refused = sender->Send("inproc://host-only", sent, In(absl::Seconds(5)));
  EXPECT_EQ(refused.status().code(), absl::StatusCode::kFailedPrecondition) << refused.status();
  EXPECT_EQ(host_only.pending(), 0);

  auto bytes = sender->Send("inproc://cpu", sent, In(absl::Seconds(5)));
  ASSERT_TRUE(bytes.ok()) << bytes.status();
  EXPECT_EQ(*bytes, host.PayloadBytes());
  auto got = on_cpu.Await("b1", absl::InfinitePast());
  ASSERT_TRUE(got.ok()) << got.status();
  EXPECT_EQ(got->backend_rows.get(), sent.backend_rows.get());
  EXPECT_EQ(got->Lengths(), host.Lengths());
  for (size_t i = 0; i < host.heads.size(); ++i) {
    EXPECT_EQ(got->heads[i].positions, host.heads[i].positions);
    EXPECT_EQ(got->heads[i].query_mask, host.heads[i].query_mask);
  }
  UnregisterInprocInbox("inproc://host-only");
  UnregisterInprocInbox("inproc://cpu");
}

}  // namespace
}  // namespace kvgate::kv
