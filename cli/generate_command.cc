// `kvgate generate`: offline generation on this machine (the engine directly).
#include <filesystem>
#include <iostream>

#include "absl/strings/str_cat.h"
#include "absl/strings/str_format.h"
#include "cli/commands.h"
#include "cli/flags.h"
#include "common/status_macros.h"
#include "cuda/backend.h"
#include "engine/generator.h"
#include "engine/model.h"
#include "engine/tokenizer.h"
#include "nlohmann/json.hpp"

namespace kvgate::cli {
namespace {

constexpr char kUsage[] =
    "usage: kvgate generate --model DIR (--prompt TEXT | --prompt-ids 1,2,3)\n"
    "         [--max-tokens N=16] [--temperature T=0 (greedy)] [--top-p P=1] [--top-k K=0]\n"
    "         [--min-p P=0] [--seed S=0] [--stop STRING] [--stop-ids 1,2] [--ignore-eos]\n"
    "         [--backend cpu|cuda[:N]] [--json]\n";

struct GenerateCommand {
  std::string model_dir;
  std::optional<std::string> prompt_text;
  std::optional<std::vector<int32_t>> prompt_ids;
  engine::GenerateOptions options;
  std::string backend = "cpu";
  bool json = false;
};

absl::StatusOr<GenerateCommand> ParseGenerate(const std::vector<std::string>& args) {
  KVGATE_ASSIGN_OR_RETURN(
      Flags flags, Flags::Parse(args,
                                {"model", "prompt", "prompt-ids", "max-tokens", "temperature", "top-p",
                                 "top-k", "min-p", "seed", "stop", "stop-ids", "backend"},
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
        {"bytes_kept", r.kv.bytes_kept}}},
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
  engine::Generator generator(model.get(), tokenizer.get());
  engine::TokenCallback stream;
  if (!command.json) {
    stream = [](int32_t, std::string_view text) {
      std::cout << text << std::flush;
      return true;
    };
  }
  KVGATE_ASSIGN_OR_RETURN(engine::GenerateResult result, generator.Generate(prompt, command.options, stream));
  if (command.json) {
    std::cout << ResultJson(result).dump() << "\n";
  } else {
    std::cout << "\n";
    std::cerr << absl::StrFormat(
        "[%s] prompt %d tokens, generated %d tokens (finish: %s); prefill %.2f ms, time to first token %.2f ms, "
        "%.2f ms per output token (%.1f tokens/s); KV %d entries, %d bytes\n",
        backend->Name(), result.prompt_tokens, result.token_ids.size(), engine::FinishReasonName(result.finish_reason),
        result.prefill_ms, result.time_to_first_token_ms, result.time_per_output_token_ms,
        result.time_per_output_token_ms > 0 ? 1000.0 / result.time_per_output_token_ms : 0.0,
        result.kv.kv_entries_kept, result.kv.bytes_kept);
  }
  return absl::OkStatus();
}

}  // namespace

int RunGenerate(const std::vector<std::string>& args) {
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
