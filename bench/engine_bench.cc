// CPU engine benchmark: prefill and decode tokens/s for the TinyStories checkpoint and a
// random ~100M-parameter Llama, each against the roofline measured in the same run
// (OpenBLAS SGEMM FLOP/s for prefill, memory bandwidth for decode).
//
//   engine_bench [--tinystories DIR] [--threads N] [--json PATH] [--markdown PATH]
#include <cblas.h>

#include <algorithm>
#include <chrono>
#include <cstdio>
#include <cstring>
#include <ctime>
#include <fstream>
#include <iostream>
#include <random>
#include <thread>

#include "absl/strings/str_format.h"
#include "cuda/cpu/cpu_backend.h"
#include "engine/model.h"
#include "nlohmann/json.hpp"

namespace kvgate::bench {
namespace {

using Clock = std::chrono::steady_clock;
using nlohmann::json;

double Seconds(Clock::time_point a, Clock::time_point b) { return std::chrono::duration<double>(b - a).count(); }

// Best of `repeats` timings of fn(), in seconds.
template <typename Fn>
double BestOf(int repeats, Fn&& fn) {
  double best = 1e30;
  for (int i = 0; i < repeats; ++i) {
    auto start = Clock::now();
    fn();
    best = std::min(best, Seconds(start, Clock::now()));
  }
  return best;
}

double MeasureSgemmFlops(int size) {
  std::vector<float> a(size_t{1} * size * size), b(a.size()), c(a.size());
  std::mt19937 rng(1);
  std::normal_distribution<float> dist;
  for (float& x : a) x = dist(rng);
  for (float& x : b) x = dist(rng);
  const double seconds = BestOf(5, [&] {
    cblas_sgemm(CblasRowMajor, CblasNoTrans, CblasTrans, size, size, size, 1.0f, a.data(), size, b.data(), size,
                0.0f, c.data(), size);
  });
  return 2.0 * size * size * size / seconds;
}

// Bytes read + written per second by memcpy of a buffer far larger than the caches.
double MeasureCopyBandwidth() {
  const size_t bytes = size_t{256} << 20;
  std::vector<char> src(bytes, 1), dst(bytes, 0);
  const double seconds = BestOf(5, [&] { std::memcpy(dst.data(), src.data(), bytes); });
  return 2.0 * bytes / seconds;
}

struct ModelResult {
  json figures;
  std::string markdown;
};

// Linear-layer FLOPs per token (q, k, v, o, gate, up, down), without lm_head.
double LayerFlopsPerToken(const engine::ModelConfig& c) {
  const double h = c.hidden_size, q = double(c.num_heads) * c.head_dim, kv = double(c.num_kv_heads) * c.head_dim;
  return 2.0 * c.num_layers * (h * q * 2 + h * kv * 2 + 3 * h * c.intermediate_size);
}

ModelResult BenchModel(const std::string& name, engine::Model* model, double gemm_flops, double bandwidth) {
  const engine::ModelConfig& c = model->config();
  std::mt19937 rng(7);
  std::uniform_int_distribution<int32_t> token(3, c.vocab_size - 1);
  json figures = {{"model", name}, {"parameters", c.NumParameters()}};
  std::string md = absl::StrFormat("\n### %s (%.1fM parameters, %d layers, hidden %d, vocab %d)\n\n", name,
                                   c.NumParameters() / 1e6, c.num_layers, c.hidden_size, c.vocab_size);
  md += "| phase | tokens | time | tokens/s | achieved | roofline floor | of roofline |\n|---|---|---|---|---|---|---|\n";
  for (int prompt_tokens : {32, 128, std::min(512, c.max_context_tokens - 64)}) {
    std::vector<int32_t> prompt(prompt_tokens);
    for (int32_t& t : prompt) t = token(rng);
    const double seconds = BestOf(3, [&] {
      auto cache = *model->NewCache(prompt_tokens);
      (void)model->Forward(prompt, cache.get());
    });
    const double attention_flops = 2.0 * 2 * c.num_layers * c.num_heads * c.head_dim * 0.5 * prompt_tokens * prompt_tokens;
    const double flops = LayerFlopsPerToken(c) * prompt_tokens + attention_flops + 2.0 * c.hidden_size * c.vocab_size;
    const double floor = flops / gemm_flops;
    figures["prefill"].push_back({{"prompt_tokens", prompt_tokens}, {"seconds", seconds},
                                  {"tokens_per_second", prompt_tokens / seconds}, {"gflops", flops / seconds / 1e9},
                                  {"roofline_seconds", floor}, {"fraction_of_roofline", floor / seconds}});
    md += absl::StrFormat("| prefill | %d | %.2f ms | %.0f | %.1f GFLOP/s | %.2f ms | %.0f%% |\n", prompt_tokens,
                          seconds * 1e3, prompt_tokens / seconds, flops / seconds / 1e9, floor * 1e3, 100 * floor / seconds);
  }
  {
    const int prompt_tokens = 64, steps = 64;
    std::vector<int32_t> prompt(prompt_tokens);
    for (int32_t& t : prompt) t = token(rng);
    double best = 1e30;
    for (int repeat = 0; repeat < 3; ++repeat) {
      auto cache = *model->NewCache(prompt_tokens + steps);
      (void)model->Forward(prompt, cache.get());
      int32_t next = token(rng);
      auto start = Clock::now();
      for (int s = 0; s < steps; ++s) (void)model->Forward({&next, 1}, cache.get());
      best = std::min(best, Seconds(start, Clock::now()) / steps);
    }
    // Every weight is read once per decoded token (float32), plus the KV cache so far.
    const double weight_bytes = 4.0 * c.NumParameters();
    const double kv_bytes = double(c.KvEntryBytes()) * c.num_layers * c.num_kv_heads * (prompt_tokens + steps / 2);
    const double floor = (weight_bytes + kv_bytes) / bandwidth;
    figures["decode"] = {{"context_tokens", prompt_tokens + steps / 2}, {"seconds_per_token", best},
                         {"tokens_per_second", 1.0 / best}, {"bytes_per_token", weight_bytes + kv_bytes},
                         {"gbytes_per_second", (weight_bytes + kv_bytes) / best / 1e9},
                         {"roofline_seconds", floor}, {"fraction_of_roofline", floor / best}};
    md += absl::StrFormat("| decode (batch 1, ctx ~%d) | 1 | %.3f ms | %.0f | %.2f GB/s | %.3f ms | %.0f%% |\n",
                          prompt_tokens + steps / 2, best * 1e3, 1.0 / best, (weight_bytes + kv_bytes) / best / 1e9,
                          floor * 1e3, 100 * floor / best);
  }
  return {figures, md};
}

std::string CpuName() {
  std::ifstream in("/proc/cpuinfo");
  std::string line;
  while (std::getline(in, line)) {
    if (line.rfind("model name", 0) == 0) return line.substr(line.find(':') + 2);
  }
  return "unknown";
}

std::string Commit() {
  FILE* pipe = popen("git rev-parse --short HEAD 2>/dev/null", "r");
  if (pipe == nullptr) return "unknown";
  char buffer[64] = {0};
  std::string out = fgets(buffer, sizeof(buffer), pipe) ? buffer : "unknown";
  pclose(pipe);
  out.erase(std::remove(out.begin(), out.end(), '\n'), out.end());
  return out;
}

int Main(int argc, char** argv) {
  std::string tinystories = "../shared/models/tinystories-656k", json_path, markdown_path;
  int threads = 0;
  for (int i = 1; i + 1 < argc; i += 2) {
    const std::string flag = argv[i];
    if (flag == "--tinystories") tinystories = argv[i + 1];
    else if (flag == "--threads") threads = std::atoi(argv[i + 1]);
    else if (flag == "--json") json_path = argv[i + 1];
    else if (flag == "--markdown") markdown_path = argv[i + 1];
    else {
      std::cerr << "unknown flag " << flag << "\n";
      return 2;
    }
  }
  if (threads <= 0) threads = std::max(1u, std::thread::hardware_concurrency());
  auto backend = ops::CreateCpuBackend(threads);
  const double gemm = MeasureSgemmFlops(1024);
  const double bandwidth = MeasureCopyBandwidth();
  char date[32];
  std::time_t now = std::time(nullptr);
  std::strftime(date, sizeof(date), "%Y-%m-%d", std::gmtime(&now));
  json out = {{"device", absl::StrFormat("%s, %d threads", CpuName(), threads)}, {"date", date},
              {"commit", Commit()}, {"backend", "cpu (OpenBLAS sgemm + threaded loops, float32)"},
              {"sgemm_1024_gflops", gemm / 1e9}, {"copy_bandwidth_gbytes_per_second", bandwidth / 1e9}};
  std::string md = absl::StrFormat(
      "# CPU engine benchmark\n\nDevice: %s. Date: %s. Commit: %s. Backend: cpu, float32.\n\n"
      "Measured in the same run: OpenBLAS SGEMM 1024^3 = %.1f GFLOP/s (prefill roofline), memcpy = %.2f GB/s "
      "read+write (decode roofline: every weight read once per token).\n",
      out["device"].get<std::string>(), date, out["commit"].get<std::string>(), gemm / 1e9, bandwidth / 1e9);

  auto tiny = engine::Model::Load(tinystories, backend.get());
  if (tiny.ok()) {
    ModelResult r = BenchModel("tinystories-656k", tiny->get(), gemm, bandwidth);
    out["models"].push_back(r.figures);
    md += r.markdown;
  } else {
    std::cerr << "skipping TinyStories: " << tiny.status() << "\n";
  }
  engine::ModelConfig config;
  config.architecture_name = "LlamaForCausalLM";
  config.vocab_size = 32000;
  config.hidden_size = 768;
  config.intermediate_size = 2048;
  config.num_layers = 12;
  config.num_heads = 12;
  config.num_kv_heads = 4;
  config.head_dim = 64;
  config.max_context_tokens = 2048;
  config.rms_norm_eps = 1e-5f;
  config.tie_word_embeddings = true;
  auto random = engine::Model::CreateRandom(config, 1, backend.get());
  if (!random.ok()) {
    std::cerr << random.status() << "\n";
    return 1;
  }
  ModelResult r = BenchModel("random-llama-100m", random->get(), gemm, bandwidth);
  out["models"].push_back(r.figures);
  md += r.markdown;
  std::cout << md;
  if (!json_path.empty()) std::ofstream(json_path) << out.dump(1) << "\n";
  if (!markdown_path.empty()) std::ofstream(markdown_path) << md;
  return 0;
}

}  // namespace
}  // namespace kvgate::bench

int main(int argc, char** argv) { return kvgate::bench::Main(argc, argv); }
