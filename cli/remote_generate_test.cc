#include "cli/remote_generate.h"

#include <gmock/gmock.h>
#include <grpcpp/grpcpp.h>
#include <gtest/gtest.h>

#include <chrono>
#include <cmath>
#include <mutex>
#include <sstream>

#include "kvgate/v1/inference.grpc.pb.h"

namespace kvgate::cli {
namespace {

using ::testing::ElementsAre;
using ::testing::HasSubstr;
using kvgate::v1::CompressionSpec;
using kvgate::v1::GenerateComplete;
using kvgate::v1::GenerateRequest;
using kvgate::v1::GenerateResponse;

absl::StatusOr<GenerateRequest> Build(const std::vector<std::string>& args) {
  std::vector<std::string> warnings;
  absl::StatusOr<RemoteGenerateCommand> command = ParseRemoteGenerate(args, &warnings);
  if (!command.ok()) return command.status();
  return command->request;
}

std::vector<std::string> WithServer(std::vector<std::string> args) {
  args.insert(args.begin(), {"--server", "localhost:1"});
  return args;
}

// --- choosing the remote path ------------------------------------------------------------

TEST(UsesServerTest, FindsTheFlagNotItsLookalikes) {
  EXPECT_TRUE(UsesServer({"--server", "h:1", "--prompt", "x"}));
  EXPECT_TRUE(UsesServer({"--prompt", "x", "--server=h:1"}));
  EXPECT_FALSE(UsesServer({"--model", "m", "--prompt", "x"}));
  EXPECT_FALSE(UsesServer({"--prompt", "--server"}));  // the prompt text is "--server"
  EXPECT_FALSE(UsesServer({"--stop", "--server=x", "--model", "m"}));
  EXPECT_TRUE(UsesServer({"--json", "--server", "h:1"}));  // a switch takes no value
  EXPECT_FALSE(UsesServer({}));
}

// --- flags to request ----------------------------------------------------------------------

TEST(BuildGenerateRequestTest, UnsetFlagsLeaveTheServerDefaults) {
  const auto request = Build(WithServer({"--prompt", "Once upon a time"}));
  ASSERT_TRUE(request.ok()) << request.status();
  EXPECT_EQ(request->text(), "Once upon a time");
  EXPECT_EQ(request->request_id(), "");
  EXPECT_FALSE(request->has_sampling());
  EXPECT_FALSE(request->has_compression());
  EXPECT_FALSE(request->skip_text());
}

TEST(BuildGenerateRequestTest, EveryFlagMaps) {
  const auto request = Build(WithServer({"--prompt-ids", "1,5,9", "--request-id", "req-7", "--max-tokens", "32",
                                         "--temperature", "0.7", "--top-p", "0.9", "--top-k", "40", "--min-p",
                                         "0.05", "--seed", "18446744073709551615", "--stop", "The end",
                                         "--stop-ids", "2,3", "--ignore-eos", "--policy", "snapkv",
                                         "--budget-tokens", "64", "--sink-tokens", "4", "--recent-tokens", "0",
                                         "--head-budget", "adaptive", "--json"}));
  ASSERT_TRUE(request.ok()) << request.status();
  const GenerateRequest& r = *request;
  EXPECT_THAT(r.tokens().ids(), ElementsAre(1, 5, 9));
  EXPECT_EQ(r.request_id(), "req-7");
  EXPECT_EQ(r.sampling().max_tokens(), 32);
  EXPECT_EQ(r.sampling().temperature(), 0.7f);
  EXPECT_EQ(r.sampling().top_p(), 0.9f);
  EXPECT_EQ(r.sampling().top_k(), 40);
  EXPECT_EQ(r.sampling().min_p(), 0.05f);
  ASSERT_TRUE(r.sampling().has_seed());
  EXPECT_EQ(r.sampling().seed(), 18446744073709551615ull);
  EXPECT_THAT(r.sampling().stop(), ElementsAre("The end"));
  EXPECT_THAT(r.sampling().stop_token_ids(), ElementsAre(2, 3));
  EXPECT_TRUE(r.sampling().ignore_eos());
  EXPECT_EQ(r.compression().policy(), "snapkv");
  EXPECT_EQ(r.compression().keep_ratio(), 0.0f);
  EXPECT_EQ(r.compression().budget_tokens(), 64);
  EXPECT_EQ(r.compression().sink_tokens(), 4);
  ASSERT_TRUE(r.compression().has_recent_tokens());  // 0 given is not "unset"
  EXPECT_EQ(r.compression().recent_tokens(), 0);
  EXPECT_EQ(r.compression().head_budget(), CompressionSpec::ADAPTIVE);
}

TEST(BuildGenerateRequestTest, SeedZeroIsSet) {
  const auto request = Build(WithServer({"--prompt", "x", "--seed", "0", "--keep-ratio", "0.25"}));
  ASSERT_TRUE(request.ok()) << request.status();
  EXPECT_TRUE(request->sampling().has_seed());
  EXPECT_EQ(request->sampling().seed(), 0u);
  EXPECT_EQ(request->compression().keep_ratio(), 0.25f);
}

// The server is the judge of values: out-of-range ones travel as given.
TEST(BuildGenerateRequestTest, ValuesAreNotJudgedHere) {
  const auto request = Build(WithServer({"--prompt", "x", "--top-p", "1.5", "--max-tokens", "-3", "--policy", "h2o",
                                         "--keep-ratio", "nan"}));
  ASSERT_TRUE(request.ok()) << request.status();
  EXPECT_EQ(request->sampling().top_p(), 1.5f);
  EXPECT_EQ(request->sampling().max_tokens(), -3);
  EXPECT_EQ(request->compression().policy(), "h2o");
  EXPECT_TRUE(std::isnan(request->compression().keep_ratio()));
}

TEST(BuildGenerateRequestTest, MalformedFlagsAreUsageErrors) {
  struct Case {
    std::vector<std::string> args;
    std::string message;
  };
  const std::vector<Case> cases = {
      {{"--max-tokens", "5"}, "exactly one of --prompt"},
      {{"--prompt", "x", "--prompt-ids", "1"}, "exactly one of --prompt"},
      {{"--prompt-ids", "1,x"}, "--prompt-ids"},
      {{"--prompt", "x", "--max-tokens", "3000000000"}, "--max-tokens"},
      {{"--prompt", "x", "--top-k", "ten"}, "--top-k"},
      {{"--prompt", "x", "--temperature", "hot"}, "--temperature"},
      {{"--prompt", "x", "--seed", "-1"}, "--seed"},
      {{"--prompt", "x", "--head-budget", "fair"}, "--head-budget"},
      {{"--prompt", "x", "--stop-ids", "2,,x"}, "--stop-ids"},
      {{"--prompt", "x", "--frobnicate"}, "--frobnicate"},
  };
  for (const Case& c : cases) {
    const auto request = Build(WithServer(c.args));
    ASSERT_FALSE(request.ok()) << c.args.back();
    EXPECT_EQ(request.status().code(), absl::StatusCode::kInvalidArgument);
    EXPECT_THAT(std::string(request.status().message()), HasSubstr(c.message));
  }
}

TEST(ParseRemoteGenerateTest, ConnectionFlags) {
  std::vector<std::string> warnings;
  auto command = ParseRemoteGenerate({"--server=h:9", "--prompt", "x", "--tls-ca", "ca.pem", "--tls-cert", "c.pem",
                                      "--tls-key", "k.pem", "--token", "s3cret", "--timeout-ms", "2500", "--json",
                                      "--model", "some/dir"},
                                     &warnings);
  ASSERT_TRUE(command.ok()) << command.status();
  EXPECT_EQ(command->server, "h:9");
  EXPECT_EQ(command->tls_ca_file, "ca.pem");
  EXPECT_EQ(command->tls_cert_file, "c.pem");
  EXPECT_EQ(command->tls_key_file, "k.pem");
  EXPECT_EQ(command->token, "s3cret");
  EXPECT_EQ(command->timeout_ms, 2500);
  EXPECT_TRUE(command->json);
  EXPECT_THAT(warnings, ElementsAre(HasSubstr("--model is ignored")));

  const std::vector<std::pair<std::vector<std::string>, std::string>> bad = {
      {{"--tls-cert", "c.pem", "--tls-key", "k.pem"}, "need --tls-ca"},
      {{"--tls-ca", "ca.pem", "--tls-cert", "c.pem"}, "go together"},
      {{"--timeout-ms", "0"}, "--timeout-ms must be positive"},
      {{"--backend", "cpu"}, "--backend applies to offline"},
      {{"--gates", "g.safetensors"}, "--gates applies to offline"},
  };
  for (const auto& [extra, message] : bad) {
    std::vector<std::string> args = WithServer({"--prompt", "x"});
    args.insert(args.end(), extra.begin(), extra.end());
    auto parsed = ParseRemoteGenerate(args, &warnings);
    ASSERT_FALSE(parsed.ok()) << extra.front();
    EXPECT_THAT(std::string(parsed.status().message()), HasSubstr(message));
  }
  EXPECT_FALSE(ParseRemoteGenerate({"--server=", "--prompt", "x"}, &warnings).ok());
}

// --- against a fake server over loopback ---------------------------------------------------

// Answers Generate with canned chunks and a complete message, or a canned error, and keeps
// what it received.
class FakeInference final : public kvgate::v1::Inference::Service {
 public:
  grpc::Status Generate(grpc::ServerContext* context, const GenerateRequest* request,
                        grpc::ServerWriter<GenerateResponse>* writer) override {
    {
      std::lock_guard<std::mutex> lock(mu_);
      request_ = *request;
      const auto auth = context->client_metadata().equal_range("authorization");
      authorization_ = auth.first == auth.second ? "" : std::string(auth.first->second.data(), auth.first->second.size());
      has_deadline_ = context->deadline() < std::chrono::system_clock::now() + std::chrono::hours(1);
    }
    for (const auto& [ids, text] : std::vector<std::pair<std::vector<int32_t>, std::string>>{
             {{10, 11}, "Once upon"}, {{12}, ""}, {{13}, " a time"}}) {
      GenerateResponse response;
      response.mutable_chunk()->mutable_token_ids()->Add(ids.begin(), ids.end());
      response.mutable_chunk()->set_text(text);
      writer->Write(response);
    }
    if (!error_.ok()) return error_;
    if (!send_complete_) return grpc::Status::OK;
    GenerateResponse response;
    GenerateComplete* c = response.mutable_complete();
    c->set_request_id("req-42");
    c->set_finish_reason(GenerateComplete::STOP);
    c->set_matched_stop("The end");
    c->mutable_usage()->set_prompt_tokens(5);
    c->mutable_usage()->set_completion_tokens(4);
    c->mutable_kv()->set_policy("snapkv");
    c->mutable_kv()->set_kv_entries_full(40);
    c->mutable_kv()->set_kv_entries_kept(20);
    c->mutable_kv()->set_keep_fraction(0.5);
    c->mutable_kv()->set_bytes_transferred(1000);
    c->mutable_kv()->set_bytes_full(2000);
    c->mutable_kv()->set_pages_used(3);
    c->mutable_timings()->set_queue_ms(0.5);
    c->mutable_timings()->set_prefill_ms(1.5);
    c->mutable_timings()->set_transfer_ms(0.25);
    c->mutable_timings()->set_time_to_first_token_ms(2.5);
    c->mutable_timings()->set_decode_ms(3.0);
    c->mutable_timings()->set_time_per_output_token_ms(1.0);
    writer->Write(response);
    return grpc::Status::OK;
  }

  grpc::Status error_ = grpc::Status::OK;
  bool send_complete_ = true;
  std::mutex mu_;
  GenerateRequest request_;
  std::string authorization_;
  bool has_deadline_ = false;
};

class RemoteGenerateTest : public ::testing::Test {
 protected:
  void SetUp() override {
    grpc::ServerBuilder builder;
    builder.AddListeningPort("127.0.0.1:0", grpc::InsecureServerCredentials(), &port_);
    builder.RegisterService(&service_);
    server_ = builder.BuildAndStart();
    ASSERT_NE(server_, nullptr);
    ASSERT_GT(port_, 0);
  }
  void TearDown() override { server_->Shutdown(); }

  std::string Address() const { return "127.0.0.1:" + std::to_string(port_); }
  int Run(std::vector<std::string> args) {
    args.insert(args.begin(), {"--server", Address()});
    out_.str("");
    err_.str("");
    return RunRemoteGenerate(args, out_, err_);
  }

  FakeInference service_;
  std::unique_ptr<grpc::Server> server_;
  int port_ = 0;
  std::ostringstream out_, err_;
};

TEST_F(RemoteGenerateTest, StreamsTextAndSendsTheRequest) {
  ASSERT_EQ(Run({"--prompt", "Hi", "--top-k", "5", "--token", "s3cret", "--timeout-ms", "60000"}), 0) << err_.str();
  EXPECT_EQ(out_.str(), "Once upon a time\n");
  EXPECT_THAT(err_.str(), HasSubstr("request req-42: prompt 5 tokens, generated 4 tokens (finish: stop)"));
  EXPECT_THAT(err_.str(), HasSubstr("KV policy snapkv kept 20 of 40 entries (50%), transferred 1000 of 2000 bytes"));
  std::lock_guard<std::mutex> lock(service_.mu_);
  EXPECT_EQ(service_.request_.text(), "Hi");
  EXPECT_EQ(service_.request_.sampling().top_k(), 5);
  EXPECT_EQ(service_.authorization_, "Bearer s3cret");
  EXPECT_TRUE(service_.has_deadline_);
}

TEST_F(RemoteGenerateTest, NoTokenNoDeadlineByDefault) {
  ASSERT_EQ(Run({"--prompt-ids", "1,2"}), 0) << err_.str();
  std::lock_guard<std::mutex> lock(service_.mu_);
  EXPECT_THAT(service_.request_.tokens().ids(), ElementsAre(1, 2));
  EXPECT_EQ(service_.authorization_, "");
  EXPECT_FALSE(service_.has_deadline_);
}

TEST_F(RemoteGenerateTest, JsonHasTheOfflineFieldsAndTheServers) {
  ASSERT_EQ(Run({"--prompt", "Hi", "--json"}), 0) << err_.str();
  const nlohmann::json j = nlohmann::json::parse(out_.str());
  EXPECT_EQ(j["text"], "Once upon a time");
  EXPECT_EQ(j["token_ids"], nlohmann::json({10, 11, 12, 13}));
  EXPECT_EQ(j["finish_reason"], "stop");
  EXPECT_EQ(j["matched_stop"], "The end");
  EXPECT_EQ(j["request_id"], "req-42");
  EXPECT_EQ(j["usage"]["prompt_tokens"], 5);
  EXPECT_EQ(j["usage"]["completion_tokens"], 4);
  EXPECT_EQ(j["kv"]["policy"], "snapkv");
  EXPECT_EQ(j["kv"]["kv_entries_full"], 40);
  EXPECT_EQ(j["kv"]["kv_entries_kept"], 20);
  EXPECT_EQ(j["kv"]["keep_fraction"], 0.5);
  EXPECT_EQ(j["kv"]["bytes_full"], 2000);
  EXPECT_EQ(j["kv"]["bytes_kept"], 1000);
  EXPECT_EQ(j["kv"]["bytes_transferred"], 1000);
  EXPECT_EQ(j["kv"]["pages_used"], 3);
  EXPECT_EQ(j["timings"]["queue_ms"], 0.5);
  EXPECT_EQ(j["timings"]["prefill_ms"], 1.5);
  EXPECT_EQ(j["timings"]["transfer_ms"], 0.25);
  EXPECT_EQ(j["timings"]["time_to_first_token_ms"], 2.5);
  EXPECT_EQ(j["timings"]["decode_ms"], 3.0);
  EXPECT_EQ(j["timings"]["time_per_output_token_ms"], 1.0);
  EXPECT_EQ(err_.str(), "");
}

TEST_F(RemoteGenerateTest, AServerErrorIsPrintedWithItsCode) {
  service_.error_ = grpc::Status(grpc::StatusCode::INVALID_ARGUMENT, "sampling.top_p must be in (0, 1], got 1.5");
  EXPECT_EQ(Run({"--prompt", "Hi", "--top-p", "1.5"}), 1);
  EXPECT_EQ(err_.str(), "kvgate generate: INVALID_ARGUMENT: sampling.top_p must be in (0, 1], got 1.5\n");
  EXPECT_EQ(out_.str(), "Once upon a time\n");  // what had streamed, then a line end

  service_.error_ = grpc::Status(grpc::StatusCode::RESOURCE_EXHAUSTED, "no KV capacity");
  EXPECT_EQ(Run({"--prompt", "Hi", "--json"}), 1);
  EXPECT_EQ(err_.str(), "kvgate generate: RESOURCE_EXHAUSTED: no KV capacity\n");
  EXPECT_EQ(out_.str(), "");  // --json prints only a complete answer
}

TEST_F(RemoteGenerateTest, AStreamWithoutCompleteIsInternal) {
  service_.send_complete_ = false;
  EXPECT_EQ(Run({"--prompt", "Hi", "--json"}), 1);
  EXPECT_THAT(err_.str(), HasSubstr("kvgate generate: INTERNAL: the server ended the stream without a complete message"));
}

TEST_F(RemoteGenerateTest, UsageErrorsExitTwo) {
  EXPECT_EQ(Run({"--top-k", "5"}), 2);
  EXPECT_THAT(err_.str(), HasSubstr("exactly one of --prompt"));
  EXPECT_THAT(err_.str(), HasSubstr("usage: kvgate generate --server HOST:PORT"));
}

TEST_F(RemoteGenerateTest, AnUnreadableCaFileIsNotFound) {
  EXPECT_EQ(Run({"--prompt", "Hi", "--tls-ca", "/nonexistent/ca.pem"}), 1);
  EXPECT_THAT(err_.str(), HasSubstr("kvgate generate: NOT_FOUND: --tls-ca: cannot read '/nonexistent/ca.pem'"));
}

TEST(RemoteGenerateNoServerTest, AnUnreachableServerIsUnavailable) {
  // Bind a port, then close it: nothing listens there.
  int port = 0;
  {
    FakeInference service;
    grpc::ServerBuilder builder;
    builder.RegisterService(&service);
    builder.AddListeningPort("127.0.0.1:0", grpc::InsecureServerCredentials(), &port);
    std::unique_ptr<grpc::Server> server = builder.BuildAndStart();
    ASSERT_NE(server, nullptr);
    server->Shutdown();
  }
  std::ostringstream out, err;
  EXPECT_EQ(RunRemoteGenerate({"--server", "127.0.0.1:" + std::to_string(port), "--prompt", "Hi", "--timeout-ms",
                               "10000"},
                              out, err),
            1);
  EXPECT_THAT(err.str(), HasSubstr("kvgate generate: UNAVAILABLE: "));
}

}  // namespace
}  // namespace kvgate::cli
