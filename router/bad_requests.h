// File: a table of malformed kvgate.v1.GenerateRequest messages, each with the status
// code the server must answer and a substring of the message naming the field. Shared by
// router/request_validation_test.cc (in process) and the loopback gRPC integration tests
// (the same requests over a real socket), so both check one list.
//
// Builders take the served model's ModelInfo (vocab_size, max_context_tokens), so the
// table fits any model: the unit test makes one from the ModelConfig, an integration
// test gets it from Inference/GetModelInfo. Codes are absl::StatusCode; the numbers are
// those of grpc::StatusCode (static_cast between them).
//
// The default server limits are assumed (ValidationLimits{}): default policy `full`, every
// policy accepted, max_tokens limit far above what fits a context.
#pragma once

#include <cmath>
#include <cstdint>
#include <functional>
#include <limits>
#include <string>
#include <vector>

#include "absl/status/status.h"
#include "kvgate/v1/inference.pb.h"

namespace kvgate::router {

struct BadRequestCase {
  std::string name;  // a valid gtest parameter name: [A-Za-z0-9_]
  std::function<kvgate::v1::GenerateRequest(const kvgate::v1::ModelInfo& model)> build;
  absl::StatusCode code = absl::StatusCode::kInvalidArgument;
  std::string field;  // the message must contain this (the proto field path)
  // False for requests protobuf itself cannot parse (invalid UTF-8 in a proto3 string):
  // over a socket they never reach validation, so integration tests skip them.
  bool survives_wire = true;
};

namespace bad_requests_internal {

using kvgate::v1::GenerateRequest;
using kvgate::v1::ModelInfo;

// A valid request: a short token prompt, default sampling and compression.
inline GenerateRequest Base() {
  GenerateRequest r;
  for (int32_t id : {1, 5, 9, 12}) r.mutable_tokens()->add_ids(id);
  return r;
}

inline GenerateRequest Ids(int32_t count, int32_t id) {
  GenerateRequest r;
  for (int32_t i = 0; i < count; ++i) r.mutable_tokens()->add_ids(id);
  return r;
}

inline constexpr float kNaN = std::numeric_limits<float>::quiet_NaN();
inline constexpr float kInf = std::numeric_limits<float>::infinity();

}  // namespace bad_requests_internal

inline std::vector<BadRequestCase> BadGenerateRequests() {
  using namespace bad_requests_internal;  // NOLINT: local to this table
  using B = std::function<GenerateRequest(const ModelInfo&)>;
  // Sampling or compression edits on the base request.
  auto sampling = [](std::function<void(kvgate::v1::SamplingParams*)> edit) -> B {
    return [edit](const ModelInfo&) {
      GenerateRequest r = Base();
      edit(r.mutable_sampling());
      return r;
    };
  };
  auto compression = [](std::function<void(kvgate::v1::CompressionSpec*)> edit) -> B {
    return [edit](const ModelInfo&) {
      GenerateRequest r = Base();
      edit(r.mutable_compression());
      return r;
    };
  };
  auto request = [](std::function<void(GenerateRequest*)> edit) -> B {
    return [edit](const ModelInfo&) {
      GenerateRequest r = Base();
      edit(&r);
      return r;
    };
  };
  const auto kInvalid = absl::StatusCode::kInvalidArgument;
  using kvgate::v1::CompressionSpec;
  using kvgate::v1::SamplingParams;
  return {
      // --- the prompt ---
      {"PromptUnset", [](const ModelInfo&) { return GenerateRequest(); }, kInvalid, "prompt"},
      {"PromptUnsetWithSampling",
       [](const ModelInfo&) {
         GenerateRequest r;
         r.mutable_sampling()->set_max_tokens(4);
         return r;
       },
       kInvalid, "prompt: set text or tokens"},
      {"EmptyText", request([](GenerateRequest* r) { r->set_text(""); }), kInvalid, "text"},
      {"EmptyTokenIds", request([](GenerateRequest* r) { r->mutable_tokens()->clear_ids(); }), kInvalid,
       "tokens.ids"},
      {"TokenIdNegative", request([](GenerateRequest* r) { r->mutable_tokens()->set_ids(1, -1); }), kInvalid,
       "tokens.ids[1]"},
      {"TokenIdEqualsVocab",
       [](const ModelInfo& m) {
         GenerateRequest r = Base();
         r.mutable_tokens()->set_ids(2, m.vocab_size());
         return r;
       },
       kInvalid, "tokens.ids[2]"},
      {"TokenIdHuge", request([](GenerateRequest* r) { r->mutable_tokens()->add_ids(std::numeric_limits<int32_t>::max()); }),
       kInvalid, "tokens.ids[4]"},
      {"InvalidUtf8Text", request([](GenerateRequest* r) { r->set_text("Once upon a \xff\xfe time"); }), kInvalid,
       "text", /*survives_wire=*/false},
      {"TruncatedUtf8Text", request([](GenerateRequest* r) { r->set_text("caf\xc3"); }), kInvalid, "text",
       /*survives_wire=*/false},
      {"PromptIdsFillContext", [](const ModelInfo& m) { return Ids(m.max_context_tokens(), 1); }, kInvalid,
       "tokens.ids: the prompt has"},
      {"PromptIdsBeyondContext", [](const ModelInfo& m) { return Ids(m.max_context_tokens() + 7, 1); }, kInvalid,
       "tokens.ids"},
      {"PromptTextBeyondContext",
       [](const ModelInfo& m) {
         GenerateRequest r;
         std::string text;
         // At least one token per word.
         for (int32_t i = 0; i < m.max_context_tokens() + 8; ++i) text += "Once ";
         r.set_text(text);
         return r;
       },
       kInvalid, "text: the prompt has"},

      // --- sampling ---
      {"PromptPlusMaxTokensBeyondContext",
       [](const ModelInfo& m) {
         GenerateRequest r = Ids(m.max_context_tokens() - 10, 1);
         r.mutable_sampling()->set_max_tokens(11);
         return r;
       },
       kInvalid, "sampling.max_tokens"},
      {"MaxTokensNegative", sampling([](SamplingParams* s) { s->set_max_tokens(-1); }), kInvalid,
       "sampling.max_tokens"},
      {"MaxTokensHuge", sampling([](SamplingParams* s) { s->set_max_tokens(std::numeric_limits<int32_t>::max()); }),
       kInvalid, "sampling.max_tokens"},
      {"TemperatureNaN", sampling([](SamplingParams* s) { s->set_temperature(kNaN); }), kInvalid,
       "sampling.temperature"},
      {"TemperatureNegative", sampling([](SamplingParams* s) { s->set_temperature(-0.5f); }), kInvalid,
       "sampling.temperature"},
      {"TemperatureInf", sampling([](SamplingParams* s) { s->set_temperature(kInf); }), kInvalid,
       "sampling.temperature"},
      {"TemperatureMinusInf", sampling([](SamplingParams* s) { s->set_temperature(-kInf); }), kInvalid,
       "sampling.temperature"},
      {"TopPAboveOne", sampling([](SamplingParams* s) { s->set_top_p(1.5f); }), kInvalid,
       "sampling.top_p must be in (0, 1], got 1.5"},
      {"TopPNegative", sampling([](SamplingParams* s) { s->set_top_p(-0.1f); }), kInvalid, "sampling.top_p"},
      {"TopPNaN", sampling([](SamplingParams* s) { s->set_top_p(kNaN); }), kInvalid, "sampling.top_p"},
      {"TopPInf", sampling([](SamplingParams* s) { s->set_top_p(kInf); }), kInvalid, "sampling.top_p"},
      {"TopKMinusTwo", sampling([](SamplingParams* s) { s->set_top_k(-2); }), kInvalid, "sampling.top_k"},
      {"MinPAboveOne", sampling([](SamplingParams* s) { s->set_min_p(1.5f); }), kInvalid, "sampling.min_p"},
      {"MinPNegative", sampling([](SamplingParams* s) { s->set_min_p(-0.01f); }), kInvalid, "sampling.min_p"},
      {"MinPNaN", sampling([](SamplingParams* s) { s->set_min_p(kNaN); }), kInvalid, "sampling.min_p"},
      {"TooManyStopStrings",
       sampling([](SamplingParams* s) {
         for (int i = 0; i < 17; ++i) s->add_stop("s" + std::to_string(i));
       }),
       kInvalid, "sampling.stop"},
      {"EmptyStopString", sampling([](SamplingParams* s) { s->add_stop(""); }), kInvalid, "sampling.stop[0]"},
      {"OverlongStopString",
       sampling([](SamplingParams* s) {
         s->add_stop("fine");
         s->add_stop(std::string(257, 'x'));
       }),
       kInvalid, "sampling.stop[1]"},
      {"InvalidUtf8StopString", sampling([](SamplingParams* s) { s->add_stop("\xc0\xaf"); }), kInvalid,
       "sampling.stop[0]", /*survives_wire=*/false},
      {"StopTokenIdNegative", sampling([](SamplingParams* s) { s->add_stop_token_ids(-3); }), kInvalid,
       "sampling.stop_token_ids[0]"},
      {"StopTokenIdEqualsVocab",
       [](const ModelInfo& m) {
         GenerateRequest r = Base();
         r.mutable_sampling()->add_stop_token_ids(2);
         r.mutable_sampling()->add_stop_token_ids(m.vocab_size());
         return r;
       },
       kInvalid, "sampling.stop_token_ids[1]"},

      // --- compression ---
      {"UnknownPolicy", compression([](CompressionSpec* c) { c->set_policy("h2o"); }), kInvalid,
       "compression.policy"},
      {"PolicyWrongCase", compression([](CompressionSpec* c) { c->set_policy("SnapKV"); }), kInvalid,
       "compression.policy"},
      {"KeepRatioAboveOne", compression([](CompressionSpec* c) { c->set_keep_ratio(1.5f); }), kInvalid,
       "compression.keep_ratio"},
      {"KeepRatioNegative", compression([](CompressionSpec* c) { c->set_keep_ratio(-0.2f); }), kInvalid,
       "compression.keep_ratio"},
      {"KeepRatioNaN", compression([](CompressionSpec* c) { c->set_keep_ratio(kNaN); }), kInvalid,
       "compression.keep_ratio"},
      {"KeepRatioInf", compression([](CompressionSpec* c) { c->set_keep_ratio(kInf); }), kInvalid,
       "compression.keep_ratio"},
      {"KeepRatioAndBudgetTokens",
       compression([](CompressionSpec* c) {
         c->set_policy("snapkv");
         c->set_keep_ratio(0.5f);
         c->set_budget_tokens(64);
       }),
       kInvalid, "compression.budget_tokens"},
      {"BudgetTokensNegative", compression([](CompressionSpec* c) { c->set_budget_tokens(-1); }), kInvalid,
       "compression.budget_tokens"},
      {"SinkTokensNegative", compression([](CompressionSpec* c) { c->set_sink_tokens(-4); }), kInvalid,
       "compression.sink_tokens"},
      {"RecentTokensNegative", compression([](CompressionSpec* c) { c->set_recent_tokens(-4); }), kInvalid,
       "compression.recent_tokens"},
      {"HeadBudgetUnknownValue",
       compression([](CompressionSpec* c) { c->set_head_budget(static_cast<CompressionSpec::HeadBudget>(7)); }),
       kInvalid, "compression.head_budget"},
      {"HeadBudgetAdaptiveUnsupported",
       compression([](CompressionSpec* c) {
         c->set_policy("streaming_llm");
         c->set_head_budget(CompressionSpec::ADAPTIVE);
       }),
       kInvalid, "compression.head_budget"},
      {"ProtectedRangeReversed",
       compression([](CompressionSpec* c) {
         auto* range = c->add_protected_ranges();
         range->set_begin(3);
         range->set_end(1);
       }),
       kInvalid, "compression.protected_ranges[0]"},
      {"ProtectedRangeEmpty",
       compression([](CompressionSpec* c) {
         auto* ok = c->add_protected_ranges();
         ok->set_begin(0);
         ok->set_end(2);
         auto* empty = c->add_protected_ranges();
         empty->set_begin(2);
         empty->set_end(2);
       }),
       kInvalid, "compression.protected_ranges[1]"},
      {"ProtectedRangeNegativeBegin",
       compression([](CompressionSpec* c) {
         auto* range = c->add_protected_ranges();
         range->set_begin(-1);
         range->set_end(2);
       }),
       kInvalid, "compression.protected_ranges[0]"},
      {"ProtectedRangeBeyondPrompt",
       compression([](CompressionSpec* c) {  // the base prompt has 4 tokens
         auto* range = c->add_protected_ranges();
         range->set_begin(2);
         range->set_end(5);
       }),
       kInvalid, "compression.protected_ranges[0]"},

      // --- request_id ---
      {"RequestIdTooLong", request([](GenerateRequest* r) { r->set_request_id(std::string(257, 'a')); }), kInvalid,
       "request_id"},
      {"RequestIdNewline", request([](GenerateRequest* r) { r->set_request_id("req\n1"); }), kInvalid,
       "request_id"},
      {"RequestIdControlByte", request([](GenerateRequest* r) { r->set_request_id(std::string("a\x01", 2)); }),
       kInvalid, "request_id"},
      {"RequestIdDelete", request([](GenerateRequest* r) { r->set_request_id("a\x7f"); }), kInvalid, "request_id"},
      {"RequestIdNonAscii", request([](GenerateRequest* r) { r->set_request_id("caf\xc3\xa9"); }), kInvalid,
       "request_id"},
  };
}

}  // namespace kvgate::router
