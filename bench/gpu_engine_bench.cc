// GPU engine benchmark driver: loads a checkpoint on a backend (normally cuda) with fp32
// or bf16 weights and times, through engine::Model, a one-shot prefill of N tokens
// (Forward of the whole prompt into a fresh cache, last-token logits on the host) and
// batch-1 decode at a context of C tokens (Forward of one token over the contiguous
// cache, the path of `kvgate generate` without a policy). Writes JSON; the peers,
// floors and the report come from bench/gpu_engine_bench.py, which runs this.
//
//   gpu_engine_bench --model DIR [--backend cuda] [--weights fp32|bf16]
//       [--prefill 2048,8192] [--decode 1024,8192] [--decode-steps 32] [--repeats 3]
//       [--json PATH]
#include <algorithm>
#include <chrono>
#include <cstdio>
#include <cstdlib>
#include <fstream>
#include <iostream>
#include <random>
#include <sstream>
#include <string>
#include <vector>

#include "absl/status/status.h"
#include "absl/status/statusor.h"
#include "absl/strings/str_cat.h"
#include "cuda/backend.h"
#include "engine/model.h"
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

absl::StatusOr<json> Run(int argc, char** argv) {
  std::string model_dir, backend_name = "cuda", weights = "bf16", json_path;
  std::vector<int32_t> prefill = {2048, 8192}, decode = {1024, 8192};
  int decode_steps = 32, repeats = 3;
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
    else if (flag == "--json") json_path = value;
    else return absl::InvalidArgumentError(absl::StrCat("unknown flag ", flag));
  }
  if (model_dir.empty()) return absl::InvalidArgumentError("--model DIR is required");
  engine::LoadOptions options;
  if (weights == "fp32") options.weights = engine::WeightDType::kF32;
  else if (weights == "bf16") options.weights = engine::WeightDType::kBf16;
  else return absl::InvalidArgumentError("--weights must be fp32 or bf16");

  absl::StatusOr<std::unique_ptr<ops::Backend>> backend = ops::CreateBackend(backend_name);
  if (!backend.ok()) return backend.status();
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
