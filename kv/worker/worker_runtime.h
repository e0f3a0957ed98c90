// File: what every worker process (prefill or decode) loads before it serves: the
// backend, the model, its tokenizer, the learned gates and the head-paged KV pool. The
// two workers of one request must load the same model and gates; the KV manager checks
// the model's shape at registration.
#pragma once

#include <cstdint>
#include <memory>
#include <optional>
#include <string>

#include "absl/status/statusor.h"
#include "cuda/backend.h"
#include "engine/model.h"
#include "engine/tokenizer.h"
#include "gates/policy.h"
#include "kv/kv_pool.h"

namespace kvgate::kv {

struct WorkerRuntimeOptions {
  std::string model_dir;
  std::string backend = "cpu";  // cpu, cuda[:N]
  int32_t page_tokens = 16;     // rows per KV page, tokens
  // The KV pages' element type; nullopt = KvPool::AutoDtype (bf16 on cuda, float32 on cpu).
  std::optional<ops::KvDtype> kv_dtype;
  // KV pool size in pages; 0 = room for kv_pool_sequences full-context sequences.
  int32_t kv_pool_pages = 0;
  int32_t kv_pool_sequences = 8;
  // Tokens each of those sequences may hold; 0 = the model's context. The prefill worker
  // stages one prompt at a time, so this is its longest prompt (--max-prompt-tokens).
  int32_t kv_pool_sequence_tokens = 0;
  // The learned gates' weight files (or seeded random gates), loaded once.
  gates::GateFiles gates;
};

class WorkerRuntime {
 public:
  // NOT_FOUND for a missing model directory; load errors pass through. With
  // `share_weights_with` (another role of this process, loaded from the same model
  // directory on the same backend name), the model's weights are that runtime's, not a
  // second copy (engine::Model::ShareWeights); this runtime keeps the other's backend
  // alive for as long as it uses them. INVALID_ARGUMENT when the two disagree.
  static absl::StatusOr<std::unique_ptr<WorkerRuntime>> Load(const WorkerRuntimeOptions& options,
                                                             const WorkerRuntime* share_weights_with = nullptr);

  const WorkerRuntimeOptions& options() const { return options_; }
  ops::Backend& backend() { return *backend_; }
  engine::Model& model() { return *model_; }
  const engine::ModelConfig& config() const { return model_->config(); }
  const engine::Tokenizer& tokenizer() const { return *tokenizer_; }
  KvPool& pool() { return *pool_; }
  // The longest sequence the pool was sized for (kv_pool_sequence_tokens, else the
  // model's context), tokens.
  int32_t max_sequence_tokens() const;
  std::string model_name() const;
  // The policy options of a request: the loaded gates attached.
  gates::PolicyOptions policy_options() const;
  // The model's shape as the policies see it.
  gates::ModelShape policy_shape() const;

 private:
  WorkerRuntimeOptions options_;
  // The backend that allocated shared weights (another runtime's); declared before
  // model_ so that it outlives the weights model_ may hold the last reference to.
  std::shared_ptr<ops::Backend> weights_backend_;
  std::shared_ptr<ops::Backend> backend_;
  std::unique_ptr<engine::Model> model_;
  std::unique_ptr<engine::Tokenizer> tokenizer_;
  gates::PolicyOptions policy_options_;  // the loaded gates attached
  std::unique_ptr<KvPool> pool_;
};

}  // namespace kvgate::kv
