// `kvgate bench`: a load generator for the streaming kvgate.v1.Inference/Generate.
//
// Two ways to offer load:
//   closed loop  --concurrency N: N streams at all times; a finished one starts the next.
//   open loop    --rate R: requests arrive as a Poisson process of R requests/s, whether or
//                not earlier ones finished (at most --max-inflight at once). Every time is
//                measured from the request's scheduled arrival, so a client that falls
//                behind shows up as latency instead of hiding it (no coordinated omission).
// The run stops after --requests N or --duration S (then streams in flight finish).
//
// Prompts are synthetic token ids with lengths drawn from --prompt-tokens (exact lengths,
// no tokenizer involved) or lines of --prompts-file; outputs have --max-tokens tokens
// (EOS ignored unless --stop-at-eos) so every policy does the same work. --policy-mix draws
// each request's compression policy.
//
// It reports requests/s, output tokens/s, latency, time to first token (TTFT), inter-token
// latency (ITL: the gap between consecutive chunks, shared evenly by the chunk's tokens) and
// time per output token (TPOT: (latency - TTFT) / (tokens - 1)) at p50/p90/p95/p99/p99.9,
// goodput (requests/s that met --ttft-target-ms and --tpot-target-ms), the KV bytes moved
// from prefill to decode against the full cache, and errors by status code. --json writes
// ghz's summary fields (count, total, average, fastest, slowest, rps, errorDistribution,
// statusCodeDistribution, latencyDistribution, histogram, details; durations in ns) plus a
// "kvgate" object with the streaming measures, so a ghz dashboard reads the file.
#include <algorithm>
#include <atomic>
#include <chrono>
#include <cmath>
#include <condition_variable>
#include <csignal>
#include <cstdio>
#include <cstdlib>
#include <ctime>
#include <deque>
#include <fstream>
#include <iostream>
#include <map>
#include <memory>
#include <mutex>
#include <optional>
#include <random>
#include <sstream>
#include <string>
#include <thread>
#include <vector>

#include <grpcpp/grpcpp.h>
#include <unistd.h>

#include "absl/status/status.h"
#include "absl/status/statusor.h"
#include "absl/strings/numbers.h"
#include "absl/strings/str_cat.h"
#include "absl/strings/str_format.h"
#include "absl/strings/str_split.h"
#include "absl/strings/strip.h"
#include "cli/commands.h"
#include "cli/flags.h"
#include "cli/inference_client.h"
#include "common/status_macros.h"
#include "kvgate/v1/inference.grpc.pb.h"
#include "nlohmann/json.hpp"

namespace kvgate::cli {
namespace {

using Clock = std::chrono::steady_clock;
using nlohmann::json;

// Set by SIGINT: no new requests start, streams in flight finish, the report is printed.
std::atomic<bool> g_interrupted{false};

constexpr char kUsage[] =
    "usage: kvgate bench --server HOST:PORT\n"
    "         [--concurrency N=8 | --rate R (requests/s, Poisson) [--max-inflight N=256]]\n"
    "         [--requests N=100 | --duration S] [--warmup N=0]\n"
    "         [--prompt-tokens DIST=128 | --prompts-file F] [--max-tokens DIST=64] [--stop-at-eos]\n"
    "         [--policy-mix full:1,fast_kvzip@0.3:1,...] [--temperature T=0] [--seed S=1]\n"
    "         [--ttft-target-ms X] [--tpot-target-ms Y] [--timeout-ms N=600000]\n"
    "         [--tls-ca F [--tls-cert F --tls-key F]] [--token-file F | $KVGATE_TOKEN]\n"
    "         [--json OUT] [--name NAME] [--quiet]\n"
    "  DIST: N (fixed), A-B (uniform integers), or N:W,M:W (weighted choices)\n"
    "  policy mix: NAME[@KEEP_RATIO]:WEIGHT, comma separated\n";

// ---------------------------------------------------------------- distributions

// A distribution of positive integers: fixed, uniform A-B, or weighted choices.
struct IntDist {
  std::vector<std::pair<int32_t, double>> choices;  // value, cumulative weight
  int32_t lo = 0, hi = -1;                          // uniform when hi >= lo

  int32_t Sample(std::mt19937_64& rng) const {
    if (hi >= lo) return std::uniform_int_distribution<int32_t>(lo, hi)(rng);
    const double u = std::uniform_real_distribution<double>(0, choices.back().second)(rng);
    for (const auto& [value, cumulative] : choices) {
      if (u < cumulative) return value;
    }
    return choices.back().first;
  }
  int32_t Max() const {
    if (hi >= lo) return hi;
    int32_t m = 0;
    for (const auto& c : choices) m = std::max(m, c.first);
    return m;
  }
};

absl::StatusOr<IntDist> ParseIntDist(const std::string& flag, const std::string& text) {
  IntDist d;
  auto bad = [&] { return absl::InvalidArgumentError(absl::StrCat("--", flag, " '", text, "': expected N, A-B or N:W,M:W")); };
  if (text.find(':') == std::string::npos && text.find(',') == std::string::npos) {
    std::vector<std::string> ab = absl::StrSplit(text, '-');
    int32_t a = 0, b = 0;
    if (ab.size() == 1 && absl::SimpleAtoi(ab[0], &a) && a > 0) {
      d.choices = {{a, 1.0}};
      return d;
    }
    if (ab.size() == 2 && absl::SimpleAtoi(ab[0], &a) && absl::SimpleAtoi(ab[1], &b) && a > 0 && b >= a) {
      d.lo = a;
      d.hi = b;
      return d;
    }
    return bad();
  }
  double total = 0;
  for (absl::string_view part : absl::StrSplit(text, ',')) {
    std::vector<std::string> vw = absl::StrSplit(part, ':');
    int32_t v = 0;
    double w = 1;
    if (vw.empty() || vw.size() > 2 || !absl::SimpleAtoi(vw[0], &v) || v <= 0) return bad();
    if (vw.size() == 2 && (!absl::SimpleAtod(vw[1], &w) || !(w > 0))) return bad();
    total += w;
    d.choices.emplace_back(v, total);
  }
  return d;
}

struct PolicyChoice {
  std::string name;                  // "" = the server's default
  std::optional<float> keep_ratio;
  double cumulative = 0;
  std::string Label() const {
    if (name.empty()) return "default";
    return keep_ratio ? absl::StrCat(name, "@", *keep_ratio) : name;
  }
};

absl::StatusOr<std::vector<PolicyChoice>> ParsePolicyMix(const std::string& text) {
  std::vector<PolicyChoice> mix;
  double total = 0;
  for (absl::string_view part : absl::StrSplit(text, ',')) {
    std::vector<std::string> pw = absl::StrSplit(part, ':');
    PolicyChoice c;
    double w = 1;
    if (pw.empty() || pw.size() > 2 || pw[0].empty()) {
      return absl::InvalidArgumentError(absl::StrCat("--policy-mix: bad entry '", part, "'"));
    }
    if (pw.size() == 2 && (!absl::SimpleAtod(pw[1], &w) || !(w > 0))) {
      return absl::InvalidArgumentError(absl::StrCat("--policy-mix: bad weight in '", part, "'"));
    }
    std::vector<std::string> nr = absl::StrSplit(pw[0], '@');
    c.name = nr[0];
    if (nr.size() == 2) {
      float r = 0;
      if (!absl::SimpleAtof(nr[1], &r) || !(r > 0) || r > 1) {
        return absl::InvalidArgumentError(absl::StrCat("--policy-mix: keep ratio of '", part, "' must be in (0, 1]"));
      }
      c.keep_ratio = r;
    } else if (nr.size() > 2) {
      return absl::InvalidArgumentError(absl::StrCat("--policy-mix: bad entry '", part, "'"));
    }
    total += w;
    c.cumulative = total;
    mix.push_back(c);
  }
  return mix;
}

// ---------------------------------------------------------------- configuration

struct BenchConfig {
  std::string server;
  std::string name = "kvgate bench";
  int32_t concurrency = 8;
  double rate = 0;  // requests/s; 0 = closed loop
  int32_t max_inflight = 256;
  int64_t requests = 100;
  double duration_s = 0;  // 0 = use requests
  int32_t warmup = 0;
  IntDist prompt_tokens;
  std::vector<std::string> prompts;  // from --prompts-file
  IntDist max_tokens;
  bool stop_at_eos = false;
  std::vector<PolicyChoice> policy_mix;
  float temperature = 0;
  uint64_t seed = 1;
  double ttft_target_ms = 0, tpot_target_ms = 0;  // 0 = no target
  int64_t timeout_ms = 600000;
  std::string tls_ca, tls_cert, tls_key, token;
  std::string json_out;
  bool quiet = false;
};

absl::StatusOr<std::string> ReadWholeFile(const std::string& flag, const std::string& path) {
  std::ifstream in(path, std::ios::binary);
  if (!in) return absl::NotFoundError(absl::StrCat("--", flag, ": cannot read '", path, "'"));
  std::stringstream s;
  s << in.rdbuf();
  return s.str();
}

absl::StatusOr<BenchConfig> ParseBench(const std::vector<std::string>& args) {
  KVGATE_ASSIGN_OR_RETURN(
      Flags flags,
      Flags::Parse(args,
                   {"server", "concurrency", "rate", "max-inflight", "requests", "duration", "warmup", "prompt-tokens",
                    "prompts-file", "max-tokens", "policy-mix", "temperature", "seed", "ttft-target-ms",
                    "tpot-target-ms", "timeout-ms", "tls-ca", "tls-cert", "tls-key", "token-file", "json", "name"},
                   {"stop-at-eos", "quiet"}));
  BenchConfig c;
  auto server = flags.String("server");
  if (!server || server->empty()) return absl::InvalidArgumentError("--server HOST:PORT is required");
  c.server = *server;
  if (flags.Has("concurrency") && flags.Has("rate")) {
    return absl::InvalidArgumentError("give --concurrency (closed loop) or --rate (open loop), not both");
  }
  if (flags.Has("requests") && flags.Has("duration")) {
    return absl::InvalidArgumentError("give --requests or --duration, not both");
  }
  auto int_flag = [&](const char* name, int64_t lo, int64_t hi, auto* out) -> absl::Status {
    KVGATE_ASSIGN_OR_RETURN(auto value, flags.Int(name));
    if (!value) return absl::OkStatus();
    if (*value < lo || *value > hi) {
      return absl::InvalidArgumentError(absl::StrCat("--", name, " must be in [", lo, ", ", hi, "]"));
    }
    *out = static_cast<std::remove_reference_t<decltype(*out)>>(*value);
    return absl::OkStatus();
  };
  auto double_flag = [&](const char* name, double lo, auto* out) -> absl::Status {
    KVGATE_ASSIGN_OR_RETURN(auto value, flags.Double(name));
    if (!value) return absl::OkStatus();
    if (!(*value >= lo) || !std::isfinite(*value)) {
      return absl::InvalidArgumentError(absl::StrCat("--", name, " must be a number >= ", lo));
    }
    *out = static_cast<std::remove_reference_t<decltype(*out)>>(*value);
    return absl::OkStatus();
  };
  KVGATE_RETURN_IF_ERROR(int_flag("concurrency", 1, 100000, &c.concurrency));
  KVGATE_RETURN_IF_ERROR(double_flag("rate", 0, &c.rate));
  if (flags.Has("rate") && !(c.rate > 0)) return absl::InvalidArgumentError("--rate must be > 0 requests/s");
  KVGATE_RETURN_IF_ERROR(int_flag("max-inflight", 1, 100000, &c.max_inflight));
  KVGATE_RETURN_IF_ERROR(int_flag("requests", 1, int64_t{1} << 40, &c.requests));
  KVGATE_RETURN_IF_ERROR(double_flag("duration", 0, &c.duration_s));
  if (flags.Has("duration") && !(c.duration_s > 0)) return absl::InvalidArgumentError("--duration must be > 0 s");
  KVGATE_RETURN_IF_ERROR(int_flag("warmup", 0, 1000000, &c.warmup));
  KVGATE_ASSIGN_OR_RETURN(c.prompt_tokens, ParseIntDist("prompt-tokens", flags.String("prompt-tokens").value_or("128")));
  KVGATE_ASSIGN_OR_RETURN(c.max_tokens, ParseIntDist("max-tokens", flags.String("max-tokens").value_or("64")));
  if (auto file = flags.String("prompts-file")) {
    if (flags.Has("prompt-tokens")) return absl::InvalidArgumentError("give --prompt-tokens or --prompts-file, not both");
    KVGATE_ASSIGN_OR_RETURN(std::string text, ReadWholeFile("prompts-file", *file));
    for (absl::string_view line : absl::StrSplit(text, '\n')) {
      line = absl::StripTrailingAsciiWhitespace(line);
      if (!line.empty()) c.prompts.emplace_back(line);
    }
    if (c.prompts.empty()) return absl::InvalidArgumentError(absl::StrCat("--prompts-file '", *file, "' has no prompt"));
  }
  c.stop_at_eos = flags.Has("stop-at-eos");
  if (auto mix = flags.String("policy-mix")) {
    KVGATE_ASSIGN_OR_RETURN(c.policy_mix, ParsePolicyMix(*mix));
  } else {
    c.policy_mix = {PolicyChoice{"", std::nullopt, 1.0}};  // the server's default policy
  }
  KVGATE_RETURN_IF_ERROR(double_flag("temperature", 0, &c.temperature));
  KVGATE_RETURN_IF_ERROR(int_flag("seed", 0, std::numeric_limits<int64_t>::max(), &c.seed));
  KVGATE_RETURN_IF_ERROR(double_flag("ttft-target-ms", 0, &c.ttft_target_ms));
  KVGATE_RETURN_IF_ERROR(double_flag("tpot-target-ms", 0, &c.tpot_target_ms));
  KVGATE_RETURN_IF_ERROR(int_flag("timeout-ms", 1, int64_t{1} << 40, &c.timeout_ms));
  c.tls_ca = flags.String("tls-ca").value_or("");
  c.tls_cert = flags.String("tls-cert").value_or("");
  c.tls_key = flags.String("tls-key").value_or("");
  if (c.tls_cert.empty() != c.tls_key.empty()) return absl::InvalidArgumentError("--tls-cert and --tls-key go together");
  if (!c.tls_cert.empty() && c.tls_ca.empty()) return absl::InvalidArgumentError("--tls-cert needs --tls-ca");
  if (auto file = flags.String("token-file")) {
    KVGATE_ASSIGN_OR_RETURN(std::string token, ReadWholeFile("token-file", *file));
    c.token = std::string(absl::StripAsciiWhitespace(token));
    if (c.token.empty()) return absl::InvalidArgumentError(absl::StrCat("--token-file '", *file, "' is empty"));
  } else if (const char* env = std::getenv("KVGATE_TOKEN"); env != nullptr && *env != '\0') {
    c.token = env;
  }
  c.json_out = flags.String("json").value_or("");
  c.name = flags.String("name").value_or(c.name);
  c.quiet = flags.Has("quiet");
  return c;
}

// ---------------------------------------------------------------- one request

struct Result {
  Clock::time_point scheduled;  // arrival time (open loop) or start (closed loop)
  std::chrono::system_clock::time_point wall_start;
  double latency_ms = 0, ttft_ms = -1;
  std::vector<double> itl_ms;  // one per output token after the first
  int32_t prompt_tokens = 0, output_tokens = 0;
  int64_t bytes_transferred = 0, bytes_full = 0;
  grpc::StatusCode code = grpc::StatusCode::OK;
  std::string error;
  std::string policy;
  bool complete = false;  // the stream carried its GenerateComplete
};

// Status names as grpc-go prints them (ghz's statusCodeDistribution keys).
std::string CodeName(grpc::StatusCode code) {
  switch (code) {
    case grpc::StatusCode::OK: return "OK";
    case grpc::StatusCode::CANCELLED: return "Canceled";
    case grpc::StatusCode::UNKNOWN: return "Unknown";
    case grpc::StatusCode::INVALID_ARGUMENT: return "InvalidArgument";
    case grpc::StatusCode::DEADLINE_EXCEEDED: return "DeadlineExceeded";
    case grpc::StatusCode::NOT_FOUND: return "NotFound";
    case grpc::StatusCode::ALREADY_EXISTS: return "AlreadyExists";
    case grpc::StatusCode::PERMISSION_DENIED: return "PermissionDenied";
    case grpc::StatusCode::RESOURCE_EXHAUSTED: return "ResourceExhausted";
    case grpc::StatusCode::FAILED_PRECONDITION: return "FailedPrecondition";
    case grpc::StatusCode::ABORTED: return "Aborted";
    case grpc::StatusCode::OUT_OF_RANGE: return "OutOfRange";
    case grpc::StatusCode::UNIMPLEMENTED: return "Unimplemented";
    case grpc::StatusCode::INTERNAL: return "Internal";
    case grpc::StatusCode::UNAVAILABLE: return "Unavailable";
    case grpc::StatusCode::DATA_LOSS: return "DataLoss";
    case grpc::StatusCode::UNAUTHENTICATED: return "Unauthenticated";
    case grpc::StatusCode::DO_NOT_USE: break;
  }
  return absl::StrCat("Code(", static_cast<int>(code), ")");
}

double Ms(Clock::duration d) { return std::chrono::duration<double, std::milli>(d).count(); }

Result RunOne(v1::Inference::Stub& stub, const BenchConfig& config, const v1::GenerateRequest& request,
              Clock::time_point scheduled, const std::string& policy_label) {
  Result r;
  r.scheduled = scheduled;
  r.wall_start = std::chrono::system_clock::now() - std::chrono::duration_cast<std::chrono::system_clock::duration>(
                                                        Clock::now() - scheduled);
  r.policy = policy_label;
  r.prompt_tokens = request.has_tokens() ? request.tokens().ids_size() : 0;
  grpc::ClientContext context;
  context.set_deadline(std::chrono::system_clock::now() + std::chrono::milliseconds(config.timeout_ms));
  if (!config.token.empty()) context.AddMetadata("authorization", absl::StrCat("Bearer ", config.token));
  std::unique_ptr<grpc::ClientReader<v1::GenerateResponse>> reader = stub.Generate(&context, request);
  v1::GenerateResponse response;
  Clock::time_point last = scheduled;
  while (reader->Read(&response)) {
    const Clock::time_point now = Clock::now();
    if (response.has_chunk()) {
      const int n = response.chunk().token_ids_size();
      if (n == 0) continue;
      if (r.ttft_ms < 0) {
        r.ttft_ms = Ms(now - scheduled);
        for (int i = 1; i < n; ++i) r.itl_ms.push_back(0);  // tokens that came with the first
      } else {
        const double gap = Ms(now - last) / n;
        for (int i = 0; i < n; ++i) r.itl_ms.push_back(gap);
      }
      r.output_tokens += n;
      last = now;
    } else if (response.has_complete()) {
      const auto& complete = response.complete();
      r.complete = true;
      if (complete.usage().prompt_tokens() > 0) r.prompt_tokens = complete.usage().prompt_tokens();
      r.bytes_transferred = complete.kv().bytes_transferred();
      r.bytes_full = complete.kv().bytes_full();
    }
  }
  const grpc::Status status = reader->Finish();
  r.latency_ms = Ms(Clock::now() - scheduled);
  r.code = status.error_code();
  if (!status.ok()) {
    r.error = absl::StrCat("rpc error: code = ", CodeName(status.error_code()), " desc = ", status.error_message());
  } else if (!r.complete) {
    r.code = grpc::StatusCode::UNKNOWN;
    r.error = "stream ended OK without a GenerateComplete message";
  }
  return r;
}

// ---------------------------------------------------------------- statistics

double Percentile(std::vector<double> v, double p) {  // nearest rank on a sorted copy
  if (v.empty()) return 0;
  std::sort(v.begin(), v.end());
  const size_t rank = static_cast<size_t>(std::ceil(p / 100.0 * v.size()));
  return v[std::min(v.size() - 1, rank == 0 ? 0 : rank - 1)];
}

json Summary(const std::vector<double>& v) {
  json j;
  double sum = 0;
  for (double x : v) sum += x;
  j["count"] = v.size();
  j["mean"] = v.empty() ? 0.0 : sum / v.size();
  for (auto [key, p] : {std::pair{"p50", 50.0}, {"p90", 90.0}, {"p95", 95.0}, {"p99", 99.0}, {"p99.9", 99.9}}) {
    j[key] = Percentile(v, p);
  }
  j["max"] = v.empty() ? 0.0 : *std::max_element(v.begin(), v.end());
  return j;
}

int64_t Ns(double ms) { return static_cast<int64_t>(std::llround(ms * 1e6)); }

std::string Rfc3339(std::chrono::system_clock::time_point t) {
  const std::time_t tt = std::chrono::system_clock::to_time_t(t);
  std::tm tm{};
  gmtime_r(&tt, &tm);
  char buf[32];
  std::strftime(buf, sizeof(buf), "%Y-%m-%dT%H:%M:%SZ", &tm);
  return buf;
}

std::string Rfc3339Nano(std::chrono::system_clock::time_point t) {
  const auto ns = std::chrono::duration_cast<std::chrono::nanoseconds>(t.time_since_epoch()).count() % 1000000000;
  std::string s = Rfc3339(t);
  s.pop_back();  // Z
  return absl::StrFormat("%s.%09dZ", s, ns);
}

// ---------------------------------------------------------------- the run

class Bench {
 public:
  explicit Bench(BenchConfig config) : config_(std::move(config)), rng_(config_.seed) {}

  absl::Status Run() {
    KVGATE_ASSIGN_OR_RETURN(std::shared_ptr<grpc::ChannelCredentials> credentials,
                            ChannelCredentialsFor({config_.tls_ca, config_.tls_cert, config_.tls_key, ""}));
    // A few channels so that many streams do not share one HTTP/2 connection's limits.
    const int channels = std::clamp(Workers() / 64 + 1, 1, 8);
    for (int i = 0; i < channels; ++i) {
      grpc::ChannelArguments args;
      args.SetInt("kvgate.bench.channel", i);  // distinct args: distinct connections
      stubs_.push_back(v1::Inference::NewStub(grpc::CreateCustomChannel(config_.server, credentials, args)));
    }
    KVGATE_RETURN_IF_ERROR(FetchModelInfo());
    if (config_.warmup > 0) Warmup();

    start_ = Clock::now();
    wall_start_ = std::chrono::system_clock::now();
    std::thread progress([this] { ProgressLoop(); });
    std::vector<std::thread> workers;
    if (config_.rate > 0) {
      std::thread arrivals([this] { ArrivalLoop(); });
      for (int i = 0; i < Workers(); ++i) workers.emplace_back([this, i] { OpenLoopWorker(i); });
      arrivals.join();
    } else {
      for (int i = 0; i < Workers(); ++i) workers.emplace_back([this, i] { ClosedLoopWorker(i); });
    }
    for (auto& w : workers) w.join();
    end_ = Clock::now();
    {
      std::lock_guard<std::mutex> lock(mu_);
      done_ = true;
    }
    progress_cv_.notify_all();
    progress.join();
    return absl::OkStatus();
  }

  json Report() const;
  void PrintText(std::ostream& out) const;

 private:
  int Workers() const { return config_.rate > 0 ? config_.max_inflight : config_.concurrency; }

  absl::Status FetchModelInfo() {
    grpc::ClientContext context;
    context.set_deadline(std::chrono::system_clock::now() + std::chrono::seconds(30));
    if (!config_.token.empty()) context.AddMetadata("authorization", absl::StrCat("Bearer ", config_.token));
    const grpc::Status status = stubs_[0]->GetModelInfo(&context, v1::GetModelInfoRequest(), &model_);
    if (!status.ok()) {
      return absl::UnavailableError(absl::StrCat("GetModelInfo on ", config_.server, ": ", CodeName(status.error_code()),
                                                 ": ", status.error_message()));
    }
    if (config_.prompts.empty() && model_.max_context_tokens() > 0 &&
        config_.prompt_tokens.Max() + config_.max_tokens.Max() > model_.max_context_tokens()) {
      return absl::InvalidArgumentError(absl::StrCat("--prompt-tokens + --max-tokens can reach ",
                                                     config_.prompt_tokens.Max() + config_.max_tokens.Max(),
                                                     " tokens; the model holds ", model_.max_context_tokens()));
    }
    return absl::OkStatus();
  }

  // The next request (thread-safe: one RNG, drawn under the lock, so a seed fixes the run).
  std::pair<v1::GenerateRequest, std::string> NextRequest() {
    std::lock_guard<std::mutex> lock(rng_mu_);
    v1::GenerateRequest request;
    if (!config_.prompts.empty()) {
      request.set_text(config_.prompts[std::uniform_int_distribution<size_t>(0, config_.prompts.size() - 1)(rng_)]);
    } else {
      const int32_t n = config_.prompt_tokens.Sample(rng_);
      // Ids above the special tokens of small vocabularies (the first 3) and below vocab.
      const int32_t vocab = std::max(model_.vocab_size(), 4);
      std::uniform_int_distribution<int32_t> id(std::min(3, vocab - 1), vocab - 1);
      auto* ids = request.mutable_tokens()->mutable_ids();
      ids->Reserve(n);
      for (int32_t i = 0; i < n; ++i) ids->Add(id(rng_));
    }
    auto* sampling = request.mutable_sampling();
    sampling->set_max_tokens(config_.max_tokens.Sample(rng_));
    sampling->set_temperature(config_.temperature);
    sampling->set_seed(rng_());
    sampling->set_ignore_eos(!config_.stop_at_eos);
    request.set_skip_text(config_.prompts.empty());
    const double u = std::uniform_real_distribution<double>(0, config_.policy_mix.back().cumulative)(rng_);
    const PolicyChoice* choice = &config_.policy_mix.back();
    for (const auto& c : config_.policy_mix) {
      if (u < c.cumulative) {
        choice = &c;
        break;
      }
    }
    if (!choice->name.empty()) {
      request.mutable_compression()->set_policy(choice->name);
      if (choice->keep_ratio) request.mutable_compression()->set_keep_ratio(*choice->keep_ratio);
    }
    return {std::move(request), choice->Label()};
  }

  void Warmup() {
    std::vector<std::thread> threads;
    std::atomic<int> left{config_.warmup};
    for (int i = 0; i < std::min(config_.warmup, Workers()); ++i) {
      threads.emplace_back([this, i, &left] {
        while (left.fetch_sub(1) > 0) {
          auto [request, label] = NextRequest();
          (void)RunOne(*stubs_[i % stubs_.size()], config_, request, Clock::now(), label);
        }
      });
    }
    for (auto& t : threads) t.join();
  }

  bool Expired() const {
    return config_.duration_s > 0 && Clock::now() - start_ >= std::chrono::duration<double>(config_.duration_s);
  }

  // Claims the right to start one more request; false when the run is over.
  bool Claim() {
    if (g_interrupted.load()) {
      stop_requested_.store(true);
      return false;
    }
    if (config_.duration_s > 0) return !Expired();
    return issued_.fetch_add(1) < config_.requests;
  }

  void Record(Result r) {
    std::lock_guard<std::mutex> lock(mu_);
    results_.push_back(std::move(r));
  }

  void ClosedLoopWorker(int i) {
    while (Claim()) {
      auto [request, label] = NextRequest();
      in_flight_.fetch_add(1);
      Result r = RunOne(*stubs_[i % stubs_.size()], config_, request, Clock::now(), label);
      in_flight_.fetch_sub(1);
      Record(std::move(r));
    }
  }

  // Poisson arrivals: exponential gaps of mean 1/rate, queued with their scheduled time.
  void ArrivalLoop() {
    std::mt19937_64 rng(config_.seed ^ 0x9e3779b97f4a7c15ULL);
    std::exponential_distribution<double> gap(config_.rate);
    Clock::time_point next = start_;
    while (Claim()) {
      std::this_thread::sleep_until(next);
      {
        std::lock_guard<std::mutex> lock(queue_mu_);
        arrivals_.push_back(next);
        if (static_cast<int>(arrivals_.size()) > max_queued_) max_queued_ = static_cast<int>(arrivals_.size());
      }
      queue_cv_.notify_one();
      next += std::chrono::duration_cast<Clock::duration>(std::chrono::duration<double>(gap(rng)));
    }
    {
      std::lock_guard<std::mutex> lock(queue_mu_);
      arrivals_closed_ = true;
    }
    queue_cv_.notify_all();
  }

  void OpenLoopWorker(int i) {
    while (true) {
      Clock::time_point scheduled;
      {
        std::unique_lock<std::mutex> lock(queue_mu_);
        queue_cv_.wait(lock, [this] { return !arrivals_.empty() || arrivals_closed_; });
        if (arrivals_.empty()) return;
        scheduled = arrivals_.front();
        arrivals_.pop_front();
      }
      auto [request, label] = NextRequest();
      in_flight_.fetch_add(1);
      Result r = RunOne(*stubs_[i % stubs_.size()], config_, request, scheduled, label);
      in_flight_.fetch_sub(1);
      Record(std::move(r));
    }
  }

  void ProgressLoop() {
    const bool tty = isatty(STDERR_FILENO);
    const auto period = std::chrono::milliseconds(tty ? 500 : 2000);
    std::unique_lock<std::mutex> lock(mu_);
    bool printed = false;
    while (!progress_cv_.wait_for(lock, period, [this] { return done_; })) {
      if (config_.quiet) continue;
      const double elapsed = std::chrono::duration<double>(Clock::now() - start_).count();
      int64_t ok = 0, errors = 0, tokens = 0;
      std::vector<double> ttft;
      for (const auto& r : results_) {
        (r.code == grpc::StatusCode::OK ? ok : errors)++;
        tokens += r.output_tokens;
        if (r.code == grpc::StatusCode::OK) ttft.push_back(r.ttft_ms);
      }
      std::string line = absl::StrFormat(
          "[%6.1fs] %lld done (%lld errors), %d in flight, %.1f req/s, %.0f tok/s, TTFT p50 %.1f ms p99 %.1f ms",
          elapsed, static_cast<long long>(ok + errors), static_cast<long long>(errors), in_flight_.load(),
          (ok + errors) / std::max(elapsed, 1e-9), tokens / std::max(elapsed, 1e-9), Percentile(ttft, 50),
          Percentile(ttft, 99));
      std::cerr << (tty ? "\r" : "") << line << (tty ? "\033[K" : "\n") << std::flush;
      printed = true;
    }
    if (printed && tty) std::cerr << "\n";
  }

  BenchConfig config_;
  std::mt19937_64 rng_;
  std::mutex rng_mu_;
  v1::ModelInfo model_;
  std::vector<std::unique_ptr<v1::Inference::Stub>> stubs_;
  Clock::time_point start_, end_;
  std::chrono::system_clock::time_point wall_start_;
  std::atomic<int64_t> issued_{0};
  std::atomic<int> in_flight_{0};
  std::atomic<bool> stop_requested_{false};

  mutable std::mutex mu_;
  std::condition_variable progress_cv_;
  bool done_ = false;
  std::vector<Result> results_;

  std::mutex queue_mu_;
  std::condition_variable queue_cv_;
  std::deque<Clock::time_point> arrivals_;
  bool arrivals_closed_ = false;
  int max_queued_ = 0;
};

json Bench::Report() const {
  std::lock_guard<std::mutex> lock(mu_);
  const double total_ms = Ms(end_ - start_);
  const double total_s = std::max(total_ms / 1000.0, 1e-9);
  std::vector<double> latency_all, latency_ok, ttft, itl, tpot;
  std::map<std::string, int> codes, errors;
  int64_t ok = 0, output_tokens = 0, prompt_tokens = 0, bytes_transferred = 0, bytes_full = 0, good = 0;
  std::map<std::string, json> by_policy;
  std::map<std::string, std::vector<double>> policy_ttft, policy_tpot;
  for (const auto& r : results_) {
    latency_all.push_back(r.latency_ms);
    codes[CodeName(r.code)]++;
    json& p = by_policy[r.policy];
    if (p.is_null()) p = json{{"count", 0}, {"ok", 0}, {"output_tokens", 0}, {"bytes_transferred", 0}, {"bytes_full", 0}};
    p["count"] = p["count"].get<int64_t>() + 1;
    if (r.code != grpc::StatusCode::OK) {
      errors[r.error]++;
      continue;
    }
    ++ok;
    p["ok"] = p["ok"].get<int64_t>() + 1;
    latency_ok.push_back(r.latency_ms);
    ttft.push_back(r.ttft_ms);
    itl.insert(itl.end(), r.itl_ms.begin(), r.itl_ms.end());
    const double request_tpot = r.output_tokens > 1 ? (r.latency_ms - r.ttft_ms) / (r.output_tokens - 1) : 0.0;
    if (r.output_tokens > 1) tpot.push_back(request_tpot);
    output_tokens += r.output_tokens;
    prompt_tokens += r.prompt_tokens;
    bytes_transferred += r.bytes_transferred;
    bytes_full += r.bytes_full;
    p["output_tokens"] = p["output_tokens"].get<int64_t>() + r.output_tokens;
    p["bytes_transferred"] = p["bytes_transferred"].get<int64_t>() + r.bytes_transferred;
    p["bytes_full"] = p["bytes_full"].get<int64_t>() + r.bytes_full;
    policy_ttft[r.policy].push_back(r.ttft_ms);
    if (r.output_tokens > 1) policy_tpot[r.policy].push_back(request_tpot);
    const bool ttft_ok = config_.ttft_target_ms <= 0 || r.ttft_ms <= config_.ttft_target_ms;
    const bool tpot_ok = config_.tpot_target_ms <= 0 || request_tpot <= config_.tpot_target_ms;
    if (ttft_ok && tpot_ok) ++good;
  }
  for (auto& [name, p] : by_policy) {
    p["ttft_ms"] = Summary(policy_ttft[name]);
    p["tpot_ms"] = Summary(policy_tpot[name]);
    const int64_t full = p["bytes_full"].get<int64_t>();
    p["kv_bytes_fraction"] = full > 0 ? static_cast<double>(p["bytes_transferred"].get<int64_t>()) / full : 0.0;
  }

  json report;
  report["name"] = config_.name;
  report["endReason"] = stop_requested_.load() ? "cancel" : "normal";
  report["date"] = Rfc3339(wall_start_);
  json options = {{"call", "kvgate.v1.Inference.Generate"},
                  {"host", config_.server},
                  {"insecure", config_.tls_ca.empty()},
                  {"load-schedule", config_.rate > 0 ? "poisson" : "const"},
                  {"load-start", 0},
                  {"load-end", 0},
                  {"load-step", 0},
                  {"load-step-duration", 0},
                  {"load-max-duration", 0},
                  {"concurrency-schedule", "const"},
                  {"concurrency-start", 0},
                  {"concurrency-end", 0},
                  {"concurrency-step", 0},
                  {"concurrency-step-duration", 0},
                  {"concurrency-max-duration", 0},
                  {"concurrency", Workers()},
                  {"connections", stubs_.size()},
                  {"timeout", Ns(static_cast<double>(config_.timeout_ms))},
                  {"binary", false},
                  {"CPUs", std::thread::hardware_concurrency()},
                  {"name", config_.name}};
  if (config_.rate > 0) options["rps"] = config_.rate;
  if (config_.duration_s > 0) {
    options["duration"] = Ns(config_.duration_s * 1000);
  } else {
    options["total"] = config_.requests;
  }
  report["options"] = options;
  report["count"] = results_.size();
  report["total"] = Ns(total_ms);
  double sum = 0;
  for (double x : latency_all) sum += x;
  report["average"] = latency_all.empty() ? 0 : Ns(sum / latency_all.size());
  report["fastest"] = latency_all.empty() ? 0 : Ns(*std::min_element(latency_all.begin(), latency_all.end()));
  report["slowest"] = latency_all.empty() ? 0 : Ns(*std::max_element(latency_all.begin(), latency_all.end()));
  report["rps"] = results_.size() / total_s;
  report["errorDistribution"] = errors;
  report["statusCodeDistribution"] = codes;
  json distribution = json::array();
  for (int p : {10, 25, 50, 75, 90, 95, 99}) {
    distribution.push_back({{"percentage", p}, {"latency", Ns(Percentile(latency_ok, p))}});
  }
  report["latencyDistribution"] = distribution;
  // ghz's histogram: ten buckets from fastest to slowest, marks in seconds.
  json histogram = json::array();
  if (!latency_ok.empty()) {
    const double lo = *std::min_element(latency_ok.begin(), latency_ok.end());
    const double hi = *std::max_element(latency_ok.begin(), latency_ok.end());
    const int buckets = 10;
    std::vector<int> counts(buckets + 1, 0);
    const double width = (hi - lo) / buckets;
    for (double x : latency_ok) {
      counts[width > 0 ? std::min(buckets, static_cast<int>((x - lo) / width)) : 0]++;
    }
    for (int b = 0; b <= buckets; ++b) {
      histogram.push_back({{"mark", (lo + b * width) / 1000.0},
                           {"count", counts[b]},
                           {"frequency", static_cast<double>(counts[b]) / latency_ok.size()}});
    }
  }
  report["histogram"] = histogram;
  json details = json::array();
  for (const auto& r : results_) {
    details.push_back({{"timestamp", Rfc3339Nano(r.wall_start)},
                       {"latency", Ns(r.latency_ms)},
                       {"error", r.error},
                       {"status", CodeName(r.code)}});
  }
  report["details"] = details;

  json k;
  k["mode"] = config_.rate > 0 ? "open-loop" : "closed-loop";
  if (config_.rate > 0) {
    k["offered_rate_rps"] = config_.rate;
    k["max_inflight"] = config_.max_inflight;
    k["max_client_queue"] = max_queued_;
  } else {
    k["concurrency"] = config_.concurrency;
  }
  k["duration_s"] = total_s;
  k["requests"] = results_.size();
  k["ok"] = ok;
  k["requests_per_s"] = ok / total_s;
  k["output_tokens"] = output_tokens;
  k["prompt_tokens"] = prompt_tokens;
  k["output_tokens_per_s"] = output_tokens / total_s;
  k["latency_ms"] = Summary(latency_ok);
  k["ttft_ms"] = Summary(ttft);
  k["itl_ms"] = Summary(itl);
  k["tpot_ms"] = Summary(tpot);
  k["goodput"] = {{"ttft_target_ms", config_.ttft_target_ms > 0 ? json(config_.ttft_target_ms) : json(nullptr)},
                  {"tpot_target_ms", config_.tpot_target_ms > 0 ? json(config_.tpot_target_ms) : json(nullptr)},
                  {"requests", good},
                  {"requests_per_s", good / total_s},
                  {"fraction", results_.empty() ? 0.0 : static_cast<double>(good) / results_.size()}};
  k["kv"] = {{"bytes_transferred", bytes_transferred},
             {"bytes_full", bytes_full},
             {"fraction", bytes_full > 0 ? static_cast<double>(bytes_transferred) / bytes_full : 0.0}};
  k["errors_by_status"] = codes;
  k["by_policy"] = by_policy;
  k["model"] = {{"name", model_.model_name()}, {"vocab_size", model_.vocab_size()},
                {"max_context_tokens", model_.max_context_tokens()}};
  report["kvgate"] = k;
  return report;
}

void Bench::PrintText(std::ostream& out) const {
  const json r = Report();
  const json& k = r["kvgate"];
  out << absl::StrFormat("Summary (%s, %s):\n", r["name"].get<std::string>(), k["mode"].get<std::string>());
  out << absl::StrFormat("  requests:           %d (%d OK) in %.2f s\n", k["requests"].get<int64_t>(),
                         k["ok"].get<int64_t>(), k["duration_s"].get<double>());
  out << absl::StrFormat("  requests/s:         %.2f\n", k["requests_per_s"].get<double>());
  out << absl::StrFormat("  output tokens/s:    %.1f (%d tokens)\n", k["output_tokens_per_s"].get<double>(),
                         k["output_tokens"].get<int64_t>());
  out << absl::StrFormat("  goodput:            %.2f requests/s (%.1f%% of requests met the targets)\n",
                         k["goodput"]["requests_per_s"].get<double>(), 100 * k["goodput"]["fraction"].get<double>());
  out << "                       mean      p50      p90      p95      p99    p99.9   (ms)\n";
  for (const char* key : {"latency_ms", "ttft_ms", "itl_ms", "tpot_ms"}) {
    const json& s = k[key];
    out << absl::StrFormat("  %-14s %9.2f%9.2f%9.2f%9.2f%9.2f%9.2f\n", std::string(key).substr(0, std::string(key).size() - 3),
                           s["mean"].get<double>(), s["p50"].get<double>(), s["p90"].get<double>(),
                           s["p95"].get<double>(), s["p99"].get<double>(), s["p99.9"].get<double>());
  }
  out << absl::StrFormat("  KV bytes moved:     %d of %d full (%.1f%%)\n", k["kv"]["bytes_transferred"].get<int64_t>(),
                         k["kv"]["bytes_full"].get<int64_t>(), 100 * k["kv"]["fraction"].get<double>());
  out << "  status codes:      ";
  for (const auto& [code, n] : k["errors_by_status"].items()) out << " " << code << "=" << n.get<int>();
  out << "\n";
  if (k["by_policy"].size() > 1) {
    for (const auto& [name, p] : k["by_policy"].items()) {
      out << absl::StrFormat("  policy %-18s %4d requests, TTFT p50 %.1f ms, TPOT p50 %.2f ms, KV %.1f%% of full\n", name,
                             p["count"].get<int64_t>(), p["ttft_ms"]["p50"].get<double>(),
                             p["tpot_ms"]["p50"].get<double>(), 100 * p["kv_bytes_fraction"].get<double>());
    }
  }
  for (const auto& [error, n] : r["errorDistribution"].items()) out << "  error x" << n.get<int>() << ": " << error << "\n";
}

}  // namespace

int RunBench(const std::vector<std::string>& args) {
  for (const auto& a : args) {
    if (a == "--help" || a == "-h") {
      std::cout << kUsage;
      return 0;
    }
  }
  absl::StatusOr<BenchConfig> config = ParseBench(args);
  if (!config.ok()) {
    std::cerr << "kvgate bench: " << config.status().message() << "\n" << kUsage;
    return 2;
  }
  const std::string json_out = config->json_out;
  Bench bench(*std::move(config));
  std::signal(SIGINT, [](int) { g_interrupted.store(true); });
  if (absl::Status s = bench.Run(); !s.ok()) {
    std::cerr << "kvgate bench: error: " << absl::StatusCodeToString(s.code()) << ": " << s.message() << "\n";
    return 1;
  }
  const json report = bench.Report();
  bench.PrintText(std::cout);
  if (!json_out.empty()) {
    std::ofstream out(json_out);
    out << report.dump(2) << "\n";
    if (!out) {
      std::cerr << "kvgate bench: error: cannot write --json '" << json_out << "'\n";
      return 1;
    }
  }
  // Exit 1 when nothing succeeded (a wrong address, a server that refuses everything).
  return report["kvgate"]["ok"].get<int64_t>() > 0 ? 0 : 1;
}

}  // namespace kvgate::cli
