// File: a Llama-family decoder (Llama 2/3, Mistral, Qwen2, Qwen3) whose forward pass
// runs on an ops::Backend, with a per-sequence KV cache. Knows nothing of gRPC.
//
// A Model is immutable after loading and may serve many sequences, but Forward calls on
// one Model must not overlap (they share scratch buffers).
#pragma once

#include <array>
#include <cstdint>
#include <functional>
#include <map>
#include <memory>
#include <string>
#include <utility>
#include <vector>

#include "absl/status/statusor.h"
#include "absl/types/span.h"
#include "cuda/backend.h"
#include "engine/model_config.h"
#include "engine/paged_kv.h"
#include "engine/prefill_capture.h"

namespace kvgate::engine {

// K and V of one sequence, head-major and contiguous per layer:
// k[layer] is [num_kv_heads, capacity_tokens, head_dim] in backend memory.
// Row r of every head holds the token at position r (no eviction yet).
class KvCache {
 public:
  int32_t length_tokens() const { return length_tokens_; }
  int32_t capacity_tokens() const { return capacity_tokens_; }
  // Entries held: layers * kv_heads * length.
  int64_t num_entries() const;
  float* k(int layer) const { return k_[layer].as<float>(); }
  float* v(int layer) const { return v_[layer].as<float>(); }

 private:
  friend class Model;
  int32_t length_tokens_ = 0;
  int32_t capacity_tokens_ = 0;
  int32_t num_kv_heads_ = 0;
  std::vector<ops::DeviceBuffer> k_, v_;
};

// The dtype of the weights in backend memory. kBackendDefault: bf16 on a backend with
// the bf16 ops (Backend::SupportsBf16: the CUDA backend), fp32 elsewhere; the
// environment variable KVGATE_WEIGHT_DTYPE=fp32|bf16 overrides the default (A/B runs,
// bit-exact cpu/cuda comparisons). bf16 keeps one bf16 copy of every matrix (fp32 norms
// and biases), runs the GEMMs through GemmBf16 (fp32 accumulation, the residual add fused)
// and prefill attention through AttentionBf16; the residual stream, q/k/v, RoPE and the
// KV cache stay fp32.
enum class WeightDType { kBackendDefault, kF32, kBf16 };

struct LoadOptions {
  WeightDType weights = WeightDType::kBackendDefault;
};

// Which logits Forward returns.
enum class LogitsMode { kLastToken, kAllTokens };

// Optional extras of a contiguous-cache forward.
struct ForwardOptions {
  LogitsMode logits = LogitsMode::kLastToken;
  // What to record for the eviction policies (filled into *capture).
  CaptureRequest capture_request;
  PrefillCapture* capture = nullptr;
  // In-forward eviction: per layer, [num_kv_heads, capacity_tokens] (host); 0 = the row
  // is invisible to every other query (see ops::AttentionArgs::key_mask). Empty = none.
  std::vector<std::vector<uint8_t>> key_masks;
  // The same, one mask row per QUERY head: per layer, [num_heads, capacity_tokens] (host);
  // query head h reads row h (ops::AttentionArgs::key_mask_per_query_head), so the query
  // heads of a GQA group may see different rows (SAGE-KV's per-query-head selection).
  // Empty = none. Combined with key_masks or layer_key_mask: INVALID_ARGUMENT.
  std::vector<std::vector<uint8_t>> query_head_key_masks;
  // In-forward eviction decided inside each layer (Attention-Gate): called with the
  // layer's attention input (post input-RMSNorm hidden states, [n, hidden_size], host)
  // before its attention; returns that layer's mask [num_kv_heads, n] over the tokens of
  // this call (1 = visible). Rows cached before this call stay visible.
  std::function<absl::StatusOr<std::vector<uint8_t>>(int32_t layer, absl::Span<const float> hidden)>
      layer_key_mask;
};

class Model {
 public:
  // Loads DIR/config.json (+ generation_config.json) and the safetensors weights.
  static absl::StatusOr<std::unique_ptr<Model>> Load(const std::string& model_dir,
                                                     ops::Backend* backend,
                                                     const LoadOptions& options = {});
  // A model with seeded random weights (benchmarks); norms 1, other weights N(0, 0.02).
  static absl::StatusOr<std::unique_ptr<Model>> CreateRandom(const ModelConfig& config,
                                                             uint64_t seed, ops::Backend* backend,
                                                             const LoadOptions& options = {});

  // A model over the same weights as `other` (no copy: one copy of the weights per
  // process, whatever roles it runs) with scratch of its own, running its ops on
  // `backend`; its Forward and DecodeStep may run concurrently with other's. `backend`
  // must address other.backend()'s memory (the same device: equal names, else
  // INVALID_ARGUMENT). The weights are freed with the last model that shares them, by
  // other.backend(), which must outlive them.
  static absl::StatusOr<std::unique_ptr<Model>> ShareWeights(const Model& other, ops::Backend* backend);

  const ModelConfig& config() const { return config_; }
  // True when the weights live in bf16 (see WeightDType).
  bool bf16_weights() const { return bf16_; }
  ops::Backend* backend() const { return backend_; }

  // A cache for up to capacity_tokens tokens (<= max context, unless the caller
  // deliberately runs positions past it, as KVzip's reconstruction pass does).
  absl::StatusOr<std::unique_ptr<KvCache>> NewCache(int32_t capacity_tokens,
                                                    bool allow_beyond_context = false) const;
  // A cache for up to capacity_tokens tokens (>= from.length_tokens(); beyond the max
  // context allowed) holding a copy of `from`'s rows: a forward on it continues `from`'s
  // sequence and leaves `from` as it was (KVzip's reconstruction forwards).
  absl::StatusOr<std::unique_ptr<KvCache>> CopyCache(const KvCache& from, int32_t capacity_tokens) const;

  // Runs `tokens` at positions [cache->length, cache->length + n), appends their K/V to
  // the cache and returns logits: [vocab] for kLastToken, [n, vocab] for kAllTokens.
  // Ids outside [0, vocab) and overflowing the cache are INVALID_ARGUMENT.
  absl::StatusOr<std::vector<float>> Forward(absl::Span<const int32_t> tokens, KvCache* cache,
                                             LogitsMode mode = LogitsMode::kLastToken);
  absl::StatusOr<std::vector<float>> Forward(absl::Span<const int32_t> tokens, KvCache* cache,
                                             const ForwardOptions& options);

  // One decode step of a batch over a head-paged cache: tokens[s] is sequence s's new
  // token. Returns logits [num_sequences, vocab]. On a backend with graphs, a step whose
  // batch gives a replay key (PagedKvBatch::replay_key) runs as one recorded graph per
  // batch size: the first step of a key runs op by op (it sizes every workspace), the
  // second records, later ones replay. KVGATE_DECODE_GRAPHS=0 runs every step op by op.
  absl::StatusOr<std::vector<float>> DecodeStep(absl::Span<const int32_t> tokens, PagedKvBatch* kv);
  // DecodeStep for a batch whose every sequence samples greedily: the argmax of each row
  // of logits is taken on the backend (ties to the lowest id, engine::ArgMax's rule) and
  // only the [num_sequences] token ids reach the host.
  absl::StatusOr<std::vector<int32_t>> DecodeStepGreedy(absl::Span<const int32_t> tokens, PagedKvBatch* kv);

  // How the decode steps so far ran (for tests and benchmarks).
  struct DecodeGraphStats {
    int64_t op_by_op = 0;   // steps run op by op
    int64_t recorded = 0;   // graphs recorded
    int64_t replayed = 0;   // steps run as a graph (the recording steps included)
    std::string last_record_error;  // why the last failed recording failed
  };
  const DecodeGraphStats& decode_graph_stats() const { return decode_graph_stats_; }
  // Off: every later decode step runs op by op (A/B runs and tests); on: as the backend
  // and KVGATE_DECODE_GRAPHS allow.
  void set_decode_graphs(bool enabled) { decode_graphs_wanted_ = enabled && DecodeGraphsWanted(); }

 private:
  struct Layer {
    ops::DeviceBuffer input_norm, post_attention_norm;
    ops::DeviceBuffer wq, wk, wv, wo, bq, bk, bv, q_norm, k_norm;
    ops::DeviceBuffer gate, up, down;
  };
  // Supplies a tensor by name and shape as float32 host data.
  using TensorSource = std::function<absl::StatusOr<std::vector<float>>(
      const std::string& name, const std::vector<int64_t>& shape)>;

  // Immutable after loading; shared by the models of ShareWeights.
  struct Weights {
    std::vector<Layer> layers;
    ops::DeviceBuffer embed, final_norm, lm_head;  // lm_head empty when tied
    ops::DeviceBuffer inv_freq;
  };

  Model(ModelConfig config, ops::Backend* backend)
      : config_(std::move(config)), backend_(backend), weights_(std::make_shared<Weights>()) {}
  absl::Status ChooseWeightDType(const LoadOptions& options);
  absl::Status LoadWeights(const TensorSource& source, bool lm_head_present);
  absl::StatusOr<ops::DeviceBuffer> Upload(const TensorSource& source, const std::string& name,
                                           const std::vector<int64_t>& shape);
  // A matrix: bf16 when bf16_, else fp32.
  absl::StatusOr<ops::DeviceBuffer> UploadMatrix(const TensorSource& source, const std::string& name,
                                                 const std::vector<int64_t>& shape);
  absl::Status EnsureScratch(int32_t num_tokens);
  // logits_ for `rows` rows of the vocabulary.
  absl::Status EnsureLogitRows(int32_t rows);
  absl::Status CheckTokens(absl::Span<const int32_t> tokens) const;
  // Input RMSNorm (into h_; into hb_ with bf16 weights, and also h_ when want_hidden),
  // q/k/v projections, q/k norms and RoPE of n tokens.
  absl::Status ProjectQkv(const Layer& l, int32_t n, const int32_t* positions, bool want_hidden = true);
  absl::Status CaptureLayer(int layer, int32_t n, const ForwardOptions& options);
  // Everything after attention in one layer: o_proj, residual, MLP, residual.
  absl::Status FinishLayer(const Layer& l, int32_t n);
  absl::Status FinishLayerBf16(const Layer& l, int32_t n);
  // A decode step: uploads, kv->BeginStep, the ops (RunDecodeOps, replayed as a graph
  // where it can), kv->EndStep. Leaves logits_ (and greedy_ids_ when greedy) of n rows.
  absl::Status RunDecodeStep(absl::Span<const int32_t> tokens, PagedKvBatch* kv, bool greedy);
  // The step's ops, from the embedding to the logits (and their argmax when greedy).
  absl::Status RunDecodeOps(int32_t n, PagedKvBatch* kv, bool greedy);
  // RunDecodeOps through the graph of (n, greedy) for the batch's replay key.
  absl::Status RunDecodeOpsAsGraph(int32_t n, PagedKvBatch* kv, bool greedy, const std::array<uint64_t, 4>& kv_key);
  // Logits of the last `rows` of n rows into logits_ (backend memory).
  absl::Status ComputeLogits(int32_t n, int32_t rows);
  absl::StatusOr<std::vector<float>> Logits(int32_t n, int32_t rows);

  ModelConfig config_;
  ops::Backend* backend_;
  std::shared_ptr<Weights> weights_;
  bool bf16_ = false;

  // Scratch sized for scratch_tokens_ tokens; logits_ for logit_rows_ rows.
  int32_t scratch_tokens_ = 0;
  int32_t logit_rows_ = 0;
  ops::DeviceBuffer ids_, positions_, x_, h_, q_, k_, v_, attn_, gate_, up_, logits_, key_mask_;
  ops::DeviceBuffer greedy_ids_;  // [logit_rows_] int32, DecodeStepGreedy's answers
  // bf16 weights only: bf16 GEMM inputs ([n, max(hidden, q_dim)]) and the MLP's gate/up
  // ([n, intermediate]); gate_ and up_ stay empty then.
  ops::DeviceBuffer hb_, gate_bf16_, up_bf16_;
  int32_t key_mask_bytes_ = 0;
  // + 1 whenever scratch moves: graphs recorded before it are stale.
  uint64_t scratch_epoch_ = 0;

  // The decode-step graph of one (batch size, greedy) and what it was recorded under.
  struct DecodeGraph {
    std::array<uint64_t, 4> kv_key{};
    uint64_t scratch_epoch = 0;
    bool ran_once = false;     // op by op under this key: workspaces are sized
    bool unrecordable = false; // recording failed under this key: op by op until it changes
    std::unique_ptr<ops::OpGraph> graph;
  };
  static bool DecodeGraphsWanted();  // KVGATE_DECODE_GRAPHS is not "0"
  bool decode_graphs_wanted_ = DecodeGraphsWanted();
  bool backend_has_graphs_ = true;  // until it answers UNIMPLEMENTED
  DecodeGraphStats decode_graph_stats_;
  std::map<std::pair<int32_t, bool>, DecodeGraph> decode_graphs_;  // by (batch size, greedy)
};

}  // namespace kvgate::engine
