// File: helpers shared by the gates/ unit tests (random captures, status matchers).
#pragma once

#include <unistd.h>

#include <cmath>
#include <cstdint>
#include <cstdlib>
#include <random>
#include <string>
#include <vector>

#include "absl/status/status.h"
#include "absl/status/statusor.h"
#include "cuda/cpu/reference_ops.h"
#include "gates/prefill_capture.h"
#include "gtest/gtest.h"

namespace kvgate::gates::testing {

inline ModelShape Shape(int32_t layers, int32_t q_heads, int32_t kv_heads, int32_t head_dim, int32_t hidden) {
  ModelShape s;
  s.num_layers = layers;
  s.num_q_heads = q_heads;
  s.num_kv_heads = kv_heads;
  s.head_dim = head_dim;
  s.hidden_size = hidden;
  return s;
}

inline std::vector<float> RandomVector(size_t size, std::mt19937& rng, float stddev = 1.0f) {
  std::normal_distribution<float> dist(0.0f, stddev);
  std::vector<float> v(size);
  for (float& x : v) x = dist(rng);
  return v;
}

// Keys [H_kv, n, d], last `w` queries [w, H_q, d], hidden [n, D] per layer, N(0, 1).
inline PrefillCapture RandomCapture(const ModelShape& shape, int32_t n, int32_t w, bool hidden, uint32_t seed) {
  std::mt19937 rng(seed);
  PrefillCapture c;
  c.shape = shape;
  c.prompt_tokens = n;
  c.num_last_queries = w;
  for (int32_t l = 0; l < shape.num_layers; ++l) {
    c.keys.push_back(RandomVector(static_cast<size_t>(shape.num_kv_heads) * n * shape.head_dim, rng));
    c.last_queries.push_back(RandomVector(static_cast<size_t>(w) * shape.num_q_heads * shape.head_dim, rng));
    if (hidden) c.hidden_states.push_back(RandomVector(static_cast<size_t>(n) * shape.hidden_size, rng));
  }
  return c;
}

// What the backend scores for a capture (ops::WindowAttentionProbs, here its reference):
// layer `layer`'s [num_q_heads, n] mean attention of the last `w` captured queries over the
// keys, or with `logits` (w = 1) the last query's scaled logits.
inline std::vector<float> ReferenceWindowScores(const PrefillCapture& c, int32_t layer, int32_t w, bool logits) {
  const ModelShape& s = c.shape;
  std::vector<float> out(static_cast<size_t>(s.num_q_heads) * c.prompt_tokens);
  ops::WindowAttentionProbsArgs args;
  args.q = c.last_queries[layer].data() + static_cast<size_t>(c.num_last_queries - w) * s.num_q_heads * s.head_dim;
  args.k_cache = c.keys[layer].data();  // [num_kv_heads, n, head_dim]: a cache of capacity n
  args.out = out.data();
  args.window = w;
  args.length = c.prompt_tokens;
  args.capacity_tokens = c.prompt_tokens;
  args.num_q_heads = s.num_q_heads;
  args.num_kv_heads = s.num_kv_heads;
  args.head_dim = s.head_dim;
  args.scale = static_cast<float>(1.0 / std::sqrt(static_cast<double>(s.head_dim)));
  args.logits = logits;
  ops::WindowAttentionProbsRef(args);
  return out;
}

inline std::string TempPath(const std::string& name) {
  const char* dir = std::getenv("TEST_TMPDIR");
  return std::string(dir != nullptr ? dir : "/tmp") + "/kvgate_gates_" + std::to_string(::getpid()) + "_" + name;
}

}  // namespace kvgate::gates::testing

namespace kvgate::gates::testing {
inline absl::Status StatusOf(const absl::Status& s) { return s; }
template <typename T>
absl::Status StatusOf(const absl::StatusOr<T>& s) {
  return s.status();
}
}  // namespace kvgate::gates::testing

// Expects `expr` (Status or StatusOr) to fail with `code` and a message containing `text`.
#define EXPECT_STATUS(expr, want_code, want_text)                                              \
  do {                                                                               \
    const ::absl::Status kv_s_ = ::kvgate::gates::testing::StatusOf(expr);           \
    EXPECT_EQ(kv_s_.code(), (want_code)) << kv_s_;                                        \
    EXPECT_NE(std::string(kv_s_.message()).find(want_text), std::string::npos) << kv_s_;  \
  } while (0)
