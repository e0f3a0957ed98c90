#include "cli/remote_generate.h"

#include <grpcpp/grpcpp.h>

#include <chrono>
#include <cstdlib>
#include <fstream>
#include <iostream>
#include <limits>
#include <optional>
#include <set>
#include <sstream>

#include "absl/strings/ascii.h"
#include "absl/strings/numbers.h"
#include "absl/strings/str_cat.h"
#include "absl/strings/str_format.h"
#include "common/grpc_status.h"
#include "cli/inference_client.h"
#include "common/status_macros.h"
#include "kvgate/v1/inference.grpc.pb.h"

namespace kvgate::cli {
namespace {

using kvgate::v1::CompressionSpec;
using kvgate::v1::GenerateComplete;
using kvgate::v1::GenerateRequest;

constexpr char kUsage[] =
    "usage: kvgate generate --server HOST:PORT (--prompt TEXT | --prompt-ids 1,2,3)\n"
    "         [--max-tokens N] [--temperature T] [--top-p P] [--top-k K] [--min-p P] [--seed S]\n"
    "         [--stop STRING] [--stop-ids 1,2] [--ignore-eos]\n"
    "         [--policy NAME] [--keep-ratio R] [--budget-tokens N] [--sink-tokens N] [--recent-tokens N]\n"
    "         [--head-budget uniform|adaptive] [--request-id ID] [--timeout-ms N]\n"
    "         [--tls-ca FILE [--tls-cert FILE --tls-key FILE]] [--token-file FILE] [--json]\n"
    "       Unset flags take the server's defaults (its seed is random unless --seed is given).\n"
    "       The bearer token: --token-file FILE or $KVGATE_TOKEN (--token T shows in ps).\n";

// Every flag `generate` takes with a value, offline ones included (so UsesServer can skip
// their values), and the switches.
const std::set<std::string>& ValueFlags() {
  static const std::set<std::string>* const kFlags = new std::set<std::string>{
      "server",   "prompt",      "prompt-ids", "max-tokens", "temperature",   "top-p",         "top-k",
      "min-p",    "seed",        "stop",       "stop-ids",   "policy",        "keep-ratio",    "budget-tokens",
      "sink-tokens", "recent-tokens", "head-budget", "request-id", "timeout-ms", "tls-ca", "tls-cert",
      "tls-key",  "token",       "token-file", "model",      "backend",    "gates"};
  return *kFlags;
}
const std::set<std::string>& SwitchFlags() {
  static const std::set<std::string>* const kFlags = new std::set<std::string>{"ignore-eos", "json"};
  return *kFlags;
}

absl::StatusOr<std::optional<int32_t>> Int32Flag(const Flags& flags, const std::string& name) {
  KVGATE_ASSIGN_OR_RETURN(std::optional<int64_t> value, flags.Int(name));
  if (!value) return std::optional<int32_t>();
  if (*value < std::numeric_limits<int32_t>::min() || *value > std::numeric_limits<int32_t>::max()) {
    return absl::InvalidArgumentError(absl::StrCat("--", name, ": ", *value, " does not fit a 32-bit integer"));
  }
  return std::optional<int32_t>(static_cast<int32_t>(*value));
}

absl::StatusOr<std::optional<float>> FloatFlag(const Flags& flags, const std::string& name) {
  KVGATE_ASSIGN_OR_RETURN(std::optional<double> value, flags.Double(name));
  if (!value) return std::optional<float>();
  return std::optional<float>(static_cast<float>(*value));
}

std::string FinishReasonName(GenerateComplete::FinishReason reason) {
  switch (reason) {
    case GenerateComplete::STOP:
      return "stop";
    case GenerateComplete::LENGTH:
      return "length";
    case GenerateComplete::ABORTED:
      return "aborted";
    default:
      return "unspecified";
  }
}

}  // namespace

bool UsesServer(const std::vector<std::string>& args) {
  for (size_t i = 0; i < args.size(); ++i) {
    const std::string& arg = args[i];
    if (arg == "--server" || arg.rfind("--server=", 0) == 0) return true;
    // "--name value": the value is never a flag, whatever it spells.
    if (arg.rfind("--", 0) == 0 && arg.find('=') == std::string::npos && ValueFlags().count(arg.substr(2))) ++i;
  }
  return false;
}

absl::StatusOr<GenerateRequest> BuildGenerateRequest(const Flags& flags) {
  GenerateRequest request;
  const std::optional<std::string> text = flags.String("prompt");
  KVGATE_ASSIGN_OR_RETURN(const std::optional<std::vector<int32_t>> ids, flags.IntList("prompt-ids"));
  if (text.has_value() == ids.has_value()) {
    return absl::InvalidArgumentError("give exactly one of --prompt TEXT or --prompt-ids 1,2,3");
  }
  if (text) {
    request.set_text(*text);
  } else {
    request.mutable_tokens()->mutable_ids()->Add(ids->begin(), ids->end());
  }
  if (auto id = flags.String("request-id")) request.set_request_id(*id);

  // Sampling: only the flags given are set.
  KVGATE_ASSIGN_OR_RETURN(const std::optional<int32_t> max_tokens, Int32Flag(flags, "max-tokens"));
  if (max_tokens) request.mutable_sampling()->set_max_tokens(*max_tokens);
  KVGATE_ASSIGN_OR_RETURN(const std::optional<float> temperature, FloatFlag(flags, "temperature"));
  if (temperature) request.mutable_sampling()->set_temperature(*temperature);
  KVGATE_ASSIGN_OR_RETURN(const std::optional<float> top_p, FloatFlag(flags, "top-p"));
  if (top_p) request.mutable_sampling()->set_top_p(*top_p);
  KVGATE_ASSIGN_OR_RETURN(const std::optional<int32_t> top_k, Int32Flag(flags, "top-k"));
  if (top_k) request.mutable_sampling()->set_top_k(*top_k);
  KVGATE_ASSIGN_OR_RETURN(const std::optional<float> min_p, FloatFlag(flags, "min-p"));
  if (min_p) request.mutable_sampling()->set_min_p(*min_p);
  if (auto seed_text = flags.String("seed")) {
    uint64_t seed;
    if (!absl::SimpleAtoi(*seed_text, &seed)) {
      return absl::InvalidArgumentError(
          absl::StrCat("--seed: '", *seed_text, "' is not an integer in [0, 18446744073709551615]"));
    }
    request.mutable_sampling()->set_seed(seed);
  }
  if (auto stop = flags.String("stop")) request.mutable_sampling()->add_stop(*stop);
  KVGATE_ASSIGN_OR_RETURN(const std::optional<std::vector<int32_t>> stop_ids, flags.IntList("stop-ids"));
  if (stop_ids) request.mutable_sampling()->mutable_stop_token_ids()->Add(stop_ids->begin(), stop_ids->end());
  if (flags.Has("ignore-eos")) request.mutable_sampling()->set_ignore_eos(true);

  // Compression.
  if (auto policy = flags.String("policy")) request.mutable_compression()->set_policy(*policy);
  KVGATE_ASSIGN_OR_RETURN(const std::optional<float> keep_ratio, FloatFlag(flags, "keep-ratio"));
  if (keep_ratio) request.mutable_compression()->set_keep_ratio(*keep_ratio);
  KVGATE_ASSIGN_OR_RETURN(const std::optional<int32_t> budget, Int32Flag(flags, "budget-tokens"));
  if (budget) request.mutable_compression()->set_budget_tokens(*budget);
  KVGATE_ASSIGN_OR_RETURN(const std::optional<int32_t> sink, Int32Flag(flags, "sink-tokens"));
  if (sink) request.mutable_compression()->set_sink_tokens(*sink);
  KVGATE_ASSIGN_OR_RETURN(const std::optional<int32_t> recent, Int32Flag(flags, "recent-tokens"));
  if (recent) request.mutable_compression()->set_recent_tokens(*recent);
  if (auto head_budget = flags.String("head-budget")) {
    if (*head_budget == "uniform") {
      request.mutable_compression()->set_head_budget(CompressionSpec::UNIFORM);
    } else if (*head_budget == "adaptive") {
      request.mutable_compression()->set_head_budget(CompressionSpec::ADAPTIVE);
    } else {
      return absl::InvalidArgumentError(
          absl::StrCat("--head-budget must be uniform or adaptive, got '", *head_budget, "'"));
    }
  }
  return request;
}

absl::StatusOr<RemoteGenerateCommand> ParseRemoteGenerate(const std::vector<std::string>& args,
                                                          std::vector<std::string>* warnings) {
  KVGATE_ASSIGN_OR_RETURN(const Flags flags, Flags::Parse(args, ValueFlags(), SwitchFlags()));
  for (const char* name : {"backend", "gates"}) {
    if (flags.Has(name)) {
      return absl::InvalidArgumentError(
          absl::StrCat("--", name, " applies to offline generation; with --server the server decides"));
    }
  }
  if (flags.Has("model")) warnings->push_back("--model is ignored with --server (the server's model generates)");
  RemoteGenerateCommand command;
  command.server = flags.String("server").value_or("");
  if (command.server.empty()) return absl::InvalidArgumentError("--server needs HOST:PORT");
  KVGATE_ASSIGN_OR_RETURN(command.request, BuildGenerateRequest(flags));
  command.tls_ca_file = flags.String("tls-ca").value_or("");
  command.tls_cert_file = flags.String("tls-cert").value_or("");
  command.tls_key_file = flags.String("tls-key").value_or("");
  if (command.tls_cert_file.empty() != command.tls_key_file.empty()) {
    return absl::InvalidArgumentError("--tls-cert and --tls-key go together (a client certificate and its key)");
  }
  if (!command.tls_cert_file.empty() && command.tls_ca_file.empty()) {
    return absl::InvalidArgumentError("--tls-cert/--tls-key need --tls-ca (the CA that signed the server)");
  }
  if (flags.Has("token") && flags.Has("token-file")) {
    return absl::InvalidArgumentError("give the token once: --token-file or --token");
  }
  if (auto file = flags.String("token-file")) {
    std::ifstream in(*file, std::ios::binary);
    if (!in) return absl::NotFoundError(absl::StrCat("--token-file: cannot read '", *file, "'"));
    std::stringstream buffer;
    buffer << in.rdbuf();
    command.token = std::string(absl::StripAsciiWhitespace(buffer.str()));
    if (command.token.empty()) return absl::InvalidArgumentError(absl::StrCat("--token-file: '", *file, "' is empty"));
  } else if (auto token = flags.String("token")) {
    command.token = *token;
  } else if (const char* env = std::getenv("KVGATE_TOKEN"); env != nullptr) {
    command.token = env;
  }
  KVGATE_ASSIGN_OR_RETURN(const std::optional<int64_t> timeout_ms, flags.Int("timeout-ms"));
  if (timeout_ms) {
    if (*timeout_ms <= 0) return absl::InvalidArgumentError(absl::StrCat("--timeout-ms must be positive, got ", *timeout_ms));
    command.timeout_ms = *timeout_ms;
  }
  command.json = flags.Has("json");
  return command;
}

nlohmann::json CompletionJson(const std::string& text, const std::vector<int32_t>& token_ids,
                              const GenerateComplete& complete) {
  const kvgate::v1::KvStats& kv = complete.kv();
  const kvgate::v1::Timings& t = complete.timings();
  return {
      {"text", text},
      {"token_ids", token_ids},
      {"finish_reason", FinishReasonName(complete.finish_reason())},
      {"matched_stop", complete.matched_stop()},
      {"request_id", complete.request_id()},
      {"usage",
       {{"prompt_tokens", complete.usage().prompt_tokens()},
        {"completion_tokens", complete.usage().completion_tokens()}}},
      {"kv",
       {{"policy", kv.policy()},
        {"kv_entries_full", kv.kv_entries_full()},
        {"kv_entries_kept", kv.kv_entries_kept()},
        {"keep_fraction", kv.keep_fraction()},
        {"bytes_full", kv.bytes_full()},
        {"bytes_kept", kv.bytes_transferred()},  // the offline field: what the decode side holds
        {"bytes_transferred", kv.bytes_transferred()},
        {"pages_used", kv.pages_used()}}},
      {"timings",
       {{"queue_ms", t.queue_ms()},
        {"prefill_ms", t.prefill_ms()},
        {"transfer_ms", t.transfer_ms()},
        {"time_to_first_token_ms", t.time_to_first_token_ms()},
        {"decode_ms", t.decode_ms()},
        {"time_per_output_token_ms", t.time_per_output_token_ms()}}},
  };
}

absl::Status RemoteGenerate(const RemoteGenerateCommand& command, std::ostream& out, std::ostream& err) {
  KVGATE_ASSIGN_OR_RETURN(std::shared_ptr<grpc::ChannelCredentials> credentials,
                          ChannelCredentialsFor({command.tls_ca_file, command.tls_cert_file, command.tls_key_file, ""}));
  std::unique_ptr<kvgate::v1::Inference::Stub> stub =
      kvgate::v1::Inference::NewStub(grpc::CreateChannel(command.server, credentials));
  grpc::ClientContext context;
  if (!command.token.empty()) context.AddMetadata("authorization", absl::StrCat("Bearer ", command.token));
  if (command.timeout_ms > 0) {
    context.set_deadline(std::chrono::system_clock::now() + std::chrono::milliseconds(command.timeout_ms));
  }

  std::unique_ptr<grpc::ClientReader<kvgate::v1::GenerateResponse>> reader = stub->Generate(&context, command.request);
  kvgate::v1::GenerateResponse response;
  std::string text;
  std::vector<int32_t> token_ids;
  std::optional<GenerateComplete> complete;
  while (reader->Read(&response)) {
    if (response.has_chunk()) {
      const kvgate::v1::TokenChunk& chunk = response.chunk();
      token_ids.insert(token_ids.end(), chunk.token_ids().begin(), chunk.token_ids().end());
      text += chunk.text();
      if (!command.json) out << chunk.text() << std::flush;
    } else if (response.has_complete()) {
      complete = response.complete();
    }
  }
  const grpc::Status status = reader->Finish();
  if (!command.json && !text.empty()) out << "\n";  // end the streamed text, also before an error
  if (!status.ok()) return FromGrpcStatus(status);
  if (!complete) return absl::InternalError("the server ended the stream without a complete message");

  if (command.json) {
    out << CompletionJson(text, token_ids, *complete).dump() << "\n";
    return absl::OkStatus();
  }
  if (text.empty()) out << "\n";
  const kvgate::v1::KvStats& kv = complete->kv();
  const kvgate::v1::Timings& t = complete->timings();
  err << absl::StrFormat(
      "[%s] request %s: prompt %d tokens, generated %d tokens (finish: %s); time to first token %.2f ms, "
      "%.2f ms per output token (%.1f tokens/s); KV policy %s kept %d of %d entries (%.0f%%), transferred %d of "
      "%d bytes\n",
      command.server, complete->request_id(), complete->usage().prompt_tokens(),
      complete->usage().completion_tokens(), FinishReasonName(complete->finish_reason()),
      t.time_to_first_token_ms(), t.time_per_output_token_ms(),
      t.time_per_output_token_ms() > 0 ? 1000.0 / t.time_per_output_token_ms() : 0.0, kv.policy(),
      kv.kv_entries_kept(), kv.kv_entries_full(), 100.0 * kv.keep_fraction(), kv.bytes_transferred(),
      kv.bytes_full());
  return absl::OkStatus();
}

int RunRemoteGenerate(const std::vector<std::string>& args, std::ostream& out, std::ostream& err) {
  std::vector<std::string> warnings;
  absl::StatusOr<RemoteGenerateCommand> command = ParseRemoteGenerate(args, &warnings);
  if (!command.ok()) {
    err << "kvgate generate: " << command.status().message() << "\n" << kUsage;
    return 2;
  }
  for (const std::string& warning : warnings) err << "kvgate generate: " << warning << "\n";
  const absl::Status status = RemoteGenerate(*command, out, err);
  if (!status.ok()) {
    err << "kvgate generate: " << absl::StatusCodeToString(status.code()) << ": " << status.message() << "\n";
    return 1;
  }
  return 0;
}

int RunRemoteGenerate(const std::vector<std::string>& args) { return RunRemoteGenerate(args, std::cout, std::cerr); }

}  // namespace kvgate::cli
