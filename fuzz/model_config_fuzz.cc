// File: libFuzzer target for the config.json loader (engine/model_config.h). Any text
// must give a config or INVALID_ARGUMENT; an accepted config must be self-consistent
// enough for what the engine computes from it first (parameter count, KV entry size,
// RoPE frequencies) to run without overflow (UBSan) or a wild allocation.
#include <cmath>
#include <cstdint>
#include <string>

#include "fuzz/fuzz_util.h"
#include "engine/model_config.h"

extern "C" int LLVMFuzzerTestOneInput(const uint8_t* data, size_t size) {
  if (size > 64 * 1024) return 0;
  const std::string text(reinterpret_cast<const char*>(data), size);
  auto config = kvgate::engine::ParseModelConfig(text);
  if (!config.ok()) {
    KVGATE_FUZZ_CHECK(config.status().code() == absl::StatusCode::kInvalidArgument, config.status().ToString());
    return 0;
  }
  KVGATE_FUZZ_CHECK(config->vocab_size > 0 && config->hidden_size > 0 && config->num_layers > 0);
  KVGATE_FUZZ_CHECK(config->num_heads > 0 && config->num_kv_heads > 0 && config->head_dim > 0);
  KVGATE_FUZZ_CHECK(config->num_heads % config->num_kv_heads == 0);
  (void)config->NumParameters();
  (void)config->KvEntryBytes();
  const auto inv_freq = kvgate::engine::RopeInverseFrequencies(*config);
  KVGATE_FUZZ_CHECK((inv_freq.size()) == (static_cast<size_t>(config->head_dim / 2)));
  return 0;
}
