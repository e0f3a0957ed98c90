// `kvgate eval`: retrieval accuracy of every eviction policy and keep ratio on the
// synthetic tasks of bench/retrieval_tasks.md. The samples are generated once from the
// seed; every (policy, keep ratio) run answers the same prompts (greedy, at most 48 new
// tokens, stop at EOS or a newline) and is scored by exact match. Writes a report that
// reads in a terminal and as Markdown, and optionally JSON for bench/plot_quality.py.
//
// With --server HOST:PORT the same prompts go to a running kvgate service
// (kvgate.v1.Inference/Generate, --concurrency at a time), so what is scored is the
// deployed path: router, KV manager, transport, batched decode. Only the model's
// config.json and tokenizer.json are read locally, to build the prompts.
#include <atomic>
#include <chrono>
#include <cmath>
#include <cstdio>
#include <ctime>
#include <filesystem>
#include <fstream>
#include <iostream>
#include <map>
#include <optional>
#include <set>
#include <thread>

#include "absl/strings/match.h"
#include "absl/strings/numbers.h"
#include "absl/strings/str_cat.h"
#include "absl/strings/str_format.h"
#include "absl/strings/str_join.h"
#include "absl/strings/str_split.h"
#include "absl/strings/strip.h"
#include "bench/retrieval_tasks.h"
#include "cli/commands.h"
#include "cli/flags.h"
#include "cli/inference_client.h"
#include "common/status_macros.h"
#include "cuda/backend.h"
#include "cuda/cpu/cpu_backend.h"
#include "engine/generator.h"
#include "engine/model.h"
#include "engine/model_config.h"
#include "engine/tokenizer.h"
#include "gates/eviction_spec.h"
#include "gates/policy.h"
#include "kv/kv_pool.h"
#include "kv/policy_planner.h"
#include "nlohmann/json.hpp"

namespace kvgate::cli {
namespace {

using bench::RetrievalTask;
using nlohmann::json;

// Rows per KV page (per layer and kv head), as `generate`.
constexpr int32_t kPageTokens = 16;

constexpr char kUsage[] =
    "usage: kvgate eval --model DIR [--tasks niah_single,niah_multikey,niah_multivalue,kv_lookup,vt]\n"
    "         [--contexts 1024,2048,4096] [--policies full,streaming_llm,...] [--keep-ratios 1,0.5,0.3,0.2,0.1]\n"
    "         [--samples N=20] [--seed S=1234] [--haystack FILE|DIR] [--depths 0,0.25,0.5,0.75,1]\n"
    "         [--gates PATH | --gates fast_kvzip=PATH,attention_gate=PATH] [--random-gates]\n"
    "         [--backend cpu|cuda[:N]] [--threads N] [--json OUT] [--markdown OUT] [--quiet]\n"
    "         [--server HOST:PORT [--concurrency N=8] [--timeout-ms MS] [--token T]\n"
    "          [--tls-ca PEM [--tls-cert PEM --tls-key PEM]]]\n"
    "  Tasks and scoring: bench/retrieval_tasks.md. Held-out tasks (never trained on, never in the\n"
    "  default list): niah_reworded, kv_lookup_48, kv_lookup_keyfmt, vt_8hop, vt_reworded.\n"
    "  Default policies: full, streaming_llm, snapkv,\n"
    "  sage_kv, kvzip, plus fast_kvzip / attention_gate when --gates names them (or --random-gates).\n"
    "  --depths sweeps niah_single over exact needle depths (every depth gets --samples samples);\n"
    "  --random-gates uses untrained random gates (machinery tests only, not a quality number).\n"
    "  --server: the prompts go to a running kvgate service, --concurrency requests in flight;\n"
    "  --model then only supplies config.json and tokenizer.json, and the server's own gates\n"
    "  answer for fast_kvzip / attention_gate (so --gates, --random-gates, --backend, --threads\n"
    "  do not apply).\n";

struct EvalCommand {
  std::string model_dir;
  std::vector<RetrievalTask> tasks = bench::AllTasks();
  std::vector<int32_t> contexts = {1024, 2048, 4096};
  std::vector<std::string> policies;
  std::vector<double> keep_ratios = {1.0, 0.5, 0.3, 0.2, 0.1};
  uint64_t seed = bench::kDefaultEvalSeed;
  int32_t samples = 20;
  std::optional<std::string> haystack_path;
  std::vector<double> depths;  // niah_single exact depths; empty = seeded
  std::map<std::string, std::string> gate_paths;  // learned policy -> weights file
  bool random_gates = false;
  std::string backend = "cpu";
  std::optional<int32_t> threads;
  std::string json_path, markdown_path;
  bool quiet = false;
  // --server: empty means the engine in this process answers.
  std::string server;
  int32_t concurrency = 8;
  int64_t timeout_ms = 0;  // per request; 0: none
  ClientSecurity security;
};

bool IsLearned(const std::string& policy) {
  const absl::StatusOr<gates::PolicyTraits> traits = gates::TraitsOfPolicy(policy);
  return traits.ok() && traits->learned_gate;
}

// Comma-separated, whitespace-trimmed, non-empty items, each at most once.
absl::StatusOr<std::vector<std::string>> ParseList(const std::string& flag, const std::string& text) {
  std::vector<std::string> items;
  for (absl::string_view part : absl::StrSplit(text, ',')) {
    part = absl::StripAsciiWhitespace(part);
    if (part.empty()) return absl::InvalidArgumentError(absl::StrCat("--", flag, ": empty item in '", text, "'"));
    if (std::find(items.begin(), items.end(), part) != items.end()) {
      return absl::InvalidArgumentError(absl::StrCat("--", flag, ": '", part, "' is listed twice"));
    }
    items.emplace_back(part);
  }
  return items;
}

absl::StatusOr<std::vector<double>> ParseDoubles(const std::string& flag, const std::string& text, double lo,
                                                 bool lo_open, double hi) {
  KVGATE_ASSIGN_OR_RETURN(std::vector<std::string> items, ParseList(flag, text));
  std::vector<double> values;
  for (const std::string& item : items) {
    double v;
    if (!absl::SimpleAtod(item, &v) || !std::isfinite(v)) {
      return absl::InvalidArgumentError(absl::StrCat("--", flag, ": '", item, "' is not a number"));
    }
    if ((lo_open ? !(v > lo) : !(v >= lo)) || !(v <= hi)) {
      return absl::InvalidArgumentError(absl::StrCat("--", flag, ": ", item, " is outside ", lo_open ? "(" : "[", lo,
                                                     ", ", hi, "]"));
    }
    if (std::find(values.begin(), values.end(), v) != values.end()) {
      return absl::InvalidArgumentError(absl::StrCat("--", flag, ": ", item, " is listed twice"));
    }
    values.push_back(v);
  }
  return values;
}

absl::StatusOr<EvalCommand> ParseEval(const std::vector<std::string>& args) {
  KVGATE_ASSIGN_OR_RETURN(Flags flags, Flags::Parse(args,
                                                    {"model", "tasks", "contexts", "policies", "keep-ratios", "samples",
                                                     "seed", "haystack", "depths", "gates", "backend", "threads",
                                                     "json", "markdown", "server", "concurrency", "timeout-ms",
                                                     "token", "tls-ca", "tls-cert", "tls-key"},
                                                    {"random-gates", "quiet"}));
  EvalCommand command;
  auto model = flags.String("model");
  if (!model) return absl::InvalidArgumentError("--model DIR is required");
  command.model_dir = *model;
  if (auto tasks = flags.String("tasks")) {
    KVGATE_ASSIGN_OR_RETURN(std::vector<std::string> names, ParseList("tasks", *tasks));
    command.tasks.clear();
    for (const std::string& name : names) {
      auto task = bench::ParseTask(name);
      if (!task.ok()) return absl::InvalidArgumentError(absl::StrCat("--tasks: ", task.status().message()));
      command.tasks.push_back(*task);
    }
  }
  if (auto contexts = flags.String("contexts")) {
    KVGATE_ASSIGN_OR_RETURN(std::vector<std::string> items, ParseList("contexts", *contexts));
    command.contexts.clear();
    for (const std::string& item : items) {
      int32_t v;
      if (!absl::SimpleAtoi(item, &v) || v <= bench::kContextMarginTokens || v > (1 << 24)) {
        return absl::InvalidArgumentError(absl::StrCat("--contexts: '", item, "' is not a token count above the ",
                                                       bench::kContextMarginTokens, "-token margin"));
      }
      command.contexts.push_back(v);
    }
  }
  if (auto ratios = flags.String("keep-ratios")) {
    KVGATE_ASSIGN_OR_RETURN(command.keep_ratios, ParseDoubles("keep-ratios", *ratios, 0.0, /*lo_open=*/true, 1.0));
  }
  if (auto depths = flags.String("depths")) {
    KVGATE_ASSIGN_OR_RETURN(command.depths, ParseDoubles("depths", *depths, 0.0, /*lo_open=*/false, 1.0));
    if (std::find(command.tasks.begin(), command.tasks.end(), RetrievalTask::kNiahSingle) == command.tasks.end()) {
      return absl::InvalidArgumentError("--depths applies to niah_single, which --tasks leaves out");
    }
  }
  KVGATE_ASSIGN_OR_RETURN(auto samples, flags.Int("samples"));
  if (samples) {
    if (*samples < 1 || *samples > 1000000) {
      return absl::InvalidArgumentError(absl::StrCat("--samples must be at least 1, got ", *samples));
    }
    command.samples = static_cast<int32_t>(*samples);
  }
  KVGATE_ASSIGN_OR_RETURN(auto seed, flags.Int("seed"));
  if (seed) {
    if (*seed < 0) return absl::InvalidArgumentError(absl::StrCat("--seed must be >= 0, got ", *seed));
    command.seed = static_cast<uint64_t>(*seed);
  }
  command.haystack_path = flags.String("haystack");
  command.random_gates = flags.Has("random-gates");
  command.quiet = flags.Has("quiet");
  if (auto server = flags.String("server")) {
    if (server->empty()) return absl::InvalidArgumentError("--server needs HOST:PORT");
    command.server = *server;
    for (const char* local : {"gates", "random-gates", "backend", "threads"}) {
      if (flags.Has(local)) {
        return absl::InvalidArgumentError(absl::StrCat("--", local,
                                                       " is for the engine in this process; with --server the "
                                                       "server's own configuration answers"));
      }
    }
    KVGATE_ASSIGN_OR_RETURN(auto concurrency, flags.Int("concurrency"));
    if (concurrency) {
      if (*concurrency < 1 || *concurrency > 1024) {
        return absl::InvalidArgumentError(absl::StrCat("--concurrency must be in [1, 1024], got ", *concurrency));
      }
      command.concurrency = static_cast<int32_t>(*concurrency);
    }
    KVGATE_ASSIGN_OR_RETURN(auto timeout_ms, flags.Int("timeout-ms"));
    if (timeout_ms) {
      if (*timeout_ms < 0) return absl::InvalidArgumentError(absl::StrCat("--timeout-ms must be >= 0, got ", *timeout_ms));
      command.timeout_ms = *timeout_ms;
    }
    command.security.token = flags.String("token").value_or("");
    command.security.tls_ca_file = flags.String("tls-ca").value_or("");
    command.security.tls_cert_file = flags.String("tls-cert").value_or("");
    command.security.tls_key_file = flags.String("tls-key").value_or("");
    if (command.security.tls_cert_file.empty() != command.security.tls_key_file.empty()) {
      return absl::InvalidArgumentError("--tls-cert and --tls-key go together");
    }
    if (!command.security.tls_cert_file.empty() && command.security.tls_ca_file.empty()) {
      return absl::InvalidArgumentError("--tls-cert needs --tls-ca (the server's CA)");
    }
  } else {
    for (const char* remote : {"concurrency", "timeout-ms", "token", "tls-ca", "tls-cert", "tls-key"}) {
      if (flags.Has(remote)) return absl::InvalidArgumentError(absl::StrCat("--", remote, " needs --server HOST:PORT"));
    }
  }

  // --gates: one path, or policy=path pairs.
  std::optional<std::string> single_gate_path;
  if (auto gates_flag = flags.String("gates")) {
    if (gates_flag->find('=') == std::string::npos) {
      if (gates_flag->empty()) return absl::InvalidArgumentError("--gates needs a path");
      single_gate_path = *gates_flag;
    } else {
      KVGATE_ASSIGN_OR_RETURN(std::vector<std::string> pairs, ParseList("gates", *gates_flag));
      for (const std::string& pair : pairs) {
        const size_t eq = pair.find('=');
        const std::string name = pair.substr(0, eq == std::string::npos ? pair.size() : eq);
        if (eq == std::string::npos || eq + 1 == pair.size() || !IsLearned(name)) {
          return absl::InvalidArgumentError(absl::StrCat(
              "--gates: '", pair, "' is not fast_kvzip=PATH or attention_gate=PATH (or give one PATH)"));
        }
        if (command.gate_paths.count(name)) return absl::InvalidArgumentError(absl::StrCat("--gates names ", name, " twice"));
        command.gate_paths[name] = pair.substr(eq + 1);
      }
    }
  }
  if (auto policies = flags.String("policies")) {
    KVGATE_ASSIGN_OR_RETURN(command.policies, ParseList("policies", *policies));
    const std::vector<std::string>& known = gates::PolicyNames();
    for (const std::string& p : command.policies) {
      if (std::find(known.begin(), known.end(), p) == known.end()) {
        return absl::InvalidArgumentError(
            absl::StrCat("--policies: unknown policy '", p, "' (policies: ", absl::StrJoin(known, ", "), ")"));
      }
    }
  } else {
    // Every policy; a learned one when its gate is given (or random gates are asked for).
    for (const std::string& p : gates::PolicyNames()) {
      if (!IsLearned(p) || command.random_gates || command.gate_paths.count(p)) command.policies.push_back(p);
    }
    if (single_gate_path) {
      return absl::InvalidArgumentError(
          "--gates PATH with the default policies: say which policy the file is for, "
          "--gates fast_kvzip=PATH or --gates attention_gate=PATH (or list --policies)");
    }
  }
  std::vector<std::string> learned;
  for (const std::string& p : command.policies) {
    if (IsLearned(p)) learned.push_back(p);
  }
  if (single_gate_path) {
    if (learned.size() != 1) {
      return absl::InvalidArgumentError(absl::StrCat(
          "--gates PATH serves exactly one learned policy, but --policies lists ", learned.size(),
          learned.empty() ? "" : absl::StrCat(" (", absl::StrJoin(learned, ", "), ")"),
          "; give --gates fast_kvzip=PATH,attention_gate=PATH"));
    }
    command.gate_paths[learned[0]] = *single_gate_path;
  }
  for (const auto& [name, path] : command.gate_paths) {
    if (std::find(learned.begin(), learned.end(), name) == learned.end()) {
      return absl::InvalidArgumentError(absl::StrCat("--gates names ", name, ", which --policies leaves out"));
    }
  }
  for (const std::string& p : learned) {
    if (!command.gate_paths.count(p) && !command.random_gates && command.server.empty()) {
      return absl::InvalidArgumentError(absl::StrCat(
          "--policies ", p, " needs trained gate weights: --gates ", p,
          "=PATH (format in gates/README.md), or --random-gates for a machinery test"));
    }
  }
  if (auto backend = flags.String("backend")) command.backend = *backend;
  KVGATE_ASSIGN_OR_RETURN(auto threads, flags.Int("threads"));
  if (threads) {
    if (command.backend != "cpu") {
      return absl::InvalidArgumentError(absl::StrCat("--threads is for --backend cpu, not ", command.backend));
    }
    if (*threads < 1 || *threads > 4096) {
      return absl::InvalidArgumentError(absl::StrCat("--threads must be at least 1, got ", *threads));
    }
    command.threads = static_cast<int32_t>(*threads);
  }
  if (auto path = flags.String("json")) command.json_path = *path;
  if (auto path = flags.String("markdown")) command.markdown_path = *path;
  // Every spec must be valid before any model loads.
  for (const std::string& p : command.policies) {
    for (double r : command.keep_ratios) {
      gates::EvictionSpec spec;
      spec.policy = p;
      spec.keep_ratio = static_cast<float>(r);
      KVGATE_RETURN_IF_ERROR(gates::ValidateEvictionSpec(spec));
    }
  }
  return command;
}

// --- Report helpers -------------------------------------------------------------------

// The first line of a shell command's output, or `fallback`.
std::string CommandLine(const std::string& command, const std::string& fallback) {
  FILE* pipe = ::popen(command.c_str(), "r");
  if (pipe == nullptr) return fallback;
  char buffer[512];
  std::string out;
  if (std::fgets(buffer, sizeof(buffer), pipe) != nullptr) out = buffer;
  const int rc = ::pclose(pipe);
  out = std::string(absl::StripAsciiWhitespace(out));
  return rc == 0 && !out.empty() ? out : fallback;
}

std::string GitCommit() {
  std::string commit = CommandLine("git rev-parse HEAD 2>/dev/null", "unknown");
  if (commit != "unknown" && !CommandLine("git status --porcelain --untracked-files=no 2>/dev/null", "").empty()) {
    commit += "-dirty";
  }
  return commit;
}

std::string CpuModel() {
  std::ifstream in("/proc/cpuinfo");
  std::string line;
  while (std::getline(in, line)) {
    if (absl::StartsWith(line, "model name")) {
      const size_t colon = line.find(':');
      if (colon != std::string::npos) return std::string(absl::StripAsciiWhitespace(line.substr(colon + 1)));
    }
  }
  return "unknown CPU";
}

std::string UtcNow() {
  const std::time_t now = std::time(nullptr);
  std::tm tm{};
  ::gmtime_r(&now, &tm);
  char buffer[32];
  std::strftime(buffer, sizeof(buffer), "%Y-%m-%dT%H:%M:%SZ", &tm);
  return buffer;
}

// A Markdown table padded so that it also lines up in a terminal.
class Table {
 public:
  explicit Table(std::vector<std::string> header, size_t left_columns)
      : header_(std::move(header)), left_columns_(left_columns) {}
  void Add(std::vector<std::string> row) { rows_.push_back(std::move(row)); }
  std::string Render() const {
    std::vector<size_t> width(header_.size(), 3);
    for (size_t c = 0; c < header_.size(); ++c) width[c] = std::max(width[c], header_[c].size());
    for (const auto& row : rows_) {
      for (size_t c = 0; c < row.size(); ++c) width[c] = std::max(width[c], row[c].size());
    }
    auto line = [&](const std::vector<std::string>& cells) {
      std::string out = "|";
      for (size_t c = 0; c < header_.size(); ++c) {
        const std::string cell = c < cells.size() ? cells[c] : "";
        const std::string pad(width[c] - cell.size(), ' ');
        out += " " + (c < left_columns_ ? cell + pad : pad + cell) + " |";
      }
      return out + "\n";
    };
    std::string out = line(header_) + "|";
    for (size_t c = 0; c < header_.size(); ++c) {
      out += c < left_columns_ ? std::string(width[c] + 2, '-') : std::string(width[c] + 1, '-') + ":";
      out += "|";
    }
    out += "\n";
    for (const auto& row : rows_) out += line(row);
    return out;
  }

 private:
  std::vector<std::string> header_;
  size_t left_columns_;
  std::vector<std::vector<std::string>> rows_;
};

std::string Ratio(double r) { return absl::StrFormat("%.2f", r); }
std::string Accuracy(double a) { return absl::StrFormat("%.3f", a); }
std::string DepthName(double d) { return absl::StrFormat("%g", d); }

// --- The run ----------------------------------------------------------------------------

struct Run {
  std::string policy;
  double keep_ratio = 1.0;
  std::vector<uint8_t> correct;       // per sample
  std::vector<std::string> outputs;   // per sample, as generated (stop string removed)
  std::vector<int64_t> sample_full, sample_kept;  // per sample, prompt KV entries
  int64_t entries_full = 0, entries_kept = 0;
  double seconds = 0;
};

// Accuracy and kept fraction over a subset of samples.
struct Cell {
  int32_t samples = 0, correct = 0;
  int64_t entries_full = 0, entries_kept = 0;
  double accuracy() const { return samples > 0 ? double(correct) / samples : 0.0; }
  double kept_fraction() const { return entries_full > 0 ? double(entries_kept) / entries_full : 1.0; }
};

absl::Status Eval(const EvalCommand& command, int* exit_code) {
  namespace fs = std::filesystem;
  const auto t0 = std::chrono::steady_clock::now();
  auto seconds_since = [](std::chrono::steady_clock::time_point start) {
    return std::chrono::duration<double>(std::chrono::steady_clock::now() - start).count();
  };
  auto log = [&](const std::string& line) {
    if (!command.quiet) std::cerr << "[eval " << absl::StrFormat("%7.1fs", seconds_since(t0)) << "] " << line << "\n";
  };
  std::error_code ec;
  if (!fs::is_directory(command.model_dir, ec)) {
    return absl::NotFoundError(absl::StrCat("model directory '", command.model_dir, "' does not exist"));
  }
  // Contexts are checked against the model before anything heavy loads; a context the
  // model cannot hold is a usage error.
  KVGATE_ASSIGN_OR_RETURN(engine::ModelConfig config, engine::LoadModelConfig(command.model_dir));
  for (int32_t context : command.contexts) {
    if (context > config.max_context_tokens) {
      *exit_code = 2;
      return absl::InvalidArgumentError(absl::StrCat("--contexts: ", context, " tokens is beyond the model's context of ",
                                                      config.max_context_tokens,
                                                      " tokens (max_position_embeddings in ", command.model_dir,
                                                      "/config.json)"));
    }
  }
  const bool remote = !command.server.empty();
  std::unique_ptr<ops::Backend> backend;
  std::unique_ptr<engine::Model> model;
  std::unique_ptr<InferenceClient> client;
  if (remote) {
    KVGATE_ASSIGN_OR_RETURN(client, InferenceClient::Connect(command.server, command.security));
  } else {
    if (command.backend == "cpu") {
      backend = ops::CreateCpuBackend(command.threads.value_or(0));
    } else {
      KVGATE_ASSIGN_OR_RETURN(backend, ops::CreateBackend(command.backend));
    }
    KVGATE_ASSIGN_OR_RETURN(model, engine::Model::Load(command.model_dir, backend.get()));
  }
  KVGATE_ASSIGN_OR_RETURN(std::unique_ptr<engine::Tokenizer> tokenizer,
                          engine::Tokenizer::FromFile((fs::path(command.model_dir) / "tokenizer.json").string()));
  const engine::ModelConfig& c = remote ? config : model->config();
  bench::Haystack haystack = bench::Haystack::Generated();
  if (command.haystack_path) {
    KVGATE_ASSIGN_OR_RETURN(haystack, bench::Haystack::FromPath(*command.haystack_path));
  }

  // Gates are loaded once and shared by every run of their policy.
  const gates::ModelShape shape{c.num_layers, c.num_heads, c.num_kv_heads, c.head_dim, c.hidden_size};
  std::map<std::string, gates::PolicyOptions> policy_options;
  json gates_json = json::object();
  for (const std::string& p : command.policies) {
    gates::PolicyOptions& options = policy_options[p];
    if (!IsLearned(p)) continue;
    if (remote) {
      gates_json[p] = "the server's";
      continue;
    }
    auto it = command.gate_paths.find(p);
    gates::GateFiles files;
    if (it != command.gate_paths.end()) {
      files.paths[p] = it->second;
    } else {
      files.random_seed = command.seed;
    }
    KVGATE_ASSIGN_OR_RETURN(options, gates::LoadGates(files, shape));
    gates_json[p] = it != command.gate_paths.end() ? it->second : absl::StrCat("random (seed ", command.seed, ")");
  }

  // The samples, generated once: every run answers exactly these prompts.
  std::vector<bench::TaskSample> samples;
  for (RetrievalTask task : command.tasks) {
    for (int32_t context : command.contexts) {
      std::vector<std::optional<double>> depths = {std::nullopt};
      if (task == RetrievalTask::kNiahSingle && !command.depths.empty()) {
        depths.assign(command.depths.begin(), command.depths.end());
      }
      for (const std::optional<double>& depth : depths) {
        for (int32_t i = 0; i < command.samples; ++i) {
          auto sample = bench::MakeSample(haystack, *tokenizer, c.bos_token_id, task, context, command.seed, i, depth);
          if (!sample.ok()) {
            if (sample.status().code() == absl::StatusCode::kInvalidArgument) *exit_code = 2;
            return absl::Status(sample.status().code(), absl::StrCat("--contexts: ", sample.status().message()));
          }
          samples.push_back(*std::move(sample));
        }
      }
    }
  }
  log(absl::StrFormat("%d samples generated (%s haystack)", samples.size(),
                      command.haystack_path ? *command.haystack_path : "generated"));

  // One pool for every run, sized for the longest prompt plus its answer, twice: a
  // compaction allocates the kept rows' fresh pages before it frees the old ones
  // (kv/sequence_layout.cc PlanCompaction), and attention_gate compacts at decode
  // steps with most of the prompt still kept (keep ratio 1 ran out of pages at 1024).
  int32_t max_rows = 0;
  for (const bench::TaskSample& s : samples) {
    max_rows = std::max<int32_t>(max_rows, static_cast<int32_t>(s.prompt_ids.size()) + bench::kMaxAnswerTokens);
  }
  max_rows = std::min(max_rows, c.max_context_tokens);
  const int32_t pages = c.num_layers * c.num_kv_heads * (2 * ((max_rows + kPageTokens - 1) / kPageTokens) + 1);
  std::unique_ptr<kv::KvPool> pool;
  std::unique_ptr<engine::Generator> generator;
  if (!remote) {
    KVGATE_ASSIGN_OR_RETURN(pool, kv::KvPool::Create(backend.get(), pages, kPageTokens, c.head_dim, kv::KvPool::AutoDtype(*backend)));
    generator = std::make_unique<engine::Generator>(model.get(), tokenizer.get());
  }

  // One sample's answer, from the engine here or from the server. Greedy, at most
  // kMaxAnswerTokens, stop at EOS or a newline, in both.
  struct Answer {
    std::string text;
    int64_t entries_full = 0, entries_kept = 0;
  };
  auto max_answer_tokens = [&](const bench::TaskSample& s) {
    return std::min<int32_t>(bench::kMaxAnswerTokens, c.max_context_tokens - static_cast<int32_t>(s.prompt_ids.size()));
  };
  auto answer_here = [&](const bench::TaskSample& s, const gates::EvictionSpec& spec,
                         const gates::PolicyOptions& options) -> absl::StatusOr<Answer> {
    KVGATE_ASSIGN_OR_RETURN(std::unique_ptr<engine::KvPlanner> planner,
                            kv::CreatePolicyPlanner(*model, pool.get(), spec, options, tokenizer.get()));
    engine::GenerateOptions generate;
    generate.max_tokens = max_answer_tokens(s);
    generate.sampling.temperature = 0.0f;
    generate.stop = {"\n"};
    KVGATE_ASSIGN_OR_RETURN(auto result, generator->Generate(s.prompt_ids, generate, nullptr, planner.get()));
    return Answer{result.text, result.kv.kv_entries_full, result.kv.kv_entries_kept};
  };
  auto answer_remotely = [&](const bench::TaskSample& s, const gates::EvictionSpec& spec) -> absl::StatusOr<Answer> {
    kvgate::v1::GenerateRequest request;
    request.mutable_tokens()->mutable_ids()->Add(s.prompt_ids.begin(), s.prompt_ids.end());
    request.mutable_sampling()->set_max_tokens(max_answer_tokens(s));
    request.mutable_sampling()->set_temperature(0.0f);
    request.mutable_sampling()->add_stop("\n");
    request.mutable_compression()->set_policy(spec.policy);
    request.mutable_compression()->set_keep_ratio(spec.keep_ratio);  // 0: unset, as in the spec
    KVGATE_ASSIGN_OR_RETURN(RemoteCompletion completion, client->Complete(request, command.timeout_ms));
    return Answer{completion.text, completion.complete.kv().kv_entries_full(), completion.complete.kv().kv_entries_kept()};
  };

  // full keeps everything whatever the ratio: it runs once, reported at keep ratio 1.
  std::vector<Run> runs;
  auto add_run = [&runs](const std::string& policy, double keep_ratio) {
    Run run;
    run.policy = policy;
    run.keep_ratio = keep_ratio;
    runs.push_back(std::move(run));
  };
  for (const std::string& p : command.policies) {
    if (p == "full") {
      add_run(p, 1.0);
    } else {
      for (double r : command.keep_ratios) add_run(p, r);
    }
  }
  for (Run& run : runs) {
    const auto run_start = std::chrono::steady_clock::now();
    gates::EvictionSpec spec;
    spec.policy = run.policy;
    if (run.policy != "full") spec.keep_ratio = static_cast<float>(run.keep_ratio);
    std::vector<absl::StatusOr<Answer>> answers(samples.size(), absl::UnknownError("not answered"));
    if (remote) {
      // --concurrency requests in flight, so the server batches them as it would a user's.
      std::atomic<size_t> next{0};
      std::vector<std::thread> senders;
      const size_t threads = std::min<size_t>(static_cast<size_t>(command.concurrency), samples.size());
      for (size_t t = 0; t < threads; ++t) {
        senders.emplace_back([&] {
          for (size_t i = next++; i < samples.size(); i = next++) answers[i] = answer_remotely(samples[i], spec);
        });
      }
      for (std::thread& sender : senders) sender.join();
    } else {
      for (size_t i = 0; i < samples.size(); ++i) answers[i] = answer_here(samples[i], spec, policy_options[run.policy]);
    }
    for (size_t i = 0; i < samples.size(); ++i) {
      const bench::TaskSample& s = samples[i];
      const absl::StatusOr<Answer>& answer = answers[i];
      if (!answer.ok()) {
        return absl::Status(answer.status().code(),
                            absl::StrCat(run.policy, " keep ", run.keep_ratio, " on ", bench::TaskName(s.task), " context ",
                                         s.context_tokens, " sample ", s.index, ": ", answer.status().message()));
      }
      run.correct.push_back(bench::IsExactMatch(answer->text, s.content.answer) ? 1 : 0);
      run.outputs.push_back(answer->text);
      run.sample_full.push_back(answer->entries_full);
      run.sample_kept.push_back(answer->entries_kept);
      run.entries_full += answer->entries_full;
      run.entries_kept += answer->entries_kept;
    }
    run.seconds = seconds_since(run_start);
    int32_t correct = 0;
    for (uint8_t x : run.correct) correct += x;
    log(absl::StrFormat("%-14s keep %s: %d/%d correct, kept %.3f of the prompt cache (%.1f s)", run.policy,
                        Ratio(run.keep_ratio), correct, run.correct.size(),
                        run.entries_full > 0 ? double(run.entries_kept) / run.entries_full : 1.0, run.seconds));
  }

  // --- Aggregation ---
  auto cell_of = [&](const Run& run, auto&& select) {
    Cell cell;
    for (size_t i = 0; i < samples.size(); ++i) {
      if (!select(samples[i])) continue;
      ++cell.samples;
      cell.correct += run.correct[i];
      cell.entries_full += run.sample_full[i];
      cell.entries_kept += run.sample_kept[i];
    }
    return cell;
  };
  auto task_context_cell = [&](const Run& run, RetrievalTask task, int32_t context) {
    return cell_of(run, [&](const bench::TaskSample& s) { return s.task == task && s.context_tokens == context; });
  };
  // Mean over (task, context) cells.
  auto task_mean = [&](const Run& run, RetrievalTask task) {
    double sum = 0;
    for (int32_t context : command.contexts) sum += task_context_cell(run, task, context).accuracy();
    return sum / command.contexts.size();
  };
  auto overall_mean = [&](const Run& run) {
    double sum = 0;
    for (RetrievalTask task : command.tasks) sum += task_mean(run, task);
    return sum / command.tasks.size();
  };
  auto kept_fraction = [](const Run& run) {
    return run.entries_full > 0 ? double(run.entries_kept) / run.entries_full : 1.0;
  };

  const double elapsed = seconds_since(t0);
  std::string device;
  if (remote) {
    device = absl::StrCat("the kvgate server at ", command.server, ", ", command.concurrency, " requests in flight");
  } else if (backend->Name() == "cpu") {
    device = absl::StrCat("cpu (", CpuModel(), ", ",
                          command.threads.value_or(static_cast<int32_t>(std::thread::hardware_concurrency())), " threads)");
  } else {
    device = std::string(backend->Name());
    const std::string index = device.find(':') != std::string::npos ? device.substr(device.find(':') + 1) : "0";
    const std::string gpu = CommandLine(
        absl::StrCat("nvidia-smi --query-gpu=name --format=csv,noheader -i ", index, " 2>/dev/null"), "");
    if (!gpu.empty()) device = absl::StrCat(device, " (", gpu, ")");
  }
  const std::string date = UtcNow(), commit = GitCommit();
  std::vector<std::string> task_names, context_names;
  for (RetrievalTask task : command.tasks) task_names.emplace_back(bench::TaskName(task));
  for (int32_t context : command.contexts) context_names.push_back(absl::StrCat(context));

  // --- Markdown / terminal report ---
  std::string md = "# kvgate eval: retrieval accuracy under KV eviction\n\n";
  md += absl::StrFormat(
      "- model: `%s` (%s, %d layers, %d heads / %d kv heads, head_dim %d, context %d, %.1fM parameters)\n"
      "- device: %s\n- date: %s\n- commit: %s\n"
      "- seed %d, %d samples per task and context%s, haystack: %s\n"
      "- tasks: %s; contexts: %s tokens (prompt + answer fill the context minus %d)\n"
      "- scoring: greedy, at most %d new tokens, stop at EOS or newline, exact match (bench/retrieval_tasks.md)\n"
      "- kept fraction: KV entries of the prompt kept after eviction (all layers and kv heads); "
      "`full` keeps everything and runs once\n",
      command.model_dir, c.architecture_name, c.num_layers, c.num_heads, c.num_kv_heads, c.head_dim,
      c.max_context_tokens, c.NumParameters() / 1e6, device, date, commit, command.seed, command.samples,
      command.depths.empty() ? "" : absl::StrCat(" (niah_single: per depth ", absl::StrJoin(command.depths, ", "), ")"),
      command.haystack_path ? absl::StrCat("`", *command.haystack_path, "`") : "generated (5 sentences)",
      absl::StrJoin(task_names, ", "), absl::StrJoin(context_names, ", "), bench::kContextMarginTokens,
      bench::kMaxAnswerTokens);
  if (!gates_json.empty()) {
    std::vector<std::string> parts;
    for (const auto& [name, source] : gates_json.items()) parts.push_back(absl::StrCat(name, ": ", source.get<std::string>()));
    md += absl::StrCat("- gates: ", absl::StrJoin(parts, "; "), "\n");
  }
  md += absl::StrFormat("- elapsed: %.1f s for %d prompts x %d runs\n\n", elapsed, samples.size(), runs.size());

  md += "## Accuracy averaged over contexts (mean: over tasks too)\n\n";
  {
    std::vector<std::string> header = {"policy", "keep ratio", "kept", "evicted", "mean"};
    header.insert(header.end(), task_names.begin(), task_names.end());
    header.push_back("time s");
    Table table(header, 1);
    for (const Run& run : runs) {
      std::vector<std::string> row = {run.policy, Ratio(run.keep_ratio), absl::StrFormat("%.3f", kept_fraction(run)),
                                      absl::StrFormat("%.3f", 1.0 - kept_fraction(run)), Accuracy(overall_mean(run))};
      for (RetrievalTask task : command.tasks) row.push_back(Accuracy(task_mean(run, task)));
      row.push_back(absl::StrFormat("%.1f", run.seconds));
      table.Add(std::move(row));
    }
    md += table.Render() + "\n";
  }
  md += "## Accuracy per task and context\n\n";
  {
    std::vector<std::string> header = {"policy", "keep ratio", "task"};
    header.insert(header.end(), context_names.begin(), context_names.end());
    Table table(header, 3);
    for (const Run& run : runs) {
      for (RetrievalTask task : command.tasks) {
        std::vector<std::string> row = {run.policy, Ratio(run.keep_ratio), std::string(bench::TaskName(task))};
        for (int32_t context : command.contexts) row.push_back(Accuracy(task_context_cell(run, task, context).accuracy()));
        table.Add(std::move(row));
      }
    }
    md += table.Render();
  }
  if (!command.depths.empty()) {
    md += "\n## niah_single by needle depth\n\n";
    std::vector<std::string> header = {"policy", "keep ratio", "context"};
    for (double d : command.depths) header.push_back(absl::StrCat("depth ", DepthName(d)));
    Table table(header, 3);
    for (const Run& run : runs) {
      for (int32_t context : command.contexts) {
        std::vector<std::string> row = {run.policy, Ratio(run.keep_ratio), absl::StrCat(context)};
        for (double d : command.depths) {
          row.push_back(Accuracy(cell_of(run, [&](const bench::TaskSample& s) {
                                   return s.task == RetrievalTask::kNiahSingle && s.context_tokens == context &&
                                          s.forced_depth == d;
                                 }).accuracy()));
        }
        table.Add(std::move(row));
      }
    }
    md += table.Render();
  }
  std::cout << md << std::flush;
  if (!command.markdown_path.empty()) {
    std::ofstream out(command.markdown_path);
    out << md;
    if (!out) return absl::InternalError(absl::StrCat("cannot write --markdown ", command.markdown_path));
  }

  // --- JSON ---
  if (!command.json_path.empty()) {
    json out = {
        {"model", command.model_dir},
        {"model_config",
         {{"architecture", c.architecture_name},
          {"num_layers", c.num_layers},
          {"num_heads", c.num_heads},
          {"num_kv_heads", c.num_kv_heads},
          {"head_dim", c.head_dim},
          {"hidden_size", c.hidden_size},
          {"max_context_tokens", c.max_context_tokens},
          {"parameters", c.NumParameters()}}},
        {"device", device},
        {"backend", remote ? std::string("server") : std::string(backend->Name())},
        {"date", date},
        {"commit", commit},
        {"seed", command.seed},
        {"samples", command.samples},
        {"tasks", task_names},
        {"contexts", command.contexts},
        {"policies", command.policies},
        {"keep_ratios", command.keep_ratios},
        {"depths", command.depths},
        {"haystack", command.haystack_path ? *command.haystack_path : "generated"},
        {"gates", gates_json},
        {"scoring",
         {{"decoding", "greedy"},
          {"max_new_tokens", bench::kMaxAnswerTokens},
          {"stop", "eos or newline"},
          {"match", "exact after trimming"},
          {"context_margin_tokens", bench::kContextMarginTokens}}},
        {"elapsed_s", elapsed},
    };
    if (command.threads) out["threads"] = *command.threads;
    if (remote) {
      out["server"] = command.server;
      out["concurrency"] = command.concurrency;
    }
    json sample_list = json::array();
    for (size_t i = 0; i < samples.size(); ++i) {
      const bench::TaskSample& s = samples[i];
      sample_list.push_back({{"id", i},
                             {"task", bench::TaskName(s.task)},
                             {"context", s.context_tokens},
                             {"index", s.index},
                             {"depth", s.forced_depth ? json(*s.forced_depth) : json(nullptr)},
                             {"seed", s.seed},
                             {"prompt_tokens", s.prompt_ids.size()},
                             {"total_tokens", s.total_tokens},
                             {"filler_sentences", s.filler_sentences},
                             {"answer", s.content.answer.substr(1)}});
    }
    out["sample_list"] = std::move(sample_list);
    json runs_json = json::array(), results = json::array(), depth_results = json::array();
    for (const Run& run : runs) {
      runs_json.push_back({{"policy", run.policy},
                           {"keep_ratio", run.keep_ratio},
                           {"kept_fraction", kept_fraction(run)},
                           {"eviction_rate", 1.0 - kept_fraction(run)},
                           {"accuracy", overall_mean(run)},
                           {"elapsed_s", run.seconds},
                           {"correct", run.correct},
                           {"outputs", run.outputs}});
      for (RetrievalTask task : command.tasks) {
        for (int32_t context : command.contexts) {
          const Cell cell = task_context_cell(run, task, context);
          results.push_back({{"policy", run.policy},
                             {"keep_ratio", run.keep_ratio},
                             {"task", bench::TaskName(task)},
                             {"context", context},
                             {"samples", cell.samples},
                             {"correct", cell.correct},
                             {"accuracy", cell.accuracy()},
                             {"kept_fraction", cell.kept_fraction()}});
        }
      }
      for (int32_t context : command.contexts) {
        for (double d : command.depths) {
          const Cell cell = cell_of(run, [&](const bench::TaskSample& s) {
            return s.task == RetrievalTask::kNiahSingle && s.context_tokens == context && s.forced_depth == d;
          });
          depth_results.push_back({{"policy", run.policy},
                                   {"keep_ratio", run.keep_ratio},
                                   {"task", "niah_single"},
                                   {"context", context},
                                   {"depth", d},
                                   {"samples", cell.samples},
                                   {"correct", cell.correct},
                                   {"accuracy", cell.accuracy()}});
        }
      }
    }
    out["runs"] = std::move(runs_json);
    out["results"] = std::move(results);
    out["depth_results"] = std::move(depth_results);
    std::ofstream file(command.json_path);
    file << out.dump(1) << "\n";
    if (!file) return absl::InternalError(absl::StrCat("cannot write --json ", command.json_path));
  }
  return absl::OkStatus();
}

}  // namespace

int RunEval(const std::vector<std::string>& args) {
  if (args.size() == 1 && (args[0] == "--help" || args[0] == "-h")) {
    std::cout << kUsage;
    return 0;
  }
  auto command = ParseEval(args);
  if (!command.ok()) {
    std::cerr << "kvgate eval: " << command.status().message() << "\n" << kUsage;
    return 2;
  }
  int exit_code = 1;
  absl::Status status = Eval(*command, &exit_code);
  if (!status.ok()) {
    if (exit_code == 2) {
      std::cerr << "kvgate eval: " << status.message() << "\n" << kUsage;
      return 2;
    }
    std::cerr << "kvgate eval: " << absl::StatusCodeToString(status.code()) << ": " << status.message() << "\n";
    return 1;
  }
  return 0;
}

}  // namespace kvgate::cli
