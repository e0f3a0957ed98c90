// File: libFuzzer target for the router's validation of a public GenerateRequest
// (router/request_validation.h ValidateGenerateRequest) on models/kvgate-tiny's tokenizer
// and config with the server's default limits: the bytes a client sends, as the router
// parses and checks them.
//
// Input: kvgate.v1.GenerateRequest wire bytes.
// Properties: a rejection is INVALID_ARGUMENT; an accepted request keeps every promise
// of ValidatedRequest (non-empty prompt of ids in [0, vocab_size), max_tokens >= 1 and
// within the context, top_p in (0, 1], a policy, an eviction spec that validates), and
// its options survive the proto mapping the workers decode (kv_manager/proto_convert.h).
// KVGATE_FUZZ_WRITE_SEEDS=DIR writes the seed corpus to DIR and exits.
#include <cstdint>
#include <cstdlib>
#include <filesystem>
#include <fstream>
#include <memory>
#include <string>

#include "engine/model_config.h"
#include "engine/tokenizer.h"
#include "fuzz/fuzz_util.h"
#include "gates/eviction_spec.h"
#include "kv_manager/proto_convert.h"
#include "router/request_validation.h"

namespace {

struct Model {
  std::unique_ptr<kvgate::engine::Tokenizer> tokenizer;
  kvgate::engine::ModelConfig config;
  kvgate::router::ValidationLimits limits;
};

const Model& TheModel() {
  static const Model* model = [] {
    auto* m = new Model();
    const std::string dir = kvgate::fuzz::SourceDir() + "/models/kvgate-tiny";
    auto tok = kvgate::engine::Tokenizer::FromFile(dir + "/tokenizer.json");
    KVGATE_FUZZ_CHECK(tok.ok(), tok.status().ToString());
    m->tokenizer = std::move(*tok);
    auto config = kvgate::engine::LoadModelConfig(dir);
    KVGATE_FUZZ_CHECK(config.ok(), config.status().ToString());
    m->config = *config;
    return m;
  }();
  return *model;
}

void WriteSeeds(const std::string& dir) {
  std::filesystem::create_directories(dir);
  auto write = [&](const std::string& name, const kvgate::v1::GenerateRequest& r) {
    std::ofstream(dir + "/" + name, std::ios::binary) << r.SerializeAsString();
  };
  kvgate::v1::GenerateRequest r;
  r.set_text("Where is the needle?");
  write("text", r);
  r.set_request_id("req-1");
  auto* s = r.mutable_sampling();
  s->set_max_tokens(8);
  s->set_temperature(0.7f);
  s->set_top_p(0.9f);
  s->set_top_k(40);
  s->set_min_p(0.05f);
  s->set_seed(42);
  s->add_stop("\n\n");
  s->add_stop_token_ids(2);
  auto* c = r.mutable_compression();
  c->set_policy("snapkv");
  c->set_keep_ratio(0.3f);
  c->set_sink_tokens(4);
  c->set_recent_tokens(16);
  c->set_head_budget(kvgate::v1::CompressionSpec::ADAPTIVE);
  auto* range = c->add_protected_ranges();
  range->set_begin(0);
  range->set_end(3);
  write("text_sampling_snapkv", r);
  kvgate::v1::GenerateRequest ids;
  for (int id : {1, 15, 300, 7}) ids.mutable_tokens()->add_ids(id);
  ids.mutable_compression()->set_policy("streaming_llm");
  ids.mutable_compression()->set_budget_tokens(64);
  ids.set_skip_text(true);
  write("ids_streaming", ids);
}

}  // namespace

extern "C" int LLVMFuzzerInitialize(int*, char***) {
  if (const char* dir = std::getenv("KVGATE_FUZZ_WRITE_SEEDS")) {
    WriteSeeds(dir);
    std::exit(0);
  }
  TheModel();
  return 0;
}

extern "C" int LLVMFuzzerTestOneInput(const uint8_t* data, size_t size) {
  if (size > 16 * 1024) return 0;
  kvgate::v1::GenerateRequest request;
  if (!request.ParseFromArray(data, static_cast<int>(size))) return 0;
  const Model& m = TheModel();
  auto v = kvgate::router::ValidateGenerateRequest(request, *m.tokenizer, m.config, m.limits);
  if (!v.ok()) {
    KVGATE_FUZZ_CHECK(v.status().code() == absl::StatusCode::kInvalidArgument, v.status().ToString());
    return 0;
  }
  KVGATE_FUZZ_CHECK(!v->prompt.empty());
  for (int32_t id : v->prompt) KVGATE_FUZZ_CHECK(id >= 0 && id < m.config.vocab_size, id);
  const auto& o = v->options;
  KVGATE_FUZZ_CHECK(o.max_tokens >= 1 && o.max_tokens <= m.limits.max_tokens, o.max_tokens);
  KVGATE_FUZZ_CHECK(static_cast<int64_t>(v->prompt.size()) + o.max_tokens <= m.config.max_context_tokens,
                    v->prompt.size(), " + ", o.max_tokens);
  KVGATE_FUZZ_CHECK(o.sampling.top_p > 0 && o.sampling.top_p <= 1, o.sampling.top_p);
  KVGATE_FUZZ_CHECK(!v->eviction.policy.empty());
  const absl::Status spec = kvgate::gates::ValidateEvictionSpec(v->eviction);
  KVGATE_FUZZ_CHECK(spec.ok(), spec.ToString());
  // What the router sends on, decoded as a worker decodes it.
  const kvgate::v1::SamplingParams wire = kvgate::kv::ToProto(o);
  KVGATE_FUZZ_CHECK(kvgate::kv::ToProto(kvgate::kv::FromProto(wire)).SerializeAsString() == wire.SerializeAsString(),
                    wire.ShortDebugString());
  const kvgate::gates::EvictionSpec back = kvgate::kv::FromProto(kvgate::kv::ToPlanProto(v->eviction));
  KVGATE_FUZZ_CHECK(kvgate::gates::ValidateEvictionSpec(back).ok());
  return 0;
}
