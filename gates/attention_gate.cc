#include "gates/attention_gate.h"

#include <algorithm>
#include <bit>
#include <cstring>
#include <cmath>
#include <limits>
#include <random>

#include "absl/strings/str_cat.h"
#include "common/status_macros.h"
#include "gates/gate_weights.h"
#include "gates/internal/select_util.h"

namespace kvgate::gates {
namespace {

std::string LayerName(int32_t layer, const char* tensor) { return absl::StrCat("layers.", layer, ".", tensor); }

}  // namespace

absl::StatusOr<std::unique_ptr<AttentionGate>> AttentionGate::Load(const std::string& path,
                                                                   const ModelShape& shape) {
  KVGATE_RETURN_IF_ERROR(ValidateModelShape(shape));
  KVGATE_ASSIGN_OR_RETURN(GateWeightFile file, GateWeightFile::Open(path, kAttentionGateFormat));
  KVGATE_RETURN_IF_ERROR(file.ExpectMetadata("num_layers", shape.num_layers));
  KVGATE_RETURN_IF_ERROR(file.ExpectMetadata("hidden_size", shape.hidden_size));
  KVGATE_RETURN_IF_ERROR(file.ExpectMetadata("num_kv_heads", shape.num_kv_heads));
  KVGATE_ASSIGN_OR_RETURN(int64_t heads, file.MetadataInt("gate_heads"));
  KVGATE_ASSIGN_OR_RETURN(int64_t head_dim, file.MetadataInt("gate_head_dim"));
  KVGATE_ASSIGN_OR_RETURN(double threshold, file.MetadataDouble("threshold", 0.5));
  if (heads < 1 || heads > 256 || head_dim < 1 || head_dim > 1024 || !(threshold > 0.0 && threshold < 1.0)) {
    return absl::InvalidArgumentError(absl::StrCat(kGateMismatch, path, ": gate_heads ", heads, ", gate_head_dim ",
                                                   head_dim, ", threshold ", threshold, " are out of range"));
  }
  AttentionGateConfig config;
  config.num_heads = static_cast<int32_t>(heads);
  config.head_dim = static_cast<int32_t>(head_dim);
  config.threshold = static_cast<float>(threshold);
  auto gate = std::unique_ptr<AttentionGate>(new AttentionGate(shape, config));
  const int64_t inner = heads * head_dim, D = shape.hidden_size, H = shape.num_kv_heads;
  gate->layers_.resize(shape.num_layers);
  for (int32_t l = 0; l < shape.num_layers; ++l) {
    Layer& w = gate->layers_[l];
    KVGATE_ASSIGN_OR_RETURN(w.q_proj_weight, file.ReadFloat32(LayerName(l, "q_proj.weight"), {inner, D}));
    KVGATE_ASSIGN_OR_RETURN(w.k_proj_weight, file.ReadFloat32(LayerName(l, "k_proj.weight"), {inner, D}));
    KVGATE_ASSIGN_OR_RETURN(w.v_proj_weight, file.ReadFloat32(LayerName(l, "v_proj.weight"), {inner, D}));
    KVGATE_ASSIGN_OR_RETURN(w.out_proj_weight, file.ReadFloat32(LayerName(l, "out_proj.weight"), {H, 2 * inner}));
    KVGATE_ASSIGN_OR_RETURN(w.out_proj_bias, file.ReadFloat32(LayerName(l, "out_proj.bias"), {H}));
  }
  KVGATE_RETURN_IF_ERROR(file.ExpectAllRead());
  return gate;
}

std::unique_ptr<AttentionGate> AttentionGate::CreateRandom(const ModelShape& shape, uint64_t seed,
                                                           const AttentionGateConfig& config) {
  auto gate = std::unique_ptr<AttentionGate>(new AttentionGate(shape, config));
  std::mt19937_64 rng(seed);
  const size_t inner = static_cast<size_t>(config.num_heads) * config.head_dim, D = shape.hidden_size,
               H = shape.num_kv_heads;
  std::normal_distribution<float> proj(0.0f, 1.0f / std::sqrt(static_cast<float>(D)));
  std::normal_distribution<float> out(0.0f, 1.0f / std::sqrt(static_cast<float>(2 * inner)));
  auto fill = [&](std::vector<float>& v, size_t size, std::normal_distribution<float>& dist) {
    v.resize(size);
    for (float& x : v) x = dist(rng);
  };
  gate->layers_.resize(shape.num_layers);
  for (Layer& w : gate->layers_) {
    fill(w.q_proj_weight, inner * D, proj);
    fill(w.k_proj_weight, inner * D, proj);
    fill(w.v_proj_weight, inner * D, proj);
    fill(w.out_proj_weight, H * 2 * inner, out);
    w.out_proj_bias.assign(H, 0.0f);
  }
  return gate;
}

absl::Status AttentionGate::Save(const std::string& path) const {
  const int64_t inner = static_cast<int64_t>(config_.num_heads) * config_.head_dim, D = shape_.hidden_size,
                H = shape_.num_kv_heads;
  std::vector<NamedTensor> tensors;
  for (int32_t l = 0; l < shape_.num_layers; ++l) {
    const Layer& w = layers_[l];
    tensors.push_back({LayerName(l, "q_proj.weight"), {inner, D}, w.q_proj_weight});
    tensors.push_back({LayerName(l, "k_proj.weight"), {inner, D}, w.k_proj_weight});
    tensors.push_back({LayerName(l, "v_proj.weight"), {inner, D}, w.v_proj_weight});
    tensors.push_back({LayerName(l, "out_proj.weight"), {H, 2 * inner}, w.out_proj_weight});
    tensors.push_back({LayerName(l, "out_proj.bias"), {H}, w.out_proj_bias});
  }
  return WriteSafetensorsF32(path, tensors,
                             {{"format", kAttentionGateFormat},
                              {"num_layers", absl::StrCat(shape_.num_layers)},
                              {"hidden_size", absl::StrCat(shape_.hidden_size)},
                              {"num_kv_heads", absl::StrCat(shape_.num_kv_heads)},
                              {"gate_heads", absl::StrCat(config_.num_heads)},
                              {"gate_head_dim", absl::StrCat(config_.head_dim)},
                              {"threshold", absl::StrCat(config_.threshold)},
                              {"source", "kvgate AttentionGate::Save"}});
}

bool AttentionGate::Flag(float logit) const {
  return 1.0f / (1.0f + std::exp(-logit)) > config_.threshold;
}

absl::StatusOr<std::vector<float>> AttentionGate::Logits(int32_t layer, absl::Span<const float> hidden) const {
  AttentionGateState state(this);
  return state.Append(layer, hidden);
}

absl::StatusOr<std::vector<uint8_t>> AttentionGate::Flags(int32_t layer, absl::Span<const float> hidden) const {
  KVGATE_ASSIGN_OR_RETURN(std::vector<float> logits, Logits(layer, hidden));
  std::vector<uint8_t> flags(logits.size());
  for (size_t i = 0; i < logits.size(); ++i) flags[i] = Flag(logits[i]) ? 1 : 0;
  return flags;
}

AttentionGateState::AttentionGateState(const AttentionGate* gate)
    : gate_(gate),
      tokens_(gate->shape().num_layers, 0),
      keys_(gate->shape().num_layers),
      values_(gate->shape().num_layers) {}

absl::StatusOr<std::vector<float>> AttentionGateState::Append(int32_t layer, absl::Span<const float> hidden) {
  const ModelShape& shape = gate_->shape();
  const int32_t D = shape.hidden_size, H = shape.num_kv_heads;
  const int32_t heads = gate_->config().num_heads, hd = gate_->config().head_dim, inner = heads * hd;
  if (layer < 0 || layer >= shape.num_layers) {
    return absl::InvalidArgumentError(absl::StrCat("attention_gate: layer ", layer, " out of [0, ", shape.num_layers, ")"));
  }
  if (hidden.size() % static_cast<size_t>(D) != 0) {
    return absl::InvalidArgumentError(absl::StrCat("attention_gate: hidden has ", hidden.size(),
                                                   " floats, not a multiple of hidden_size ", D));
  }
  const int32_t m = static_cast<int32_t>(hidden.size() / D);
  const AttentionGate::Layer& w = gate_->layers_[layer];
  std::vector<float>& keys = keys_[layer];
  std::vector<float>& values = values_[layer];
  const int32_t before = tokens_[layer];
  std::vector<float> queries(static_cast<size_t>(m) * inner);
  keys.resize(static_cast<size_t>(before + m) * inner);
  values.resize(static_cast<size_t>(before + m) * inner);
  auto project = [&](const std::vector<float>& weight, const float* x, float* out) {
    for (int32_t o = 0; o < inner; ++o) {
      const float* row = weight.data() + static_cast<size_t>(o) * D;
      float acc = 0.0f;
      for (int32_t i = 0; i < D; ++i) acc += row[i] * x[i];
      out[o] = acc;
    }
  };
  for (int32_t t = 0; t < m; ++t) {
    const float* x = hidden.data() + static_cast<size_t>(t) * D;
    project(w.q_proj_weight, x, queries.data() + static_cast<size_t>(t) * inner);
    project(w.k_proj_weight, x, keys.data() + static_cast<size_t>(before + t) * inner);
    project(w.v_proj_weight, x, values.data() + static_cast<size_t>(before + t) * inner);
  }
  tokens_[layer] = before + m;

  const float scale = 1.0f / std::sqrt(static_cast<float>(hd));
  std::vector<float> out(static_cast<size_t>(H) * m);
  std::vector<float> features(static_cast<size_t>(2) * inner), probs(static_cast<size_t>(before + m));
  for (int32_t t = 0; t < m; ++t) {
    const int32_t row = before + t;  // absolute index; sees rows 0..row
    const float* q = queries.data() + static_cast<size_t>(t) * inner;
    for (int32_t a = 0; a < heads; ++a) {
      float max_logit = -std::numeric_limits<float>::infinity();
      for (int32_t s = 0; s <= row; ++s) {
        const float* k = keys.data() + static_cast<size_t>(s) * inner + a * hd;
        float dot = 0.0f;
        for (int32_t i = 0; i < hd; ++i) dot += q[a * hd + i] * k[i];
        probs[s] = dot * scale;
        max_logit = std::max(max_logit, probs[s]);
      }
      float denom = 0.0f;
      for (int32_t s = 0; s <= row; ++s) {
        probs[s] = std::exp(probs[s] - max_logit);
        denom += probs[s];
      }
      float* o = features.data() + a * hd;
      std::fill(o, o + hd, 0.0f);
      for (int32_t s = 0; s <= row; ++s) {
        const float* v = values.data() + static_cast<size_t>(s) * inner + a * hd;
        const float p = probs[s] / denom;
        for (int32_t i = 0; i < hd; ++i) o[i] += p * v[i];
      }
    }
    std::copy_n(values.data() + static_cast<size_t>(row) * inner, inner, features.data() + inner);
    for (int32_t h = 0; h < H; ++h) {
      const float* wrow = w.out_proj_weight.data() + static_cast<size_t>(h) * 2 * inner;
      float z = w.out_proj_bias[h];
      for (int32_t i = 0; i < 2 * inner; ++i) z += wrow[i] * features[i];
      out[static_cast<size_t>(h) * m + t] = z;
    }
  }
  return out;
}

namespace {

constexpr uint32_t kGateStateMagic = 0x4741564B;  // "KVAG" read as little-endian bytes
constexpr uint32_t kGateStateVersion = 1;
static_assert(std::endian::native == std::endian::little, "the gate state bytes are little-endian");

template <typename T>
void PutPod(std::string* out, const T& value) {
  out->append(reinterpret_cast<const char*>(&value), sizeof(T));
}

// Reads POD values off the front of `bytes`; false once it runs short.
class PodReader {
 public:
  explicit PodReader(std::string_view bytes) : bytes_(bytes) {}
  template <typename T>
  bool Read(T* value) {
    if (bytes_.size() < sizeof(T)) return false;
    std::memcpy(value, bytes_.data(), sizeof(T));
    bytes_.remove_prefix(sizeof(T));
    return true;
  }
  bool ReadFloats(size_t count, std::vector<float>* out) {
    if (count > bytes_.size() / sizeof(float)) return false;
    out->resize(count);
    // An empty vector's data() may be null, which memcpy may not be given even for 0 bytes.
    if (count > 0) std::memcpy(out->data(), bytes_.data(), count * sizeof(float));
    bytes_.remove_prefix(count * sizeof(float));
    return true;
  }
  size_t left() const { return bytes_.size(); }

 private:
  std::string_view bytes_;
};

}  // namespace

std::string AttentionGateState::Serialize() const {
  const ModelShape& shape = gate_->shape();
  std::string out;
  size_t floats = 0;
  for (const std::vector<float>& k : keys_) floats += 2 * k.size();
  out.reserve(7 * sizeof(int32_t) + shape.num_layers * sizeof(int32_t) + floats * sizeof(float));
  PutPod(&out, kGateStateMagic);
  PutPod(&out, kGateStateVersion);
  for (int32_t v : {shape.num_layers, shape.num_kv_heads, shape.hidden_size, gate_->config().num_heads,
                    gate_->config().head_dim}) {
    PutPod(&out, v);
  }
  for (int32_t l = 0; l < shape.num_layers; ++l) {
    PutPod(&out, tokens_[l]);
    out.append(reinterpret_cast<const char*>(keys_[l].data()), keys_[l].size() * sizeof(float));
    out.append(reinterpret_cast<const char*>(values_[l].data()), values_[l].size() * sizeof(float));
  }
  return out;
}

absl::StatusOr<std::unique_ptr<AttentionGateState>> AttentionGateState::Deserialize(const AttentionGate* gate,
                                                                                    std::string_view bytes) {
  if (gate == nullptr) return absl::InvalidArgumentError("attention_gate state: no gate");
  const ModelShape& shape = gate->shape();
  PodReader in(bytes);
  uint32_t magic = 0, version = 0;
  int32_t header[5] = {};
  bool ok = in.Read(&magic) && in.Read(&version);
  for (int32_t& v : header) ok = ok && in.Read(&v);
  if (!ok || magic != kGateStateMagic || version != kGateStateVersion) {
    return absl::InvalidArgumentError(absl::StrCat("attention_gate state: not a v", kGateStateVersion,
                                                   " state (", bytes.size(), " bytes)"));
  }
  const int32_t expected[5] = {shape.num_layers, shape.num_kv_heads, shape.hidden_size, gate->config().num_heads,
                               gate->config().head_dim};
  if (!std::equal(std::begin(header), std::end(header), std::begin(expected))) {
    return absl::InvalidArgumentError(absl::StrCat(
        "attention_gate state of a gate with ", header[0], " layers, ", header[1], " kv heads, hidden ", header[2],
        ", ", header[3], "x", header[4], " gate heads; the loaded gate has ", expected[0], ", ", expected[1], ", ",
        expected[2], ", ", expected[3], "x", expected[4]));
  }
  auto state = std::make_unique<AttentionGateState>(gate);
  const size_t inner = static_cast<size_t>(gate->config().num_heads) * gate->config().head_dim;
  for (int32_t l = 0; l < shape.num_layers; ++l) {
    int32_t tokens = 0;
    if (!in.Read(&tokens) || tokens < 0 || !in.ReadFloats(static_cast<size_t>(tokens) * inner, &state->keys_[l]) ||
        !in.ReadFloats(static_cast<size_t>(tokens) * inner, &state->values_[l])) {
      return absl::InvalidArgumentError(absl::StrCat("attention_gate state: layer ", l, " is truncated"));
    }
    state->tokens_[l] = tokens;
  }
  if (in.left() != 0) {
    return absl::InvalidArgumentError(absl::StrCat("attention_gate state: ", in.left(), " trailing bytes"));
  }
  return state;
}

absl::StatusOr<std::vector<uint8_t>> AttentionGatePrefillKeyMask(const AttentionGate& gate, int32_t layer,
                                                                 absl::Span<const float> hidden,
                                                                 const ResolvedBudget& budget) {
  KVGATE_ASSIGN_OR_RETURN(std::vector<uint8_t> flags, gate.Flags(layer, hidden));
  const int32_t H = gate.shape().num_kv_heads;
  const size_t n = flags.size() / static_cast<size_t>(H);
  if (budget.protected_mask.size() != n) {
    return absl::InvalidArgumentError(absl::StrCat("attention_gate: hidden holds ", n, " tokens, the budget ",
                                                   budget.protected_mask.size()));
  }
  for (int32_t h = 0; h < H; ++h) {
    for (size_t p = 0; p < n; ++p) flags[h * n + p] |= budget.protected_mask[p] ? 1 : 0;
  }
  return flags;
}

namespace {

constexpr char kName[] = "attention_gate";

// The decode-time flags: the gate flags each new token per kv head from its causal state;
// after the step the token's row stays only in the heads that flag it (it always attends
// to itself first).
class AttentionGateEvictor final : public DecodeEvictor {
 public:
  AttentionGateEvictor(std::shared_ptr<const AttentionGate> gate, std::unique_ptr<AttentionGateState> state)
      : gate_(std::move(gate)), state_(std::move(state)), step_flags_(gate_->shape().num_layers) {}
  std::string_view policy() const override { return kName; }
  bool wants_layer_inputs() const override { return true; }

  absl::Status ObserveLayerInput(int32_t layer, absl::Span<const float> x) override {
    if (layer < 0 || layer >= static_cast<int32_t>(step_flags_.size()) ||
        x.size() != static_cast<size_t>(gate_->shape().hidden_size)) {
      return absl::InvalidArgumentError(absl::StrCat("attention_gate decode eviction: layer ", layer, " input of ",
                                                     x.size(), " floats (one token's hidden state expected)"));
    }
    KVGATE_ASSIGN_OR_RETURN(std::vector<float> logits, state_->Append(layer, x));  // [kv_heads, 1]
    step_flags_[layer].resize(logits.size());
    for (size_t h = 0; h < logits.size(); ++h) step_flags_[layer][h] = gate_->Flag(logits[h]);
    return absl::OkStatus();
  }

  absl::StatusOr<RowsToDrop> AfterStep(const DecodeRows& rows) override {
    if (rows.num_layers != static_cast<int32_t>(step_flags_.size()) ||
        rows.num_kv_heads != gate_->shape().num_kv_heads) {
      return absl::InvalidArgumentError(absl::StrCat("attention_gate decode eviction: a sequence of ", rows.num_layers,
                                                     "x", rows.num_kv_heads, " heads for a gate of ",
                                                     step_flags_.size(), "x", gate_->shape().num_kv_heads));
    }
    const int32_t newest = rows.next_pos - 1;
    RowsToDrop drop;
    for (int32_t l = 0; l < rows.num_layers; ++l) {
      if (static_cast<int32_t>(step_flags_[l].size()) != rows.num_kv_heads) {
        return absl::FailedPreconditionError(
            absl::StrCat("attention_gate decode eviction: no input of layer ", l, " in this step"));
      }
      for (int32_t h = 0; h < rows.num_kv_heads; ++h) {
        const absl::Span<const int32_t> positions = rows.head_positions(l, h);
        if (step_flags_[l][h] != 0 || positions.empty() || positions.back() != newest) continue;
        if (drop.empty()) drop.resize(rows.positions.size());
        drop[static_cast<size_t>(l) * rows.num_kv_heads + h].push_back(static_cast<int32_t>(positions.size()) - 1);
      }
      step_flags_[l].clear();
    }
    return drop;
  }

  std::string SaveState() const override { return internal::PackState(kName, {}, state_->Serialize()); }

 private:
  std::shared_ptr<const AttentionGate> gate_;
  std::unique_ptr<AttentionGateState> state_;
  std::vector<std::vector<uint8_t>> step_flags_;  // per layer [kv_heads] of the step in progress
};

// The prefill's key masks come from the gate, and its causal state takes the prompt so
// that decode can flag new tokens.
class AttentionGateRequest final : public PolicyRequest {
 public:
  AttentionGateRequest(const Policy& policy, const ResolvedBudget& budget, std::shared_ptr<const AttentionGate> gate)
      : PolicyRequest(policy, budget), gate_(std::move(gate)),
        state_(std::make_unique<AttentionGateState>(gate_.get())) {}
  bool masks_prefill_keys() const override { return true; }
  absl::StatusOr<std::vector<uint8_t>> PrefillKeyMask(int32_t layer, absl::Span<const float> x) override {
    if (state_ == nullptr) return absl::FailedPreconditionError("attention_gate: prefill mask after the decode evictor left");
    KVGATE_RETURN_IF_ERROR(state_->Append(layer, x).status());
    return AttentionGatePrefillKeyMask(*gate_, layer, x, budget_);
  }
  absl::StatusOr<std::unique_ptr<DecodeEvictor>> TakeDecodeEvictor() override {
    if (state_ == nullptr) return absl::FailedPreconditionError("attention_gate: the decode evictor was taken already");
    return std::make_unique<AttentionGateEvictor>(gate_, std::move(state_));
  }

 private:
  std::shared_ptr<const AttentionGate> gate_;
  std::unique_ptr<AttentionGateState> state_;
};

class AttentionGatePolicy final : public Policy {
 public:
  AttentionGatePolicy(const ModelShape& shape, std::shared_ptr<const AttentionGate> gate)
      : shape_(shape), gate_(std::move(gate)) {}
  std::string_view name() const override { return "attention_gate"; }
  CaptureRequest needs() const override { return {}; }
  int32_t default_sink() const override { return kAttentionGateDefaultSink; }
  int32_t default_recent() const override { return 0; }
  std::unique_ptr<PolicyRequest> StartRequest(const ResolvedBudget& budget) const override {
    return std::make_unique<AttentionGateRequest>(*this, budget, gate_);
  }
  absl::StatusOr<std::unique_ptr<DecodeEvictor>> RestoreDecodeEvictor(std::string_view state) const override {
    KVGATE_ASSIGN_OR_RETURN(internal::PackedState packed, internal::UnpackState(state, kName, 0));
    KVGATE_ASSIGN_OR_RETURN(std::unique_ptr<AttentionGateState> gate_state,
                            AttentionGateState::Deserialize(gate_.get(), packed.tail));
    return std::make_unique<AttentionGateEvictor>(gate_, std::move(gate_state));
  }

  absl::StatusOr<KeepPlan> Plan(const PrefillCapture& capture, const PolicyInputs& inputs,
                                const ResolvedBudget& budget, HeadBudget head_budget) const override {
    if (head_budget == HeadBudget::kAdaptive) {
      return absl::InvalidArgumentError("attention_gate: head_budget ADAPTIVE is not supported (flags are learned)");
    }
    KVGATE_RETURN_IF_ERROR(CheckBudgetAndCapture(capture, budget, shape_));
    const int32_t n = budget.prompt_tokens, H = shape_.num_kv_heads, L = shape_.num_layers;
    const bool have_hidden = static_cast<int32_t>(capture.hidden_states.size()) == L;
    std::vector<std::vector<uint8_t>> masks = inputs.gate_flags;
    if (masks.empty()) {
      if (gate_ == nullptr) {
        return absl::FailedPreconditionError("attention_gate: no gate loaded and no PolicyInputs::gate_flags");
      }
      if (!have_hidden) {
        return absl::InvalidArgumentError(
            "attention_gate: needs PolicyInputs::gate_flags (the prefill key masks) or captured hidden_states");
      }
      masks.resize(L);
      for (int32_t l = 0; l < L; ++l) {
        KVGATE_ASSIGN_OR_RETURN(masks[l], AttentionGatePrefillKeyMask(*gate_, l, capture.hidden_states[l], budget));
      }
    }
    if (static_cast<int32_t>(masks.size()) != L) {
      return absl::InvalidArgumentError("attention_gate: gate_flags needs one entry per layer");
    }
    for (int32_t l = 0; l < L; ++l) {
      if (masks[l].size() != static_cast<size_t>(H) * n) {
        return absl::InvalidArgumentError(absl::StrCat("attention_gate: gate_flags of layer ", l,
                                                       " must hold num_kv_heads * n bytes"));
      }
    }
    const bool cap = budget.keep_per_head < n;
    const int64_t protected_rows =
        std::count_if(budget.protected_mask.begin(), budget.protected_mask.end(), [](uint8_t b) { return b != 0; });
    const int64_t need = std::max<int64_t>(0, budget.keep_per_head - protected_rows);

    KeepPlan plan;
    plan.num_layers = L;
    plan.num_kv_heads = H;
    plan.prompt_tokens = n;
    plan.heads.resize(static_cast<size_t>(L) * H);
    for (int32_t l = 0; l < L; ++l) {
      std::vector<float> logits;
      if (cap && have_hidden && gate_ != nullptr) {
        KVGATE_ASSIGN_OR_RETURN(logits, gate_->Logits(l, capture.hidden_states[l]));
      }
      for (int32_t h = 0; h < H; ++h) {
        const uint8_t* mask = masks[l].data() + static_cast<size_t>(h) * n;
        const float* row = logits.empty() ? nullptr : logits.data() + static_cast<size_t>(h) * n;
        auto key = [&](int32_t p) {
          return row != nullptr ? internal::ScoreKey(row[p]) : static_cast<uint32_t>(p);
        };
        internal::Cut cut;
        cut.keep_all = true;
        if (cap) {
          cut = internal::FindCut(need, [&](auto&& f) {
            for (int32_t p = 0; p < n; ++p) {
              if (mask[p] && !budget.protected_mask[p]) f(key(p), static_cast<uint64_t>(p));
            }
          });
        }
        std::vector<int32_t>& out = plan.at(l, h).positions;
        for (int32_t p = 0; p < n; ++p) {
          if (budget.protected_mask[p] || (mask[p] && cut.Keeps(key(p), static_cast<uint64_t>(p)))) out.push_back(p);
        }
      }
    }
    return plan;
  }

 private:
  ModelShape shape_;
  std::shared_ptr<const AttentionGate> gate_;
};

}  // namespace

std::unique_ptr<Policy> MakeAttentionGatePolicy(const ModelShape& shape, std::shared_ptr<const AttentionGate> gate) {
  return std::make_unique<AttentionGatePolicy>(shape, std::move(gate));
}

}  // namespace kvgate::gates
