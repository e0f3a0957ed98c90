// `kvgate generate`: offline generation on this machine (the engine directly).
#include <filesystem>
#include <iostream>

#include "absl/strings/str_cat.h"
#include "absl/strings/str_format.h"
#include "cli/commands.h"
#include "cli/flags.h"
#include "cli/remote_generate.h"
#include "common/status_macros.h"
#include "cuda/backend.h"
#include "engine/generator.h"
#include "engine/model.h"
#include "engine/tokenizer.h"
#include "gates/eviction_spec.h"
#include "gates/policy.h"
#include "kv/kv_pool.h"
#include "kv/policy_planner.h"
#include "nlohmann/json.hpp"

namespace kvgate::cli {
namespace {

// Rows per KV page (per layer and kv head).
constexpr int32_t kPageTokens = 16;

constexpr char kUsage[] =
    "usage: kvgate generate --model DIR (--prompt TEXT | --prompt-ids 1,2,3)\n"
    "         [--max-tokens N=16] [--temperature T=0 (greedy)] [--top-p P=1] [--top-k K=0]\n"
    "         [--min-p P=0] [--seed S=0] [--stop STRING] [--stop-ids 1,2] [--ignore-eos]\n"
    "         [--policy full|streaming_llm|snapkv|sage_kv|kvzip|fast_kvzip|attention_gate]\n"
    "         [--keep-ratio R] [--budget-tokens N] [--sink-tokens N] [--recent-tokens N]\n"
    "         [--head-budget uniform|adaptive] [--gates PATH] [--backend cpu|cuda[:N]] [--json]\n"
    "   or: kvgate generate --server HOST:PORT ... (the same request answered by a server)\n";

struct GenerateCommand {
  std::string model_dir;
  std::optional<std::string> prompt_text;
  std::optional<std::vector<int32_t>> prompt_ids;
  engine::GenerateOptions options;
  gates::EvictionSpec eviction;
  gates::PolicyOptions policy_options;
  std::string backend = "cpu";
  bool json = false;
};

absl::StatusOr<GenerateCommand> ParseGenerate(const std::vector<std::string>& args) {
  KVGATE_ASSIGN_OR_RETURN(
      Flags flags, Flags::Parse(args,
                                {"model", "prompt", "prompt-ids", "max-tokens", "temperature", "top-p",
                                 "top-k", "min-p", "seed", "stop", "stop-ids", "backend", "policy", "keep-ratio",
                                 "budget-tokens", "sink-tokens", "recent-tokens", "head-budget", "gates"},
                                {"ignore-eos", "json"}));
  GenerateCommand command;
  auto model = flags.String("model");
  if (!model) return absl::InvalidArgumentError("--model DIR is required");
  command.model_dir = *model;
  command.prompt_text = flags.String("prompt");
  KVGATE_ASSIGN_OR_RETURN(command.prompt_ids, flags.IntList("prompt-ids"));
  if (command.prompt_text.has_value() == command.prompt_ids.has_value()) {
    return absl::InvalidArgumentError("give exactly one of --prompt TEXT or --prompt-ids 1,2,3");
  }
  engine::GenerateOptions& o = command.options;
  KVGATE_ASSIGN_OR_RETURN(auto max_tokens, flags.Int("max-tokens"));
  if (max_tokens) {
    if (*max_tokens < 1 || *max_tokens > (1 << 30)) {
      return absl::InvalidArgumentError(absl::StrCat("--max-tokens must be at least 1, got ", *max_tokens));
    }
    o.max_tokens = static_cast<int32_t>(*max_tokens);
  }
  KVGATE_ASSIGN_OR_RETURN(auto temperature, flags.Double("temperature"));
  if (temperature) o.sampling.temperature = static_cast<float>(*temperature);
  KVGATE_ASSIGN_OR_RETURN(auto top_p, flags.Double("top-p"));
  if (top_p) o.sampling.top_p = static_cast<float>(*top_p);
  KVGATE_ASSIGN_OR_RETURN(auto top_k, flags.Int("top-k"));
  if (top_k) {
    if (*top_k < -1 || *top_k > (1 << 30)) return absl::InvalidArgumentError("--top-k must be -1, 0 or positive");
    o.sampling.top_k = static_cast<int32_t>(*top_k);
  }
  KVGATE_ASSIGN_OR_RETURN(auto min_p, flags.Double("min-p"));
  if (min_p) o.sampling.min_p = static_cast<float>(*min_p);
  KVGATE_ASSIGN_OR_RETURN(auto seed, flags.Int("seed"));
  if (seed) o.sampling.seed = static_cast<uint64_t>(*seed);
  if (auto stop = flags.String("stop")) o.stop.push_back(*stop);
  KVGATE_ASSIGN_OR_RETURN(auto stop_ids, flags.IntList("stop-ids"));
  if (stop_ids) o.stop_token_ids = *stop_ids;
  o.ignore_eos = flags.Has("ignore-eos");
  command.json = flags.Has("json");
  gates::EvictionSpec& e = command.eviction;
  if (auto policy = flags.String("policy")) e.policy = *policy;
  KVGATE_ASSIGN_OR_RETURN(auto keep_ratio, flags.Double("keep-ratio"));
  if (keep_ratio) {
    // In the proto 0 means "unset"; on the command line an explicit ratio must be real.
    if (!(*keep_ratio > 0.0 && *keep_ratio <= 1.0)) {
      return absl::InvalidArgumentError(absl::StrCat("--keep-ratio must be in (0, 1], got ", *keep_ratio));
    }
    e.keep_ratio = static_cast<float>(*keep_ratio);
  }
  for (const char* name : {"budget-tokens", "sink-tokens", "recent-tokens"}) {
    KVGATE_ASSIGN_OR_RETURN(auto value, flags.Int(name));
    if (!value) continue;
    if (*value < -(1ll << 30) || *value > (1ll << 30)) return absl::InvalidArgumentError(absl::StrCat("--", name, " is out of range"));
    const int32_t v = static_cast<int32_t>(*value);
    if (std::string(name) == "budget-tokens") e.budget_tokens = v;
    else if (std::string(name) == "sink-tokens") e.sink_tokens = v;
    else e.recent_tokens = v;
  }
  if (auto head_budget = flags.String("head-budget")) {
    if (*head_budget == "uniform") e.head_budget = gates::HeadBudget::kUniform;
    else if (*head_budget == "adaptive") e.head_budget = gates::HeadBudget::kAdaptive;
    else return absl::InvalidArgumentError(absl::StrCat("--head-budget must be uniform or adaptive, got '", *head_budget, "'"));
  }
  if (auto gates_path = flags.String("gates")) command.policy_options.gate_path = *gates_path;
  const absl::StatusOr<gates::PolicyTraits> traits = gates::TraitsOfPolicy(e.policy);
  if (traits.ok() && traits->learned_gate && command.policy_options.gate_path.empty()) {
    return absl::InvalidArgumentError(absl::StrCat("--policy ", e.policy,
                                                   " needs trained gate weights: --gates PATH (format in gates/README.md)"));
  }
  // Checked here too so that a bad spec is a usage error before any model loads.
  KVGATE_RETURN_IF_ERROR(gates::ValidateEvictionSpec(e));
  if (auto backend = flags.String("backend")) command.backend = *backend;
  return command;
}

nlohmann::json ResultJson(const engine::GenerateResult& r) {
  return {
      {"text", r.text},
      {"token_ids", r.token_ids},
      {"finish_reason", engine::FinishReasonName(r.finish_reason)},
      {"matched_stop", r.matched_stop},
      {"usage", {{"prompt_tokens", r.prompt_tokens}, {"completion_tokens", r.token_ids.size()}}},
      {"kv",
       {{"policy", r.kv.policy},
        {"kv_entries_full", r.kv.kv_entries_full},
        {"kv_entries_kept", r.kv.kv_entries_kept},
        {"keep_fraction", r.kv.keep_fraction},
        {"bytes_full", r.kv.bytes_full},
        {"bytes_kept", r.kv.bytes_kept},
        {"pages_used", r.kv.pages_used}}},
      {"timings",
       {{"prefill_ms", r.prefill_ms},
        {"time_to_first_token_ms", r.time_to_first_token_ms},
        {"decode_ms", r.decode_ms},
        {"time_per_output_token_ms", r.time_per_output_token_ms}}},
  };
}

absl::Status Generate(const GenerateCommand& command) {
  namespace fs = std::filesystem;
  std::error_code ec;
  if (!fs::is_directory(command.model_dir, ec)) {
    return absl::NotFoundError(absl::StrCat("model directory '", command.model_dir, "' does not exist"));
  }
  KVGATE_ASSIGN_OR_RETURN(std::unique_ptr<ops::Backend> backend, ops::CreateBackend(command.backend));
  KVGATE_ASSIGN_OR_RETURN(std::unique_ptr<engine::Model> model, engine::Model::Load(command.model_dir, backend.get()));
  KVGATE_ASSIGN_OR_RETURN(std::unique_ptr<engine::Tokenizer> tokenizer,
                          engine::Tokenizer::FromFile((fs::path(command.model_dir) / "tokenizer.json").string()));
  std::vector<int32_t> prompt;
  if (command.prompt_ids) {
    prompt = *command.prompt_ids;
  } else {
    KVGATE_ASSIGN_OR_RETURN(prompt, tokenizer->Encode(*command.prompt_text));
  }
  // A pool sized for this one request: every (layer, kv head) may hold the whole
  // sequence (eviction only ever needs less).
  const engine::ModelConfig& c = model->config();
  const int32_t max_rows = static_cast<int32_t>(prompt.size()) + command.options.max_tokens;
  const int32_t pages = c.num_layers * c.num_kv_heads * ((max_rows + kPageTokens - 1) / kPageTokens + 1);
  KVGATE_ASSIGN_OR_RETURN(std::unique_ptr<kv::KvPool> pool, kv::KvPool::Create(backend.get(), pages, kPageTokens, c.head_dim,
                                                                                          kv::KvPool::AutoDtype(*backend)));
  KVGATE_ASSIGN_OR_RETURN(std::unique_ptr<engine::KvPlanner> planner,
                          kv::CreatePolicyPlanner(*model, pool.get(), command.eviction, command.policy_options,
                                                  tokenizer.get()));
  engine::Generator generator(model.get(), tokenizer.get());
  engine::TokenCallback stream;
  if (!command.json) {
    stream = [](int32_t, std::string_view text) {
      std::cout << text << std::flush;
      return true;
    };
  }
  KVGATE_ASSIGN_OR_RETURN(engine::GenerateResult result, generator.Generate(prompt, command.options, stream, planner.get()));
  if (command.json) {
    std::cout << ResultJson(result).dump() << "\n";
  } else {
    std::cout << "\n";
    std::cerr << absl::StrFormat(
        "[%s] prompt %d tokens, generated %d tokens (finish: %s); prefill %.2f ms, time to first token %.2f ms, "
        "%.2f ms per output token (%.1f tokens/s); KV policy %s kept %d of %d entries (%.0f%%), %d of %d bytes\n",
        backend->Name(), result.prompt_tokens, result.token_ids.size(), engine::FinishReasonName(result.finish_reason),
        result.prefill_ms, result.time_to_first_token_ms, result.time_per_output_token_ms,
        result.time_per_output_token_ms > 0 ? 1000.0 / result.time_per_output_token_ms : 0.0,
        result.kv.policy, result.kv.kv_entries_kept, result.kv.kv_entries_full, 100.0 * result.kv.keep_fraction,
        result.kv.bytes_kept, result.kv.bytes_full);
  }
  return absl::OkStatus();
}

}  // namespace

int RunGenerate(const std::vector<std::string>& args) {
  if (UsesServer(args)) return RunRemoteGenerate(args);
  auto command = ParseGenerate(args);
  if (!command.ok()) {
    std::cerr << "kvgate generate: " << command.status().message() << "\n" << kUsage;
    return 2;
  }
  absl::Status status = Generate(*command);
  if (!status.ok()) {
    std::cerr << "kvgate generate: " << absl::StatusCodeToString(status.code()) << ": " << status.message() << "\n";
    return 1;
  }
  return 0;
}

}  // namespace kvgate::cli
