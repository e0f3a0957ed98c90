#include "kv/worker/worker_runtime.h"

#include <algorithm>
#include <filesystem>

#include "absl/strings/str_cat.h"
#include "common/status_macros.h"

namespace kvgate::kv {

absl::StatusOr<std::unique_ptr<WorkerRuntime>> WorkerRuntime::Load(const WorkerRuntimeOptions& options,
                                                                   const WorkerRuntime* share_weights_with) {
  namespace fs = std::filesystem;
  std::error_code ec;
  if (!fs::is_directory(options.model_dir, ec)) {
    return absl::NotFoundError(absl::StrCat("model directory '", options.model_dir, "' does not exist"));
  }
  if (options.page_tokens < 1) return absl::InvalidArgumentError("page_tokens must be at least 1");
  auto runtime = std::unique_ptr<WorkerRuntime>(new WorkerRuntime());
  runtime->options_ = options;
  KVGATE_ASSIGN_OR_RETURN(runtime->backend_, ops::CreateBackend(options.backend));
  if (share_weights_with != nullptr) {
    if (fs::path(share_weights_with->options_.model_dir).lexically_normal() != fs::path(options.model_dir).lexically_normal()) {
      return absl::InvalidArgumentError(absl::StrCat("cannot share the weights of '", share_weights_with->options_.model_dir,
                                                     "' with a runtime of '", options.model_dir, "'"));
    }
    KVGATE_ASSIGN_OR_RETURN(runtime->model_,
                            engine::Model::ShareWeights(*share_weights_with->model_, runtime->backend_.get()));
    runtime->weights_backend_ = share_weights_with->backend_;
  } else {
    KVGATE_ASSIGN_OR_RETURN(runtime->model_, engine::Model::Load(options.model_dir, runtime->backend_.get()));
  }
  KVGATE_ASSIGN_OR_RETURN(runtime->tokenizer_,
                          engine::Tokenizer::FromFile((fs::path(options.model_dir) / "tokenizer.json").string()));
  const engine::ModelConfig& c = runtime->model_->config();
  KVGATE_ASSIGN_OR_RETURN(runtime->policy_options_, gates::LoadGates(options.gates, runtime->policy_shape()));
  int32_t pages = options.kv_pool_pages;
  if (pages <= 0) {
    const int32_t pages_per_head = (runtime->max_sequence_tokens() + options.page_tokens - 1) / options.page_tokens + 1;
    const int64_t total = int64_t{std::max(1, options.kv_pool_sequences)} * c.num_layers * c.num_kv_heads * pages_per_head;
    if (total > (int64_t{1} << 30)) return absl::InvalidArgumentError("KV pool too large: lower kv_pool_sequences");
    pages = static_cast<int32_t>(total);
  }
  const ops::KvDtype dtype = options.kv_dtype.value_or(KvPool::AutoDtype(*runtime->backend_));
  KVGATE_ASSIGN_OR_RETURN(runtime->pool_,
                          KvPool::Create(runtime->backend_.get(), pages, options.page_tokens, c.head_dim, dtype));
  return runtime;
}

int32_t WorkerRuntime::max_sequence_tokens() const {
  const int32_t context = model_->config().max_context_tokens;
  const int32_t asked = options_.kv_pool_sequence_tokens;
  return asked > 0 ? std::min(asked, context) : context;
}

std::string WorkerRuntime::model_name() const {
  std::filesystem::path dir(options_.model_dir);
  if (dir.filename().empty()) dir = dir.parent_path();
  return dir.filename().string();
}

gates::ModelShape WorkerRuntime::policy_shape() const {
  const engine::ModelConfig& c = config();
  return gates::ModelShape{c.num_layers, c.num_heads, c.num_kv_heads, c.head_dim, c.hidden_size};
}

gates::PolicyOptions WorkerRuntime::policy_options() const { return policy_options_; }

}  // namespace kvgate::kv
