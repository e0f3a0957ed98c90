#include "engine/model.h"

#include <cmath>
#include <random>

#include "absl/strings/str_cat.h"
#include "common/status_macros.h"
#include "engine/safetensors.h"

namespace kvgate::engine {

int64_t KvCache::num_entries() const {
  return static_cast<int64_t>(k_.size()) * num_kv_heads_ * length_tokens_;
}

absl::StatusOr<std::unique_ptr<Model>> Model::Load(const std::string& model_dir,
                                                   ops::Backend* backend) {
  KVGATE_ASSIGN_OR_RETURN(ModelConfig config, LoadModelConfig(model_dir));
  KVGATE_ASSIGN_OR_RETURN(std::unique_ptr<CheckpointTensors> tensors,
                          CheckpointTensors::Open(model_dir));
  auto model = std::unique_ptr<Model>(new Model(std::move(config), backend));
  const bool lm_head_present = tensors->Contains("lm_head.weight");
  if (!model->config_.tie_word_embeddings && !lm_head_present) {
    return absl::InvalidArgumentError(absl::StrCat(
        model_dir, ": tie_word_embeddings is false but the checkpoint has no lm_head.weight"));
  }
  TensorSource source = [&](const std::string& name, const std::vector<int64_t>& shape) {
    return tensors->ReadFloat32(name, shape);
  };
  absl::Status status = model->LoadWeights(source, lm_head_present);
  if (!status.ok()) {
    return absl::Status(status.code(), absl::StrCat(model_dir, ": ", status.message()));
  }
  return model;
}

absl::StatusOr<std::unique_ptr<Model>> Model::CreateRandom(const ModelConfig& config, uint64_t seed,
                                                           ops::Backend* backend) {
  auto model = std::unique_ptr<Model>(new Model(config, backend));
  std::mt19937_64 rng(seed);
  TensorSource source = [&](const std::string& name, const std::vector<int64_t>& shape)
      -> absl::StatusOr<std::vector<float>> {
    size_t n = 1;
    for (int64_t d : shape) n *= static_cast<size_t>(d);
    std::vector<float> values(n);
    const bool is_norm = name.find("norm") != std::string::npos;
    std::normal_distribution<float> dist(0.0f, 0.02f);
    for (float& v : values) v = is_norm ? 1.0f : dist(rng);
    return values;
  };
  KVGATE_RETURN_IF_ERROR(model->LoadWeights(source, !config.tie_word_embeddings));
  return model;
}

absl::StatusOr<ops::DeviceBuffer> Model::Upload(const TensorSource& source, const std::string& name,
                                                const std::vector<int64_t>& shape) {
  KVGATE_ASSIGN_OR_RETURN(std::vector<float> host, source(name, shape));
  KVGATE_ASSIGN_OR_RETURN(ops::DeviceBuffer buffer, backend_->Alloc(host.size() * sizeof(float)));
  KVGATE_RETURN_IF_ERROR(backend_->CopyToBackend(buffer.data(), host.data(), buffer.bytes()));
  return buffer;
}

absl::Status Model::LoadWeights(const TensorSource& source, bool lm_head_present) {
  const ModelConfig& c = config_;
  const int64_t hidden = c.hidden_size, q_dim = int64_t{c.num_heads} * c.head_dim,
                kv_dim = int64_t{c.num_kv_heads} * c.head_dim, inter = c.intermediate_size;
  KVGATE_ASSIGN_OR_RETURN(embed_, Upload(source, "model.embed_tokens.weight", {c.vocab_size, hidden}));
  KVGATE_ASSIGN_OR_RETURN(final_norm_, Upload(source, "model.norm.weight", {hidden}));
  // HF ties only when asked; a stored lm_head is used whenever the config does not tie.
  if (!c.tie_word_embeddings && lm_head_present) {
    KVGATE_ASSIGN_OR_RETURN(lm_head_, Upload(source, "lm_head.weight", {c.vocab_size, hidden}));
  }
  layers_.resize(c.num_layers);
  for (int i = 0; i < c.num_layers; ++i) {
    const std::string p = absl::StrCat("model.layers.", i, ".");
    Layer& l = layers_[i];
    KVGATE_ASSIGN_OR_RETURN(l.input_norm, Upload(source, p + "input_layernorm.weight", {hidden}));
    KVGATE_ASSIGN_OR_RETURN(l.post_attention_norm,
                            Upload(source, p + "post_attention_layernorm.weight", {hidden}));
    KVGATE_ASSIGN_OR_RETURN(l.wq, Upload(source, p + "self_attn.q_proj.weight", {q_dim, hidden}));
    KVGATE_ASSIGN_OR_RETURN(l.wk, Upload(source, p + "self_attn.k_proj.weight", {kv_dim, hidden}));
    KVGATE_ASSIGN_OR_RETURN(l.wv, Upload(source, p + "self_attn.v_proj.weight", {kv_dim, hidden}));
    KVGATE_ASSIGN_OR_RETURN(l.wo, Upload(source, p + "self_attn.o_proj.weight", {hidden, q_dim}));
    if (c.attention_bias) {
      KVGATE_ASSIGN_OR_RETURN(l.bq, Upload(source, p + "self_attn.q_proj.bias", {q_dim}));
      KVGATE_ASSIGN_OR_RETURN(l.bk, Upload(source, p + "self_attn.k_proj.bias", {kv_dim}));
      KVGATE_ASSIGN_OR_RETURN(l.bv, Upload(source, p + "self_attn.v_proj.bias", {kv_dim}));
    }
    if (c.qk_norm) {
      KVGATE_ASSIGN_OR_RETURN(l.q_norm, Upload(source, p + "self_attn.q_norm.weight", {c.head_dim}));
      KVGATE_ASSIGN_OR_RETURN(l.k_norm, Upload(source, p + "self_attn.k_norm.weight", {c.head_dim}));
    }
    KVGATE_ASSIGN_OR_RETURN(l.gate, Upload(source, p + "mlp.gate_proj.weight", {inter, hidden}));
    KVGATE_ASSIGN_OR_RETURN(l.up, Upload(source, p + "mlp.up_proj.weight", {inter, hidden}));
    KVGATE_ASSIGN_OR_RETURN(l.down, Upload(source, p + "mlp.down_proj.weight", {hidden, inter}));
  }
  std::vector<float> inv_freq = RopeInverseFrequencies(c);
  KVGATE_ASSIGN_OR_RETURN(inv_freq_, backend_->Alloc(inv_freq.size() * sizeof(float)));
  return backend_->CopyToBackend(inv_freq_.data(), inv_freq.data(), inv_freq_.bytes());
}

absl::StatusOr<std::unique_ptr<KvCache>> Model::NewCache(int32_t capacity_tokens) const {
  if (capacity_tokens <= 0 || capacity_tokens > config_.max_context_tokens) {
    return absl::InvalidArgumentError(absl::StrCat("KV cache capacity ", capacity_tokens,
                                                   " tokens is outside [1, ", config_.max_context_tokens, "]"));
  }
  auto cache = std::make_unique<KvCache>();
  cache->capacity_tokens_ = capacity_tokens;
  cache->num_kv_heads_ = config_.num_kv_heads;
  const size_t bytes = size_t{4} * config_.num_kv_heads * capacity_tokens * config_.head_dim;
  for (int i = 0; i < config_.num_layers; ++i) {
    KVGATE_ASSIGN_OR_RETURN(ops::DeviceBuffer k, backend_->Alloc(bytes));
    KVGATE_ASSIGN_OR_RETURN(ops::DeviceBuffer v, backend_->Alloc(bytes));
    cache->k_.push_back(std::move(k));
    cache->v_.push_back(std::move(v));
  }
  return cache;
}

absl::Status Model::EnsureScratch(int32_t n) {
  if (n <= scratch_tokens_) return absl::OkStatus();
  const ModelConfig& c = config_;
  const size_t q_dim = size_t{4} * c.num_heads * c.head_dim, kv_dim = size_t{4} * c.num_kv_heads * c.head_dim;
  KVGATE_ASSIGN_OR_RETURN(ids_, backend_->Alloc(size_t{4} * n));
  KVGATE_ASSIGN_OR_RETURN(positions_, backend_->Alloc(size_t{4} * n));
  KVGATE_ASSIGN_OR_RETURN(x_, backend_->Alloc(size_t{4} * n * c.hidden_size));
  KVGATE_ASSIGN_OR_RETURN(h_, backend_->Alloc(size_t{4} * n * c.hidden_size));
  KVGATE_ASSIGN_OR_RETURN(q_, backend_->Alloc(q_dim * n));
  KVGATE_ASSIGN_OR_RETURN(k_, backend_->Alloc(kv_dim * n));
  KVGATE_ASSIGN_OR_RETURN(v_, backend_->Alloc(kv_dim * n));
  KVGATE_ASSIGN_OR_RETURN(attn_, backend_->Alloc(q_dim * n));
  KVGATE_ASSIGN_OR_RETURN(gate_, backend_->Alloc(size_t{4} * n * c.intermediate_size));
  KVGATE_ASSIGN_OR_RETURN(up_, backend_->Alloc(size_t{4} * n * c.intermediate_size));
  KVGATE_ASSIGN_OR_RETURN(logits_, backend_->Alloc(size_t{4} * n * c.vocab_size));
  scratch_tokens_ = n;
  return absl::OkStatus();
}

absl::StatusOr<std::vector<float>> Model::Forward(absl::Span<const int32_t> tokens, KvCache* cache,
                                                  LogitsMode mode) {
  const ModelConfig& c = config_;
  const int32_t n = static_cast<int32_t>(tokens.size());
  if (n == 0) return absl::InvalidArgumentError("forward of zero tokens");
  for (int32_t i = 0; i < n; ++i) {
    if (tokens[i] < 0 || tokens[i] >= c.vocab_size) {
      return absl::InvalidArgumentError(absl::StrCat("token id ", tokens[i], " at index ", i,
                                                     " is outside the vocabulary [0, ", c.vocab_size, ")"));
    }
  }
  const int32_t start = cache->length_tokens_;
  if (start + n > cache->capacity_tokens_) {
    return absl::InvalidArgumentError(absl::StrCat("sequence of ", start + n, " tokens exceeds the KV cache capacity of ",
                                                   cache->capacity_tokens_, " tokens"));
  }
  KVGATE_RETURN_IF_ERROR(EnsureScratch(n));
  std::vector<int32_t> positions(n);
  for (int32_t i = 0; i < n; ++i) positions[i] = start + i;
  KVGATE_RETURN_IF_ERROR(backend_->CopyToBackend(ids_.data(), tokens.data(), size_t{4} * n));
  KVGATE_RETURN_IF_ERROR(backend_->CopyToBackend(positions_.data(), positions.data(), size_t{4} * n));

  const int32_t q_dim = c.num_heads * c.head_dim, kv_dim = c.num_kv_heads * c.head_dim;
  ops::Backend& b = *backend_;
  float* x = x_.as<float>();
  float* h = h_.as<float>();
  KVGATE_RETURN_IF_ERROR(b.Embed({ids_.as<int32_t>(), embed_.as<float>(), x, n, c.hidden_size, c.vocab_size}));
  for (int i = 0; i < c.num_layers; ++i) {
    const Layer& l = layers_[i];
    KVGATE_RETURN_IF_ERROR(b.RmsNorm({x, l.input_norm.as<float>(), h, n, c.hidden_size, c.rms_norm_eps}));
    KVGATE_RETURN_IF_ERROR(b.MatMul({h, l.wq.as<float>(), l.bq.as<float>(), q_.as<float>(), n, q_dim, c.hidden_size}));
    KVGATE_RETURN_IF_ERROR(b.MatMul({h, l.wk.as<float>(), l.bk.as<float>(), k_.as<float>(), n, kv_dim, c.hidden_size}));
    KVGATE_RETURN_IF_ERROR(b.MatMul({h, l.wv.as<float>(), l.bv.as<float>(), v_.as<float>(), n, kv_dim, c.hidden_size}));
    if (c.qk_norm) {
      KVGATE_RETURN_IF_ERROR(b.RmsNorm({q_.as<float>(), l.q_norm.as<float>(), q_.as<float>(), n * c.num_heads,
                                        c.head_dim, c.rms_norm_eps}));
      KVGATE_RETURN_IF_ERROR(b.RmsNorm({k_.as<float>(), l.k_norm.as<float>(), k_.as<float>(), n * c.num_kv_heads,
                                        c.head_dim, c.rms_norm_eps}));
    }
    KVGATE_RETURN_IF_ERROR(b.Rope({q_.as<float>(), positions_.as<int32_t>(), inv_freq_.as<float>(), n, c.num_heads, c.head_dim}));
    KVGATE_RETURN_IF_ERROR(b.Rope({k_.as<float>(), positions_.as<int32_t>(), inv_freq_.as<float>(), n, c.num_kv_heads, c.head_dim}));
    KVGATE_RETURN_IF_ERROR(b.StoreKv({k_.as<float>(), v_.as<float>(), cache->k(i), cache->v(i), n, c.num_kv_heads,
                                      c.head_dim, cache->capacity_tokens_, start}));
    ops::AttentionArgs attention;
    attention.q = q_.as<float>();
    attention.k_cache = cache->k(i);
    attention.v_cache = cache->v(i);
    attention.out = attn_.as<float>();
    attention.num_tokens = n;
    attention.num_q_heads = c.num_heads;
    attention.num_kv_heads = c.num_kv_heads;
    attention.head_dim = c.head_dim;
    attention.capacity_tokens = cache->capacity_tokens_;
    attention.q_start_row = start;
    attention.sliding_window = c.sliding_window;
    attention.scale = 1.0f / std::sqrt(static_cast<float>(c.head_dim));
    KVGATE_RETURN_IF_ERROR(b.Attention(attention));
    KVGATE_RETURN_IF_ERROR(b.MatMul({attn_.as<float>(), l.wo.as<float>(), nullptr, h, n, c.hidden_size, q_dim}));
    KVGATE_RETURN_IF_ERROR(b.Add({x, h, int64_t{n} * c.hidden_size}));
    KVGATE_RETURN_IF_ERROR(b.RmsNorm({x, l.post_attention_norm.as<float>(), h, n, c.hidden_size, c.rms_norm_eps}));
    KVGATE_RETURN_IF_ERROR(b.MatMul({h, l.gate.as<float>(), nullptr, gate_.as<float>(), n, c.intermediate_size, c.hidden_size}));
    KVGATE_RETURN_IF_ERROR(b.MatMul({h, l.up.as<float>(), nullptr, up_.as<float>(), n, c.intermediate_size, c.hidden_size}));
    KVGATE_RETURN_IF_ERROR(b.SiluMul({gate_.as<float>(), up_.as<float>(), gate_.as<float>(), int64_t{n} * c.intermediate_size}));
    KVGATE_RETURN_IF_ERROR(b.MatMul({gate_.as<float>(), l.down.as<float>(), nullptr, h, n, c.hidden_size, c.intermediate_size}));
    KVGATE_RETURN_IF_ERROR(b.Add({x, h, int64_t{n} * c.hidden_size}));
  }
  // Only the rows whose logits are wanted go through the final norm and lm_head.
  const int32_t rows = mode == LogitsMode::kAllTokens ? n : 1;
  const float* last_rows = x + int64_t{n - rows} * c.hidden_size;
  KVGATE_RETURN_IF_ERROR(b.RmsNorm({last_rows, final_norm_.as<float>(), h, rows, c.hidden_size, c.rms_norm_eps}));
  const float* head = lm_head_.data() != nullptr ? lm_head_.as<float>() : embed_.as<float>();
  KVGATE_RETURN_IF_ERROR(b.MatMul({h, head, nullptr, logits_.as<float>(), rows, c.vocab_size, c.hidden_size}));
  std::vector<float> logits(size_t{1} * rows * c.vocab_size);
  KVGATE_RETURN_IF_ERROR(b.CopyToHost(logits.data(), logits_.data(), logits.size() * sizeof(float)));
  cache->length_tokens_ = start + n;
  return logits;
}

}  // namespace kvgate::engine
