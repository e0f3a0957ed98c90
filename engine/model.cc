#include "engine/model.h"

#include <algorithm>
#include <cmath>
#include <cstdlib>
#include <optional>
#include <random>
#include <string_view>

#include "absl/strings/str_cat.h"
#include "common/status_macros.h"
#include "cuda/bf16.h"
#include "engine/safetensors.h"

namespace kvgate::engine {

int64_t KvCache::num_entries() const {
  return static_cast<int64_t>(k_.size()) * num_kv_heads_ * length_tokens_;
}

absl::StatusOr<std::unique_ptr<Model>> Model::Load(const std::string& model_dir,
                                                   ops::Backend* backend, const LoadOptions& options) {
  KVGATE_ASSIGN_OR_RETURN(ModelConfig config, LoadModelConfig(model_dir));
  KVGATE_ASSIGN_OR_RETURN(std::unique_ptr<CheckpointTensors> tensors,
                          CheckpointTensors::Open(model_dir));
  auto model = std::unique_ptr<Model>(new Model(std::move(config), backend));
  KVGATE_RETURN_IF_ERROR(model->ChooseWeightDType(options));
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
                                                           ops::Backend* backend, const LoadOptions& options) {
  auto model = std::unique_ptr<Model>(new Model(config, backend));
  KVGATE_RETURN_IF_ERROR(model->ChooseWeightDType(options));
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

absl::Status Model::ChooseWeightDType(const LoadOptions& options) {
  WeightDType want = options.weights;
  if (want == WeightDType::kBackendDefault) {
    const char* env = std::getenv("KVGATE_WEIGHT_DTYPE");
    const std::string name = env != nullptr ? env : "";
    if (name == "fp32") {
      want = WeightDType::kF32;
    } else if (name == "bf16") {
      want = WeightDType::kBf16;
    } else if (name.empty()) {
      want = backend_->SupportsBf16() ? WeightDType::kBf16 : WeightDType::kF32;
    } else {
      return absl::InvalidArgumentError(absl::StrCat("KVGATE_WEIGHT_DTYPE='", name, "': expected fp32 or bf16"));
    }
  }
  if (want == WeightDType::kBf16 && !backend_->SupportsBf16()) {
    return absl::InvalidArgumentError(
        absl::StrCat("bf16 weights asked for, but backend ", std::string(backend_->Name()), " has no bf16 ops"));
  }
  bf16_ = want == WeightDType::kBf16;
  return absl::OkStatus();
}

absl::StatusOr<ops::DeviceBuffer> Model::UploadMatrix(const TensorSource& source, const std::string& name,
                                                      const std::vector<int64_t>& shape) {
  if (!bf16_) return Upload(source, name, shape);
  KVGATE_ASSIGN_OR_RETURN(std::vector<float> host, source(name, shape));
  // Exact for a bf16 checkpoint; round to nearest even for an fp32 one.
  std::vector<ops::Bf16> bf16(host.size());
  for (size_t i = 0; i < host.size(); ++i) bf16[i] = ops::F32ToBf16(host[i]);
  host = {};
  KVGATE_ASSIGN_OR_RETURN(ops::DeviceBuffer buffer, backend_->Alloc(bf16.size() * sizeof(ops::Bf16)));
  KVGATE_RETURN_IF_ERROR(backend_->CopyToBackend(buffer.data(), bf16.data(), buffer.bytes()));
  // The runtime stages pageable copies, but a later Synchronize keeps this obviously safe.
  KVGATE_RETURN_IF_ERROR(backend_->Synchronize());
  return buffer;
}

absl::StatusOr<std::unique_ptr<Model>> Model::ShareWeights(const Model& other, ops::Backend* backend) {
  if (backend == nullptr || backend->Name() != other.backend_->Name()) {
    return absl::InvalidArgumentError(absl::StrCat("cannot share weights held by backend ", std::string(other.backend_->Name()),
                                                   " with backend ", backend == nullptr ? std::string("(none)") : std::string(backend->Name())));
  }
  auto model = std::unique_ptr<Model>(new Model(other.config_, backend));
  model->weights_ = other.weights_;
  model->bf16_ = other.bf16_;
  return model;
}

absl::Status Model::LoadWeights(const TensorSource& source, bool lm_head_present) {
  const ModelConfig& c = config_;
  const int64_t hidden = c.hidden_size, q_dim = int64_t{c.num_heads} * c.head_dim,
                kv_dim = int64_t{c.num_kv_heads} * c.head_dim, inter = c.intermediate_size;
  KVGATE_ASSIGN_OR_RETURN(weights_->embed, UploadMatrix(source, "model.embed_tokens.weight", {c.vocab_size, hidden}));
  KVGATE_ASSIGN_OR_RETURN(weights_->final_norm, Upload(source, "model.norm.weight", {hidden}));
  // HF ties only when asked; a stored lm_head is used whenever the config does not tie.
  if (!c.tie_word_embeddings && lm_head_present) {
    KVGATE_ASSIGN_OR_RETURN(weights_->lm_head, UploadMatrix(source, "lm_head.weight", {c.vocab_size, hidden}));
  }
  weights_->layers.resize(c.num_layers);
  for (int i = 0; i < c.num_layers; ++i) {
    const std::string p = absl::StrCat("model.layers.", i, ".");
    Layer& l = weights_->layers[i];
    KVGATE_ASSIGN_OR_RETURN(l.input_norm, Upload(source, p + "input_layernorm.weight", {hidden}));
    KVGATE_ASSIGN_OR_RETURN(l.post_attention_norm,
                            Upload(source, p + "post_attention_layernorm.weight", {hidden}));
    KVGATE_ASSIGN_OR_RETURN(l.wq, UploadMatrix(source, p + "self_attn.q_proj.weight", {q_dim, hidden}));
    KVGATE_ASSIGN_OR_RETURN(l.wk, UploadMatrix(source, p + "self_attn.k_proj.weight", {kv_dim, hidden}));
    KVGATE_ASSIGN_OR_RETURN(l.wv, UploadMatrix(source, p + "self_attn.v_proj.weight", {kv_dim, hidden}));
    KVGATE_ASSIGN_OR_RETURN(l.wo, UploadMatrix(source, p + "self_attn.o_proj.weight", {hidden, q_dim}));
    if (c.attention_bias) {
      KVGATE_ASSIGN_OR_RETURN(l.bq, Upload(source, p + "self_attn.q_proj.bias", {q_dim}));
      KVGATE_ASSIGN_OR_RETURN(l.bk, Upload(source, p + "self_attn.k_proj.bias", {kv_dim}));
      KVGATE_ASSIGN_OR_RETURN(l.bv, Upload(source, p + "self_attn.v_proj.bias", {kv_dim}));
    }
    if (c.qk_norm) {
      KVGATE_ASSIGN_OR_RETURN(l.q_norm, Upload(source, p + "self_attn.q_norm.weight", {c.head_dim}));
      KVGATE_ASSIGN_OR_RETURN(l.k_norm, Upload(source, p + "self_attn.k_norm.weight", {c.head_dim}));
    }
    KVGATE_ASSIGN_OR_RETURN(l.gate, UploadMatrix(source, p + "mlp.gate_proj.weight", {inter, hidden}));
    KVGATE_ASSIGN_OR_RETURN(l.up, UploadMatrix(source, p + "mlp.up_proj.weight", {inter, hidden}));
    KVGATE_ASSIGN_OR_RETURN(l.down, UploadMatrix(source, p + "mlp.down_proj.weight", {hidden, inter}));
  }
  std::vector<float> inv_freq = RopeInverseFrequencies(c);
  KVGATE_ASSIGN_OR_RETURN(weights_->inv_freq, backend_->Alloc(inv_freq.size() * sizeof(float)));
  return backend_->CopyToBackend(weights_->inv_freq.data(), inv_freq.data(), weights_->inv_freq.bytes());
}

absl::StatusOr<std::unique_ptr<KvCache>> Model::NewCache(int32_t capacity_tokens,
                                                         bool allow_beyond_context) const {
  if (capacity_tokens <= 0 || (!allow_beyond_context && capacity_tokens > config_.max_context_tokens)) {
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

absl::StatusOr<std::unique_ptr<KvCache>> Model::CopyCache(const KvCache& from, int32_t capacity_tokens) const {
  if (from.num_kv_heads_ != config_.num_kv_heads || static_cast<int32_t>(from.k_.size()) != config_.num_layers) {
    return absl::InvalidArgumentError("CopyCache: the cache is not of this model");
  }
  if (capacity_tokens < from.length_tokens_) {
    return absl::InvalidArgumentError(absl::StrCat("CopyCache: capacity ", capacity_tokens, " is below the ",
                                                   from.length_tokens_, " rows to copy"));
  }
  KVGATE_ASSIGN_OR_RETURN(std::unique_ptr<KvCache> cache, NewCache(capacity_tokens, /*allow_beyond_context=*/true));
  const size_t head_floats = size_t{1} * config_.head_dim, rows = static_cast<size_t>(from.length_tokens_);
  for (int i = 0; i < config_.num_layers; ++i) {
    for (int h = 0; h < config_.num_kv_heads; ++h) {
      // Rows of a kv head are capacity apart: each head's rows move as one block.
      const size_t to = size_t{1} * h * capacity_tokens * head_floats, at = size_t{1} * h * from.capacity_tokens_ * head_floats;
      KVGATE_RETURN_IF_ERROR(backend_->CopyWithinBackend(cache->k(i) + to, from.k(i) + at, sizeof(float) * rows * head_floats));
      KVGATE_RETURN_IF_ERROR(backend_->CopyWithinBackend(cache->v(i) + to, from.v(i) + at, sizeof(float) * rows * head_floats));
    }
  }
  cache->length_tokens_ = from.length_tokens_;
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
  if (bf16_) {
    const size_t widest = std::max<size_t>(c.hidden_size, size_t{1} * c.num_heads * c.head_dim);
    KVGATE_ASSIGN_OR_RETURN(hb_, backend_->Alloc(sizeof(ops::Bf16) * n * widest));
    KVGATE_ASSIGN_OR_RETURN(gate_bf16_, backend_->Alloc(sizeof(ops::Bf16) * n * c.intermediate_size));
    KVGATE_ASSIGN_OR_RETURN(up_bf16_, backend_->Alloc(sizeof(ops::Bf16) * n * c.intermediate_size));
  } else {
    KVGATE_ASSIGN_OR_RETURN(gate_, backend_->Alloc(size_t{4} * n * c.intermediate_size));
    KVGATE_ASSIGN_OR_RETURN(up_, backend_->Alloc(size_t{4} * n * c.intermediate_size));
  }
  scratch_tokens_ = n;
  ++scratch_epoch_;
  return absl::OkStatus();
}

// Sized by the rows whose logits are wanted, not by the tokens of the forward: a
// 32k-token prompt of a 128k-vocabulary model would otherwise hold 16 GiB of fp32 logits
// to return one row.
absl::Status Model::EnsureLogitRows(int32_t rows) {
  if (rows <= logit_rows_) return absl::OkStatus();
  KVGATE_ASSIGN_OR_RETURN(logits_, backend_->Alloc(size_t{4} * rows * config_.vocab_size));
  KVGATE_ASSIGN_OR_RETURN(greedy_ids_, backend_->Alloc(size_t{4} * rows));
  logit_rows_ = rows;
  ++scratch_epoch_;
  return absl::OkStatus();
}

absl::Status Model::CheckTokens(absl::Span<const int32_t> tokens) const {
  if (tokens.empty()) return absl::InvalidArgumentError("forward of zero tokens");
  for (size_t i = 0; i < tokens.size(); ++i) {
    if (tokens[i] < 0 || tokens[i] >= config_.vocab_size) {
      return absl::InvalidArgumentError(absl::StrCat("token id ", tokens[i], " at index ", i,
                                                     " is outside the vocabulary [0, ", config_.vocab_size, ")"));
    }
  }
  return absl::OkStatus();
}

absl::StatusOr<std::vector<float>> Model::Forward(absl::Span<const int32_t> tokens, KvCache* cache,
                                                  LogitsMode mode) {
  ForwardOptions options;
  options.logits = mode;
  return Forward(tokens, cache, options);
}

absl::Status Model::CaptureLayer(int layer, int32_t n, const ForwardOptions& options) {
  PrefillCapture* capture = options.capture;
  const CaptureRequest& want = options.capture_request;
  const ModelConfig& c = config_;
  if (want.layer_inputs_on_backend) {
    LayerInputOnBackend input;
    if (bf16_) {
      input.bf16 = hb_.as<ops::Bf16>();
    } else {
      input.f32 = h_.as<float>();
    }
    KVGATE_RETURN_IF_ERROR(want.layer_inputs_on_backend(layer, input, n));
  }
  if (want.hidden_states) {
    auto& hidden = capture->hidden_states[layer];
    hidden.resize(size_t{1} * n * c.hidden_size);
    KVGATE_RETURN_IF_ERROR(backend_->CopyToHost(hidden.data(), h_.data(), hidden.size() * sizeof(float)));
  }
  if (capture->num_last_queries > 0) {
    const size_t row = size_t{1} * c.num_heads * c.head_dim;
    auto& queries = capture->last_queries[layer];
    queries.resize(row * capture->num_last_queries);
    KVGATE_RETURN_IF_ERROR(backend_->CopyToHost(queries.data(), q_.as<float>() + row * (n - capture->num_last_queries),
                                                queries.size() * sizeof(float)));
  }
  return absl::OkStatus();
}

absl::Status Model::FinishLayer(const Layer& l, int32_t n) {
  if (bf16_) return FinishLayerBf16(l, n);
  const ModelConfig& c = config_;
  ops::Backend& b = *backend_;
  const int32_t q_dim = c.num_heads * c.head_dim;
  float* x = x_.as<float>();
  float* h = h_.as<float>();
  KVGATE_RETURN_IF_ERROR(b.MatMul({attn_.as<float>(), l.wo.as<float>(), nullptr, h, n, c.hidden_size, q_dim}));
  KVGATE_RETURN_IF_ERROR(b.Add({x, h, int64_t{n} * c.hidden_size}));
  KVGATE_RETURN_IF_ERROR(b.RmsNorm({x, l.post_attention_norm.as<float>(), h, n, c.hidden_size, c.rms_norm_eps}));
  KVGATE_RETURN_IF_ERROR(b.MatMul({h, l.gate.as<float>(), nullptr, gate_.as<float>(), n, c.intermediate_size, c.hidden_size}));
  KVGATE_RETURN_IF_ERROR(b.MatMul({h, l.up.as<float>(), nullptr, up_.as<float>(), n, c.intermediate_size, c.hidden_size}));
  KVGATE_RETURN_IF_ERROR(b.SiluMul({gate_.as<float>(), up_.as<float>(), gate_.as<float>(), int64_t{n} * c.intermediate_size}));
  KVGATE_RETURN_IF_ERROR(b.MatMul({gate_.as<float>(), l.down.as<float>(), nullptr, h, n, c.hidden_size, c.intermediate_size}));
  return b.Add({x, h, int64_t{n} * c.hidden_size});
}

// o_proj and down_proj add into the residual stream inside the GEMM (accumulate).
absl::Status Model::FinishLayerBf16(const Layer& l, int32_t n) {
  const ModelConfig& c = config_;
  ops::Backend& b = *backend_;
  const int32_t q_dim = c.num_heads * c.head_dim;
  float* x = x_.as<float>();
  ops::Bf16* hb = hb_.as<ops::Bf16>();
  ops::Bf16* gate = gate_bf16_.as<ops::Bf16>();
  ops::Bf16* up = up_bf16_.as<ops::Bf16>();
  const auto gemm = [&](const ops::Bf16* in, const ops::DeviceBuffer& w, void* out, int32_t out_dim, int32_t in_dim,
                        bool out_bf16, bool accumulate) {
    ops::GemmBf16Args args;
    args.x = in;
    args.w = w.as<ops::Bf16>();
    args.y = out;
    args.m = n;
    args.n = out_dim;
    args.k = in_dim;
    args.y_bf16 = out_bf16;
    args.accumulate = accumulate;
    return b.GemmBf16(args);
  };
  KVGATE_RETURN_IF_ERROR(b.CastToBf16({attn_.as<float>(), hb, int64_t{n} * q_dim}));
  KVGATE_RETURN_IF_ERROR(gemm(hb, l.wo, x, c.hidden_size, q_dim, false, true));
  KVGATE_RETURN_IF_ERROR(b.RmsNormBf16({x, l.post_attention_norm.as<float>(), hb, n, c.hidden_size, c.rms_norm_eps}));
  KVGATE_RETURN_IF_ERROR(gemm(hb, l.gate, gate, c.intermediate_size, c.hidden_size, true, false));
  KVGATE_RETURN_IF_ERROR(gemm(hb, l.up, up, c.intermediate_size, c.hidden_size, true, false));
  KVGATE_RETURN_IF_ERROR(b.SiluMulBf16({gate, up, gate, int64_t{n} * c.intermediate_size}));
  return gemm(gate, l.down, x, c.hidden_size, c.intermediate_size, false, true);
}

absl::StatusOr<std::vector<float>> Model::Logits(int32_t n, int32_t rows) {
  KVGATE_RETURN_IF_ERROR(ComputeLogits(n, rows));
  std::vector<float> logits(size_t{1} * rows * config_.vocab_size);
  KVGATE_RETURN_IF_ERROR(backend_->CopyToHost(logits.data(), logits_.data(), logits.size() * sizeof(float)));
  return logits;
}

absl::Status Model::ComputeLogits(int32_t n, int32_t rows) {
  const ModelConfig& c = config_;
  ops::Backend& b = *backend_;
  // Only the rows whose logits are wanted go through the final norm and lm_head.
  const float* last_rows = x_.as<float>() + int64_t{n - rows} * c.hidden_size;
  KVGATE_RETURN_IF_ERROR(EnsureLogitRows(rows));
  if (bf16_) {
    ops::Bf16* hb = hb_.as<ops::Bf16>();
    KVGATE_RETURN_IF_ERROR(b.RmsNormBf16({last_rows, weights_->final_norm.as<float>(), hb, rows, c.hidden_size, c.rms_norm_eps}));
    ops::GemmBf16Args args;
    args.x = hb;
    args.w = weights_->lm_head.data() != nullptr ? weights_->lm_head.as<ops::Bf16>() : weights_->embed.as<ops::Bf16>();
    args.y = logits_.data();
    args.m = rows;
    args.n = c.vocab_size;
    args.k = c.hidden_size;
    return b.GemmBf16(args);
  }
  KVGATE_RETURN_IF_ERROR(b.RmsNorm({last_rows, weights_->final_norm.as<float>(), h_.as<float>(), rows, c.hidden_size, c.rms_norm_eps}));
  const float* head = weights_->lm_head.data() != nullptr ? weights_->lm_head.as<float>() : weights_->embed.as<float>();
  return b.MatMul({h_.as<float>(), head, nullptr, logits_.as<float>(), rows, c.vocab_size, c.hidden_size});
}

absl::StatusOr<std::vector<float>> Model::Forward(absl::Span<const int32_t> tokens, KvCache* cache,
                                                  const ForwardOptions& options) {
  const ModelConfig& c = config_;
  KVGATE_RETURN_IF_ERROR(CheckTokens(tokens));
  const int32_t n = static_cast<int32_t>(tokens.size());
  const int32_t start = cache->length_tokens_;
  if (start + n > cache->capacity_tokens_) {
    return absl::InvalidArgumentError(absl::StrCat("sequence of ", start + n, " tokens exceeds the KV cache capacity of ",
                                                   cache->capacity_tokens_, " tokens"));
  }
  const bool per_query_head_masks = !options.query_head_key_masks.empty();
  if (per_query_head_masks && (!options.key_masks.empty() || options.layer_key_mask)) {
    return absl::InvalidArgumentError("query_head_key_masks cannot be combined with key_masks or layer_key_mask");
  }
  if (!options.key_masks.empty() || per_query_head_masks || options.layer_key_mask) {
    const size_t mask_bytes =
        size_t{1} * (per_query_head_masks ? c.num_heads : c.num_kv_heads) * cache->capacity_tokens_;
    if (!options.key_masks.empty() && options.key_masks.size() != static_cast<size_t>(c.num_layers)) {
      return absl::InvalidArgumentError("key_masks must have one mask per layer");
    }
    for (const auto& mask : options.key_masks) {
      if (mask.size() != mask_bytes) return absl::InvalidArgumentError("key mask size is not num_kv_heads * capacity");
    }
    if (per_query_head_masks && options.query_head_key_masks.size() != static_cast<size_t>(c.num_layers)) {
      return absl::InvalidArgumentError("query_head_key_masks must have one mask per layer");
    }
    for (const auto& mask : options.query_head_key_masks) {
      if (mask.size() != mask_bytes) {
        return absl::InvalidArgumentError("query-head key mask size is not num_heads * capacity");
      }
    }
    if (key_mask_bytes_ < static_cast<int32_t>(mask_bytes)) {
      KVGATE_ASSIGN_OR_RETURN(key_mask_, backend_->Alloc(mask_bytes));
      key_mask_bytes_ = static_cast<int32_t>(mask_bytes);
    }
  }
  PrefillCapture* capture = options.capture;
  if (capture != nullptr) {
    capture->shape = {c.num_layers, c.num_heads, c.num_kv_heads, c.head_dim, c.hidden_size};
    capture->prompt_tokens = start + n;
    capture->num_last_queries = std::min(options.capture_request.last_queries, n);
    capture->keys.assign(options.capture_request.keys ? c.num_layers : 0, {});
    capture->last_queries.assign(capture->num_last_queries > 0 ? c.num_layers : 0, {});
    capture->hidden_states.assign(options.capture_request.hidden_states ? c.num_layers : 0, {});
    capture->num_window_queries = std::min(options.capture_request.window_probs, n);
    capture->window_probs.clear();
    capture->backend_window_probs.reset();
    capture->backend = nullptr;
    capture->window_logits = options.capture_request.window_logits && capture->num_window_queries == 1;
  }
  // [num_layers, num_q_heads, start + n]: the window scores of every layer, brought to the
  // host in one copy after the last layer (a copy per layer would stall the device each time).
  // [num_layers, num_q_heads, start + n]: the window scores of every layer, left in backend
  // memory for the policy (PrefillCapture::backend_window_probs).
  const size_t window_probs_per_layer = size_t{1} * c.num_heads * (start + n);
  float* window_probs = nullptr;
  if (capture != nullptr && capture->num_window_queries > 0) {
    KVGATE_ASSIGN_OR_RETURN(ops::DeviceBuffer scores,
                            backend_->Alloc(sizeof(float) * c.num_layers * window_probs_per_layer));
    window_probs = scores.as<float>();
    capture->backend_window_probs = std::make_shared<const ops::DeviceBuffer>(std::move(scores));
    capture->backend = backend_;
  }
  KVGATE_RETURN_IF_ERROR(EnsureScratch(n));
  std::vector<int32_t> positions(n);
  for (int32_t i = 0; i < n; ++i) positions[i] = start + i;
  KVGATE_RETURN_IF_ERROR(backend_->CopyToBackend(ids_.data(), tokens.data(), size_t{4} * n));
  KVGATE_RETURN_IF_ERROR(backend_->CopyToBackend(positions_.data(), positions.data(), size_t{4} * n));

  ops::Backend& b = *backend_;
  if (bf16_) {
    KVGATE_RETURN_IF_ERROR(
        b.EmbedBf16({ids_.as<int32_t>(), weights_->embed.as<ops::Bf16>(), x_.as<float>(), n, c.hidden_size, c.vocab_size}));
  } else {
    KVGATE_RETURN_IF_ERROR(b.Embed({ids_.as<int32_t>(), weights_->embed.as<float>(), x_.as<float>(), n, c.hidden_size, c.vocab_size}));
  }
  // With bf16 weights the fp32 normed hidden states are made only when someone reads them
  // (a gate on the backend reads the bf16 ones).
  const bool want_hidden = (capture != nullptr && options.capture_request.hidden_states) ||
                           static_cast<bool>(options.layer_key_mask);
  for (int i = 0; i < c.num_layers; ++i) {
    const Layer& l = weights_->layers[i];
    KVGATE_RETURN_IF_ERROR(ProjectQkv(l, n, positions_.as<int32_t>(), want_hidden));
    if (capture != nullptr) KVGATE_RETURN_IF_ERROR(CaptureLayer(i, n, options));
    KVGATE_RETURN_IF_ERROR(b.StoreKv({k_.as<float>(), v_.as<float>(), cache->k(i), cache->v(i), n, c.num_kv_heads,
                                      c.head_dim, cache->capacity_tokens_, start}));
    if (window_probs != nullptr) {
      const int32_t w = capture->num_window_queries, length = start + n;
      ops::WindowAttentionProbsArgs scores;
      scores.q = q_.as<float>() + size_t{1} * (n - w) * c.num_heads * c.head_dim;
      scores.k_cache = cache->k(i);
      scores.out = window_probs + i * window_probs_per_layer;
      scores.window = w;
      scores.length = length;
      scores.num_q_heads = c.num_heads;
      scores.num_kv_heads = c.num_kv_heads;
      scores.head_dim = c.head_dim;
      scores.capacity_tokens = cache->capacity_tokens_;
      scores.scale = 1.0f / std::sqrt(static_cast<float>(c.head_dim));
      scores.logits = capture->window_logits;
      KVGATE_RETURN_IF_ERROR(b.WindowAttentionProbs(scores));
    }
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
    if (!options.key_masks.empty()) {
      KVGATE_RETURN_IF_ERROR(b.CopyToBackend(key_mask_.data(), options.key_masks[i].data(), options.key_masks[i].size()));
      attention.key_mask = key_mask_.as<uint8_t>();
    } else if (per_query_head_masks) {
      const std::vector<uint8_t>& mask = options.query_head_key_masks[i];
      KVGATE_RETURN_IF_ERROR(b.CopyToBackend(key_mask_.data(), mask.data(), mask.size()));
      attention.key_mask = key_mask_.as<uint8_t>();
      attention.key_mask_per_query_head = true;
    } else if (options.layer_key_mask) {
      std::vector<float> hidden(size_t{1} * n * c.hidden_size);
      KVGATE_RETURN_IF_ERROR(b.CopyToHost(hidden.data(), h_.data(), hidden.size() * sizeof(float)));
      KVGATE_ASSIGN_OR_RETURN(std::vector<uint8_t> call_mask, options.layer_key_mask(i, hidden));
      if (call_mask.size() != size_t{1} * c.num_kv_heads * n) {
        return absl::InternalError("layer_key_mask returned a mask that is not [num_kv_heads, n]");
      }
      std::vector<uint8_t> mask(size_t{1} * c.num_kv_heads * cache->capacity_tokens_, 1);
      for (int32_t kv = 0; kv < c.num_kv_heads; ++kv) {
        std::copy_n(call_mask.begin() + size_t{1} * kv * n, n,
                    mask.begin() + size_t{1} * kv * cache->capacity_tokens_ + start);
      }
      KVGATE_RETURN_IF_ERROR(b.CopyToBackend(key_mask_.data(), mask.data(), mask.size()));
      attention.key_mask = key_mask_.as<uint8_t>();
    }
    KVGATE_RETURN_IF_ERROR(bf16_ ? b.AttentionBf16(attention) : b.Attention(attention));
    KVGATE_RETURN_IF_ERROR(FinishLayer(l, n));
  }
  if (capture != nullptr && options.capture_request.keys) {
    // Keys of the whole sequence so far (or of this forward's rows), [num_kv_heads, length,
    // head_dim] per layer.
    const int32_t first = options.capture_request.keys_of_new_rows_only ? start : 0, length = start + n - first;
    for (int i = 0; i < c.num_layers; ++i) {
      auto& keys = capture->keys[i];
      keys.resize(size_t{1} * c.num_kv_heads * length * c.head_dim);
      for (int h = 0; h < c.num_kv_heads; ++h) {
        KVGATE_RETURN_IF_ERROR(b.CopyToHost(keys.data() + size_t{1} * h * length * c.head_dim,
                                            cache->k(i) + (size_t{1} * h * cache->capacity_tokens_ + first) * c.head_dim,
                                            size_t{4} * length * c.head_dim));
      }
    }
  }
  KVGATE_ASSIGN_OR_RETURN(std::vector<float> logits, Logits(n, options.logits == LogitsMode::kAllTokens ? n : 1));
  cache->length_tokens_ = start + n;
  return logits;
}

absl::Status Model::ProjectQkv(const Layer& l, int32_t n, const int32_t* positions, bool want_hidden) {
  const ModelConfig& c = config_;
  ops::Backend& b = *backend_;
  const int32_t q_dim = c.num_heads * c.head_dim, kv_dim = c.num_kv_heads * c.head_dim;
  float* x = x_.as<float>();
  float* h = h_.as<float>();
  if (!bf16_ || want_hidden) {
    KVGATE_RETURN_IF_ERROR(b.RmsNorm({x, l.input_norm.as<float>(), h, n, c.hidden_size, c.rms_norm_eps}));
  }
  if (bf16_) {
    ops::Bf16* hb = hb_.as<ops::Bf16>();
    KVGATE_RETURN_IF_ERROR(b.RmsNormBf16({x, l.input_norm.as<float>(), hb, n, c.hidden_size, c.rms_norm_eps}));
    const auto project = [&](const ops::DeviceBuffer& w, const ops::DeviceBuffer& bias, ops::DeviceBuffer& out,
                             int32_t out_dim) {
      ops::GemmBf16Args args;
      args.x = hb;
      args.w = w.as<ops::Bf16>();
      args.bias = bias.as<float>();
      args.y = out.data();
      args.m = n;
      args.n = out_dim;
      args.k = c.hidden_size;
      return b.GemmBf16(args);
    };
    KVGATE_RETURN_IF_ERROR(project(l.wq, l.bq, q_, q_dim));
    KVGATE_RETURN_IF_ERROR(project(l.wk, l.bk, k_, kv_dim));
    KVGATE_RETURN_IF_ERROR(project(l.wv, l.bv, v_, kv_dim));
  } else {
    KVGATE_RETURN_IF_ERROR(b.MatMul({h, l.wq.as<float>(), l.bq.as<float>(), q_.as<float>(), n, q_dim, c.hidden_size}));
    KVGATE_RETURN_IF_ERROR(b.MatMul({h, l.wk.as<float>(), l.bk.as<float>(), k_.as<float>(), n, kv_dim, c.hidden_size}));
    KVGATE_RETURN_IF_ERROR(b.MatMul({h, l.wv.as<float>(), l.bv.as<float>(), v_.as<float>(), n, kv_dim, c.hidden_size}));
  }
  if (c.qk_norm) {
    KVGATE_RETURN_IF_ERROR(b.RmsNorm({q_.as<float>(), l.q_norm.as<float>(), q_.as<float>(), n * c.num_heads,
                                      c.head_dim, c.rms_norm_eps}));
    KVGATE_RETURN_IF_ERROR(b.RmsNorm({k_.as<float>(), l.k_norm.as<float>(), k_.as<float>(), n * c.num_kv_heads,
                                      c.head_dim, c.rms_norm_eps}));
  }
  KVGATE_RETURN_IF_ERROR(b.Rope({q_.as<float>(), positions, weights_->inv_freq.as<float>(), n, c.num_heads, c.head_dim}));
  return b.Rope({k_.as<float>(), positions, weights_->inv_freq.as<float>(), n, c.num_kv_heads, c.head_dim});
}

absl::StatusOr<std::vector<float>> Model::DecodeStep(absl::Span<const int32_t> tokens, PagedKvBatch* kv) {
  KVGATE_RETURN_IF_ERROR(RunDecodeStep(tokens, kv, /*greedy=*/false));
  std::vector<float> logits(tokens.size() * config_.vocab_size);
  KVGATE_RETURN_IF_ERROR(backend_->CopyToHost(logits.data(), logits_.data(), logits.size() * sizeof(float)));
  return logits;
}

absl::StatusOr<std::vector<int32_t>> Model::DecodeStepGreedy(absl::Span<const int32_t> tokens, PagedKvBatch* kv) {
  KVGATE_RETURN_IF_ERROR(RunDecodeStep(tokens, kv, /*greedy=*/true));
  std::vector<int32_t> ids(tokens.size());
  KVGATE_RETURN_IF_ERROR(backend_->CopyToHost(ids.data(), greedy_ids_.data(), ids.size() * sizeof(int32_t)));
  return ids;
}

absl::Status Model::RunDecodeStep(absl::Span<const int32_t> tokens, PagedKvBatch* kv, bool greedy) {
  KVGATE_RETURN_IF_ERROR(CheckTokens(tokens));
  const int32_t n = static_cast<int32_t>(tokens.size());
  if (n != kv->num_sequences()) {
    return absl::InvalidArgumentError(absl::StrCat("decode step of ", n, " tokens for ", kv->num_sequences(), " sequences"));
  }
  // Everything a recorded graph points at is sized before the step's ops.
  KVGATE_RETURN_IF_ERROR(EnsureScratch(n));
  KVGATE_RETURN_IF_ERROR(EnsureLogitRows(n));
  const std::vector<int32_t> positions = kv->NextPositions();
  KVGATE_RETURN_IF_ERROR(backend_->CopyToBackend(ids_.data(), tokens.data(), size_t{4} * n));
  KVGATE_RETURN_IF_ERROR(backend_->CopyToBackend(positions_.data(), positions.data(), size_t{4} * n));
  KVGATE_RETURN_IF_ERROR(kv->BeginStep());
  const std::optional<std::array<uint64_t, 4>> kv_key =
      decode_graphs_wanted_ && backend_has_graphs_ && !kv->wants_layer_inputs() ? kv->replay_key() : std::nullopt;
  if (kv_key.has_value()) {
    KVGATE_RETURN_IF_ERROR(RunDecodeOpsAsGraph(n, kv, greedy, *kv_key));
  } else {
    ++decode_graph_stats_.op_by_op;
    KVGATE_RETURN_IF_ERROR(RunDecodeOps(n, kv, greedy));
  }
  return kv->EndStep();
}

bool Model::DecodeGraphsWanted() {
  const char* value = std::getenv("KVGATE_DECODE_GRAPHS");
  return value == nullptr || std::string_view(value) != "0";
}

absl::Status Model::RunDecodeOpsAsGraph(int32_t n, PagedKvBatch* kv, bool greedy,
                                        const std::array<uint64_t, 4>& kv_key) {
  DecodeGraph& entry = decode_graphs_[{n, greedy}];
  if (entry.kv_key != kv_key || entry.scratch_epoch != scratch_epoch_) {
    entry = DecodeGraph{};
    entry.kv_key = kv_key;
    entry.scratch_epoch = scratch_epoch_;
  }
  if (entry.graph != nullptr) {
    const absl::Status replayed = backend_->ReplayGraph(*entry.graph);
    if (replayed.ok()) ++decode_graph_stats_.replayed;
    if (!absl::IsFailedPrecondition(replayed)) return replayed;
    entry.graph.reset();  // a backend workspace moved: size it again op by op, record next step
    entry.ran_once = false;
  }
  if (!entry.ran_once || entry.unrecordable) {
    entry.ran_once = true;
    ++decode_graph_stats_.op_by_op;
    return RunDecodeOps(n, kv, greedy);
  }
  absl::StatusOr<std::unique_ptr<ops::OpGraph>> graph =
      backend_->RecordGraph([&] { return RunDecodeOps(n, kv, greedy); });
  if (!graph.ok()) {
    if (absl::IsUnimplemented(graph.status())) {
      backend_has_graphs_ = false;
    } else {
      entry.unrecordable = true;
      decode_graph_stats_.last_record_error = graph.status().ToString();
    }
    ++decode_graph_stats_.op_by_op;
    return RunDecodeOps(n, kv, greedy);
  }
  entry.graph = *std::move(graph);
  ++decode_graph_stats_.recorded;
  KVGATE_RETURN_IF_ERROR(backend_->ReplayGraph(*entry.graph));
  ++decode_graph_stats_.replayed;
  return absl::OkStatus();
}

absl::Status Model::RunDecodeOps(int32_t n, PagedKvBatch* kv, bool greedy) {
  const ModelConfig& c = config_;
  ops::Backend& b = *backend_;
  if (bf16_) {
    KVGATE_RETURN_IF_ERROR(
        b.EmbedBf16({ids_.as<int32_t>(), weights_->embed.as<ops::Bf16>(), x_.as<float>(), n, c.hidden_size, c.vocab_size}));
  } else {
    KVGATE_RETURN_IF_ERROR(b.Embed({ids_.as<int32_t>(), weights_->embed.as<float>(), x_.as<float>(), n, c.hidden_size, c.vocab_size}));
  }
  for (int i = 0; i < c.num_layers; ++i) {
    const Layer& l = weights_->layers[i];
    KVGATE_RETURN_IF_ERROR(
        ProjectQkv(l, n, positions_.as<int32_t>(), kv->wants_layer_inputs() || kv->scores_layer_inputs()));
    if (kv->scores_layer_inputs()) KVGATE_RETURN_IF_ERROR(kv->ScoreLayerInput(i, h_.as<float>()));
    if (kv->wants_layer_inputs()) {
      std::vector<float> hidden(size_t{1} * n * c.hidden_size);
      KVGATE_RETURN_IF_ERROR(b.CopyToHost(hidden.data(), h_.data(), hidden.size() * sizeof(float)));
      KVGATE_RETURN_IF_ERROR(kv->ObserveLayerInput(i, hidden));
    }
    KVGATE_RETURN_IF_ERROR(kv->AppendLayer(i, k_.as<float>(), v_.as<float>()));
    KVGATE_ASSIGN_OR_RETURN(ops::HeadPagedKvView view, kv->View(i));
    ops::HeadPagedDecodeAttentionArgs attention;
    attention.q = q_.as<float>();
    attention.kv = view;
    attention.out = attn_.as<float>();
    attention.num_seqs = n;
    attention.num_q_heads = c.num_heads;
    attention.num_kv_heads = c.num_kv_heads;
    attention.scale = 1.0f / std::sqrt(static_cast<float>(c.head_dim));
    KVGATE_RETURN_IF_ERROR(b.HeadPagedDecodeAttention(attention));
    KVGATE_RETURN_IF_ERROR(FinishLayer(l, n));
  }
  KVGATE_RETURN_IF_ERROR(ComputeLogits(n, n));
  if (!greedy) return absl::OkStatus();
  return b.ArgMaxRows({logits_.as<float>(), greedy_ids_.as<int32_t>(), n, c.vocab_size});
}

}  // namespace kvgate::engine
