// File: Fast KVzip (arXiv 2601.17668; eviction-methods.md section 5): a per-layer
// "low-rank sink attention" gate on the layer's attention input predicts KVzip scores;
// one global threshold across layers and kv heads decides what stays.
//
// Gate, per layer, token t, kv head h, group member g (FastKVzip prefill/attention/gate.py):
//   q_{t,h,g} = RMSNorm_q(W_q x_t + b_q)[h, g]          in R^rank   (q_proj has a bias)
//   k_{t,h}   = RMSNorm_k(W_k x_t)[h]                   in R^rank   (k_proj has none)
//   l         = <k_{t,h}, q_{t,h,g}> / sqrt(rank) + b[h, g]         (b added ONCE, as gate.py)
//   s_r       = <k_base[h, r], q_{t,h,g}> / sqrt(rank),  r < num_sinks
//   score_{t,h,g} = sigmoid(l - logsumexp_r s_r) = e^l / (e^l + sum_r e^{s_r})
//   score_{t,h}   = mean_g score_{t,h,g}
// RMSNorm(v) = w * v / sqrt(mean(v^2) + eps), eps = 1e-6 (Qwen3RMSNorm), fp32 throughout,
// evaluated as a max-shifted softmax so nothing overflows. Projection rows are ordered
// [h][g][rank] for q and [h][rank] for k (the checkpoint's view(n, H_kv, -1, rank)).
// Pointwise: token t's score depends on x_t only.
#pragma once

#include <cstdint>
#include <memory>
#include <mutex>
#include <string>
#include <vector>

#include "absl/status/statusor.h"
#include "absl/types/span.h"
#include "cuda/backend.h"
#include "gates/decode_evictor.h"
#include "gates/eviction_spec.h"
#include "gates/policy.h"
#include "gates/selectors.h"

namespace kvgate::gates {

inline constexpr char kFastKvzipFormat[] = "kvgate.fast_kvzip.v1";
inline constexpr int32_t kFastKvzipDefaultSink = 4;           // kvpress n_sink; decode first_tokens
inline constexpr int32_t kFastKvzipPrefillChunkTokens = 16000;  // prefill_chunk_size
inline constexpr int32_t kFastKvzipWindowTokens = 4096;       // window_size
inline constexpr double kFastKvzipWindowRatio = 0.02;         // window_ratio

// A gate is also the DecodeLayerScorer of its decode-time re-eviction: a decode batch
// scores its fast_kvzip sequences' tokens on the backend, one launch a layer.
class FastKvzipGate final : public DecodeLayerScorer {
 public:
  FastKvzipGate(const FastKvzipGate&) = delete;  // one owner id per set of weights
  FastKvzipGate& operator=(const FastKvzipGate&) = delete;
  struct Layer {
    std::vector<float> q_proj_weight;  // [H_kv * G * rank, D]
    std::vector<float> q_proj_bias;    // [H_kv * G * rank]
    std::vector<float> k_proj_weight;  // [H_kv * rank, D]
    std::vector<float> q_norm_weight;  // [rank]
    std::vector<float> k_norm_weight;  // [rank]
    std::vector<float> k_base;         // [H_kv, num_sinks, rank]
    std::vector<float> b;              // [H_kv, G]
  };

  // Loads our safetensors format (gates/README.md; gates/train/convert_fastkvzip.py writes
  // it from the authors' q{G}_dim16_sink16.pt). NOT_FOUND if the file is missing;
  // INVALID_ARGUMENT "gate weights do not fit the model: ..." naming the metadata key or
  // tensor that is missing or has the wrong shape.
  static absl::StatusOr<std::unique_ptr<FastKvzipGate>> Load(const std::string& path,
                                                             const ModelShape& shape);
  // Random weights for tests and benchmarks (deterministic in seed): projections
  // N(0, 1/D), norms 1, sinks N(0, 1), b N(0, 1).
  static std::unique_ptr<FastKvzipGate> CreateRandom(const ModelShape& shape, uint64_t seed,
                                                     int32_t rank = 16, int32_t num_sinks = 16);
  // Writes our format (all tensors F32).
  absl::Status Save(const std::string& path) const;

  // hidden: [n, hidden_size] post input-RMSNorm attention inputs of `layer`. Returns
  // [num_kv_heads, n] scores in (0, 1). INVALID_ARGUMENT for a bad layer or a size that is
  // not a multiple of hidden_size.
  absl::StatusOr<std::vector<float>> Score(int32_t layer, absl::Span<const float> hidden) const;
  // The same gate as an op on `backend` (ops::SinkGateScores; the caller sets x, out,
  // out_stride and n): the weights of `layer` go to the backend's memory at the first call
  // and stay there (Backend::ConstantOnBackend), so change them (mutable_layer) before that.
  absl::StatusOr<ops::SinkGateScoresArgs> ArgsOnBackend(ops::Backend& backend, int32_t layer) const;

  // DecodeLayerScorer: every layer's weights uploaded once; ScoreOn is ArgsOnBackend + the op.
  int32_t scorer_layers() const override { return shape_.num_layers; }
  int32_t scorer_kv_heads() const override { return shape_.num_kv_heads; }
  absl::Status PrepareOn(ops::Backend& backend) const override;
  absl::Status ScoreOn(ops::Backend& backend, int32_t layer, const float* x, int32_t rows, float* out,
                       int64_t out_stride) const override {
    return ScoreOn(backend, layer, x, rows, out, out_stride, /*allow_tf32=*/false);
  }
  // allow_tf32: the projections may run on TF32 tensor cores (ops::SinkGateScoresArgs).
  absl::Status ScoreOn(ops::Backend& backend, int32_t layer, const float* x, int32_t rows, float* out,
                       int64_t out_stride, bool allow_tf32) const;
  // The bf16 form (ops::SinkGateScoresArgs::x_bf16): x is a bf16 model's layer input; the
  // bf16 rounding of the layer's projections goes to the backend at the first call.
  absl::Status ScoreBf16On(ops::Backend& backend, int32_t layer, const ops::Bf16* x, int32_t rows, float* out,
                           int64_t out_stride) const;

  const ModelShape& shape() const { return shape_; }
  int32_t rank() const { return rank_; }
  int32_t num_sinks() const { return num_sinks_; }
  float norm_eps() const { return norm_eps_; }
  const Layer& layer(int32_t i) const { return layers_[i]; }
  Layer& mutable_layer(int32_t i) { return layers_[i]; }

 private:
  FastKvzipGate(const ModelShape& shape, int32_t rank, int32_t num_sinks, float eps)
      : shape_(shape), rank_(rank), num_sinks_(num_sinks), norm_eps_(eps) {}
  ops::SinkGateScoresArgs Args(const Layer& w) const;  // host weights and dimensions
  ModelShape shape_;
  int32_t rank_, num_sinks_;
  float norm_eps_;
  // The bf16 rounding of [q_proj_weight; k_proj_weight] of `layer`, made at its first use
  // and kept: what ScoreBf16On hands to ConstantOnBackend.
  const std::vector<ops::Bf16>& QkWeightBf16(int32_t layer) const;
  std::vector<Layer> layers_;
  uint64_t constant_owner_ = ops::NewConstantOwner();  // this gate's weights on backends
  mutable std::mutex qk_bf16_mutex_;
  mutable std::vector<std::unique_ptr<std::vector<ops::Bf16>>> qk_bf16_;  // per layer, or null
};

// Gate scores of every layer as a ScoreGrid (hidden_states from a capture).
absl::StatusOr<ScoreGrid> FastKvzipScoreGrid(const FastKvzipGate& gate,
                                             const std::vector<std::vector<float>>& hidden_states,
                                             int32_t prompt_tokens);

// --- Chunked prefill (FastKVzip prefill/model/wrapper.py::prefill), pure helper math -----
//
// The engine prefills in chunks of chunk_tokens over the WHOLE prompt (system prompt
// included); after the forward of each chunk it thresholds, over all layers x kv heads, the
// scores of the not-yet-thresholded tokens that have left the local window, and removes
// the losers before the next chunk. With clen = prompt_tokens - context_begin (the
// evictable context; [0, context_begin) is the system prompt, never scored):
//   W = int(window_ratio * clen) if clen < chunk_tokens, else window_tokens;
//   if keep_ratio >= 1: nothing is evicted;
//   else if keep_ratio * clen < W: W = int(keep_ratio * clen), r_chunk = 0;
//   else r_chunk = (keep_ratio * clen - W) / (clen - W),
// so that r_chunk * (clen - W) + W = keep_ratio * clen: the final W tokens are always kept
// and the overall retained fraction of the context equals keep_ratio.
struct FastKvzipChunkPlan {
  int32_t context_begin = 0;
  int32_t prompt_tokens = 0;
  int32_t chunk_tokens = kFastKvzipPrefillChunkTokens;
  int32_t window = 0;             // W after the adjustments above
  double chunk_keep_ratio = 1.0;  // r_chunk
  bool evicts = false;            // keep_ratio < 1
};
FastKvzipChunkPlan MakeFastKvzipChunkPlan(double keep_ratio, int32_t context_begin,
                                          int32_t prompt_tokens,
                                          int32_t chunk_tokens = kFastKvzipPrefillChunkTokens,
                                          int32_t window_tokens = kFastKvzipWindowTokens,
                                          double window_ratio = kFastKvzipWindowRatio);
// The prefill chunks [i * chunk_tokens, min((i + 1) * chunk_tokens, n)).
std::vector<TokenRange> FastKvzipPrefillChunks(const FastKvzipChunkPlan& plan);
// After the chunk ending at `scored_end` (tokens [0, scored_end) have scores), the range
// to threshold: [thresholded_until, scored_end - W), where thresholded_until starts at
// context_begin and becomes this range's end afterwards. Empty (begin == end) when no token
// has left the window yet (the repo would slice an empty range there too).
TokenRange FastKvzipThresholdRange(const FastKvzipChunkPlan& plan, int32_t thresholded_until,
                                   int32_t scored_end);
// Entries to keep among `candidates` = range length x layers x kv heads:
// floor(r_chunk * candidates). (The repo keeps the scores strictly above the
// int(N * r)-th largest, i.e. one fewer without ties; we keep exactly this count with the
// selectors' tie rule via SelectGlobalTopKCount.)
int64_t FastKvzipChunkKeepCount(const FastKvzipChunkPlan& plan, int64_t candidates);

// Policy (one-shot, after a full prefill; kvpress's port): scores = PolicyInputs::gate_scores
// or the gate on PrefillCapture::hidden_states; protected = sink (default 4) + recent window
// (default FastKvzipPrefillWindow(n), shrunk to the budget) + ranges; one global threshold
// over all layers and kv heads (kPolicyDefault), per-head top-k (kUniform, "pair-head"),
// AdaKV (kAdaptive, "adakv-layer"). HeadKeep::scores carries each kept row's gate score
// for decode-time eviction; rows pinned for the whole request (sink rows and protected
// ranges outside the recent window) carry 1.0, like the decode-time first_tokens. Its
// A request prefills in chunks that evict between them when `chunked_prefill` (the
// authors' code; else one forward and one eviction after it, kvpress's port), and its
// decode evictor re-evicts every `decode_interval` steps (PolicyOptions' fast_kvzip_*).
struct FastKvzipRequestOptions {
  bool chunked_prefill = true;
  int32_t chunk_tokens = 16000;
  int32_t window_tokens = 4096;
  int32_t decode_interval = 128;
};
std::unique_ptr<Policy> MakeFastKvzipPolicy(const ModelShape& shape,
                                            std::shared_ptr<const FastKvzipGate> gate,
                                            float adakv_safeguard, const FastKvzipRequestOptions& request_options);

}  // namespace kvgate::gates
