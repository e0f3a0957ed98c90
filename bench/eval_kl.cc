// Quality of every eviction policy against the full cache on text the model samples
// itself: a long sequence is generated from each prompt; its first part is the prompt
// (prefilled, then compressed by the policy), and the rest is teacher-forced through
// paged decode. Reports mean KL(full || compressed) of the next-token distributions, top-1
// agreement and the KV bytes the compressed cache would transfer.
//
//   eval_kl --model DIR [--policies a,b] [--keep-ratios 1,0.75,...] [--tokens 450]
//           [--continuation 128] [--json PATH] [--markdown PATH]
//           [--gates fast_kvzip=PATH,attention_gate=PATH]   (gate files of the learned policies)
#include <cmath>
#include <ctime>
#include <fstream>
#include <iostream>
#include <map>
#include <optional>

#include "absl/strings/numbers.h"
#include "absl/strings/str_format.h"
#include "absl/strings/str_join.h"
#include "absl/strings/str_split.h"
#include "common/status_macros.h"
#include "cuda/cpu/cpu_backend.h"
#include "engine/generator.h"
#include "engine/model.h"
#include "engine/tokenizer.h"
#include "gates/eviction_spec.h"
#include "kv/policy_planner.h"
#include "nlohmann/json.hpp"

namespace kvgate::bench {
namespace {

using nlohmann::json;

const char* kPrompts[] = {
    "Once upon a time, there was a little girl named Lily. She",
    "One day, a little dog named Max",
    "Tom and his mom went to the park. They saw",
    "There was a big red ball in the garden. A small bird",
};

struct Metrics {
  double kl_sum = 0;
  int64_t agree = 0, count = 0;
  int64_t entries_full = 0, entries_kept = 0, bytes_full = 0, bytes_kept = 0;
};

// Softmax in double of one logits row.
std::vector<double> Softmax(const float* logits, int vocab) {
  std::vector<double> p(vocab);
  double max_logit = -INFINITY, sum = 0;
  for (int i = 0; i < vocab; ++i) max_logit = std::max(max_logit, double(logits[i]));
  for (int i = 0; i < vocab; ++i) sum += p[i] = std::exp(double(logits[i]) - max_logit);
  for (double& x : p) x /= sum;
  return p;
}

int ArgMax(const float* logits, int vocab) {
  int best = 0;
  for (int i = 1; i < vocab; ++i) if (logits[i] > logits[best]) best = i;
  return best;
}

absl::Status EvaluatePolicy(engine::Model* model, const engine::Tokenizer* tokenizer, bool decode_eviction,
                            const gates::PolicyOptions& options, kv::KvPool* pool, const std::vector<int32_t>& sequence,
                            int32_t prompt_tokens, const std::vector<float>& reference,
                            const gates::EvictionSpec& spec, Metrics* metrics) {
  const int vocab = model->config().vocab_size;
  KVGATE_ASSIGN_OR_RETURN(std::unique_ptr<engine::KvPlanner> planner,
                          kv::CreatePolicyPlanner(*model, pool, spec, options, tokenizer, decode_eviction));
  KVGATE_ASSIGN_OR_RETURN(std::unique_ptr<engine::KvCache> cache, model->NewCache(prompt_tokens));
  engine::PrefillCapture capture;
  engine::ForwardOptions forward;
  forward.capture = &capture;
  const std::vector<int32_t> prompt(sequence.begin(), sequence.begin() + prompt_tokens);
  KVGATE_RETURN_IF_ERROR(planner->ConfigurePrefill(prompt, &forward));
  KVGATE_RETURN_IF_ERROR(model->Forward(prompt, cache.get(), forward).status());
  engine::KvAccounting accounting;
  KVGATE_ASSIGN_OR_RETURN(std::unique_ptr<engine::PagedKvBatch> batch, planner->Commit(prompt, *cache, capture, &accounting));
  cache.reset();
  metrics->entries_full += accounting.kv_entries_full;
  metrics->entries_kept += accounting.kv_entries_kept;
  metrics->bytes_full += accounting.bytes_full;
  metrics->bytes_kept += accounting.bytes_kept;
  // Token t (t >= prompt_tokens) is fed at step t; its logits predict token t + 1 and are
  // compared with the full cache's row t.
  for (size_t t = prompt_tokens; t + 1 < sequence.size(); ++t) {
    KVGATE_ASSIGN_OR_RETURN(std::vector<float> logits, model->DecodeStep({&sequence[t], 1}, batch.get()));
    const float* full_row = reference.data() + t * vocab;
    const std::vector<double> p = Softmax(full_row, vocab), q = Softmax(logits.data(), vocab);
    double kl = 0;
    for (int i = 0; i < vocab; ++i) {
      if (p[i] > 0) kl += p[i] * (std::log(p[i]) - std::log(std::max(q[i], 1e-300)));
    }
    metrics->kl_sum += kl;
    metrics->agree += ArgMax(full_row, vocab) == ArgMax(logits.data(), vocab);
    ++metrics->count;
  }
  return absl::OkStatus();
}

absl::Status Run(int argc, char** argv) {
  std::string model_dir = "../shared/models/tinystories-656k", json_path, markdown_path;
  std::vector<std::string> policies = {"full", "streaming_llm", "snapkv", "sage_kv", "kvzip"};
  std::vector<float> ratios = {1.0f, 0.75f, 0.5f, 0.3f, 0.2f};
  int32_t total_tokens = 330, continuation = 128;
  gates::PolicyOptions policy_options;
  std::optional<int32_t> sink_tokens;  // unset: each policy's default
  std::map<std::string, std::string> gate_paths;  // policy -> gate file (--gates)
  bool decode_eviction = true;
  for (int i = 1; i + 1 < argc; i += 2) {
    const std::string flag = argv[i], value = argv[i + 1];
    if (flag == "--model") model_dir = value;
    else if (flag == "--policies") policies = absl::StrSplit(value, ',');
    else if (flag == "--keep-ratios") {
      ratios.clear();
      for (absl::string_view part : absl::StrSplit(value, ',')) {
        float r;
        if (!absl::SimpleAtof(part, &r)) return absl::InvalidArgumentError("--keep-ratios: not a number");
        ratios.push_back(r);
      }
    } else if (flag == "--tokens") total_tokens = std::atoi(value.c_str());
    else if (flag == "--continuation") continuation = std::atoi(value.c_str());
    else if (flag == "--json") json_path = value;
    else if (flag == "--snapkv-window") policy_options.snapkv_window = std::atoi(value.c_str());
    else if (flag == "--sink-tokens") sink_tokens = std::atoi(value.c_str());
    else if (flag == "--decode-eviction") decode_eviction = value != "0" && value != "false";
    else if (flag == "--markdown") markdown_path = value;
    else if (flag == "--gates") {
      for (absl::string_view part : absl::StrSplit(value, ',')) {
        const std::vector<std::string> kv = absl::StrSplit(part, absl::MaxSplits('=', 1));
        if (kv.size() != 2 || kv[0].empty() || kv[1].empty()) {
          return absl::InvalidArgumentError("--gates: expected POLICY=PATH[,POLICY=PATH]");
        }
        gate_paths[kv[0]] = kv[1];
      }
    } else return absl::InvalidArgumentError("unknown flag " + flag);
  }
  auto backend = ops::CreateCpuBackend(0);
  KVGATE_ASSIGN_OR_RETURN(std::unique_ptr<engine::Model> model, engine::Model::Load(model_dir, backend.get()));
  KVGATE_ASSIGN_OR_RETURN(std::unique_ptr<engine::Tokenizer> tokenizer,
                          engine::Tokenizer::FromFile(model_dir + "/tokenizer.json"));
  const engine::ModelConfig& c = model->config();
  KVGATE_ASSIGN_OR_RETURN(std::unique_ptr<kv::KvPool> pool,
                          kv::KvPool::Create(backend.get(), /*num_pages=*/c.num_layers * c.num_kv_heads * 64,
                                             /*page_tokens=*/16, c.head_dim));
  // The model writes its own text: sampled, so the context is in-distribution.
  std::vector<std::vector<int32_t>> sequences;
  for (size_t p = 0; p < std::size(kPrompts); ++p) {
    KVGATE_ASSIGN_OR_RETURN(std::vector<int32_t> ids, tokenizer->Encode(kPrompts[p]));
    engine::Generator generator(model.get(), tokenizer.get());
    engine::GenerateOptions options;
    options.max_tokens = total_tokens - static_cast<int32_t>(ids.size());
    options.ignore_eos = true;
    options.sampling.temperature = 0.8f;
    options.sampling.seed = 1000 + p;
    KVGATE_ASSIGN_OR_RETURN(engine::GenerateResult result, generator.Generate(ids, options));
    ids.insert(ids.end(), result.token_ids.begin(), result.token_ids.end());
    sequences.push_back(std::move(ids));
  }
  json out = {{"model", model_dir}, {"decode_eviction", decode_eviction}, {"sequences", sequences.size()}, {"tokens_per_sequence", total_tokens},
              {"prompt_tokens", total_tokens - continuation}, {"continuation_tokens", continuation}};
  std::map<std::pair<std::string, float>, Metrics> results;
  for (const std::vector<int32_t>& sequence : sequences) {
    auto cache = *model->NewCache(static_cast<int32_t>(sequence.size()));
    KVGATE_ASSIGN_OR_RETURN(std::vector<float> reference,
                            model->Forward(sequence, cache.get(), engine::LogitsMode::kAllTokens));
    const int32_t prompt_tokens = static_cast<int32_t>(sequence.size()) - continuation;
    for (const std::string& policy : policies) {
      for (float ratio : ratios) {
        gates::EvictionSpec spec;
        spec.policy = policy;
        spec.keep_ratio = ratio;
        spec.sink_tokens = sink_tokens;
        gates::PolicyOptions options = policy_options;
        if (auto it = gate_paths.find(policy); it != gate_paths.end()) options.gate_path = it->second;
        KVGATE_RETURN_IF_ERROR(EvaluatePolicy(model.get(), tokenizer.get(), decode_eviction, options, pool.get(), sequence, prompt_tokens, reference, spec,
                                              &results[{policy, ratio}]));
      }
    }
  }
  std::string md = absl::StrFormat(
      "# Eviction quality on TinyStories-656K\n\nModel `%s`; %d self-sampled sequences of %d tokens "
      "(temperature 0.8); the first %d tokens are the prompt (compressed), the last %d are teacher-forced "
      "through paged decode. KL = mean KL(full || compressed) of next-token distributions; top-1 = "
      "agreement of the argmax; bytes = K+V float32 of the prompt cache after eviction (what the transfer moves).\n\n"
      "| policy | keep ratio | kept entries | KV bytes | mean KL | top-1 agreement |\n|---|---|---|---|---|---|\n",
      model_dir, sequences.size(), total_tokens, total_tokens - continuation, continuation);
  for (const std::string& policy : policies) {
    for (float ratio : ratios) {
      const Metrics& m = results[{policy, ratio}];
      const double kl = m.kl_sum / m.count, top1 = double(m.agree) / m.count;
      md += absl::StrFormat("| %s | %.2f | %.3f | %d / %d | %.4f | %.3f |\n", policy, ratio,
                            double(m.entries_kept) / m.entries_full, m.bytes_kept, m.bytes_full, kl, top1);
      out["results"].push_back({{"policy", policy}, {"keep_ratio", ratio}, {"kept_fraction", double(m.entries_kept) / m.entries_full},
                                {"bytes_kept", m.bytes_kept}, {"bytes_full", m.bytes_full}, {"mean_kl", kl}, {"top1_agreement", top1},
                                {"tokens", m.count}});
    }
  }
  std::cout << md;
  if (!json_path.empty()) std::ofstream(json_path) << out.dump(1) << "\n";
  if (!markdown_path.empty()) std::ofstream(markdown_path) << md;
  return absl::OkStatus();
}

}  // namespace
}  // namespace kvgate::bench

int main(int argc, char** argv) {
  absl::Status status = kvgate::bench::Run(argc, argv);
  if (!status.ok()) {
    std::cerr << "eval_kl: " << status << "\n";
    return 1;
  }
  return 0;
}
