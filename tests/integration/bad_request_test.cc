// Bad requests over a real socket: the router/bad_requests.h table (every case that
// survives protobuf serialization) gets its exact status code and a message naming the
// field, plus what only a live server can show: a duplicate in-flight request_id, a
// message over the receive limit, Abort of an unknown and of a running request, and a
// missing bearer token. The server keeps serving afterwards.
#include <gtest/gtest.h>

#include "router/bad_requests.h"
#include "tests/integration/harness.h"

namespace kvgate::integration {
namespace {

constexpr char kToken[] = "integration-secret";

class BadRequestTest : public ::testing::Test {
 protected:
  void SetUp() override {
    DeploymentOptions options;
    options.router_args = {"--token", kToken};
    absl::StatusOr<std::unique_ptr<Deployment>> d = Deployment::Start(options);
    ASSERT_TRUE(d.ok()) << d.status();
    deployment_ = *std::move(d);
  }

  v1::Inference::Stub& stub() { return deployment_->stub(); }

  CallOptions WithToken() {
    CallOptions options;
    options.token = kToken;
    options.timeout = absl::Seconds(20);
    return options;
  }

  grpc::Status Abort(const std::string& request_id, bool* was_running, const std::string& token = kToken) {
    grpc::ClientContext ctx;
    ctx.set_deadline(absl::ToChronoTime(absl::Now() + absl::Seconds(5)));
    if (!token.empty()) ctx.AddMetadata("authorization", "Bearer " + token);
    v1::AbortRequest request;
    request.set_request_id(request_id);
    v1::AbortResponse response;
    grpc::Status s = stub().Abort(&ctx, request, &response);
    if (was_running != nullptr) *was_running = response.was_running();
    return s;
  }

  void ExpectStillServing() {
    Case c;
    c.prompt = StoryPrompt(Reference().tokenizer(), 60, 0);
    c.max_tokens = 12;
    StreamResult r = Generate(stub(), c.Request(), WithToken());
    EXPECT_TRUE(r.status.ok()) << ToString(r.status) << "\n" << deployment_->Logs();
    EXPECT_TRUE(r.complete.has_value());
    EXPECT_EQ(r.tokens.size(), 12u);
    absl::StatusOr<v1::ServerInfo> info = WaitServerInfo(stub(), Idle, absl::Seconds(2), kToken);
    ASSERT_TRUE(info.ok()) << info.status();
    EXPECT_TRUE(Idle(*info)) << Describe(*info);
  }

  Case Long(const std::string& request_id) {
    Case c;
    c.prompt = StoryPrompt(Reference().tokenizer(), 40, 2);
    c.max_tokens = 470;
    c.ignore_eos = true;
    c.request_id = request_id;
    return c;
  }

  std::unique_ptr<Deployment> deployment_;
};

TEST_F(BadRequestTest, EveryTableCaseGetsItsCodeAndFieldOverTheWire) {
  absl::StatusOr<v1::ModelInfo> model = GetModelInfo(stub(), kToken);
  ASSERT_TRUE(model.ok()) << model.status();
  int sent = 0;
  for (const router::BadRequestCase& bad : router::BadGenerateRequests()) {
    if (!bad.survives_wire) continue;
    SCOPED_TRACE(bad.name);
    ++sent;
    StreamResult r = Generate(stub(), bad.build(*model), WithToken());
    EXPECT_EQ(static_cast<int>(r.status.error_code()), static_cast<int>(bad.code)) << ToString(r.status);
    EXPECT_NE(r.status.error_message().find(bad.field), std::string::npos)
        << "the message does not name '" << bad.field << "': " << r.status.error_message();
    EXPECT_EQ(r.chunks, 0);
    EXPECT_FALSE(r.complete.has_value());
  }
  EXPECT_GE(sent, 30);
  ExpectStillServing();
}

TEST_F(BadRequestTest, DuplicateInFlightRequestIdIsAlreadyExists) {
  const Case c = Long("duplicate-id");
  grpc::Status duplicate;
  bool sent = false;
  CallOptions call = WithToken();
  call.on_chunk = [&](grpc::ClientContext* ctx, const StreamResult&) {
    if (sent) return;
    sent = true;
    Case second = c;
    second.max_tokens = 4;
    duplicate = Generate(stub(), second.Request(), WithToken()).status;
    ctx->TryCancel();
  };
  StreamResult first = Generate(stub(), c.Request(), call);
  ASSERT_TRUE(sent) << "the first stream ended before its first chunk: " << ToString(first.status);
  EXPECT_EQ(duplicate.error_code(), grpc::StatusCode::ALREADY_EXISTS) << ToString(duplicate);
  EXPECT_NE(duplicate.error_message().find("request_id"), std::string::npos) << duplicate.error_message();
  EXPECT_EQ(first.status.error_code(), grpc::StatusCode::CANCELLED) << ToString(first.status);
  ExpectStillServing();
}

TEST_F(BadRequestTest, MessageOverTheReceiveLimitIsResourceExhausted) {
  v1::GenerateRequest request;
  request.set_text(std::string(9 << 20, 'a'));  // the servers accept at most 8 MiB
  StreamResult r = Generate(stub(), request, WithToken());
  EXPECT_EQ(r.status.error_code(), grpc::StatusCode::RESOURCE_EXHAUSTED) << ToString(r.status);
  ExpectStillServing();
}

TEST_F(BadRequestTest, AbortOfAnUnknownRequestIsNotFound) {
  grpc::Status s = Abort("never-seen-request", nullptr);
  EXPECT_EQ(s.error_code(), grpc::StatusCode::NOT_FOUND) << ToString(s);
  grpc::Status empty = Abort("", nullptr);
  EXPECT_EQ(empty.error_code(), grpc::StatusCode::INVALID_ARGUMENT) << ToString(empty);
  ExpectStillServing();
}

TEST_F(BadRequestTest, MissingOrWrongBearerTokenIsUnauthenticated) {
  Case c;
  c.prompt = StoryPrompt(Reference().tokenizer(), 20, 0);
  c.max_tokens = 4;
  StreamResult missing = Generate(stub(), c.Request(), Within(absl::Seconds(10)));
  EXPECT_EQ(missing.status.error_code(), grpc::StatusCode::UNAUTHENTICATED) << ToString(missing.status);
  EXPECT_EQ(missing.chunks, 0);
  StreamResult wrong = Generate(stub(), c.Request(), Within(absl::Seconds(10), "not-the-token"));
  EXPECT_EQ(wrong.status.error_code(), grpc::StatusCode::UNAUTHENTICATED) << ToString(wrong.status);
  grpc::Status abort = Abort("anything", nullptr, /*token=*/"");
  EXPECT_EQ(abort.error_code(), grpc::StatusCode::UNAUTHENTICATED) << ToString(abort);
  ExpectStillServing();
}

TEST_F(BadRequestTest, AbortOfARunningRequestEndsItsStreamWithAborted) {
  const Case c = Long("abort-me");
  grpc::Status abort_status;
  bool was_running = false;
  bool aborted = false;
  CallOptions call = WithToken();
  call.on_chunk = [&](grpc::ClientContext*, const StreamResult& so_far) {
    if (aborted || so_far.chunks < 2) return;
    aborted = true;
    abort_status = Abort(c.request_id, &was_running);
  };
  StreamResult r = Generate(stub(), c.Request(), call);
  ASSERT_TRUE(aborted) << "the stream ended before its second chunk: " << ToString(r.status);
  EXPECT_TRUE(abort_status.ok()) << ToString(abort_status);
  EXPECT_TRUE(was_running);
  EXPECT_TRUE(r.status.ok()) << ToString(r.status);
  ASSERT_TRUE(r.complete.has_value()) << "an aborted stream ends with a complete message";
  EXPECT_EQ(r.complete->finish_reason(), v1::GenerateComplete::ABORTED);
  EXPECT_EQ(r.complete->usage().completion_tokens(), static_cast<int32_t>(r.tokens.size()));
  EXPECT_LT(r.tokens.size(), static_cast<size_t>(c.max_tokens));
  // Aborting it again: it is finished, still remembered.
  bool again = true;
  grpc::Status second = Abort(c.request_id, &again);
  EXPECT_TRUE(second.ok()) << ToString(second);
  EXPECT_FALSE(again);
  absl::StatusOr<v1::ServerInfo> info = WaitServerInfo(stub(), Idle, absl::Seconds(1), kToken, {c.request_id});
  ASSERT_TRUE(info.ok()) << info.status();
  EXPECT_TRUE(Idle(*info)) << Describe(*info);
  EXPECT_EQ(PhaseOf(*info, c.request_id), v1::RequestState::ABORTED) << Describe(*info);
  ExpectStillServing();
}

}  // namespace
}  // namespace kvgate::integration
