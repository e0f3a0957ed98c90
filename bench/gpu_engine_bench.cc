// GPU engine benchmark driver: loads a checkpoint on a backend (normally cuda) with fp32
// or bf16 weights and times, through engine::Model, a one-shot prefill of N tokens
// (Forward of the whole prompt into a fresh cache, last-token logits on the host) and
// batch-1 decode at a context of C tokens (Forward of one token over the contiguous
// cache, the path of `kvgate generate` without a policy), and batched decode: B
// sequences of C tokens each in the head-paged KV pool, one Model::DecodeStep for all
// of them (the decode worker's continuous-batching step, policy "full", greedy on the
// device: Model::DecodeStepGreedy). Writes JSON;
// the peers, floors and the report come from bench/gpu_engine_bench.py, which runs this.
//
//   gpu_engine_bench --model DIR [--backend cuda] [--weights fp32|bf16]
//       [--prefill 2048,8192] [--decode 1024,8192] [--decode-steps 32] [--repeats 3]
//       [--decode-batch 32,64] [--batch-context 8192] [--kv-dtype auto|float32|bf16] [--json PATH]
//       [--policy-prefill snapkv,sage_kv [--keep-ratio 0.3]] [--decode-policy full,snapkv]
//       [--capacity-context 32768 --capacity-pool-gib 8]
// --policy-prefill times, at each --prefill size, a prefill through each policy's planner
// (forward with its capture, scoring, selection and compaction into pages), warm.
// --kv-dtype is the element type of the batched decode's KV pages (auto: bf16 on cuda).
// --capacity-context counts, per --decode-policy, how many sequences of that many tokens a
// KV pool of --capacity-pool-gib GiB of K/V pages holds: one prompt is prefilled and
// committed under the policy, then its kept rows are committed again until the pool
// refuses (RESOURCE_EXHAUSTED), as admission to a decode worker's fixed pool would.
#include <dlfcn.h>

#include <algorithm>
#include <chrono>
#include <cstdio>
#include <cstdlib>
#include <fstream>
#include <iostream>
#include <optional>
#include <random>
#include <sstream>
#include <string>
#include <vector>

#include "absl/status/status.h"
#include "absl/status/statusor.h"
#include "absl/strings/str_cat.h"
#include "absl/strings/str_split.h"
#include "cuda/backend.h"
#include "engine/model.h"
#include "gates/eviction_spec.h"
#include "kv/decode_batch.h"
#include "kv/kv_pool.h"
#include "kv/policy_planner.h"
#include "nlohmann/json.hpp"

namespace kvgate::bench {
namespace {

using Clock = std::chrono::steady_clock;
using nlohmann::json;

double MillisSince(Clock::time_point start) {
  return std::chrono::duration<double, std::milli>(Clock::now() - start).count();
}

double Median(std::vector<double> v) {
  std::sort(v.begin(), v.end());
  return v.empty() ? 0.0 : v[v.size() / 2];
}

std::vector<int32_t> ParseList(const std::string& text) {
  std::vector<int32_t> out;
  std::stringstream stream(text);
  std::string item;
  while (std::getline(stream, item, ',')) {
    if (!item.empty()) out.push_back(std::stoi(item));
  }
  return out;
}

std::vector<int32_t> RandomTokens(int32_t n, int32_t vocab, uint32_t seed) {
  std::mt19937 rng(seed);
  std::uniform_int_distribution<int32_t> dist(0, vocab - 1);
  std::vector<int32_t> tokens(n);
  for (int32_t& t : tokens) t = dist(rng);
  return tokens;
}

// With `env`=1 (KVGATE_PROFILE_DECODE_STEPS: the timed batched decode steps;
// KVGATE_PROFILE_POLICY_PREFILL: the last run of each policy prefill) a phase runs between
// cudaProfilerStart and cudaProfilerStop (looked up at run time, so the bench needs no
// CUDA at build time), for `ncu --profile-from-start off`.
void ProfilerRange(const char* env, bool start) {
  const char* wanted = std::getenv(env);
  if (wanted == nullptr || std::string(wanted) != "1") return;
  using Fn = int (*)();
  if (auto fn = reinterpret_cast<Fn>(dlsym(RTLD_DEFAULT, start ? "cudaProfilerStart" : "cudaProfilerStop"))) fn();
}

// The decode batch with its host work timed: BeginStep builds and uploads the step's
// page tables on the host while the GPU waits (the previous step ended when its ids
// reached the host), so its time is the part of a step that no graph can hide.
class HostTimedBatch : public engine::PagedKvBatch {
 public:
  explicit HostTimedBatch(kv::DecodeBatch* batch) : batch_(batch) {}
  int32_t num_sequences() const override { return batch_->num_sequences(); }
  std::vector<int32_t> NextPositions() const override { return batch_->NextPositions(); }
  absl::Status BeginStep() override {
    const auto start = Clock::now();
    absl::Status status = batch_->BeginStep();
    begin_ms_ = MillisSince(start);
    return status;
  }
  absl::Status AppendLayer(int32_t layer, const float* k_new, const float* v_new) override {
    return batch_->AppendLayer(layer, k_new, v_new);
  }
  absl::StatusOr<ops::HeadPagedKvView> View(int32_t layer) override { return batch_->View(layer); }
  std::optional<std::array<uint64_t, 4>> replay_key() const override { return batch_->replay_key(); }
  absl::Status EndStep() override {
    const auto start = Clock::now();
    absl::Status status = batch_->EndStep();
    end_ms_ = MillisSince(start);
    return status;
  }
  bool wants_layer_inputs() const override { return batch_->wants_layer_inputs(); }
  absl::Status ObserveLayerInput(int32_t layer, absl::Span<const float> hidden) override {
    return batch_->ObserveLayerInput(layer, hidden);
  }
  bool scores_layer_inputs() const override { return batch_->scores_layer_inputs(); }
  absl::Status ScoreLayerInput(int32_t layer, const float* hidden) override {
    return batch_->ScoreLayerInput(layer, hidden);
  }
  double begin_ms() const { return begin_ms_; }
  double end_ms() const { return end_ms_; }

 private:
  kv::DecodeBatch* batch_;
  double begin_ms_ = 0.0, end_ms_ = 0.0;
};

// One prompt prefilled into `cache` (empty, its size) and committed to pages by `planner`.
struct Committed {
  std::vector<float> logits;  // the last token's
  engine::KvAccounting accounting;
  std::unique_ptr<engine::PagedKvBatch> batch;
  // From the call to the last token's logits on the host (the forward and the window
  // scores: the logits' copy waits for the device); the rest is the plan and the commit.
  double forward_ms = 0.0;
};
absl::StatusOr<Committed> PrefillAndCommit(engine::Model& m, engine::KvPlanner& planner,
                                           const std::vector<int32_t>& prompt, engine::KvCache* cache) {
  engine::PrefillCapture capture;
  Committed out;
  const auto start = Clock::now();
  absl::StatusOr<std::vector<float>> logits = planner.Prefill(m, prompt, cache, &capture);
  if (!logits.ok()) return logits.status();
  out.forward_ms = MillisSince(start);
  out.logits = *std::move(logits);
  absl::StatusOr<std::unique_ptr<engine::PagedKvBatch>> batch = planner.Commit(prompt, *cache, capture, &out.accounting);
  if (!batch.ok()) return batch.status();
  out.batch = *std::move(batch);
  return out;
}

// `policy` at `keep_ratio` (`full` keeps everything).
gates::EvictionSpec SpecOf(const std::string& policy, float keep_ratio) {
  gates::EvictionSpec spec;
  spec.policy = policy;
  if (policy != "full") spec.keep_ratio = keep_ratio;
  return spec;
}

// A random `context`-token prompt (from `seed`) prefilled into a cache of its own and
// committed to `pool` under `spec`; the cache stays, so its rows can be committed again.
struct PrefilledPrompt {
  std::unique_ptr<engine::KvCache> cache;
  Committed committed;
};
absl::StatusOr<PrefilledPrompt> PrefillRandomPrompt(engine::Model& m, kv::KvPool* pool, const gates::EvictionSpec& spec,
                                                    const gates::PolicyOptions& policy_options, int32_t context,
                                                    uint32_t seed) {
  absl::StatusOr<std::unique_ptr<engine::KvPlanner>> planner = kv::CreatePolicyPlanner(m, pool, spec, policy_options);
  if (!planner.ok()) return planner.status();
  const std::vector<int32_t> prompt = RandomTokens(context, m.config().vocab_size, seed);
  absl::StatusOr<std::unique_ptr<engine::KvCache>> cache = m.NewCache(context);
  if (!cache.ok()) return cache.status();
  absl::StatusOr<Committed> committed = PrefillAndCommit(m, **planner, prompt, cache->get());
  if (!committed.ok()) return committed.status();
  return PrefilledPrompt{*std::move(cache), *std::move(committed)};
}

// The learned gates (fast_kvzip, attention_gate) are random here (their cost, not their
// choices), loaded once and shared by every request as a worker's are.
absl::StatusOr<gates::PolicyOptions> RandomGates(const engine::ModelConfig& c) {
  gates::GateFiles gate_files;
  gate_files.random_seed = 7;
  return gates::LoadGates(gate_files, {c.num_layers, c.num_heads, c.num_kv_heads, c.head_dim, c.hidden_size});
}

// `batch_size` sequences of `context` random tokens, each prefilled and committed to
// one pool under `policy` (at `keep_ratio` unless "full"), then `steps` decode steps of
// all of them at once: what a decode worker's step costs with each sequence's kept cache.
absl::StatusOr<json> BatchedDecode(engine::Model& m, ops::Backend* backend, int32_t batch_size, int32_t context,
                                   int32_t steps, ops::KvDtype kv_dtype, const std::string& policy, float keep_ratio,
                                   const gates::PolicyOptions& policy_options) {
  constexpr int32_t kPageTokens = 16;
  const engine::ModelConfig& c = m.config();
  const int32_t pages_per_head = (context + steps + 4 + kPageTokens - 1) / kPageTokens + 1;
  const int64_t pages = int64_t{batch_size} * c.num_layers * c.num_kv_heads * pages_per_head;
  if (pages > (int64_t{1} << 30)) return absl::InvalidArgumentError("--decode-batch x --batch-context too large");
  absl::StatusOr<std::unique_ptr<kv::KvPool>> pool =
      kv::KvPool::Create(backend, static_cast<int32_t>(pages), kPageTokens, c.head_dim, kv_dtype);
  if (!pool.ok()) return pool.status();
  const gates::EvictionSpec spec = SpecOf(policy, keep_ratio);
  std::vector<std::unique_ptr<kv::SequenceBatch>> sequences;
  int64_t kept = 0, full = 0;
  std::vector<int32_t> last_tokens;
  const auto fill_start = Clock::now();
  for (int32_t b = 0; b < batch_size; ++b) {
    absl::StatusOr<PrefilledPrompt> prefilled = PrefillRandomPrompt(m, pool->get(), spec, policy_options, context, 7000u + b);
    if (!prefilled.ok()) return prefilled.status();
    Committed* committed = &prefilled->committed;
    kept += committed->accounting.kv_entries_kept;
    full += committed->accounting.kv_entries_full;
    sequences.emplace_back(static_cast<kv::SequenceBatch*>(committed->batch.release()));
    last_tokens.push_back(static_cast<int32_t>(
        std::max_element(committed->logits.begin(), committed->logits.end()) - committed->logits.begin()));
  }
  const double fill_ms = MillisSince(fill_start);
  std::vector<kv::SequenceBatch*> members;
  for (auto& sequence : sequences) members.push_back(sequence.get());
  std::vector<double> times, begin_times, end_times;
  kv::DecodeBatch decode_batch(pool->get());
  decode_batch.SetSequences(members);
  HostTimedBatch batch(&decode_batch);
  const engine::Model::DecodeGraphStats graphs_before = m.decode_graph_stats();
  for (int32_t s = 0; s < steps + 2; ++s) {  // two warm-up steps (the first runs op by op, the second records)
    if (s == 2) ProfilerRange("KVGATE_PROFILE_DECODE_STEPS", true);
    const auto start = Clock::now();
    // Greedy on the device, as the decode worker does for a greedy batch: ids come back.
    absl::StatusOr<std::vector<int32_t>> ids = m.DecodeStepGreedy(last_tokens, &batch);
    if (!ids.ok()) return ids.status();
    if (s >= 2) {
      times.push_back(MillisSince(start));
      begin_times.push_back(batch.begin_ms());
      end_times.push_back(batch.end_ms());
    }
    last_tokens = *std::move(ids);
  }
  ProfilerRange("KVGATE_PROFILE_DECODE_STEPS", false);
  const engine::Model::DecodeGraphStats& graphs = m.decode_graph_stats();
  return json{{"batch", batch_size}, {"context", context}, {"policy", policy},
              {"keep_ratio", policy == "full" ? 1.0f : keep_ratio},
              {"kv_entries_kept", kept}, {"kv_entries_full", full}, {"median_ms", Median(times)},
              {"tokens_per_s", batch_size * 1000.0 / Median(times)},
              {"graph_steps", graphs.replayed - graphs_before.replayed},
              {"op_by_op_steps", graphs.op_by_op - graphs_before.op_by_op},
              {"graph_record_error", graphs.last_record_error},
              {"min_ms", *std::min_element(times.begin(), times.end())}, {"steps", steps},
              {"host_begin_step_median_ms", Median(begin_times)}, {"host_end_step_median_ms", Median(end_times)},
              {"pool_pages", pages}, {"page_tokens", kPageTokens},
              {"kv_dtype", ops::KvDtypeName(kv_dtype)}, {"kv_bytes_per_entry", ops::KvDtypeBytes(kv_dtype)},
              {"fill_ms", fill_ms}};
}

// How many `context`-token sequences kept as `policy` keeps one random prompt fit a pool
// of `pool_pages` pages (see --capacity-context). Every page goes back before it returns.
absl::StatusOr<json> Capacity(engine::Model& m, ops::Backend* backend, int32_t context, int64_t pool_pages,
                              ops::KvDtype kv_dtype, const std::string& policy, float keep_ratio,
                              const gates::PolicyOptions& policy_options) {
  constexpr int32_t kPageTokens = 16;
  const engine::ModelConfig& c = m.config();
  if (pool_pages <= 0 || pool_pages > (int64_t{1} << 30)) {
    return absl::InvalidArgumentError(absl::StrCat("--capacity-pool-gib gives ", pool_pages, " pages"));
  }
  absl::StatusOr<std::unique_ptr<kv::KvPool>> pool =
      kv::KvPool::Create(backend, static_cast<int32_t>(pool_pages), kPageTokens, c.head_dim, kv_dtype);
  if (!pool.ok()) return pool.status();
  absl::StatusOr<PrefilledPrompt> prefilled =
      PrefillRandomPrompt(m, pool->get(), SpecOf(policy, keep_ratio), policy_options, context, 9000u + context);
  if (!prefilled.ok()) return prefilled.status();
  const std::unique_ptr<engine::KvCache>& cache = prefilled->cache;
  const Committed* committed = &prefilled->committed;
  const kv::SequenceLayout& first = static_cast<kv::SequenceBatch*>(committed->batch.get())->layout();
  gates::KeepPlan plan{first.num_layers, first.num_kv_heads, context, {}};
  for (const kv::HeadPages& head : first.heads) {
    plan.heads.push_back({std::vector<int32_t>(head.positions.begin(), head.positions.end()),
                          std::vector<uint8_t>(head.query_mask.begin(), head.query_mask.end()),
                          std::vector<float>(head.scores.begin(), head.scores.end())});
  }
  std::vector<kv::SequenceLayout> more;
  absl::Status refused;
  while (refused.ok()) {
    kv::SequenceLayout layout;
    refused = (*pool)->CommitPrefill(*cache, plan, &layout);
    if (refused.ok()) more.push_back(std::move(layout));
  }
  for (kv::SequenceLayout& layout : more) {
    if (absl::Status released = (*pool)->Release(&layout); !released.ok()) return released;
  }
  if (refused.code() != absl::StatusCode::kResourceExhausted) return refused;
  return json{{"context", context}, {"policy", policy}, {"keep_ratio", policy == "full" ? 1.0f : keep_ratio},
              {"pool_pages", pool_pages}, {"page_tokens", kPageTokens}, {"kv_dtype", ops::KvDtypeName(kv_dtype)},
              {"pages_per_sequence", first.NumPages()}, {"kv_entries_kept", committed->accounting.kv_entries_kept},
              {"sequences", static_cast<int64_t>(more.size()) + 1}};
}

// Prefill of one `n`-token prompt through a policy planner (forward with the policy's
// capture, scoring, selection, compaction into pages), warm: the first of repeats + 1
// runs is dropped. The sequence's pages go back after each run.
absl::StatusOr<json> PolicyPrefill(engine::Model& m, ops::Backend* backend, int32_t n, const std::string& policy,
                                   float keep_ratio, int repeats, ops::KvDtype kv_dtype) {
  constexpr int32_t kPageTokens = 16;
  const engine::ModelConfig& c = m.config();
  const int32_t pages = c.num_layers * c.num_kv_heads * ((n + kPageTokens - 1) / kPageTokens + 2);
  absl::StatusOr<std::unique_ptr<kv::KvPool>> pool = kv::KvPool::Create(backend, pages, kPageTokens, c.head_dim, kv_dtype);
  if (!pool.ok()) return pool.status();
  const gates::EvictionSpec spec = SpecOf(policy, keep_ratio);
  const std::vector<int32_t> prompt = RandomTokens(n, c.vocab_size, 555u + n);
  absl::StatusOr<gates::PolicyOptions> options = RandomGates(c);
  if (!options.ok()) return options.status();
  std::vector<double> times, forward_times, plan_and_commit_times;
  int64_t kept = 0, full = 0;
  for (int r = 0; r < repeats + 1; ++r) {
    absl::StatusOr<std::unique_ptr<engine::KvPlanner>> planner = kv::CreatePolicyPlanner(m, pool->get(), spec, *options);
    if (!planner.ok()) return planner.status();
    absl::StatusOr<std::unique_ptr<engine::KvCache>> cache = m.NewCache(n);
    if (!cache.ok()) return cache.status();
    if (absl::Status s = backend->Synchronize(); !s.ok()) return s;
    if (r == repeats) ProfilerRange("KVGATE_PROFILE_POLICY_PREFILL", true);  // the last run only
    const auto start = Clock::now();
    absl::StatusOr<Committed> committed = PrefillAndCommit(m, **planner, prompt, cache->get());
    if (!committed.ok()) return committed.status();
    if (absl::Status s = backend->Synchronize(); !s.ok()) return s;
    if (r == repeats) ProfilerRange("KVGATE_PROFILE_POLICY_PREFILL", false);
    if (r > 0) {
      times.push_back(MillisSince(start));
      forward_times.push_back(committed->forward_ms);
      plan_and_commit_times.push_back(times.back() - committed->forward_ms);
    }
    kept = committed->accounting.kv_entries_kept;
    full = committed->accounting.kv_entries_full;
  }
  return json{{"tokens", n}, {"policy", policy}, {"keep_ratio", policy == "full" ? 1.0f : keep_ratio},
              {"median_ms", Median(times)}, {"min_ms", *std::min_element(times.begin(), times.end())},
              {"forward_median_ms", Median(forward_times)}, {"plan_and_commit_median_ms", Median(plan_and_commit_times)},
              {"kv_entries_kept", kept}, {"kv_entries_full", full}};
}

absl::StatusOr<json> Run(int argc, char** argv) {
  std::string model_dir, backend_name = "cuda", weights = "bf16", json_path, kv_dtype_name = "auto";
  std::vector<int32_t> prefill = {2048, 8192}, decode = {1024, 8192}, decode_batch;
  int decode_steps = 32, repeats = 3, batch_context = 8192, capacity_context = 0;
  double capacity_pool_gib = 8.0;
  std::vector<std::string> policies;  // --policy-prefill: eviction overhead at --prefill sizes
  std::vector<std::string> decode_policies = {"full"};  // --decode-policy: batched decode per policy
  float keep_ratio = 0.3f;
  for (int i = 1; i < argc; ++i) {
    const std::string flag = argv[i];
    if (i + 1 >= argc) return absl::InvalidArgumentError(absl::StrCat(flag, " needs a value"));
    const std::string value = argv[++i];
    if (flag == "--model") model_dir = value;
    else if (flag == "--backend") backend_name = value;
    else if (flag == "--weights") weights = value;
    else if (flag == "--prefill") prefill = ParseList(value);
    else if (flag == "--decode") decode = ParseList(value);
    else if (flag == "--decode-steps") decode_steps = std::stoi(value);
    else if (flag == "--repeats") repeats = std::stoi(value);
    else if (flag == "--decode-batch") decode_batch = ParseList(value);
    else if (flag == "--batch-context") batch_context = std::stoi(value);
    else if (flag == "--json") json_path = value;
    else if (flag == "--kv-dtype") kv_dtype_name = value;
    else if (flag == "--policy-prefill") policies = absl::StrSplit(value, ',', absl::SkipEmpty());
    else if (flag == "--keep-ratio") keep_ratio = std::stof(value);
    else if (flag == "--decode-policy") decode_policies = absl::StrSplit(value, ',', absl::SkipEmpty());
    else if (flag == "--capacity-context") capacity_context = std::stoi(value);
    else if (flag == "--capacity-pool-gib") capacity_pool_gib = std::stod(value);
    else return absl::InvalidArgumentError(absl::StrCat("unknown flag ", flag));
  }
  if (model_dir.empty()) return absl::InvalidArgumentError("--model DIR is required");
  engine::LoadOptions options;
  if (weights == "fp32") options.weights = engine::WeightDType::kF32;
  else if (weights == "bf16") options.weights = engine::WeightDType::kBf16;
  else return absl::InvalidArgumentError("--weights must be fp32 or bf16");

  absl::StatusOr<std::optional<ops::KvDtype>> kv_dtype_flag = kv::ParseKvCacheDtype(kv_dtype_name);
  if (!kv_dtype_flag.ok()) return kv_dtype_flag.status();
  absl::StatusOr<std::unique_ptr<ops::Backend>> backend = ops::CreateBackend(backend_name);
  if (!backend.ok()) return backend.status();
  const ops::KvDtype kv_dtype = kv_dtype_flag->value_or(kv::KvPool::AutoDtype(**backend));
  const auto load_start = Clock::now();
  absl::StatusOr<std::unique_ptr<engine::Model>> model = engine::Model::Load(model_dir, backend->get(), options);
  if (!model.ok()) return model.status();
  const double load_ms = MillisSince(load_start);
  engine::Model& m = **model;
  const int32_t vocab = m.config().vocab_size;
  json result = {{"backend", std::string((*backend)->Name())}, {"weights", weights}, {"load_ms", load_ms}};

  json prefill_rows = json::array();
  for (const int32_t n : prefill) {
    const std::vector<int32_t> tokens = RandomTokens(n, vocab, 1234u + n);
    std::vector<double> times;
    for (int r = 0; r < repeats + 1; ++r) {  // the first run warms up (scratch, plans)
      absl::StatusOr<std::unique_ptr<engine::KvCache>> cache = m.NewCache(n);
      if (!cache.ok()) return cache.status();
      const absl::Status synced = (*backend)->Synchronize();
      if (!synced.ok()) return synced;
      const auto start = Clock::now();
      absl::StatusOr<std::vector<float>> logits = m.Forward(tokens, cache->get());
      if (!logits.ok()) return logits.status();
      if (r > 0) times.push_back(MillisSince(start));
    }
    if (prefill_rows.empty()) {
      // The first prompt's ids and last-token logits, for the end-to-end check in the .py.
      absl::StatusOr<std::unique_ptr<engine::KvCache>> cache = m.NewCache(n);
      if (!cache.ok()) return cache.status();
      absl::StatusOr<std::vector<float>> logits = m.Forward(tokens, cache->get());
      if (!logits.ok()) return logits.status();
      result["check"] = {{"tokens", tokens}, {"logits", *logits}};
    }
    std::fprintf(stderr, "[%s] prefill %d: %.2f ms (median of %d)\n", weights.c_str(), n, Median(times), repeats);
    prefill_rows.push_back({{"tokens", n}, {"median_ms", Median(times)},
                            {"min_ms", *std::min_element(times.begin(), times.end())}, {"runs_ms", times}});
  }
  result["prefill"] = prefill_rows;

  json policy_rows = json::array();
  for (const int32_t n : policies.empty() ? std::vector<int32_t>{} : prefill) {
    for (const std::string& policy : policies) {
      absl::StatusOr<json> row = PolicyPrefill(m, backend->get(), n, policy, keep_ratio, repeats, kv_dtype);
      if (!row.ok()) return row.status();
      std::fprintf(stderr, "[%s] policy prefill %d %s: %.2f ms (forward %.2f, plan + commit %.2f; median of %d)\n",
                   weights.c_str(), n, policy.c_str(), (*row)["median_ms"].get<double>(),
                   (*row)["forward_median_ms"].get<double>(), (*row)["plan_and_commit_median_ms"].get<double>(), repeats);
      policy_rows.push_back(*row);
    }
  }
  result["policy_prefill"] = policy_rows;

  json decode_rows = json::array();
  for (const int32_t context : decode) {
    const std::vector<int32_t> tokens = RandomTokens(context + decode_steps + 4, vocab, 99u + context);
    absl::StatusOr<std::unique_ptr<engine::KvCache>> cache = m.NewCache(context + decode_steps + 4);
    if (!cache.ok()) return cache.status();
    absl::StatusOr<std::vector<float>> logits =
        m.Forward(absl::MakeConstSpan(tokens.data(), context), cache->get());
    if (!logits.ok()) return logits.status();
    std::vector<double> times;
    for (int s = 0; s < decode_steps + 2; ++s) {  // two warm-up steps
      const auto start = Clock::now();
      logits = m.Forward(absl::MakeConstSpan(tokens.data() + context + s, 1), cache->get());
      if (!logits.ok()) return logits.status();
      if (s >= 2) times.push_back(MillisSince(start));
    }
    std::fprintf(stderr, "[%s] decode at %d: %.3f ms/token (median of %d)\n", weights.c_str(), context,
                 Median(times), decode_steps);
    decode_rows.push_back({{"context", context}, {"median_ms", Median(times)},
                           {"min_ms", *std::min_element(times.begin(), times.end())}, {"steps", decode_steps}});
  }
  result["decode_batch1"] = decode_rows;

  json batch_rows = json::array();
  absl::StatusOr<gates::PolicyOptions> gate_options = RandomGates(m.config());
  if (!gate_options.ok()) return gate_options.status();
  for (const std::string& policy : decode_batch.empty() ? std::vector<std::string>{} : decode_policies) {
    for (const int32_t batch_size : decode_batch) {
      absl::StatusOr<json> row = BatchedDecode(m, backend->get(), batch_size, batch_context, decode_steps, kv_dtype,
                                               policy, keep_ratio, *gate_options);
      if (!row.ok()) return row.status();
      std::fprintf(stderr, "[%s, %s KV] decode batch %d at %d, %s: %.3f ms/step\n", weights.c_str(),
                   ops::KvDtypeName(kv_dtype), batch_size, batch_context, policy.c_str(),
                   (*row)["median_ms"].get<double>());
      batch_rows.push_back(*row);
    }
  }
  result["decode_batched"] = batch_rows;

  json capacity_rows = json::array();
  const int64_t page_bytes = int64_t{2} * 16 * m.config().head_dim * static_cast<int64_t>(ops::KvDtypeBytes(kv_dtype));
  const auto capacity_pages = static_cast<int64_t>(capacity_pool_gib * double(int64_t{1} << 30) / double(page_bytes));
  for (const std::string& policy : capacity_context > 0 ? decode_policies : std::vector<std::string>{}) {
    absl::StatusOr<json> row = Capacity(m, backend->get(), capacity_context, capacity_pages, kv_dtype, policy,
                                        keep_ratio, *gate_options);
    if (!row.ok()) return row.status();
    (*row)["pool_gib"] = capacity_pool_gib;
    std::fprintf(stderr, "[%s KV] %.2f GiB pool at %d tokens, %s: %lld sequences\n", ops::KvDtypeName(kv_dtype),
                 capacity_pool_gib, capacity_context, policy.c_str(), static_cast<long long>((*row)["sequences"].get<int64_t>()));
    capacity_rows.push_back(*row);
  }
  result["capacity"] = capacity_rows;
  if (!json_path.empty()) std::ofstream(json_path) << result.dump(2) << "\n";
  return result;
}

}  // namespace
}  // namespace kvgate::bench

int main(int argc, char** argv) {
  absl::StatusOr<nlohmann::json> result = kvgate::bench::Run(argc, argv);
  if (!result.ok()) {
    std::cerr << "gpu_engine_bench: " << result.status() << "\n";
    return 1;
  }
  std::cout << result->dump() << "\n";
  return 0;
}
