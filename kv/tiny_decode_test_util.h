// File: test-only helpers for the handoff, decode-batch and transport tests: the
// bundled kvgate-tiny model on a CPU backend with its own KV pool, generated prompts, and one
// prefill + commit per eviction policy (with fixed random gates, so a second "worker"
// can rebuild the same decode-time eviction).
#pragma once

#include <algorithm>
#include <cstdlib>
#include <cstdint>
#include <memory>
#include <optional>
#include <string>
#include <vector>

#include "absl/status/statusor.h"
#include "absl/strings/str_cat.h"
#include "absl/types/span.h"
#include "common/status_macros.h"
#include "cuda/backend.h"
#include "cuda/cpu/cpu_backend.h"
#include "engine/generator.h"
#include "engine/model.h"
#include "engine/tokenizer.h"
#include "gates/attention_gate.h"
#include "gates/fast_kvzip.h"
#include "kv/kv_pool.h"
#include "kv/policy_planner.h"
#include "tests/testing/paths.h"

namespace kvgate::kv::testing {

// One "worker": a backend, the model on it, and a KV pool in its memory. The backend is the
// CPU one unless KVGATE_TEST_BACKEND names another (the GPU machine runs these tests with
// "cuda": the handoff and batch invariants hold on every backend, against itself), and
// the pool's pages are float32 unless KVGATE_TEST_KV_DTYPE names another type.
struct TinyWorker {
  std::unique_ptr<ops::Backend> backend;
  std::unique_ptr<engine::Model> model;
  std::unique_ptr<KvPool> pool;

  static absl::StatusOr<std::unique_ptr<TinyWorker>> Create(int32_t num_pages, int32_t page_tokens = 16) {
    auto worker = std::make_unique<TinyWorker>();
    const char* backend_name = std::getenv("KVGATE_TEST_BACKEND");
    if (backend_name == nullptr || std::string(backend_name).empty()) {
      worker->backend = ops::CreateCpuBackend(2);
    } else {
      KVGATE_ASSIGN_OR_RETURN(worker->backend, ops::CreateBackend(backend_name));
    }
    KVGATE_ASSIGN_OR_RETURN(worker->model, engine::Model::Load(kvgate::testing::KvgateTinyDir(), worker->backend.get()));
    // KVGATE_TEST_KV_DTYPE (auto, float32, bf16; float32 when unset) picks the pages' type.
    const char* dtype_name = std::getenv("KVGATE_TEST_KV_DTYPE");
    KVGATE_ASSIGN_OR_RETURN(std::optional<ops::KvDtype> dtype,
                            ParseKvCacheDtype(dtype_name == nullptr || *dtype_name == '\0' ? "float32" : dtype_name));
    KVGATE_ASSIGN_OR_RETURN(worker->pool,
                            KvPool::Create(worker->backend.get(), num_pages, page_tokens,
                                           worker->model->config().head_dim,
                                           dtype.value_or(KvPool::AutoDtype(*worker->backend))));
    return worker;
  }
  gates::ModelShape shape() const {
    const engine::ModelConfig& c = model->config();
    return {c.num_layers, c.num_heads, c.num_kv_heads, c.head_dim, c.hidden_size};
  }
};

inline absl::StatusOr<std::unique_ptr<engine::Tokenizer>> LoadTinyTokenizer() {
  return engine::Tokenizer::FromFile(kvgate::testing::KvgateTinyDir() + "/tokenizer.json");
}

// `opening` followed by `tokens` tokens the model sampled itself (deterministic in seed).
inline absl::StatusOr<std::vector<int32_t>> TinyText(engine::Model* model, const engine::Tokenizer* tokenizer,
                                                     const std::string& opening, int32_t tokens, uint64_t seed) {
  KVGATE_ASSIGN_OR_RETURN(std::vector<int32_t> ids, tokenizer->Encode(opening));
  engine::Generator generator(model, tokenizer);
  engine::GenerateOptions options;
  options.max_tokens = tokens;
  options.ignore_eos = true;
  options.sampling.temperature = 0.8f;
  options.sampling.seed = seed;
  KVGATE_ASSIGN_OR_RETURN(engine::GenerateResult text, generator.Generate(ids, options));
  ids.insert(ids.end(), text.token_ids.begin(), text.token_ids.end());
  return ids;
}

// The gates every worker of a test shares (a real deployment loads the same files).
struct TinyGates {
  std::shared_ptr<const gates::FastKvzipGate> fast_kvzip;
  std::shared_ptr<const gates::AttentionGate> attention_gate;
  explicit TinyGates(const gates::ModelShape& shape)
      : fast_kvzip(gates::FastKvzipGate::CreateRandom(shape, 11)),
        attention_gate(gates::AttentionGate::CreateRandom(shape, 5)) {}
};

struct PolicyCase {
  std::string name;
  gates::EvictionSpec spec;
  gates::PolicyOptions options;
};

// Every policy with a decode-time eviction, plus full: streaming_llm's ring, sage_kv's
// query masks and recent ring, fast_kvzip's scores (chunked prefill, re-eviction every 4
// steps) and attention_gate's causal gate state.
inline std::vector<PolicyCase> DecodePolicyCases(const TinyGates& g) {
  std::vector<PolicyCase> cases;
  for (const char* name : {"full", "streaming_llm", "snapkv", "sage_kv", "fast_kvzip", "attention_gate"}) {
    PolicyCase c;
    c.name = name;
    c.spec.policy = name;
    if (c.name != "full" && c.name != "attention_gate") c.spec.keep_ratio = 0.4f;
    c.options.fast_kvzip_gate = g.fast_kvzip;
    c.options.attention_gate = g.attention_gate;
    c.options.fast_kvzip_decode_interval = 4;
    c.options.fast_kvzip_chunk_tokens = 48;
    c.options.fast_kvzip_window_tokens = 8;
    c.options.snapkv_window = 16;
    cases.push_back(std::move(c));
  }
  return cases;
}

struct Prefilled {
  std::unique_ptr<SequenceBatch> sequence;
  std::vector<float> logits;  // the last prompt token's
};

// Prefill of `prompt` with the case's policy and commit into `pool`.
inline absl::StatusOr<Prefilled> PrefillAndCommit(engine::Model& model, KvPool* pool, const PolicyCase& c,
                                                  absl::Span<const int32_t> prompt) {
  KVGATE_ASSIGN_OR_RETURN(std::unique_ptr<engine::KvPlanner> planner,
                          CreatePolicyPlanner(model, pool, c.spec, c.options));
  KVGATE_ASSIGN_OR_RETURN(std::unique_ptr<engine::KvCache> cache, model.NewCache(static_cast<int32_t>(prompt.size())));
  engine::PrefillCapture capture;
  Prefilled out;
  KVGATE_ASSIGN_OR_RETURN(out.logits, planner->Prefill(model, prompt, cache.get(), &capture));
  engine::KvAccounting accounting;
  KVGATE_ASSIGN_OR_RETURN(std::unique_ptr<engine::PagedKvBatch> batch,
                          planner->Commit(prompt, *cache, capture, &accounting));
  out.sequence.reset(static_cast<SequenceBatch*>(batch.release()));
  return out;
}

inline int32_t Argmax(absl::Span<const float> logits) {
  return static_cast<int32_t>(std::max_element(logits.begin(), logits.end()) - logits.begin());
}

}  // namespace kvgate::kv::testing
