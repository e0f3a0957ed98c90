// Parity tests of the CUDA backend's bf16 ops (EmbedBf16, GemmBf16, RmsNormBf16,
// SiluMulBf16, CastToBf16, AttentionBf16) against their references
// (cuda/cpu/reference_bf16_ops.h): seeded random inputs, the reference on the host, the
// backend on the GPU, a NaN/Inf check, then |ref - out| <= atol + rtol * |ref| on every
// element (the worst index reported), and canary guard bands around every output.
// Skips when no CUDA device is visible (label gpu).
#include <gtest/gtest.h>

#include <algorithm>
#include <cmath>
#include <cstdint>
#include <cstring>
#include <memory>
#include <random>
#include <string>
#include <vector>

#include "absl/status/status.h"
#include "absl/strings/str_cat.h"
#include "cuda/backend.h"
#include "cuda/bf16.h"
#include "cuda/cpu/reference_bf16_ops.h"
#include "cuda/cuda_backend.h"

namespace kvgate::ops {
namespace {

// Tolerances, derived from bf16 rounding (8 significand bits: one ulp is 2^-8 to 2^-7 of
// the value) and fp32 accumulation.
// A value rounded to bf16 once on each side (the reference from double, the kernel from
// float) may land on adjacent neighbours when it sits near a tie: one ulp, <= 2^-7 |v|.
constexpr float kRtolBf16Rounding = 1.0f / 128.0f;
constexpr float kAtolBf16Rounding = 1e-6f;  // for values that round to (near) zero
// Copies and conversions of the same float are bit-exact.
constexpr float kAtolExact = 0.0f;
constexpr float kRtolExact = 0.0f;
// GemmBf16 with an fp32 output: the operands are exact bf16 on both sides; cuBLASLt sums
// k products in fp32 (blocked, maybe split-k), the reference in double: like the fp32
// MatMul test (measured 3.1e-5 at k = 4096 there, allowance 4e-6 * sqrt(k)), with 2.5x
// more room because the library may pick another split per shape.
constexpr float kAtolGemmF32AccumPerSqrtK = 1e-5f;
constexpr float kRtolGemmF32Accum = 1e-4f;
// AttentionBf16: q, K and V are rounded identically on both sides; the kernel also
// rounds each probability to bf16 (relative error <= 2^-9) before it multiplies V, so
// the output moves by at most 2^-9 * max|v| (all errors of one sign); 2^-8 with V in
// [-1, 1] leaves 2x for the fp32 sums and the unrounded normaliser.
constexpr float kAtolAttentionBf16 = 1.0f / 256.0f;
constexpr float kRtolAttentionBf16 = 1.0f / 256.0f;

constexpr size_t kGuardBytes = 256;
constexpr uint8_t kCanaryByte = 0xA5;

#define KVGATE_ASSERT_OK(expr)                                             \
  do {                                                                     \
    const ::absl::Status kv_test_status_ = (expr);                         \
    ASSERT_TRUE(kv_test_status_.ok()) << #expr << ": " << kv_test_status_; \
  } while (0)

std::unique_ptr<Backend> MakeCudaOrNull() {
  if (CudaDeviceCount() == 0) return nullptr;
  auto backend = CreateBackend("cuda:0");
  if (!backend.ok()) return nullptr;
  return std::move(*backend);
}

std::vector<float> RandomFloats(std::mt19937& rng, size_t n, float lo, float hi) {
  std::uniform_real_distribution<float> dist(lo, hi);
  std::vector<float> v(n);
  for (float& x : v) x = dist(rng);
  return v;
}

std::vector<Bf16> RandomBf16(std::mt19937& rng, size_t n, float lo, float hi) {
  std::vector<Bf16> v(n);
  for (Bf16& x : v) x = F32ToBf16(std::uniform_real_distribution<float>(lo, hi)(rng));
  return v;
}

// Device memory laid out as [canaries][payload][canaries]; the payload starts 256 bytes
// in, so it keeps cudaMalloc's alignment.
class Guarded {
 public:
  template <typename T>
  static std::unique_ptr<Guarded> Make(Backend& backend, const std::vector<T>& init) {
    auto g = std::unique_ptr<Guarded>(new Guarded);
    g->payload_bytes_ = std::max<size_t>(init.size() * sizeof(T), 1);
    std::vector<uint8_t> host(g->payload_bytes_ + 2 * kGuardBytes, kCanaryByte);
    if (!init.empty()) std::memcpy(host.data() + kGuardBytes, init.data(), init.size() * sizeof(T));
    auto buffer = backend.Alloc(host.size());
    if (!buffer.ok()) return nullptr;
    g->buffer_ = std::move(*buffer);
    if (!backend.CopyToBackend(g->buffer_.data(), host.data(), host.size()).ok()) return nullptr;
    return g;
  }
  template <typename T>
  T* data() const {
    return reinterpret_cast<T*>(buffer_.as<uint8_t>() + kGuardBytes);
  }
  // Copies the payload out and checks both canary bands.
  template <typename T>
  ::testing::AssertionResult Download(Backend& backend, std::vector<T>* out) const {
    std::vector<uint8_t> host(payload_bytes_ + 2 * kGuardBytes);
    const absl::Status s = backend.CopyToHost(host.data(), buffer_.data(), host.size());
    if (!s.ok()) return ::testing::AssertionFailure() << "CopyToHost: " << s;
    for (size_t i = 0; i < kGuardBytes; ++i) {
      if (host[i] != kCanaryByte || host[host.size() - 1 - i] != kCanaryByte) {
        return ::testing::AssertionFailure() << "canary overwritten " << i << " bytes from a payload edge";
      }
    }
    out->resize(payload_bytes_ / sizeof(T));
    std::memcpy(out->data(), host.data() + kGuardBytes, out->size() * sizeof(T));
    return ::testing::AssertionSuccess();
  }

 private:
  Guarded() = default;
  DeviceBuffer buffer_;
  size_t payload_bytes_ = 0;
};

std::vector<float> ToFloats(const std::vector<Bf16>& v) {
  std::vector<float> out(v.size());
  for (size_t i = 0; i < v.size(); ++i) out[i] = Bf16ToF32(v[i]);
  return out;
}

// NaN/Inf first, then the element-wise bound; atol_each (if not empty) adds a per-element
// allowance.
::testing::AssertionResult AllClose(const std::vector<float>& ref, const std::vector<float>& out, float atol,
                                    float rtol, const std::vector<float>& atol_each = {}) {
  if (ref.size() != out.size()) return ::testing::AssertionFailure() << "size " << out.size() << " != " << ref.size();
  size_t worst = 0;
  double worst_excess = -1.0;
  for (size_t i = 0; i < ref.size(); ++i) {
    if (!std::isfinite(out[i]) && std::isfinite(ref[i])) {
      return ::testing::AssertionFailure() << "non-finite " << out[i] << " at " << i << " (ref " << ref[i] << ")";
    }
    const double bound = atol + rtol * std::fabs(ref[i]) + (atol_each.empty() ? 0.0 : atol_each[i]);
    const double excess = std::fabs(static_cast<double>(ref[i]) - out[i]) - bound;
    if (excess > worst_excess) {
      worst_excess = excess;
      worst = i;
    }
  }
  if (worst_excess > 0) {
    return ::testing::AssertionFailure() << "worst at " << worst << ": ref " << ref[worst] << " out " << out[worst]
                                         << " exceeds the bound by " << worst_excess;
  }
  return ::testing::AssertionSuccess();
}

#define KVGATE_SKIP_WITHOUT_GPU(backend)                      \
  std::unique_ptr<Backend> backend = MakeCudaOrNull();        \
  if (backend == nullptr) GTEST_SKIP() << "no CUDA device"

TEST(CudaBf16OpsTest, EmbedBf16IsExact) {
  KVGATE_SKIP_WITHOUT_GPU(backend);
  std::mt19937 rng(11);
  const int32_t vocab = 97, dim = 129, n = 54;
  const std::vector<Bf16> table = RandomBf16(rng, size_t{1} * vocab * dim, -2, 2);
  std::vector<int32_t> ids(n);
  for (int32_t& id : ids) id = std::uniform_int_distribution<int32_t>(0, vocab - 1)(rng);
  auto d_table = Guarded::Make(*backend, table);
  auto d_ids = Guarded::Make(*backend, ids);
  auto d_out = Guarded::Make(*backend, std::vector<float>(size_t{1} * n * dim, 0.f));
  KVGATE_ASSERT_OK(backend->EmbedBf16({d_ids->data<int32_t>(), d_table->data<Bf16>(), d_out->data<float>(), n, dim, vocab}));
  std::vector<float> ref(size_t{1} * n * dim), out;
  EmbedBf16Ref({ids.data(), table.data(), ref.data(), n, dim, vocab});
  ASSERT_TRUE(d_out->Download(*backend, &out));
  EXPECT_TRUE(AllClose(ref, out, kAtolExact, kRtolExact));
}

struct GemmCase {
  int32_t m, n, k;
  bool y_bf16, accumulate, bias;
  std::string Name() const {
    return absl::StrCat("m", m, "_n", n, "_k", k, y_bf16 ? "_bf16out" : "_f32out", accumulate ? "_acc" : "",
                        bias ? "_bias" : "");
  }
};

class GemmBf16Test : public ::testing::TestWithParam<GemmCase> {};

TEST_P(GemmBf16Test, MatchesReference) {
  KVGATE_SKIP_WITHOUT_GPU(backend);
  const GemmCase c = GetParam();
  const uint32_t seed = 1000 + c.m * 7 + c.n * 13 + c.k;
  SCOPED_TRACE(absl::StrCat(c.Name(), " seed ", seed));
  std::mt19937 rng(seed);
  const std::vector<Bf16> x = RandomBf16(rng, size_t{1} * c.m * c.k, -1, 1);
  const std::vector<Bf16> w = RandomBf16(rng, size_t{1} * c.n * c.k, -1, 1);
  const std::vector<float> bias = RandomFloats(rng, c.n, -1, 1);
  const std::vector<float> y0 = RandomFloats(rng, size_t{1} * c.m * c.n, -1, 1);
  auto d_x = Guarded::Make(*backend, x);
  auto d_w = Guarded::Make(*backend, w);
  auto d_bias = Guarded::Make(*backend, bias);
  GemmBf16Args args;
  args.m = c.m;
  args.n = c.n;
  args.k = c.k;
  args.y_bf16 = c.y_bf16;
  args.accumulate = c.accumulate;
  std::vector<float> ref_f32 = y0;
  std::vector<Bf16> ref_bf16(size_t{1} * c.m * c.n);
  GemmBf16Args ref_args = args;
  ref_args.x = x.data();
  ref_args.w = w.data();
  ref_args.bias = c.bias ? bias.data() : nullptr;
  ref_args.y = c.y_bf16 ? static_cast<void*>(ref_bf16.data()) : static_cast<void*>(ref_f32.data());
  GemmBf16Ref(ref_args);
  args.x = d_x->data<Bf16>();
  args.w = d_w->data<Bf16>();
  args.bias = c.bias ? d_bias->data<float>() : nullptr;
  std::unique_ptr<Guarded> d_y = c.y_bf16 ? Guarded::Make(*backend, std::vector<Bf16>(ref_bf16.size(), 0))
                                          : Guarded::Make(*backend, y0);
  args.y = d_y->data<uint8_t>();
  KVGATE_ASSERT_OK(backend->GemmBf16(args));
  const float atol = kAtolGemmF32AccumPerSqrtK * std::sqrt(static_cast<float>(c.k));
  if (c.y_bf16) {
    std::vector<Bf16> out;
    ASSERT_TRUE(d_y->Download(*backend, &out));
    EXPECT_TRUE(AllClose(ToFloats(ref_bf16), ToFloats(out), atol + kAtolBf16Rounding, kRtolBf16Rounding + kRtolGemmF32Accum));
  } else {
    std::vector<float> out;
    ASSERT_TRUE(d_y->Download(*backend, &out));
    EXPECT_TRUE(AllClose(ref_f32, out, atol, kRtolGemmF32Accum));
  }
}

INSTANTIATE_TEST_SUITE_P(Shapes, GemmBf16Test,
                         ::testing::Values(GemmCase{1, 96, 64, false, false, false}, GemmCase{3, 54, 97, false, false, true},
                                           GemmCase{1, 1024, 4096, false, true, false},
                                           GemmCase{129, 256, 512, true, false, false},
                                           GemmCase{257, 1024, 4096, false, true, false},
                                           GemmCase{300, 1500, 4096, false, false, false},
                                           GemmCase{64, 14336, 4096, true, false, false},
                                           GemmCase{97, 4096, 14336, false, true, false},
                                           // m <= 8 with k % 8 == 0: the weight-streaming kernel
                                           // (gemv_bf16.cuh); odd n leaves a partial last block.
                                           GemmCase{1, 4096, 4096, false, true, false},
                                           GemmCase{1, 14336, 4096, true, false, false},
                                           GemmCase{2, 1027, 4096, false, false, true},
                                           GemmCase{4, 4096, 14336, false, true, false},
                                           GemmCase{5, 1500, 4104, false, true, true},
                                           GemmCase{7, 33, 2056, true, false, false},
                                           GemmCase{8, 1024, 4096, false, false, false},
                                           GemmCase{8, 14336, 4096, true, false, false}),
                         [](const auto& info) { return info.param.Name(); });

TEST(CudaBf16OpsTest, RmsNormBf16) {
  KVGATE_SKIP_WITHOUT_GPU(backend);
  for (const auto& [rows, dim] : std::vector<std::pair<int32_t, int32_t>>{{1, 64}, {3, 97}, {54, 4096}, {129, 128}, {2, 8192}, {1, 5120}}) {
    SCOPED_TRACE(absl::StrCat("rows ", rows, " dim ", dim));
    std::mt19937 rng(rows * 31 + dim);
    const std::vector<float> x = RandomFloats(rng, size_t{1} * rows * dim, -3, 3);
    const std::vector<float> weight = RandomFloats(rng, dim, 0.5f, 1.5f);
    auto d_x = Guarded::Make(*backend, x);
    auto d_w = Guarded::Make(*backend, weight);
    auto d_out = Guarded::Make(*backend, std::vector<Bf16>(x.size(), 0));
    KVGATE_ASSERT_OK(backend->RmsNormBf16({d_x->data<float>(), d_w->data<float>(), d_out->data<Bf16>(), rows, dim, 1e-5f}));
    std::vector<Bf16> ref(x.size()), out;
    RmsNormBf16Ref({x.data(), weight.data(), ref.data(), rows, dim, 1e-5f});
    ASSERT_TRUE(d_out->Download(*backend, &out));
    EXPECT_TRUE(AllClose(ToFloats(ref), ToFloats(out), kAtolBf16Rounding, kRtolBf16Rounding));
  }
}

TEST(CudaBf16OpsTest, SiluMulBf16AndCastToBf16) {
  KVGATE_SKIP_WITHOUT_GPU(backend);
  // 97 and 100003 take the scalar kernel, 100000 the 4-wide one.
  for (const int64_t n : {int64_t{1}, int64_t{97}, int64_t{100003}, int64_t{100000}}) {
    SCOPED_TRACE(absl::StrCat("n ", n));
    std::mt19937 rng(static_cast<uint32_t>(n));
    const std::vector<Bf16> gate = RandomBf16(rng, n, -6, 6);
    const std::vector<Bf16> up = RandomBf16(rng, n, -2, 2);
    const std::vector<float> x = RandomFloats(rng, n, -100, 100);
    auto d_gate = Guarded::Make(*backend, gate);
    auto d_up = Guarded::Make(*backend, up);
    auto d_out = Guarded::Make(*backend, std::vector<Bf16>(n, 0));
    auto d_x = Guarded::Make(*backend, x);
    auto d_cast = Guarded::Make(*backend, std::vector<Bf16>(n, 0));
    KVGATE_ASSERT_OK(backend->SiluMulBf16({d_gate->data<Bf16>(), d_up->data<Bf16>(), d_out->data<Bf16>(), n}));
    KVGATE_ASSERT_OK(backend->CastToBf16({d_x->data<float>(), d_cast->data<Bf16>(), n}));
    std::vector<Bf16> ref(n), ref_cast(n), out, cast;
    SiluMulBf16Ref({gate.data(), up.data(), ref.data(), n});
    CastToBf16Ref({x.data(), ref_cast.data(), n});
    ASSERT_TRUE(d_out->Download(*backend, &out));
    ASSERT_TRUE(d_cast->Download(*backend, &cast));
    EXPECT_TRUE(AllClose(ToFloats(ref), ToFloats(out), kAtolBf16Rounding, kRtolBf16Rounding));
    EXPECT_TRUE(AllClose(ToFloats(ref_cast), ToFloats(cast), kAtolExact, kRtolExact));
  }
}

struct AttentionCase {
  int32_t num_tokens, num_q_heads, num_kv_heads, head_dim, q_start_row, extra_capacity, sliding_window;
  int mask;  // 0 none, 1 per kv head, 2 per query head; 3 and 4 the same with runs of 80 hidden rows
  std::string Name() const {
    return absl::StrCat("t", num_tokens, "_q", num_q_heads, "_kv", num_kv_heads, "_d", head_dim, "_past", q_start_row,
                        "_extra", extra_capacity, "_win", sliding_window, "_mask", mask);
  }
};

class AttentionBf16Test : public ::testing::TestWithParam<AttentionCase> {};

// Unwritten cache rows (after the queries) and evicted rows of the past hold NaN: a
// kernel must never let them into a sum.
TEST_P(AttentionBf16Test, MatchesReference) {
  KVGATE_SKIP_WITHOUT_GPU(backend);
  const AttentionCase c = GetParam();
  const uint32_t seed = 77 + c.num_tokens * 3 + c.q_start_row + c.mask;
  SCOPED_TRACE(absl::StrCat(c.Name(), " seed ", seed));
  std::mt19937 rng(seed);
  const int32_t capacity = c.q_start_row + c.num_tokens + c.extra_capacity;
  const size_t q_elems = size_t{1} * c.num_tokens * c.num_q_heads * c.head_dim;
  const size_t cache_elems = size_t{1} * c.num_kv_heads * capacity * c.head_dim;
  const std::vector<float> q = RandomFloats(rng, q_elems, -1, 1);
  std::vector<float> k = RandomFloats(rng, cache_elems, -1, 1);
  std::vector<float> v = RandomFloats(rng, cache_elems, -1, 1);
  const bool per_query_head = c.mask == 2 || c.mask == 4;
  const int32_t mask_heads = per_query_head ? c.num_q_heads : c.num_kv_heads;
  std::vector<uint8_t> mask(size_t{1} * mask_heads * capacity, 1);
  const float nan = std::numeric_limits<float>::quiet_NaN();
  for (int32_t h = 0; h < c.num_kv_heads; ++h) {
    for (int32_t r = c.q_start_row + c.num_tokens; r < capacity; ++r) {
      for (int32_t i = 0; i < c.head_dim; ++i) {
        k[(size_t{1} * h * capacity + r) * c.head_dim + i] = nan;
        v[(size_t{1} * h * capacity + r) * c.head_dim + i] = nan;
      }
    }
  }
  if (c.mask != 0) {
    for (uint8_t& m : mask) m = std::bernoulli_distribution(0.6)(rng) ? 1 : 0;
    // Runs of hidden rows wider than a key tile: whole tiles the kernel may skip.
    for (size_t i = 0; c.mask >= 3 && i < mask.size(); ++i) {
      if ((i % capacity) / 80 % 2 == 0) mask[i] = 0;
    }
    // An evicted row of the past may hold anything: NaN where no query head of its kv
    // head sees it.
    const int32_t group = c.num_q_heads / c.num_kv_heads;
    for (int32_t h = 0; h < c.num_kv_heads; ++h) {
      for (int32_t r = 0; r < c.q_start_row; ++r) {
        bool seen = false;
        if (!per_query_head) seen = mask[size_t{1} * h * capacity + r] != 0;
        for (int32_t qh = h * group; per_query_head && qh < (h + 1) * group; ++qh) seen |= mask[size_t{1} * qh * capacity + r] != 0;
        if (seen) continue;
        for (int32_t i = 0; i < c.head_dim; ++i) v[(size_t{1} * h * capacity + r) * c.head_dim + i] = nan;
      }
    }
  }
  auto d_q = Guarded::Make(*backend, q);
  auto d_k = Guarded::Make(*backend, k);
  auto d_v = Guarded::Make(*backend, v);
  auto d_mask = Guarded::Make(*backend, mask);
  auto d_out = Guarded::Make(*backend, std::vector<float>(q_elems, 0.f));
  AttentionArgs args;
  args.num_tokens = c.num_tokens;
  args.num_q_heads = c.num_q_heads;
  args.num_kv_heads = c.num_kv_heads;
  args.head_dim = c.head_dim;
  args.capacity_tokens = capacity;
  args.q_start_row = c.q_start_row;
  args.sliding_window = c.sliding_window;
  args.scale = 1.0f / std::sqrt(static_cast<float>(c.head_dim));
  args.key_mask_per_query_head = per_query_head;
  AttentionArgs ref_args = args;
  std::vector<float> ref(q_elems), out;
  ref_args.q = q.data();
  ref_args.k_cache = k.data();
  ref_args.v_cache = v.data();
  ref_args.key_mask = c.mask != 0 ? mask.data() : nullptr;
  ref_args.out = ref.data();
  AttentionBf16Ref(ref_args);
  args.q = d_q->data<float>();
  args.k_cache = d_k->data<float>();
  args.v_cache = d_v->data<float>();
  args.key_mask = c.mask != 0 ? d_mask->data<uint8_t>() : nullptr;
  args.out = d_out->data<float>();
  KVGATE_ASSERT_OK(backend->AttentionBf16(args));
  ASSERT_TRUE(d_out->Download(*backend, &out));
  EXPECT_TRUE(AllClose(ref, out, kAtolAttentionBf16, kRtolAttentionBf16));
}

INSTANTIATE_TEST_SUITE_P(Shapes, AttentionBf16Test,
                         ::testing::Values(AttentionCase{129, 32, 8, 128, 0, 0, 0, 0},
                                           AttentionCase{16, 4, 1, 128, 0, 3, 0, 0},
                                           AttentionCase{97, 14, 2, 64, 0, 5, 0, 0},
                                           AttentionCase{64, 8, 8, 64, 0, 0, 0, 0},
                                           AttentionCase{200, 8, 2, 128, 135, 7, 0, 0},
                                           AttentionCase{150, 8, 2, 128, 60, 0, 70, 0},
                                           AttentionCase{130, 8, 2, 128, 100, 9, 0, 1},
                                           AttentionCase{77, 8, 2, 64, 120, 2, 0, 2},
                                           AttentionCase{1024, 32, 8, 128, 0, 0, 0, 0},
                                           AttentionCase{3, 8, 2, 128, 40, 1, 0, 0},
                                           AttentionCase{300, 8, 2, 128, 500, 3, 0, 3},
                                           AttentionCase{190, 8, 4, 64, 410, 0, 0, 4},
                                           AttentionCase{1000, 16, 4, 128, 2000, 0, 0, 1}),
                         [](const auto& info) { return info.param.Name(); });

}  // namespace
}  // namespace kvgate::ops
