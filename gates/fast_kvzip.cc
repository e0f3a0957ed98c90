#include "gates/fast_kvzip.h"

#include <algorithm>
#include <cmath>
#include <cstring>
#include <limits>
#include <optional>
#include <random>


#include "absl/strings/str_cat.h"
#include "common/status_macros.h"
#include "cuda/bf16.h"
#include "cuda/cpu/sink_gate_scores.h"
#include "gates/backend_selection.h"
#include "gates/gate_weights.h"
#include "gates/selectors.h"

namespace kvgate::gates {
namespace {

std::string LayerName(int32_t layer, const char* tensor) { return absl::StrCat("layers.", layer, ".", tensor); }


}  // namespace

absl::StatusOr<std::unique_ptr<FastKvzipGate>> FastKvzipGate::Load(const std::string& path,
                                                                   const ModelShape& shape) {
  KVGATE_RETURN_IF_ERROR(ValidateModelShape(shape));
  KVGATE_ASSIGN_OR_RETURN(GateWeightFile file, GateWeightFile::Open(path, kFastKvzipFormat));
  KVGATE_RETURN_IF_ERROR(file.ExpectMetadata("num_layers", shape.num_layers));
  KVGATE_RETURN_IF_ERROR(file.ExpectMetadata("hidden_size", shape.hidden_size));
  KVGATE_RETURN_IF_ERROR(file.ExpectMetadata("num_kv_heads", shape.num_kv_heads));
  KVGATE_RETURN_IF_ERROR(file.ExpectMetadata("group_size", shape.group_size()));
  KVGATE_ASSIGN_OR_RETURN(int64_t rank, file.MetadataInt("rank"));
  KVGATE_ASSIGN_OR_RETURN(int64_t sinks, file.MetadataInt("num_sinks"));
  KVGATE_ASSIGN_OR_RETURN(double eps, file.MetadataDouble("norm_eps", 1e-6));
  // num_sinks >= 1: the sink-free variant (score = sigmoid(logit)) is a different formula.
  if (rank < 1 || rank > 4096 || sinks < 1 || sinks > 4096 || !(eps > 0.0)) {
    return absl::InvalidArgumentError(absl::StrCat(kGateMismatch, path, ": rank ", rank, ", num_sinks ",
                                                   sinks, ", norm_eps ", eps, " are out of range"));
  }
  auto gate = std::unique_ptr<FastKvzipGate>(
      new FastKvzipGate(shape, static_cast<int32_t>(rank), static_cast<int32_t>(sinks), static_cast<float>(eps)));
  const int64_t H = shape.num_kv_heads, G = shape.group_size(), D = shape.hidden_size, R = rank, S = sinks;
  gate->layers_.resize(shape.num_layers);
  for (int32_t l = 0; l < shape.num_layers; ++l) {
    Layer& w = gate->layers_[l];
    KVGATE_ASSIGN_OR_RETURN(w.q_proj_weight, file.ReadFloat32(LayerName(l, "q_proj.weight"), {H * G * R, D}));
    KVGATE_ASSIGN_OR_RETURN(w.q_proj_bias, file.ReadFloat32(LayerName(l, "q_proj.bias"), {H * G * R}));
    KVGATE_ASSIGN_OR_RETURN(w.k_proj_weight, file.ReadFloat32(LayerName(l, "k_proj.weight"), {H * R, D}));
    KVGATE_ASSIGN_OR_RETURN(w.q_norm_weight, file.ReadFloat32(LayerName(l, "q_norm.weight"), {R}));
    KVGATE_ASSIGN_OR_RETURN(w.k_norm_weight, file.ReadFloat32(LayerName(l, "k_norm.weight"), {R}));
    KVGATE_ASSIGN_OR_RETURN(w.k_base, file.ReadFloat32(LayerName(l, "k_base"), {H, S, R}));
    KVGATE_ASSIGN_OR_RETURN(w.b, file.ReadFloat32(LayerName(l, "b"), {H, G}));
  }
  KVGATE_RETURN_IF_ERROR(file.ExpectAllRead());
  return gate;
}

std::unique_ptr<FastKvzipGate> FastKvzipGate::CreateRandom(const ModelShape& shape, uint64_t seed,
                                                           int32_t rank, int32_t num_sinks) {
  auto gate = std::unique_ptr<FastKvzipGate>(new FastKvzipGate(shape, rank, num_sinks, 1e-6f));
  std::mt19937_64 rng(seed);
  const size_t H = shape.num_kv_heads, G = shape.group_size(), D = shape.hidden_size, R = rank, S = num_sinks;
  std::normal_distribution<float> proj(0.0f, 1.0f / std::sqrt(static_cast<float>(D)));
  std::normal_distribution<float> unit(0.0f, 1.0f);
  auto fill = [&](std::vector<float>& v, size_t size, std::normal_distribution<float>& dist) {
    v.resize(size);
    for (float& x : v) x = dist(rng);
  };
  gate->layers_.resize(shape.num_layers);
  for (Layer& w : gate->layers_) {
    fill(w.q_proj_weight, H * G * R * D, proj);
    fill(w.q_proj_bias, H * G * R, unit);
    fill(w.k_proj_weight, H * R * D, proj);
    w.q_norm_weight.assign(R, 1.0f);
    w.k_norm_weight.assign(R, 1.0f);
    fill(w.k_base, H * S * R, unit);
    fill(w.b, H * G, unit);
  }
  return gate;
}

absl::Status FastKvzipGate::Save(const std::string& path) const {
  const int64_t H = shape_.num_kv_heads, G = shape_.group_size(), D = shape_.hidden_size, R = rank_, S = num_sinks_;
  std::vector<NamedTensor> tensors;
  for (int32_t l = 0; l < shape_.num_layers; ++l) {
    const Layer& w = layers_[l];
    tensors.push_back({LayerName(l, "q_proj.weight"), {H * G * R, D}, w.q_proj_weight});
    tensors.push_back({LayerName(l, "q_proj.bias"), {H * G * R}, w.q_proj_bias});
    tensors.push_back({LayerName(l, "k_proj.weight"), {H * R, D}, w.k_proj_weight});
    tensors.push_back({LayerName(l, "q_norm.weight"), {R}, w.q_norm_weight});
    tensors.push_back({LayerName(l, "k_norm.weight"), {R}, w.k_norm_weight});
    tensors.push_back({LayerName(l, "k_base"), {H, S, R}, w.k_base});
    tensors.push_back({LayerName(l, "b"), {H, G}, w.b});
  }
  return WriteSafetensorsF32(path, tensors,
                             {{"format", kFastKvzipFormat},
                              {"num_layers", absl::StrCat(shape_.num_layers)},
                              {"hidden_size", absl::StrCat(shape_.hidden_size)},
                              {"num_kv_heads", absl::StrCat(shape_.num_kv_heads)},
                              {"group_size", absl::StrCat(shape_.group_size())},
                              {"rank", absl::StrCat(rank_)},
                              {"num_sinks", absl::StrCat(num_sinks_)},
                              {"norm_eps", absl::StrCat(norm_eps_)},
                              {"source", "kvgate FastKvzipGate::Save"}});
}

absl::StatusOr<std::vector<float>> FastKvzipGate::Score(int32_t layer, absl::Span<const float> hidden) const {
  const int32_t D = shape_.hidden_size, H = shape_.num_kv_heads;
  if (layer < 0 || layer >= shape_.num_layers) {
    return absl::InvalidArgumentError(absl::StrCat("fast_kvzip gate: layer ", layer, " out of [0, ", shape_.num_layers, ")"));
  }
  if (hidden.size() % static_cast<size_t>(D) != 0) {
    return absl::InvalidArgumentError(absl::StrCat("fast_kvzip gate: hidden has ", hidden.size(),
                                                   " floats, not a multiple of hidden_size ", D));
  }
  const int32_t n = static_cast<int32_t>(hidden.size() / D);
  const Layer& w = layers_[layer];
  std::vector<float> out(static_cast<size_t>(H) * n);
  ops::SinkGateScoresArgs args = Args(w);
  args.x = hidden.data();
  args.out = out.data();
  args.out_stride = n;
  args.n = n;
  ops::SinkGateScoresCpu(args);
  return out;
}

ops::SinkGateScoresArgs FastKvzipGate::Args(const Layer& w) const {
  ops::SinkGateScoresArgs args;
  args.q_weight = w.q_proj_weight.data();
  args.q_bias = w.q_proj_bias.data();
  args.k_weight = w.k_proj_weight.data();
  args.q_norm = w.q_norm_weight.data();
  args.k_norm = w.k_norm_weight.data();
  args.k_base = w.k_base.data();
  args.b = w.b.data();
  args.hidden = shape_.hidden_size;
  args.kv_heads = shape_.num_kv_heads;
  args.group = shape_.group_size();
  args.rank = rank_;
  args.sinks = num_sinks_;
  args.eps = norm_eps_;
  return args;
}

absl::StatusOr<ops::SinkGateScoresArgs> FastKvzipGate::ArgsOnBackend(ops::Backend& backend, int32_t layer) const {
  if (layer < 0 || layer >= shape_.num_layers) {
    return absl::InvalidArgumentError(absl::StrCat("fast_kvzip gate: layer ", layer, " out of [0, ", shape_.num_layers, ")"));
  }
  const Layer& w = layers_[layer];
  ops::SinkGateScoresArgs args = Args(w);
  int32_t key = layer * 8;  // + 0 .. 6 here; + 7 is ScoreBf16On's bf16 projections
  auto upload = [&](const std::vector<float>& host, const float** out) -> absl::Status {
    // A tensor of no elements (no sinks) still needs a distinct valid address.
    static const float kNothing = 0.0f;
    const void* src = host.empty() ? &kNothing : host.data();
    KVGATE_ASSIGN_OR_RETURN(const void* on_backend,
                            backend.ConstantOnBackend(constant_owner_, key++, src, std::max<size_t>(1, host.size()) * sizeof(float)));
    *out = static_cast<const float*>(on_backend);
    return absl::OkStatus();
  };
  KVGATE_RETURN_IF_ERROR(upload(w.q_proj_weight, &args.q_weight));
  KVGATE_RETURN_IF_ERROR(upload(w.q_proj_bias, &args.q_bias));
  KVGATE_RETURN_IF_ERROR(upload(w.k_proj_weight, &args.k_weight));
  KVGATE_RETURN_IF_ERROR(upload(w.q_norm_weight, &args.q_norm));
  KVGATE_RETURN_IF_ERROR(upload(w.k_norm_weight, &args.k_norm));
  KVGATE_RETURN_IF_ERROR(upload(w.k_base, &args.k_base));
  KVGATE_RETURN_IF_ERROR(upload(w.b, &args.b));
  return args;
}

absl::Status FastKvzipGate::PrepareOn(ops::Backend& backend) const {
  for (int32_t layer = 0; layer < shape_.num_layers; ++layer) KVGATE_RETURN_IF_ERROR(ArgsOnBackend(backend, layer).status());
  return absl::OkStatus();
}

absl::Status FastKvzipGate::ScoreOn(ops::Backend& backend, int32_t layer, const float* x, int32_t rows, float* out,
                                    int64_t out_stride, bool allow_tf32) const {
  KVGATE_ASSIGN_OR_RETURN(ops::SinkGateScoresArgs args, ArgsOnBackend(backend, layer));
  args.x = x;
  args.n = rows;
  args.out = out;
  args.out_stride = out_stride;
  args.allow_tf32 = allow_tf32;
  return backend.SinkGateScores(args);
}

const std::vector<ops::Bf16>& FastKvzipGate::QkWeightBf16(int32_t layer) const {
  std::lock_guard<std::mutex> lock(qk_bf16_mutex_);
  if (qk_bf16_.size() < layers_.size()) qk_bf16_.resize(layers_.size());
  if (qk_bf16_[layer] == nullptr) {
    const Layer& w = layers_[layer];
    auto qk = std::make_unique<std::vector<ops::Bf16>>();
    qk->reserve(w.q_proj_weight.size() + w.k_proj_weight.size());
    for (float v : w.q_proj_weight) qk->push_back(ops::F32ToBf16(v));
    for (float v : w.k_proj_weight) qk->push_back(ops::F32ToBf16(v));
    qk_bf16_[layer] = std::move(qk);
  }
  return *qk_bf16_[layer];
}

absl::Status FastKvzipGate::ScoreBf16On(ops::Backend& backend, int32_t layer, const ops::Bf16* x, int32_t rows,
                                        float* out, int64_t out_stride) const {
  KVGATE_ASSIGN_OR_RETURN(ops::SinkGateScoresArgs args, ArgsOnBackend(backend, layer));
  const std::vector<ops::Bf16>& qk = QkWeightBf16(layer);
  KVGATE_ASSIGN_OR_RETURN(const void* qk_on_backend,
                          backend.ConstantOnBackend(constant_owner_, layer * 8 + 7, qk.data(), qk.size() * sizeof(ops::Bf16)));
  args.x = nullptr;
  args.x_bf16 = x;
  args.qk_weight_bf16 = static_cast<const ops::Bf16*>(qk_on_backend);
  args.n = rows;
  args.out = out;
  args.out_stride = out_stride;
  return backend.SinkGateScores(args);
}

absl::StatusOr<ScoreGrid> FastKvzipScoreGrid(const FastKvzipGate& gate,
                                             const std::vector<std::vector<float>>& hidden_states,
                                             int32_t prompt_tokens) {
  const ModelShape& s = gate.shape();
  if (static_cast<int32_t>(hidden_states.size()) != s.num_layers) {
    return absl::InvalidArgumentError(absl::StrCat("fast_kvzip: hidden states for ", hidden_states.size(),
                                                   " layers, the model has ", s.num_layers));
  }
  ScoreGrid grid;
  grid.num_layers = s.num_layers;
  grid.num_kv_heads = s.num_kv_heads;
  grid.prompt_tokens = prompt_tokens;
  grid.scores.reserve(static_cast<size_t>(s.num_layers) * s.num_kv_heads * prompt_tokens);
  for (int32_t l = 0; l < s.num_layers; ++l) {
    if (hidden_states[l].size() != static_cast<size_t>(prompt_tokens) * s.hidden_size) {
      return absl::InvalidArgumentError(absl::StrCat("fast_kvzip: layer ", l, " hidden states have ",
                                                     hidden_states[l].size(), " floats, expected ",
                                                     static_cast<size_t>(prompt_tokens) * s.hidden_size));
    }
    KVGATE_ASSIGN_OR_RETURN(std::vector<float> scores, gate.Score(l, hidden_states[l]));
    grid.scores.insert(grid.scores.end(), scores.begin(), scores.end());
  }
  return grid;
}

FastKvzipChunkPlan MakeFastKvzipChunkPlan(double keep_ratio, int32_t context_begin, int32_t prompt_tokens,
                                          int32_t chunk_tokens, int32_t window_tokens, double window_ratio) {
  FastKvzipChunkPlan plan;
  plan.context_begin = std::clamp(context_begin, 0, std::max(prompt_tokens, 0));
  plan.prompt_tokens = std::max(prompt_tokens, 0);
  plan.chunk_tokens = std::max(chunk_tokens, 1);
  const int32_t clen = plan.prompt_tokens - plan.context_begin;
  int32_t window = clen < plan.chunk_tokens ? static_cast<int32_t>(window_ratio * clen) : window_tokens;
  window = std::clamp(window, 0, clen);
  plan.evicts = keep_ratio < 1.0;
  if (!plan.evicts) {
    plan.window = window;
    plan.chunk_keep_ratio = 1.0;
    return plan;
  }
  if (keep_ratio * clen < window) {
    plan.window = static_cast<int32_t>(keep_ratio * clen);
    plan.chunk_keep_ratio = 0.0;
  } else {
    plan.window = window;
    // clen > window here unless clen == window == 0 (empty context).
    plan.chunk_keep_ratio = clen > window ? (keep_ratio * clen - window) / (clen - window) : 0.0;
  }
  return plan;
}

std::vector<TokenRange> FastKvzipPrefillChunks(const FastKvzipChunkPlan& plan) {
  std::vector<TokenRange> out;
  for (int64_t b = 0; b < plan.prompt_tokens; b += plan.chunk_tokens) {
    out.push_back({static_cast<int32_t>(b),
                   static_cast<int32_t>(std::min<int64_t>(b + plan.chunk_tokens, plan.prompt_tokens))});
  }
  return out;
}

TokenRange FastKvzipThresholdRange(const FastKvzipChunkPlan& plan, int32_t thresholded_until, int32_t scored_end) {
  const int32_t begin = std::max(thresholded_until, plan.context_begin);
  const int32_t end = std::max(begin, std::min(scored_end, plan.prompt_tokens) - plan.window);
  return {begin, end};
}

int64_t FastKvzipChunkKeepCount(const FastKvzipChunkPlan& plan, int64_t candidates) {
  if (!plan.evicts) return candidates;
  return std::clamp<int64_t>(static_cast<int64_t>(std::floor(plan.chunk_keep_ratio * static_cast<double>(candidates))),
                             0, candidates);
}

namespace {

constexpr char kName[] = "fast_kvzip";

// The decode-time re-eviction (FastKVzip math/method/compression/fastkvzip.py): every
// `interval` steps the gate scores the new rows; if the sequence holds more than
// capacity * layers * kv_heads rows, one global threshold keeps that many, always keeping
// the newest `interval` rows and the first sink_tokens positions.
class FastKvzipEvictor final : public DecodeEvictor {
 public:
  FastKvzipEvictor(std::shared_ptr<const FastKvzipGate> gate, int32_t sink_tokens, int32_t capacity, int32_t interval)
      : gate_(std::move(gate)), sink_tokens_(sink_tokens), capacity_(capacity), interval_(interval),
        pending_inputs_(gate_->shape().num_layers), pending_scores_(gate_->shape().num_layers) {}
  std::string_view policy() const override { return kName; }
  bool wants_layer_inputs() const override { return true; }
  const DecodeLayerScorer* layer_scorer() const override { return gate_.get(); }

  // Inputs wait for the re-eviction to be scored as a block; once a layer has scores
  // waiting (a batch scored on the backend) an input is scored at once, so the layer's
  // rows keep their order.
  absl::Status ObserveLayerInput(int32_t layer, absl::Span<const float> x) override {
    if (layer < 0 || layer >= static_cast<int32_t>(pending_inputs_.size()) ||
        x.size() % static_cast<size_t>(gate_->shape().hidden_size) != 0) {
      return absl::InvalidArgumentError(absl::StrCat("fast_kvzip decode eviction: layer ", layer, " input of ",
                                                     x.size(), " floats"));
    }
    pending_inputs_[layer].insert(pending_inputs_[layer].end(), x.begin(), x.end());
    if (!pending_scores_[layer].empty()) return ScorePendingInputs(layer);
    return absl::OkStatus();
  }

  // `scores`: [steps, kv_heads], the rows' scores in step order.
  absl::Status ObserveLayerScores(int32_t layer, absl::Span<const float> scores) override {
    const size_t heads = static_cast<size_t>(gate_->shape().num_kv_heads);
    if (layer < 0 || layer >= static_cast<int32_t>(pending_scores_.size()) || scores.size() % heads != 0) {
      return absl::InvalidArgumentError(absl::StrCat("fast_kvzip decode eviction: layer ", layer, " scores of ",
                                                     scores.size(), " floats for ", heads, " kv heads"));
    }
    KVGATE_RETURN_IF_ERROR(ScorePendingInputs(layer));
    pending_scores_[layer].insert(pending_scores_[layer].end(), scores.begin(), scores.end());
    return absl::OkStatus();
  }

  absl::StatusOr<RowsToDrop> AfterStep(const DecodeRows& rows) override {
    const ModelShape& shape = gate_->shape();
    if (rows.num_layers != shape.num_layers || rows.num_kv_heads != shape.num_kv_heads) {
      return absl::InvalidArgumentError(absl::StrCat("fast_kvzip decode eviction: a sequence of ", rows.num_layers,
                                                     "x", rows.num_kv_heads, " heads for a gate of ",
                                                     shape.num_layers, "x", shape.num_kv_heads));
    }
    const int32_t steps = PendingSteps(0);
    if (steps < interval_) return RowsToDrop{};
    // Score the rows decoded since the last re-eviction: the last `steps` rows of every head.
    for (int32_t l = 0; l < rows.num_layers; ++l) {
      if (PendingSteps(l) != steps) {
        return absl::InvalidArgumentError(absl::StrCat("fast_kvzip decode eviction: layer ", l, " saw ",
                                                       PendingSteps(l), " steps, layer 0 ", steps));
      }
      if (pending_scores_[l].empty()) KVGATE_RETURN_IF_ERROR(ScorePendingInputs(l));
      const std::vector<float>& scores = pending_scores_[l];  // [steps, kv]
      for (int32_t h = 0; h < rows.num_kv_heads; ++h) {
        const absl::Span<float> head = rows.scores[static_cast<size_t>(l) * rows.num_kv_heads + h];
        if (head.size() != rows.head_positions(l, h).size() || head.size() < static_cast<size_t>(steps)) {
          return absl::InvalidArgumentError(absl::StrCat("fast_kvzip decode eviction: head (", l, ", ", h, ") has ",
                                                         head.size(), " scores for ",
                                                         rows.head_positions(l, h).size(), " rows and ", steps,
                                                         " new ones"));
        }
        for (int32_t t = 0; t < steps; ++t) {
          head[head.size() - steps + t] = scores[static_cast<size_t>(t) * rows.num_kv_heads + h];
        }
      }
      pending_scores_[l].clear();
    }
    const int64_t total_budget = int64_t{capacity_} * rows.num_layers * rows.num_kv_heads;
    int64_t total_rows = 0;
    for (const auto& positions : rows.positions) total_rows += static_cast<int64_t>(positions.size());
    if (total_rows <= total_budget) return RowsToDrop{};
    // One global threshold over every row; the newest `interval` rows and the first sinks
    // are pinned (the repo sets their scores to 1.0; a score above every gate score here).
    struct Row {
      float score;
      int32_t position, head_index, row;
    };
    std::vector<Row> all;
    all.reserve(static_cast<size_t>(total_rows));
    const int32_t newest = rows.next_pos - interval_;
    int64_t pinned = 0;
    for (size_t i = 0; i < rows.positions.size(); ++i) {
      const absl::Span<const int32_t> positions = rows.positions[i];
      for (size_t r = 0; r < positions.size(); ++r) {
        const int32_t p = positions[r];
        const bool pin = p < sink_tokens_ || p >= newest;
        pinned += pin ? 1 : 0;
        all.push_back({pin ? std::numeric_limits<float>::infinity() : rows.scores[i][r], p, static_cast<int32_t>(i),
                       static_cast<int32_t>(r)});
      }
    }
    const size_t keep = static_cast<size_t>(std::max<int64_t>(total_budget, pinned));
    std::nth_element(all.begin(), all.begin() + keep, all.end(), [](const Row& a, const Row& b) {
      if (a.score != b.score) return a.score > b.score;
      if (a.position != b.position) return a.position < b.position;
      return a.head_index < b.head_index;
    });
    RowsToDrop drop(rows.positions.size());
    for (size_t k = keep; k < all.size(); ++k) drop[all[k].head_index].push_back(all[k].row);
    for (auto& head : drop) std::sort(head.begin(), head.end());
    return drop;
  }

  // Tail: per layer, uint32 count and float32[count] of inputs not yet scored; then, only
  // when some layer has scores waiting, the same per layer for them ([steps, kv_heads]).
  std::string SaveState() const override {
    std::string tail;
    AppendPerLayer(pending_inputs_, &tail);
    const bool any_scores = std::any_of(pending_scores_.begin(), pending_scores_.end(),
                                        [](const std::vector<float>& s) { return !s.empty(); });
    if (any_scores) AppendPerLayer(pending_scores_, &tail);
    return internal::PackState(kName, {sink_tokens_, capacity_, interval_}, tail);
  }

  absl::Status RestorePending(std::string_view tail) {
    KVGATE_RETURN_IF_ERROR(ReadPerLayer(&tail, gate_->shape().hidden_size, "input", &pending_inputs_));
    if (!tail.empty()) KVGATE_RETURN_IF_ERROR(ReadPerLayer(&tail, gate_->shape().num_kv_heads, "score", &pending_scores_));
    if (!tail.empty()) {
      return absl::InvalidArgumentError(absl::StrCat("fast_kvzip decode eviction state: ", tail.size(), " trailing bytes"));
    }
    for (size_t l = 0; l < pending_inputs_.size(); ++l) {
      if (!pending_inputs_[l].empty() && !pending_scores_[l].empty()) {
        return absl::InvalidArgumentError(
            absl::StrCat("fast_kvzip decode eviction state: layer ", l, " has both inputs and scores waiting"));
      }
    }
    return absl::OkStatus();
  }

 private:
  int32_t PendingSteps(int32_t layer) const {
    return static_cast<int32_t>(pending_inputs_[layer].size() / static_cast<size_t>(gate_->shape().hidden_size) +
                                pending_scores_[layer].size() / static_cast<size_t>(gate_->shape().num_kv_heads));
  }

  // The layer's waiting inputs become waiting scores (after any scores already there).
  absl::Status ScorePendingInputs(int32_t layer) {
    std::vector<float>& inputs = pending_inputs_[layer];
    if (inputs.empty()) return absl::OkStatus();
    const size_t heads = static_cast<size_t>(gate_->shape().num_kv_heads);
    const size_t steps = inputs.size() / static_cast<size_t>(gate_->shape().hidden_size);
    KVGATE_ASSIGN_OR_RETURN(std::vector<float> scores, gate_->Score(layer, inputs));  // [kv, steps]
    std::vector<float>& out = pending_scores_[layer];
    for (size_t t = 0; t < steps; ++t) {
      for (size_t h = 0; h < heads; ++h) out.push_back(scores[h * steps + t]);
    }
    inputs.clear();
    return absl::OkStatus();
  }

  static void AppendPerLayer(const std::vector<std::vector<float>>& per_layer, std::string* tail) {
    for (const std::vector<float>& values : per_layer) {
      const uint32_t count = static_cast<uint32_t>(values.size());
      tail->append(reinterpret_cast<const char*>(&count), sizeof(count));
      if (!values.empty()) tail->append(reinterpret_cast<const char*>(values.data()), values.size() * sizeof(float));
    }
  }

  // Each layer's count must be a multiple of `row`.
  static absl::Status ReadPerLayer(std::string_view* tail, int32_t row, std::string_view what,
                                   std::vector<std::vector<float>>* per_layer) {
    for (std::vector<float>& values : *per_layer) {
      uint32_t count = 0;
      if (tail->size() < sizeof(count)) return absl::InvalidArgumentError("fast_kvzip decode eviction state is truncated");
      std::memcpy(&count, tail->data(), sizeof(count));
      tail->remove_prefix(sizeof(count));
      if (count % static_cast<uint32_t>(row) != 0 || tail->size() / sizeof(float) < count) {
        return absl::InvalidArgumentError(absl::StrCat("fast_kvzip decode eviction state: ", count, " pending ",
                                                       std::string(what), " floats in ", tail->size(), " bytes"));
      }
      values.resize(count);
      if (count > 0) std::memcpy(values.data(), tail->data(), size_t{count} * sizeof(float));
      tail->remove_prefix(size_t{count} * sizeof(float));
    }
    return absl::OkStatus();
  }

  std::shared_ptr<const FastKvzipGate> gate_;
  int32_t sink_tokens_;
  int32_t capacity_;
  int32_t interval_;
  std::vector<std::vector<float>> pending_inputs_;  // per layer [steps, hidden_size], not yet scored
  std::vector<std::vector<float>> pending_scores_;  // per layer [steps, kv_heads], after any inputs scored
};

// Fast KVzip's prefill (FastKVzip prefill/model/wrapper.py::prefill, eviction-methods.md
// 5.3) when chunked: the prompt runs in chunks; after each chunk's forward through every
// layer, the tokens that have left the local window and were not yet judged are
// thresholded with ONE threshold over all layers and kv heads (keep fraction r_chunk), and
// the losers become invisible to every later chunk. The first sink_tokens (the "system
// prompt") are never scored; the final window W is never evicted.
class FastKvzipRequest final : public PolicyRequest {
 public:
  FastKvzipRequest(const Policy& policy, const ResolvedBudget& budget, std::shared_ptr<const FastKvzipGate> gate,
                   const FastKvzipRequestOptions& options)
      : PolicyRequest(policy, budget), gate_(std::move(gate)), options_(options) {}

  bool runs_prefill() const override { return options_.chunked_prefill; }

  absl::StatusOr<std::vector<float>> RunPrefill(PrefillRunner& runner, absl::Span<const int32_t> prompt) override {
    if (gate_ == nullptr) return absl::FailedPreconditionError("fast_kvzip: chunked prefill without a gate");
    const int32_t n = static_cast<int32_t>(prompt.size());
    if (n != budget_.prompt_tokens || n < 1) {
      return absl::InvalidArgumentError(absl::StrCat("fast_kvzip: a prefill of ", n, " tokens for a budget of ",
                                                     budget_.prompt_tokens));
    }
    const int32_t L = gate_->shape().num_layers, H = gate_->shape().num_kv_heads;
    const int32_t context_begin = std::min(budget_.sink_tokens, n);
    const FastKvzipChunkPlan chunks = MakeFastKvzipChunkPlan(double(budget_.keep_per_head) / n, context_begin, n,
                                                             options_.chunk_tokens, options_.window_tokens);
    const size_t head_rows = size_t{1} * H * n;
    // Row p of (layer l, kv head h) is still kept: visible[(l * H + h) * n + p].
    std::vector<uint8_t> visible(size_t{1} * L * head_rows, 1);
    std::vector<float> logits;
    int32_t judged_until = context_begin;
    // The gate runs on the backend inside each chunk's forward, on the layer's input where
    // it is, into [L, H, n] scores there; only the chunk's scores come to the host.
    ops::Backend& backend = runner.backend();
    KVGATE_ASSIGN_OR_RETURN(ops::DeviceBuffer backend_scores, backend.Alloc(sizeof(float) * L * head_rows));
    int32_t chunk_begin = 0;
    CaptureRequest record;
    record.layer_inputs_on_backend = [&](int32_t layer, const engine::LayerInputOnBackend& input,
                                         int32_t tokens) -> absl::Status {
      float* out = backend_scores.as<float>() + layer * head_rows + chunk_begin;
      // A prompt's scores rank thousands of tokens against one threshold: bf16 inputs (or
      // TF32's ~1e-3) only reorder near-ties there, for the projections' tensor-core rate.
      // (A decode step's few rows stay fp32.)
      if (input.bf16 != nullptr) return gate_->ScoreBf16On(backend, layer, input.bf16, tokens, out, n);
      return gate_->ScoreOn(backend, layer, input.f32, tokens, out, n, /*allow_tf32=*/true);
    };
    for (const TokenRange& chunk : FastKvzipPrefillChunks(chunks)) {
      const int32_t m = chunk.end - chunk.begin;
      chunk_begin = chunk.begin;
      PrefillCapture recorded;
      // Until a chunk has evicted something every key is visible: no mask, so attention
      // takes its unmasked path (a prompt shorter than one chunk never pays for masking).
      std::vector<std::vector<uint8_t>> key_masks;
      if (judged_until > context_begin) {
        const int32_t capacity = runner.cache_capacity_tokens();
        key_masks.assign(L, std::vector<uint8_t>(size_t{1} * H * capacity, 1));
        for (int32_t l = 0; l < L; ++l) {
          for (int32_t h = 0; h < H; ++h) {
            std::copy_n(visible.begin() + (size_t{1} * l * H + h) * n, chunk.begin,
                        key_masks[l].begin() + size_t{1} * h * capacity);
          }
        }
      }
      KVGATE_ASSIGN_OR_RETURN(logits, runner.Forward(prompt.subspan(chunk.begin, m), key_masks, record, &recorded));
      if (!chunks.evicts) continue;
      const TokenRange judge = FastKvzipThresholdRange(chunks, judged_until, chunk.end);
      const int32_t len = judge.end - judge.begin;
      if (len <= 0) continue;
      // One threshold over every layer and kv head (SelectGlobalTopKCount's cut), taken where
      // the scores are: the [L * H, len] window of the backend's [L, H, n] scores.
      BackendSelection selection;
      selection.scores = backend_scores.as<float>() + judge.begin;
      selection.rows = L * H;
      selection.n = len;
      selection.row_stride = n;
      selection.rows_per_selection = L * H;
      selection.need = FastKvzipChunkKeepCount(chunks, int64_t{len} * L * H);
      KVGATE_ASSIGN_OR_RETURN(const std::vector<uint8_t> winners, SelectOnBackend(backend, selection));
      for (size_t row = 0; row < size_t{1} * L * H; ++row) {
        std::copy_n(winners.begin() + row * len, len, visible.begin() + row * n + judge.begin);
      }
      judged_until = judge.end;
    }
    // Every chunk's scores in one copy (the thresholds were taken on the backend), read
    // only at the kept rows; the system prompt keeps its pinned 1.0.
    std::vector<float> scores(size_t{1} * L * head_rows);
    KVGATE_RETURN_IF_ERROR(backend.CopyToHost(scores.data(), backend_scores.data(), scores.size() * sizeof(float)));
    KeepPlan plan{L, H, n, {}};
    plan.heads.resize(size_t{1} * L * H);
    for (size_t row = 0; row < size_t{1} * L * H; ++row) {
      const uint8_t* kept = visible.data() + row * n;
      const float* score = scores.data() + row * n;
      HeadKeep& head = plan.heads[row];  // KeepPlan::at(l, h) is heads[l * H + h]
      const size_t count = static_cast<size_t>(n - std::count(kept, kept + n, uint8_t{0}));
      head.positions.resize(count);
      head.scores.resize(count);
      size_t k = 0;
      for (int32_t p = 0; p < n; ++p) {
        if (!kept[p]) continue;
        head.positions[k] = p;
        head.scores[k] = p < context_begin ? 1.0f : score[p];
        ++k;
      }
    }
    chunked_plan_ = std::move(plan);
    return logits;
  }

  absl::StatusOr<KeepPlan> Plan(PrefillRunner& runner, absl::Span<const int32_t> prompt,
                                const PrefillCapture& capture, const PolicyInputs& inputs,
                                HeadBudget head_budget) override {
    if (!chunked_plan_.has_value()) return PolicyRequest::Plan(runner, prompt, capture, inputs, head_budget);
    KeepPlan plan = std::move(*chunked_plan_);
    chunked_plan_.reset();
    return plan;
  }

  absl::StatusOr<std::unique_ptr<DecodeEvictor>> TakeDecodeEvictor() override {
    if (budget_.keep_per_head >= budget_.prompt_tokens) return nullptr;  // keeping all stays keeping all
    if (gate_ == nullptr) return absl::FailedPreconditionError("fast_kvzip: decode eviction without a gate");
    return std::make_unique<FastKvzipEvictor>(gate_, budget_.sink_tokens, budget_.keep_per_head,
                                              options_.decode_interval);
  }

 private:
  std::shared_ptr<const FastKvzipGate> gate_;
  FastKvzipRequestOptions options_;
  std::optional<KeepPlan> chunked_plan_;  // set by RunPrefill
};

class FastKvzipPolicy final : public Policy {
 public:
  FastKvzipPolicy(const ModelShape& shape, std::shared_ptr<const FastKvzipGate> gate, float safeguard,
                  const FastKvzipRequestOptions& request_options)
      : shape_(shape), gate_(std::move(gate)), safeguard_(safeguard), request_options_(request_options) {}
  std::unique_ptr<PolicyRequest> StartRequest(const ResolvedBudget& budget) const override {
    return std::make_unique<FastKvzipRequest>(*this, budget, gate_, request_options_);
  }
  absl::StatusOr<std::unique_ptr<DecodeEvictor>> RestoreDecodeEvictor(std::string_view state) const override {
    KVGATE_ASSIGN_OR_RETURN(internal::PackedState packed, internal::UnpackState(state, kName, 3));
    const int32_t sink_tokens = packed.values[0], capacity = packed.values[1], interval = packed.values[2];
    if (sink_tokens < 0 || capacity < 0 || interval < 1) {
      return absl::InvalidArgumentError(absl::StrCat("fast_kvzip decode eviction with sink_tokens ", sink_tokens,
                                                     ", capacity ", capacity, ", interval ", interval));
    }
    if (gate_ == nullptr) return absl::FailedPreconditionError("fast_kvzip: decode eviction without a gate");
    auto evictor = std::make_unique<FastKvzipEvictor>(gate_, sink_tokens, capacity, interval);
    KVGATE_RETURN_IF_ERROR(evictor->RestorePending(packed.tail));
    return evictor;
  }
  std::string_view name() const override { return "fast_kvzip"; }
  CaptureRequest needs() const override {
    CaptureRequest r;
    r.hidden_states = true;
    return r;
  }
  int32_t default_sink() const override { return kFastKvzipDefaultSink; }
  int32_t default_recent() const override { return kDefaultFastKvzipWindow; }
  const FastKvzipGate* fast_kvzip_gate() const override { return gate_.get(); }

  absl::StatusOr<KeepPlan> Plan(const PrefillCapture& capture, const PolicyInputs& inputs,
                                const ResolvedBudget& budget, HeadBudget head_budget) const override {
    KVGATE_RETURN_IF_ERROR(CheckBudgetAndCapture(capture, budget, shape_));
    const int32_t n = budget.prompt_tokens;
    ScoreGrid grid;
    if (!inputs.gate_scores.empty()) {
      if (static_cast<int32_t>(inputs.gate_scores.size()) != shape_.num_layers) {
        return absl::InvalidArgumentError("fast_kvzip: PolicyInputs::gate_scores needs one entry per layer");
      }
      grid.num_layers = shape_.num_layers;
      grid.num_kv_heads = shape_.num_kv_heads;
      grid.prompt_tokens = n;
      for (int32_t l = 0; l < shape_.num_layers; ++l) {
        if (inputs.gate_scores[l].size() != static_cast<size_t>(shape_.num_kv_heads) * n) {
          return absl::InvalidArgumentError(absl::StrCat("fast_kvzip: gate_scores of layer ", l,
                                                         " must hold num_kv_heads * n values"));
        }
        grid.scores.insert(grid.scores.end(), inputs.gate_scores[l].begin(), inputs.gate_scores[l].end());
      }
    } else {
      if (gate_ == nullptr) {
        return absl::FailedPreconditionError("fast_kvzip: no gate loaded and no PolicyInputs::gate_scores");
      }
      KVGATE_ASSIGN_OR_RETURN(grid, FastKvzipScoreGrid(*gate_, capture.hidden_states, n));
    }
    KeepPlan plan;
    if (budget.keep_per_head >= n) {
      plan = KeepPlan::KeepAll(shape_.num_layers, shape_.num_kv_heads, n);
    } else if (head_budget == HeadBudget::kUniform) {
      plan = SelectPerHeadTopK(grid, budget.keep_per_head, budget.protected_mask);
    } else if (head_budget == HeadBudget::kAdaptive) {
      plan = SelectAdaKv(grid, budget.keep_per_head, budget.protected_mask, safeguard_);
    } else {
      plan = SelectGlobalTopK(grid, budget.keep_per_head, budget.protected_mask);
    }
    // Scores for decode-time eviction; pinned rows (sink, ranges outside the window) = 1.0.
    const int32_t window_begin = n - budget.recent_tokens;
    for (int32_t l = 0; l < shape_.num_layers; ++l) {
      for (int32_t h = 0; h < shape_.num_kv_heads; ++h) {
        HeadKeep& keep = plan.at(l, h);
        keep.scores.resize(keep.positions.size());
        for (size_t i = 0; i < keep.positions.size(); ++i) {
          const int32_t p = keep.positions[i];
          const bool pinned = budget.protected_mask[p] && (p < budget.sink_tokens || p < window_begin);
          keep.scores[i] = pinned ? 1.0f : grid.at(l, h, p);
        }
      }
    }
    return plan;
  }

 private:
  ModelShape shape_;
  std::shared_ptr<const FastKvzipGate> gate_;
  float safeguard_;
  FastKvzipRequestOptions request_options_;
};

}  // namespace

std::unique_ptr<Policy> MakeFastKvzipPolicy(const ModelShape& shape, std::shared_ptr<const FastKvzipGate> gate,
                                            float adakv_safeguard, const FastKvzipRequestOptions& request_options) {
  return std::make_unique<FastKvzipPolicy>(shape, std::move(gate), adakv_safeguard, request_options);
}

}  // namespace kvgate::gates
