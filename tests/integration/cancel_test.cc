// A client that cancels mid-stream, or whose deadline passes, gets CANCELLED /
// DEADLINE_EXCEEDED, and within one second every page, lease and transfer of its request
// is released and the request is no longer DECODING (architecture.md section 7).
#include <gtest/gtest.h>

#include "tests/integration/harness.h"

namespace kvgate::integration {
namespace {

// A stream that runs for several hundred milliseconds: ~470 tokens past EOS.
Case LongCase(const std::string& request_id) {
  Case c;
  c.policy = "snapkv";
  c.keep_ratio = 0.5f;
  c.prompt = StoryPrompt(Reference().tokenizer(), 40, 1);
  c.max_tokens = 470;
  c.ignore_eos = true;
  c.request_id = request_id;
  return c;
}

bool Ended(v1::RequestState::Phase phase) {
  return phase == v1::RequestState::ABORTED || phase == v1::RequestState::FAILED;
}

class CancelTest : public ::testing::Test {
 protected:
  void SetUp() override {
    absl::StatusOr<std::unique_ptr<Deployment>> d = Deployment::Start({});
    ASSERT_TRUE(d.ok()) << d.status();
    deployment_ = *std::move(d);
    absl::StatusOr<v1::ServerInfo> info = GetServerInfo(deployment_->stub());
    ASSERT_TRUE(info.ok()) << info.status();
    initial_ = *info;
  }

  // Waits at most until `since + 1 s` for the request's release; the ServerInfo seen last.
  v1::ServerInfo WaitReleased(const std::string& request_id, absl::Time since) {
    absl::StatusOr<v1::ServerInfo> info = WaitServerInfo(
        deployment_->stub(),
        [&](const v1::ServerInfo& i) {
          return Idle(i) && i.kv_pages_free() == initial_.kv_pages_free() && Ended(PhaseOf(i, request_id));
        },
        std::max(absl::ZeroDuration(), since + absl::Seconds(1) - absl::Now()), "", {request_id});
    EXPECT_TRUE(info.ok()) << info.status();
    return info.ok() ? *info : v1::ServerInfo();
  }

  void ExpectReleased(const v1::ServerInfo& info, const std::string& request_id) {
    EXPECT_EQ(info.kv_pages_free(), initial_.kv_pages_free()) << Describe(info);
    EXPECT_EQ(info.leases_active(), 0) << Describe(info);
    EXPECT_EQ(info.transfers_active(), 0) << Describe(info);
    EXPECT_EQ(info.requests_in_flight(), 0) << Describe(info);
    const v1::RequestState::Phase phase = PhaseOf(info, request_id);
    EXPECT_TRUE(Ended(phase)) << request_id << " is " << v1::RequestState::Phase_Name(phase)
                              << ", want ABORTED or FAILED; " << Describe(info);
  }

  std::unique_ptr<Deployment> deployment_;
  v1::ServerInfo initial_;
};

TEST_F(CancelTest, CancelMidStreamReleasesEverythingWithinOneSecond) {
  const Case c = LongCase("cancel-mid-stream");
  absl::Time cancelled_at = absl::InfiniteFuture();
  CallOptions call;
  call.on_chunk = [&](grpc::ClientContext* ctx, const StreamResult& so_far) {
    if (so_far.chunks == 3) {
      cancelled_at = absl::Now();
      ctx->TryCancel();
    }
  };
  StreamResult r = Generate(deployment_->stub(), c.Request(), call);
  ASSERT_NE(cancelled_at, absl::InfiniteFuture()) << "the stream ended before its third chunk: " << ToString(r.status);
  EXPECT_EQ(r.status.error_code(), grpc::StatusCode::CANCELLED) << ToString(r.status);
  EXPECT_FALSE(r.complete.has_value());
  EXPECT_LT(r.tokens.size(), static_cast<size_t>(c.max_tokens));
  const v1::ServerInfo info = WaitReleased(c.request_id, cancelled_at);
  ExpectReleased(info, c.request_id);
  EXPECT_EQ(PhaseOf(info, c.request_id), v1::RequestState::ABORTED) << Describe(info);

  // The server keeps serving.
  Case next = LongCase("after-cancel");
  next.max_tokens = 8;
  StreamResult ok = Generate(deployment_->stub(), next.Request());
  EXPECT_TRUE(ok.status.ok()) << ToString(ok.status);
}

TEST_F(CancelTest, DeadlineExpiryReleasesEverythingWithinOneSecond) {
  const Case c = LongCase("deadline-mid-stream");
  CallOptions call;
  // Well before the ~470 tokens can be out (about 0.75 ms each on a 2-core CPU): the
  // deadline passes in prefill or mid-stream, never after the end.
  call.timeout = absl::Milliseconds(120);
  StreamResult r = Generate(deployment_->stub(), c.Request(), call);
  const absl::Time expired_at = absl::Now();
  EXPECT_EQ(r.status.error_code(), grpc::StatusCode::DEADLINE_EXCEEDED) << ToString(r.status);
  EXPECT_FALSE(r.complete.has_value());
  EXPECT_LT(r.tokens.size(), static_cast<size_t>(c.max_tokens));
  const v1::ServerInfo info = WaitReleased(c.request_id, expired_at);
  ExpectReleased(info, c.request_id);

  Case next = LongCase("after-deadline");
  next.max_tokens = 8;
  StreamResult ok = Generate(deployment_->stub(), next.Request());
  EXPECT_TRUE(ok.status.ok()) << ToString(ok.status);
}

}  // namespace
}  // namespace kvgate::integration
