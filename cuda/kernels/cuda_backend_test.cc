// Parity tests of the CUDA backend against the plain references (<Op>Ref in
// cuda/cpu/reference_ops.h), op by op: seeded random inputs, the reference on the host,
// the backend on the GPU, an element-wise |ref - out| <= atol + rtol * |ref| check after a
// NaN/Inf check, and canary guard bands on both sides of every output buffer. Every
// test skips when no CUDA device is visible (label gpu), except the factory's own
// error test, which holds on any machine.
#include "cuda/cuda_backend.h"

#include <gtest/gtest.h>

#include <algorithm>
#include <bit>
#include <cmath>
#include <cstdint>
#include <cstdlib>
#include <cstring>
#include <functional>
#include <iomanip>
#include <limits>
#include <memory>
#include <numeric>
#include <ostream>
#include <random>
#include <sstream>
#include <string>
#include <utility>
#include <vector>

#include "absl/status/status.h"
#include "absl/status/statusor.h"
#include "absl/strings/str_cat.h"
#include "common/status_macros.h"
#include "cuda/backend.h"
#include "cuda/bf16.h"
#include "cuda/cpu/reference_ops.h"
#include "cuda/cpu/sink_gate_scores.h"
#include "cuda/kernels/head_paged_decode_attention.cuh"
#include "cuda/kernels/shareable_memory.h"
#include "cuda/testing/head_paged_layout.h"

namespace kvgate::ops {
namespace {

// fp32 kernels against references that accumulate in double (MatMul, RmsNorm,
// Attention) or use the same float formula (Rope, SiluMul): a few float ulps apart.
constexpr float kAtolF32 = 1e-5f;
constexpr float kRtolF32 = 1e-4f;
// Copies (Embed, StoreKv) and a single float add (Add) must be bit-exact.
constexpr float kAtolExact = 0.0f;
constexpr float kRtolExact = 0.0f;
// MatMul: cuBLAS sums k float products in float (blocked, maybe split-k) while
// MatMulRef sums in double, so the absolute error grows with k (like sqrt(k) * eps *
// |x||w| for random inputs in [-1, 1]), not with |ref|. Measured on an H100 (cuBLAS
// 13.0): max |err| 3.1e-5 at k = 4096 and 6.1e-5 at k = 11008, over kAtolF32 = 1e-5, so
// an output near 0 would fail the fp32 tolerance. The allowance kAtolMatMulPerSqrtK *
// sqrt(k) is 2.6e-4 at k = 4096 and 4.2e-4 at k = 11008, about 7x those.
constexpr float kAtolMatMulPerSqrtK = 4e-6f;
constexpr float kRtolMatMul = 1e-4f;

// Floats of canary on each side of every output buffer: 0xDEADBEEF as a float, a
// finite value no kernel computes from these inputs.
constexpr size_t kGuardFloats = 64;
constexpr uint32_t kCanaryBits = 0xDEADBEEFu;

#define KVGATE_ASSERT_OK(expr)                                             \
  do {                                                                     \
    const ::absl::Status kv_test_status_ = (expr);                         \
    ASSERT_TRUE(kv_test_status_.ok()) << #expr << ": " << kv_test_status_; \
  } while (0)

#define KVGATE_ASSERT_OK_AND_ASSIGN(lhs, expr) \
  KVGATE_ASSERT_OK_AND_ASSIGN_IMPL_(KVGATE_TEST_CONCAT_(kv_or_, __LINE__), lhs, expr)
#define KVGATE_TEST_CONCAT_INNER_(a, b) a##b
#define KVGATE_TEST_CONCAT_(a, b) KVGATE_TEST_CONCAT_INNER_(a, b)
#define KVGATE_ASSERT_OK_AND_ASSIGN_IMPL_(statusor, lhs, expr)      \
  auto statusor = (expr);                                           \
  ASSERT_TRUE(statusor.ok()) << #expr << ": " << statusor.status(); \
  lhs = std::move(statusor).value()

std::vector<float> RandomFloats(std::mt19937& rng, size_t n, float lo, float hi) {
  std::uniform_real_distribution<float> dist(lo, hi);
  std::vector<float> v(n);
  for (float& x : v) x = dist(rng);
  return v;
}

std::vector<int32_t> RandomInts(std::mt19937& rng, size_t n, int32_t lo, int32_t hi_inclusive) {
  std::uniform_int_distribution<int32_t> dist(lo, hi_inclusive);
  std::vector<int32_t> v(n);
  for (int32_t& x : v) x = dist(rng);
  return v;
}

// Input buffer on the device holding a copy of `host` (at least one element allocated).
template <typename T>
absl::StatusOr<DeviceBuffer> Upload(Backend& backend, const std::vector<T>& host) {
  const size_t bytes = std::max<size_t>(host.size() * sizeof(T), sizeof(T));
  absl::StatusOr<DeviceBuffer> buffer = backend.Alloc(bytes);
  if (!buffer.ok()) return buffer.status();
  if (!host.empty()) {
    const absl::Status s =
        backend.CopyToBackend(buffer->data(), host.data(), host.size() * sizeof(T));
    if (!s.ok()) return s;
  }
  return buffer;
}

// An output (or in/out) buffer laid out as [canaries][n floats][canaries] on the device.
class GuardedBuffer {
 public:
  static absl::StatusOr<GuardedBuffer> Create(Backend& backend, const std::vector<float>& init) {
    std::vector<float> host(init.size() + 2 * kGuardFloats, std::bit_cast<float>(kCanaryBits));
    std::copy(init.begin(), init.end(), host.begin() + kGuardFloats);
    absl::StatusOr<DeviceBuffer> buffer = Upload(backend, host);
    if (!buffer.ok()) return buffer.status();
    return GuardedBuffer(std::move(*buffer), init.size());
  }

  float* data() const { return buffer_.as<float>() + kGuardFloats; }

  // Copies the payload to `out` and reports any canary that changed.
  ::testing::AssertionResult Download(Backend& backend, std::vector<float>* out) const {
    std::vector<float> host(n_ + 2 * kGuardFloats);
    const absl::Status s =
        backend.CopyToHost(host.data(), buffer_.data(), host.size() * sizeof(float));
    if (!s.ok()) return ::testing::AssertionFailure() << "CopyToHost: " << s;
    for (size_t i = 0; i < host.size(); ++i) {
      if (i >= kGuardFloats && i < kGuardFloats + n_) continue;
      const uint32_t bits = std::bit_cast<uint32_t>(host[i]);
      if (bits != kCanaryBits) {
        const bool before = i < kGuardFloats;
        const long long offset =
            before ? static_cast<long long>(i) - static_cast<long long>(kGuardFloats)
                   : static_cast<long long>(i - kGuardFloats - n_);
        return ::testing::AssertionFailure()
               << "guard band overwritten " << (before ? "before the start" : "after the end")
               << " at offset " << offset << " (bits 0x" << std::hex << bits << std::dec << ")";
      }
    }
    out->assign(host.begin() + kGuardFloats, host.begin() + kGuardFloats + n_);
    return ::testing::AssertionSuccess();
  }

 private:
  GuardedBuffer(DeviceBuffer buffer, size_t n) : buffer_(std::move(buffer)), n_(n) {}
  DeviceBuffer buffer_;
  size_t n_ = 0;
};

// NaN/Inf first, then |ref - out| <= atol + rtol * |ref| on every element; on failure
// reports how many failed and the worst index.
::testing::AssertionResult AllClose(const std::vector<float>& ref, const std::vector<float>& out,
                                    float atol, float rtol) {
  if (ref.size() != out.size()) {
    return ::testing::AssertionFailure()
           << "size " << out.size() << " != reference size " << ref.size();
  }
  for (size_t i = 0; i < ref.size(); ++i) {
    if (!std::isfinite(ref[i])) {
      return ::testing::AssertionFailure() << "reference not finite at " << i << ": " << ref[i];
    }
  }
  for (size_t i = 0; i < out.size(); ++i) {
    if (!std::isfinite(out[i])) {
      return ::testing::AssertionFailure()
             << "output not finite at " << i << ": " << out[i] << " (reference " << ref[i] << ")";
    }
  }
  size_t num_bad = 0;
  size_t worst = 0;
  double worst_excess = -std::numeric_limits<double>::infinity();
  double max_abs_err = 0.0;
  for (size_t i = 0; i < ref.size(); ++i) {
    const double err = std::fabs(static_cast<double>(ref[i]) - out[i]);
    const double allowed = atol + static_cast<double>(rtol) * std::fabs(ref[i]);
    max_abs_err = std::max(max_abs_err, err);
    if (err > allowed) ++num_bad;
    if (err - allowed > worst_excess) {
      worst_excess = err - allowed;
      worst = i;
    }
  }
  if (num_bad == 0) return ::testing::AssertionSuccess() << "max |err| " << max_abs_err;
  std::ostringstream msg;
  msg << std::setprecision(9) << num_bad << " of " << ref.size()
      << " elements outside atol=" << atol << " rtol=" << rtol << "; worst at index " << worst
      << ": ref " << ref[worst] << " out " << out[worst] << " |err| "
      << std::fabs(static_cast<double>(ref[worst]) - out[worst]) << " allowed "
      << atol + static_cast<double>(rtol) * std::fabs(ref[worst]) << "; max |err| " << max_abs_err;
  return ::testing::AssertionFailure() << msg.str();
}

// AllClose as a non-fatal expectation; the max |err| also goes to the XML report
// (--gtest_output=xml) as property max_abs_err<what>, to re-measure tolerance margins.
void ExpectAllClose(const std::vector<float>& ref, const std::vector<float>& out, float atol,
                    float rtol, const std::string& what = "") {
  const ::testing::AssertionResult close = AllClose(ref, out, atol, rtol);
  ::testing::Test::RecordProperty(absl::StrCat("max_abs_err", what), close.message());
  EXPECT_TRUE(close) << what;
}

// Fixture: a fresh cuda:0 backend per test, or a skip without a GPU.
template <typename Case>
class CudaOpTest : public ::testing::TestWithParam<Case> {
 protected:
  void SetUp() override {
    if (CudaDeviceCount() == 0) GTEST_SKIP() << "no CUDA device visible";
    absl::StatusOr<std::unique_ptr<Backend>> backend = CreateCudaBackend(0);
    ASSERT_TRUE(backend.ok()) << backend.status();
    backend_ = std::move(*backend);
  }
  void TearDown() override { backend_.reset(); }

  Backend& backend() { return *backend_; }

 private:
  std::unique_ptr<Backend> backend_;
};

template <typename Case>
std::string CaseName(const ::testing::TestParamInfo<Case>& info) {
  return info.param.Name();
}

// ---------------------------------------------------------------------------- Embed

struct EmbedCase {
  int32_t num_tokens, dim, vocab_size;
  uint32_t seed;
  std::string Name() const {
    return absl::StrCat("tokens", num_tokens, "_dim", dim, "_vocab", vocab_size, "_seed", seed);
  }
};
void PrintTo(const EmbedCase& c, std::ostream* os) { *os << c.Name(); }

using EmbedTest = CudaOpTest<EmbedCase>;

TEST_P(EmbedTest, MatchesReference) {
  const EmbedCase c = GetParam();
  SCOPED_TRACE(c.Name());
  std::mt19937 rng(c.seed);
  const auto table = RandomFloats(rng, static_cast<size_t>(c.vocab_size) * c.dim, -1.0f, 1.0f);
  const auto ids = RandomInts(rng, c.num_tokens, 0, c.vocab_size - 1);
  const size_t n_out = static_cast<size_t>(c.num_tokens) * c.dim;

  std::vector<float> ref(n_out);
  EmbedRef({ids.data(), table.data(), ref.data(), c.num_tokens, c.dim, c.vocab_size});

  KVGATE_ASSERT_OK_AND_ASSIGN(DeviceBuffer d_table, Upload(backend(), table));
  KVGATE_ASSERT_OK_AND_ASSIGN(DeviceBuffer d_ids, Upload(backend(), ids));
  KVGATE_ASSERT_OK_AND_ASSIGN(GuardedBuffer d_out,
                              GuardedBuffer::Create(backend(), std::vector<float>(n_out, 0.0f)));
  KVGATE_ASSERT_OK(backend().Embed(
      {d_ids.as<int32_t>(), d_table.as<float>(), d_out.data(), c.num_tokens, c.dim, c.vocab_size}));
  KVGATE_ASSERT_OK(backend().Synchronize());
  std::vector<float> out;
  ASSERT_TRUE(d_out.Download(backend(), &out));
  ExpectAllClose(ref, out, kAtolExact, kRtolExact);
}

INSTANTIATE_TEST_SUITE_P(Shapes, EmbedTest,
                         ::testing::Values(EmbedCase{1, 1, 1, 11}, EmbedCase{1, 129, 7, 12},
                                           EmbedCase{3, 54, 97, 13}, EmbedCase{54, 97, 3, 14},
                                           EmbedCase{97, 3, 129, 15}, EmbedCase{129, 129, 1000, 16},
                                           EmbedCase{7, 896, 5000, 17}),
                         CaseName<EmbedCase>);

// --------------------------------------------------------------------------- MatMul

struct MatMulCase {
  int32_t m, n, k;
  bool bias;
  uint32_t seed;
  std::string Name() const {
    return absl::StrCat("m", m, "_n", n, "_k", k, bias ? "_bias" : "_nobias", "_seed", seed);
  }
};
void PrintTo(const MatMulCase& c, std::ostream* os) { *os << c.Name(); }

using MatMulTest = CudaOpTest<MatMulCase>;

TEST_P(MatMulTest, MatchesReference) {
  const MatMulCase c = GetParam();
  SCOPED_TRACE(c.Name());
  std::mt19937 rng(c.seed);
  const auto x = RandomFloats(rng, static_cast<size_t>(c.m) * c.k, -1.0f, 1.0f);
  const auto w = RandomFloats(rng, static_cast<size_t>(c.n) * c.k, -1.0f, 1.0f);
  const auto bias = RandomFloats(rng, c.n, -1.0f, 1.0f);
  const size_t n_out = static_cast<size_t>(c.m) * c.n;

  std::vector<float> ref(n_out);
  MatMulRef({x.data(), w.data(), c.bias ? bias.data() : nullptr, ref.data(), c.m, c.n, c.k});

  KVGATE_ASSERT_OK_AND_ASSIGN(DeviceBuffer d_x, Upload(backend(), x));
  KVGATE_ASSERT_OK_AND_ASSIGN(DeviceBuffer d_w, Upload(backend(), w));
  KVGATE_ASSERT_OK_AND_ASSIGN(DeviceBuffer d_bias, Upload(backend(), bias));
  KVGATE_ASSERT_OK_AND_ASSIGN(GuardedBuffer d_y,
                              GuardedBuffer::Create(backend(), std::vector<float>(n_out, 0.0f)));
  KVGATE_ASSERT_OK(
      backend().MatMul({d_x.as<float>(), d_w.as<float>(), c.bias ? d_bias.as<float>() : nullptr,
                        d_y.data(), c.m, c.n, c.k}));
  KVGATE_ASSERT_OK(backend().Synchronize());
  std::vector<float> out;
  ASSERT_TRUE(d_y.Download(backend(), &out));
  const float atol = kAtolMatMulPerSqrtK * std::sqrt(static_cast<float>(c.k));
  ExpectAllClose(ref, out, atol, kRtolMatMul);
}

INSTANTIATE_TEST_SUITE_P(
    Shapes, MatMulTest,
    ::testing::Values(MatMulCase{1, 1, 1, false, 21}, MatMulCase{1, 3, 54, true, 22},
                      MatMulCase{3, 54, 97, true, 23}, MatMulCase{54, 97, 129, false, 24},
                      MatMulCase{97, 129, 3, true, 25}, MatMulCase{129, 1, 97, true, 26},
                      MatMulCase{129, 129, 129, false, 27}, MatMulCase{1, 4864, 896, false, 28},
                      MatMulCase{3, 896, 896, true, 29}, MatMulCase{7, 896, 4864, true, 30},
                      MatMulCase{97, 512, 4096, false, 31}, MatMulCase{54, 64, 11008, true, 32}),
    CaseName<MatMulCase>);

// -------------------------------------------------------------------------- RmsNorm

struct RmsNormCase {
  int32_t rows, dim;
  float eps;
  bool in_place;
  uint32_t seed;
  std::string Name() const {
    return absl::StrCat("rows", rows, "_dim", dim, "_eps", eps == 1e-6f ? "1em6" : "1em5",
                        in_place ? "_inplace" : "", "_seed", seed);
  }
};
void PrintTo(const RmsNormCase& c, std::ostream* os) { *os << c.Name(); }

using RmsNormTest = CudaOpTest<RmsNormCase>;

TEST_P(RmsNormTest, MatchesReference) {
  const RmsNormCase c = GetParam();
  SCOPED_TRACE(c.Name());
  std::mt19937 rng(c.seed);
  const auto x = RandomFloats(rng, static_cast<size_t>(c.rows) * c.dim, -2.0f, 2.0f);
  const auto weight = RandomFloats(rng, c.dim, 0.5f, 1.5f);

  std::vector<float> ref(x.size());
  RmsNormRef({x.data(), weight.data(), ref.data(), c.rows, c.dim, c.eps});

  KVGATE_ASSERT_OK_AND_ASSIGN(DeviceBuffer d_weight, Upload(backend(), weight));
  // In place: x lives in the guarded buffer itself; otherwise x is a plain input.
  KVGATE_ASSERT_OK_AND_ASSIGN(DeviceBuffer d_x, Upload(backend(), x));
  KVGATE_ASSERT_OK_AND_ASSIGN(
      GuardedBuffer d_out,
      GuardedBuffer::Create(backend(), c.in_place ? x : std::vector<float>(x.size(), 0.0f)));
  const float* x_ptr = c.in_place ? d_out.data() : d_x.as<float>();
  KVGATE_ASSERT_OK(
      backend().RmsNorm({x_ptr, d_weight.as<float>(), d_out.data(), c.rows, c.dim, c.eps}));
  KVGATE_ASSERT_OK(backend().Synchronize());
  std::vector<float> out;
  ASSERT_TRUE(d_out.Download(backend(), &out));
  ExpectAllClose(ref, out, kAtolF32, kRtolF32);
}

INSTANTIATE_TEST_SUITE_P(
    Shapes, RmsNormTest,
    ::testing::Values(RmsNormCase{1, 1, 1e-6f, false, 41}, RmsNormCase{1, 4096, 1e-6f, false, 42},
                      RmsNormCase{3, 54, 1e-5f, false, 43}, RmsNormCase{54, 97, 1e-6f, true, 44},
                      RmsNormCase{97, 129, 1e-5f, false, 45}, RmsNormCase{129, 3, 1e-6f, true, 46},
                      RmsNormCase{129, 896, 1e-6f, false, 47},
                      RmsNormCase{5, 5120, 1e-5f, true, 48}),
    CaseName<RmsNormCase>);

// ----------------------------------------------------------------------------- Rope

struct RopeCase {
  int32_t num_tokens, num_heads, head_dim;
  int32_t max_position;  // positions are drawn from [0, max_position]
  float theta;
  uint32_t seed;
  std::string Name() const {
    return absl::StrCat("tokens", num_tokens, "_heads", num_heads, "_hd", head_dim, "_maxpos",
                        max_position, "_theta", static_cast<int64_t>(theta), "_seed", seed);
  }
};
void PrintTo(const RopeCase& c, std::ostream* os) { *os << c.Name(); }

using RopeTest = CudaOpTest<RopeCase>;

TEST_P(RopeTest, MatchesReference) {
  const RopeCase c = GetParam();
  SCOPED_TRACE(c.Name());
  std::mt19937 rng(c.seed);
  const auto x =
      RandomFloats(rng, static_cast<size_t>(c.num_tokens) * c.num_heads * c.head_dim, -1.0f, 1.0f);
  const auto positions = RandomInts(rng, c.num_tokens, 0, c.max_position);
  std::vector<float> inv_freq(c.head_dim / 2);
  for (int32_t i = 0; i < c.head_dim / 2; ++i) {
    inv_freq[i] = static_cast<float>(
        1.0 / std::pow(static_cast<double>(c.theta), 2.0 * i / static_cast<double>(c.head_dim)));
  }

  std::vector<float> ref = x;
  RopeRef({ref.data(), positions.data(), inv_freq.data(), c.num_tokens, c.num_heads, c.head_dim});

  KVGATE_ASSERT_OK_AND_ASSIGN(DeviceBuffer d_positions, Upload(backend(), positions));
  KVGATE_ASSERT_OK_AND_ASSIGN(DeviceBuffer d_inv_freq, Upload(backend(), inv_freq));
  KVGATE_ASSERT_OK_AND_ASSIGN(GuardedBuffer d_x, GuardedBuffer::Create(backend(), x));
  KVGATE_ASSERT_OK(backend().Rope({d_x.data(), d_positions.as<int32_t>(), d_inv_freq.as<float>(),
                                   c.num_tokens, c.num_heads, c.head_dim}));
  KVGATE_ASSERT_OK(backend().Synchronize());
  std::vector<float> out;
  ASSERT_TRUE(d_x.Download(backend(), &out));
  ExpectAllClose(ref, out, kAtolF32, kRtolF32);
}

INSTANTIATE_TEST_SUITE_P(Shapes, RopeTest,
                         ::testing::Values(RopeCase{1, 1, 2, 0, 10000.0f, 51},
                                           RopeCase{3, 3, 16, 54, 10000.0f, 52},
                                           RopeCase{54, 14, 64, 4096, 1000000.0f, 53},
                                           RopeCase{97, 2, 128, 32768, 10000.0f, 54},
                                           RopeCase{129, 4, 64, 129, 10000.0f, 55},
                                           RopeCase{1, 32, 128, 131072, 500000.0f, 56},
                                           RopeCase{7, 8, 256, 8192, 10000.0f, 57}),
                         CaseName<RopeCase>);

// -------------------------------------------------------------------------- StoreKv

struct StoreKvCase {
  int32_t num_tokens, num_kv_heads, head_dim, capacity_tokens, start_row;
  uint32_t seed;
  std::string Name() const {
    return absl::StrCat("tokens", num_tokens, "_kvheads", num_kv_heads, "_hd", head_dim, "_cap",
                        capacity_tokens, "_start", start_row, "_seed", seed);
  }
};
void PrintTo(const StoreKvCase& c, std::ostream* os) { *os << c.Name(); }

using StoreKvTest = CudaOpTest<StoreKvCase>;

TEST_P(StoreKvTest, MatchesReference) {
  const StoreKvCase c = GetParam();
  SCOPED_TRACE(c.Name());
  std::mt19937 rng(c.seed);
  const size_t n_new = static_cast<size_t>(c.num_tokens) * c.num_kv_heads * c.head_dim;
  const size_t n_cache = static_cast<size_t>(c.num_kv_heads) * c.capacity_tokens * c.head_dim;
  const auto k = RandomFloats(rng, n_new, -1.0f, 1.0f);
  const auto v = RandomFloats(rng, n_new, -1.0f, 1.0f);
  // Rows outside [start_row, start_row + num_tokens) hold older values that must stay.
  const auto k_cache = RandomFloats(rng, n_cache, -1.0f, 1.0f);
  const auto v_cache = RandomFloats(rng, n_cache, -1.0f, 1.0f);

  std::vector<float> ref_k = k_cache, ref_v = v_cache;
  StoreKvRef({k.data(), v.data(), ref_k.data(), ref_v.data(), c.num_tokens, c.num_kv_heads,
              c.head_dim, c.capacity_tokens, c.start_row});

  KVGATE_ASSERT_OK_AND_ASSIGN(DeviceBuffer d_k, Upload(backend(), k));
  KVGATE_ASSERT_OK_AND_ASSIGN(DeviceBuffer d_v, Upload(backend(), v));
  KVGATE_ASSERT_OK_AND_ASSIGN(GuardedBuffer d_k_cache, GuardedBuffer::Create(backend(), k_cache));
  KVGATE_ASSERT_OK_AND_ASSIGN(GuardedBuffer d_v_cache, GuardedBuffer::Create(backend(), v_cache));
  KVGATE_ASSERT_OK(backend().StoreKv({d_k.as<float>(), d_v.as<float>(), d_k_cache.data(),
                                      d_v_cache.data(), c.num_tokens, c.num_kv_heads, c.head_dim,
                                      c.capacity_tokens, c.start_row}));
  KVGATE_ASSERT_OK(backend().Synchronize());
  std::vector<float> out_k, out_v;
  ASSERT_TRUE(d_k_cache.Download(backend(), &out_k));
  ASSERT_TRUE(d_v_cache.Download(backend(), &out_v));
  ExpectAllClose(ref_k, out_k, kAtolExact, kRtolExact, "_k_cache");
  ExpectAllClose(ref_v, out_v, kAtolExact, kRtolExact, "_v_cache");
}

INSTANTIATE_TEST_SUITE_P(
    Shapes, StoreKvTest,
    ::testing::Values(StoreKvCase{1, 1, 1, 1, 0, 61}, StoreKvCase{1, 2, 64, 129, 128, 62},
                      StoreKvCase{3, 3, 16, 54, 10, 63}, StoreKvCase{54, 2, 128, 97, 43, 64},
                      StoreKvCase{97, 8, 64, 129, 0, 65}, StoreKvCase{129, 1, 3, 129, 0, 66},
                      StoreKvCase{5, 4, 256, 1000, 500, 67}),
    CaseName<StoreKvCase>);

// ------------------------------------------------------------------------ Attention

struct AttentionCase {
  const char* label;
  int32_t num_tokens, num_q_heads, num_kv_heads, head_dim, capacity_tokens, q_start_row,
      sliding_window;
  float scale;  // 0 = 1 / sqrt(head_dim)
  uint32_t seed;
  std::string Name() const {
    return absl::StrCat(
        label, "_tokens", num_tokens, "_q", num_q_heads, "_kv", num_kv_heads, "_hd", head_dim,
        "_cap", capacity_tokens, "_start", q_start_row, "_win", sliding_window,
        scale == 0.0f ? std::string() : absl::StrCat("_scale", static_cast<int>(scale)), "_seed",
        seed);
  }
  float EffectiveScale() const {
    return scale != 0.0f ? scale : 1.0f / std::sqrt(static_cast<float>(head_dim));
  }
};
void PrintTo(const AttentionCase& c, std::ostream* os) { *os << c.Name(); }

// The cache for a case: random rows wherever some query of the case may look, NaN in
// every row no query may see (later rows and rows before the first window), so a kernel
// that reads outside the visible range produces NaN.
void MakeAttentionCache(const AttentionCase& c, std::mt19937& rng, std::vector<float>* k_cache,
                        std::vector<float>* v_cache) {
  const size_t row_floats = c.head_dim;
  const int32_t last_row = c.q_start_row + c.num_tokens - 1;
  const int32_t first_row =
      c.sliding_window > 0 ? std::max(0, c.q_start_row - c.sliding_window + 1) : 0;
  *k_cache = RandomFloats(rng, static_cast<size_t>(c.num_kv_heads) * c.capacity_tokens * row_floats,
                          -1.0f, 1.0f);
  *v_cache = RandomFloats(rng, k_cache->size(), -1.0f, 1.0f);
  const float nan = std::numeric_limits<float>::quiet_NaN();
  for (int32_t h = 0; h < c.num_kv_heads; ++h) {
    for (int32_t r = 0; r < c.capacity_tokens; ++r) {
      if (r >= first_row && r <= last_row) continue;
      const size_t offset = (static_cast<size_t>(h) * c.capacity_tokens + r) * row_floats;
      std::fill_n(k_cache->begin() + offset, row_floats, nan);
      std::fill_n(v_cache->begin() + offset, row_floats, nan);
    }
  }
}

using AttentionTest = CudaOpTest<AttentionCase>;

TEST_P(AttentionTest, MatchesReference) {
  const AttentionCase c = GetParam();
  SCOPED_TRACE(c.Name());
  std::mt19937 rng(c.seed);
  const auto q = RandomFloats(rng, static_cast<size_t>(c.num_tokens) * c.num_q_heads * c.head_dim,
                              -1.0f, 1.0f);
  std::vector<float> k_cache, v_cache;
  MakeAttentionCache(c, rng, &k_cache, &v_cache);

  std::vector<float> ref(q.size());
  AttentionRef({q.data(), k_cache.data(), v_cache.data(), ref.data(), c.num_tokens, c.num_q_heads,
                c.num_kv_heads, c.head_dim, c.capacity_tokens, c.q_start_row, c.sliding_window,
                c.EffectiveScale()});

  KVGATE_ASSERT_OK_AND_ASSIGN(DeviceBuffer d_q, Upload(backend(), q));
  KVGATE_ASSERT_OK_AND_ASSIGN(DeviceBuffer d_k_cache, Upload(backend(), k_cache));
  KVGATE_ASSERT_OK_AND_ASSIGN(DeviceBuffer d_v_cache, Upload(backend(), v_cache));
  KVGATE_ASSERT_OK_AND_ASSIGN(GuardedBuffer d_out,
                              GuardedBuffer::Create(backend(), std::vector<float>(q.size(), 0.0f)));
  KVGATE_ASSERT_OK(backend().Attention(
      {d_q.as<float>(), d_k_cache.as<float>(), d_v_cache.as<float>(), d_out.data(), c.num_tokens,
       c.num_q_heads, c.num_kv_heads, c.head_dim, c.capacity_tokens, c.q_start_row,
       c.sliding_window, c.EffectiveScale()}));
  KVGATE_ASSERT_OK(backend().Synchronize());
  std::vector<float> out;
  ASSERT_TRUE(d_out.Download(backend(), &out));
  ExpectAllClose(ref, out, kAtolF32, kRtolF32);
}

INSTANTIATE_TEST_SUITE_P(
    Cases, AttentionTest,
    ::testing::Values(
        // label, tokens, q heads, kv heads, head_dim, capacity, q_start_row, window, scale, seed
        AttentionCase{"single", 1, 1, 1, 16, 1, 0, 0, 0.0f, 71},
        AttentionCase{"decode_gqa", 1, 8, 2, 64, 129, 96, 0, 0.0f, 72},
        AttentionCase{"decode_gqa_window", 1, 8, 2, 128, 129, 128, 16, 0.0f, 73},
        AttentionCase{"decode_long", 1, 14, 2, 64, 4096, 4000, 0, 0.0f, 74},
        AttentionCase{"decode_long_window", 1, 8, 2, 128, 4096, 4095, 1024, 0.0f, 75},
        AttentionCase{"prefill_gqa", 129, 8, 2, 64, 129, 0, 0, 0.0f, 76},
        AttentionCase{"prefill_mha_window", 97, 4, 4, 16, 97, 0, 32, 0.0f, 77},
        AttentionCase{"prefill_hd128", 54, 8, 2, 128, 64, 0, 0, 0.0f, 78},
        AttentionCase{"chunked_gqa", 43, 8, 2, 128, 129, 54, 0, 0.0f, 79},
        AttentionCase{"chunked_window", 54, 2, 1, 64, 129, 43, 7, 0.0f, 80},
        AttentionCase{"window1", 3, 3, 3, 16, 3, 0, 1, 0.0f, 81},
        AttentionCase{"window_over_context", 3, 8, 2, 64, 97, 94, 1000, 0.0f, 82},
        AttentionCase{"hd256", 3, 4, 2, 256, 54, 51, 0, 0.0f, 83},
        AttentionCase{"hd3", 54, 2, 2, 3, 54, 0, 0, 0.0f, 84},
        AttentionCase{"peaky_scale1", 97, 8, 2, 128, 129, 32, 0, 1.0f, 85},
        // Grids far smaller than the SM count: the backend splits the rows across blocks.
        AttentionCase{"decode_split", 1, 2, 1, 64, 1000, 900, 0, 0.0f, 86},
        AttentionCase{"chunked_split", 3, 2, 1, 128, 1000, 900, 0, 0.0f, 87},
        AttentionCase{"chunked_split_window", 5, 4, 2, 64, 1024, 700, 300, 0.0f, 88},
        // 129 blocks on a 132-SM H100: 2 splits of 65 rows; token 0's second is empty.
        AttentionCase{"prefill_split_empty", 129, 1, 1, 64, 129, 0, 0, 0.0f, 89},
        AttentionCase{"decode_split_hd256", 1, 4, 1, 256, 2048, 2047, 0, 0.0f, 90},
        AttentionCase{"decode_split_hd3_peaky", 1, 2, 1, 3, 600, 599, 0, 4.0f, 92},
        // Larger prefills and chunks.
        AttentionCase{"prefill_window", 200, 8, 2, 64, 256, 0, 50, 0.0f, 93},
        AttentionCase{"chunked_gqa4", 100, 16, 4, 128, 300, 150, 0, 0.0f, 94},
        AttentionCase{"prefill_hd16", 131, 12, 3, 16, 131, 0, 0, 0.0f, 95},
        AttentionCase{"prefill_hd256", 33, 32, 8, 256, 40, 0, 0, 0.0f, 96}),
    CaseName<AttentionCase>);

// Chunked prefill must equal one-shot prefill. The final one-token chunk is a decode
// step, which the backend splits across blocks (a different summation order), so the
// comparison uses the fp32 tolerances rather than bit equality.
TEST(AttentionEquivalenceTest, ChunkedPrefillEqualsOneShot) {
  if (CudaDeviceCount() == 0) GTEST_SKIP() << "no CUDA device visible";
  KVGATE_ASSERT_OK_AND_ASSIGN(std::unique_ptr<Backend> backend, CreateCudaBackend(0));
  const AttentionCase c{"oneshot", 129, 8, 2, 64, 129, 0, 0, 0.0f, 91};
  std::mt19937 rng(c.seed);
  SCOPED_TRACE(c.Name());
  const auto q = RandomFloats(rng, static_cast<size_t>(c.num_tokens) * c.num_q_heads * c.head_dim,
                              -1.0f, 1.0f);
  std::vector<float> k_cache, v_cache;
  MakeAttentionCache(c, rng, &k_cache, &v_cache);
  KVGATE_ASSERT_OK_AND_ASSIGN(DeviceBuffer d_q, Upload(*backend, q));
  KVGATE_ASSERT_OK_AND_ASSIGN(DeviceBuffer d_k_cache, Upload(*backend, k_cache));
  KVGATE_ASSERT_OK_AND_ASSIGN(DeviceBuffer d_v_cache, Upload(*backend, v_cache));
  KVGATE_ASSERT_OK_AND_ASSIGN(GuardedBuffer d_one_shot,
                              GuardedBuffer::Create(*backend, std::vector<float>(q.size(), 0.0f)));
  KVGATE_ASSERT_OK_AND_ASSIGN(GuardedBuffer d_chunked,
                              GuardedBuffer::Create(*backend, std::vector<float>(q.size(), 0.0f)));
  const size_t token_floats = static_cast<size_t>(c.num_q_heads) * c.head_dim;
  KVGATE_ASSERT_OK(
      backend->Attention({d_q.as<float>(), d_k_cache.as<float>(), d_v_cache.as<float>(),
                          d_one_shot.data(), c.num_tokens, c.num_q_heads, c.num_kv_heads,
                          c.head_dim, c.capacity_tokens, 0, 0, c.EffectiveScale()}));
  const int32_t chunk_starts[] = {0, 54, 97, 128, 129};
  for (int i = 0; i + 1 < 5; ++i) {
    const int32_t start = chunk_starts[i];
    const int32_t tokens = chunk_starts[i + 1] - start;
    KVGATE_ASSERT_OK(backend->Attention(
        {d_q.as<float>() + start * token_floats, d_k_cache.as<float>(), d_v_cache.as<float>(),
         d_chunked.data() + start * token_floats, tokens, c.num_q_heads, c.num_kv_heads, c.head_dim,
         c.capacity_tokens, start, 0, c.EffectiveScale()}));
  }
  KVGATE_ASSERT_OK(backend->Synchronize());
  std::vector<float> one_shot, chunked;
  ASSERT_TRUE(d_one_shot.Download(*backend, &one_shot));
  ASSERT_TRUE(d_chunked.Download(*backend, &chunked));
  ExpectAllClose(one_shot, chunked, kAtolF32, kRtolF32);
}

// ---------------------------------------------------------------- Attention key_mask

struct MaskedAttentionCase {
  const char* label;
  int32_t num_tokens, num_q_heads, num_kv_heads, head_dim, q_start_row, sliding_window;
  int32_t keep_percent;  // chance that a row survives eviction
  uint32_t seed;
  // One mask row per query head (key_mask_per_query_head): the heads of a group see
  // different rows of their shared K/V.
  bool per_query_head = false;
  std::string Name() const {
    return absl::StrCat(label, "_tokens", num_tokens, "_q", num_q_heads, "_kv", num_kv_heads,
                        "_hd", head_dim, "_start", q_start_row, "_win", sliding_window, "_keep",
                        keep_percent, "_seed", seed, per_query_head ? "_perq" : "");
  }
};
void PrintTo(const MaskedAttentionCase& c, std::ostream* os) { *os << c.Name(); }

using MaskedAttentionTest = CudaOpTest<MaskedAttentionCase>;

// Evicted rows of earlier chunks hold NaN (no query may read them), as do rows outside
// every query's window; an evicted row of the current chunk stays finite, since the
// query at that row still sees it. With per-query-head masks a row is evicted when no
// query head of its group keeps it. With keep 100% the mask is all ones, which must
// give bit-for-bit the output of no mask.
TEST_P(MaskedAttentionTest, MatchesReference) {
  const MaskedAttentionCase c = GetParam();
  SCOPED_TRACE(c.Name());
  std::mt19937 rng(c.seed);
  const int32_t capacity = c.q_start_row + c.num_tokens + 3;
  const int32_t first_seen =
      c.sliding_window > 0 ? std::max(0, c.q_start_row - c.sliding_window + 1) : 0;
  const auto q = RandomFloats(rng, static_cast<size_t>(c.num_tokens) * c.num_q_heads * c.head_dim,
                              -1.0f, 1.0f);
  auto k_cache = RandomFloats(rng, static_cast<size_t>(c.num_kv_heads) * capacity * c.head_dim,
                              -1.0f, 1.0f);
  auto v_cache = RandomFloats(rng, k_cache.size(), -1.0f, 1.0f);
  const int32_t mask_rows = c.per_query_head ? c.num_q_heads : c.num_kv_heads;
  const int32_t rows_per_kv_head = mask_rows / c.num_kv_heads;
  std::vector<uint8_t> key_mask(static_cast<size_t>(mask_rows) * capacity);
  std::uniform_int_distribution<int> percent(0, 99);
  for (uint8_t& m : key_mask) m = percent(rng) < c.keep_percent ? 1 : 0;
  for (int32_t h = 0; h < c.num_kv_heads; ++h) {
    for (int32_t r = 0; r < capacity; ++r) {
      bool kept = false;  // by the mask row of some query head of the group
      for (int32_t j = 0; j < rows_per_kv_head; ++j) {
        kept |= key_mask[static_cast<size_t>(h * rows_per_kv_head + j) * capacity + r] != 0;
      }
      if ((!kept && r < c.q_start_row) || r < first_seen || r >= c.q_start_row + c.num_tokens) {
        const size_t offset = (static_cast<size_t>(h) * capacity + r) * c.head_dim;
        std::fill_n(k_cache.begin() + offset, c.head_dim, std::numeric_limits<float>::quiet_NaN());
        std::fill_n(v_cache.begin() + offset, c.head_dim, std::numeric_limits<float>::quiet_NaN());
      }
    }
  }
  const float scale = 1.0f / std::sqrt(static_cast<float>(c.head_dim));
  std::vector<float> ref(q.size());
  AttentionRef({q.data(), k_cache.data(), v_cache.data(), ref.data(), c.num_tokens, c.num_q_heads,
                c.num_kv_heads, c.head_dim, capacity, c.q_start_row, c.sliding_window, scale,
                key_mask.data(), c.per_query_head});

  KVGATE_ASSERT_OK_AND_ASSIGN(DeviceBuffer d_q, Upload(backend(), q));
  KVGATE_ASSERT_OK_AND_ASSIGN(DeviceBuffer d_k, Upload(backend(), k_cache));
  KVGATE_ASSERT_OK_AND_ASSIGN(DeviceBuffer d_v, Upload(backend(), v_cache));
  KVGATE_ASSERT_OK_AND_ASSIGN(DeviceBuffer d_mask, Upload(backend(), key_mask));
  KVGATE_ASSERT_OK_AND_ASSIGN(GuardedBuffer d_out,
                              GuardedBuffer::Create(backend(), std::vector<float>(q.size(), 0.0f)));
  AttentionArgs args{d_q.as<float>(), d_k.as<float>(), d_v.as<float>(), d_out.data(),
                     c.num_tokens, c.num_q_heads, c.num_kv_heads, c.head_dim, capacity,
                     c.q_start_row, c.sliding_window, scale, d_mask.as<uint8_t>(),
                     c.per_query_head};
  KVGATE_ASSERT_OK(backend().Attention(args));
  KVGATE_ASSERT_OK(backend().Synchronize());
  std::vector<float> out;
  ASSERT_TRUE(d_out.Download(backend(), &out));
  ExpectAllClose(ref, out, kAtolF32, kRtolF32);
  if (c.keep_percent == 100) {
    KVGATE_ASSERT_OK_AND_ASSIGN(GuardedBuffer d_plain,
                                GuardedBuffer::Create(backend(), std::vector<float>(q.size(), 0.0f)));
    args.out = d_plain.data();
    args.key_mask = nullptr;
    KVGATE_ASSERT_OK(backend().Attention(args));
    std::vector<float> plain;
    ASSERT_TRUE(d_plain.Download(backend(), &plain));
    ExpectAllClose(plain, out, kAtolExact, kRtolExact, "_ones_vs_null");
  }
}

INSTANTIATE_TEST_SUITE_P(
    Cases, MaskedAttentionTest,
    ::testing::Values(
        // label, tokens, q heads, kv heads, head_dim, q_start_row, window, keep %, seed
        MaskedAttentionCase{"decode_gqa", 1, 8, 2, 64, 128, 0, 50, 201},
        MaskedAttentionCase{"decode_split", 1, 14, 2, 128, 3000, 0, 30, 202},
        MaskedAttentionCase{"decode_split_window", 1, 8, 2, 64, 2000, 700, 40, 203},
        MaskedAttentionCase{"decode_split_sparse", 1, 2, 1, 64, 1000, 0, 2, 204},
        MaskedAttentionCase{"decode_all_evicted", 1, 4, 1, 128, 600, 0, 0, 205},
        MaskedAttentionCase{"prefill_gqa7", 129, 14, 2, 64, 0, 0, 60, 206},
        MaskedAttentionCase{"prefill_window", 97, 4, 4, 16, 0, 32, 50, 207},
        MaskedAttentionCase{"chunked_gqa", 54, 8, 2, 128, 97, 0, 50, 208},
        MaskedAttentionCase{"chunked_window", 3, 8, 2, 256, 129, 16, 0, 209},
        MaskedAttentionCase{"chunked_hd3", 54, 2, 2, 3, 43, 0, 70, 210},
        MaskedAttentionCase{"chunked_split", 3, 2, 1, 128, 1000, 0, 50, 211},
        MaskedAttentionCase{"ones_decode_split", 1, 4, 2, 64, 1500, 0, 100, 212},
        MaskedAttentionCase{"ones_prefill", 97, 8, 2, 64, 0, 40, 100, 213},
        // One mask row per query head (SAGE-KV): decode with and without row splits.
        MaskedAttentionCase{"decode_gqa", 1, 8, 2, 64, 128, 0, 50, 214, true},
        MaskedAttentionCase{"decode_split", 1, 14, 2, 128, 3000, 0, 30, 215, true},
        MaskedAttentionCase{"decode_split_window", 1, 8, 2, 64, 2000, 700, 40, 216, true},
        MaskedAttentionCase{"decode_all_evicted", 1, 4, 1, 128, 600, 0, 0, 217, true},
        MaskedAttentionCase{"prefill_gqa7", 129, 14, 2, 64, 0, 0, 60, 218, true},
        MaskedAttentionCase{"chunked_gqa", 54, 8, 2, 128, 97, 0, 50, 219, true},
        MaskedAttentionCase{"chunked_mha", 54, 4, 4, 16, 43, 0, 70, 220, true},
        MaskedAttentionCase{"ones_decode_split", 1, 4, 2, 64, 1500, 0, 100, 221, true}),
    CaseName<MaskedAttentionCase>);

// ------------------------------------------------------------------------- CopyRows

struct CopyRowsCase {
  int32_t num_rows, row_elements, pool_rows;
  bool in_place;  // src and dst are one buffer, disjoint rows (page compaction)
  uint32_t seed;
  std::string Name() const {
    return absl::StrCat("rows", num_rows, "_elements", row_elements, "_pool", pool_rows,
                        in_place ? "_inplace" : "", "_seed", seed);
  }
};
void PrintTo(const CopyRowsCase& c, std::ostream* os) { *os << c.Name(); }

using CopyRowsTest = CudaOpTest<CopyRowsCase>;

// Random permutation-like index sets over a pool; the result must be bit-exact, rows
// not named in dst_rows must keep their old values, and the guard bands must hold.
TEST_P(CopyRowsTest, MatchesReference) {
  const CopyRowsCase c = GetParam();
  SCOPED_TRACE(c.Name());
  std::mt19937 rng(c.seed);
  std::vector<int32_t> order(c.pool_rows);
  std::iota(order.begin(), order.end(), 0);
  std::shuffle(order.begin(), order.end(), rng);
  std::vector<int32_t> src_rows(order.begin(), order.begin() + c.num_rows), dst_rows;
  if (c.in_place) {
    ASSERT_LE(2 * c.num_rows, c.pool_rows);
    dst_rows.assign(order.begin() + c.num_rows, order.begin() + 2 * c.num_rows);
  } else {
    std::shuffle(order.begin(), order.end(), rng);
    dst_rows.assign(order.begin(), order.begin() + c.num_rows);
  }
  const size_t n = static_cast<size_t>(c.pool_rows) * c.row_elements;
  const auto src = RandomFloats(rng, n, -1.0f, 1.0f);
  const auto dst = c.in_place ? src : RandomFloats(rng, n, -1.0f, 1.0f);
  std::vector<float> ref = dst;
  CopyRowsRef({c.in_place ? ref.data() : src.data(), ref.data(), src_rows.data(), dst_rows.data(),
               c.num_rows, c.row_elements});

  KVGATE_ASSERT_OK_AND_ASSIGN(DeviceBuffer d_src, Upload(backend(), src));
  KVGATE_ASSERT_OK_AND_ASSIGN(DeviceBuffer d_src_rows, Upload(backend(), src_rows));
  KVGATE_ASSERT_OK_AND_ASSIGN(DeviceBuffer d_dst_rows, Upload(backend(), dst_rows));
  KVGATE_ASSERT_OK_AND_ASSIGN(GuardedBuffer d_dst, GuardedBuffer::Create(backend(), dst));
  KVGATE_ASSERT_OK(backend().CopyRows({c.in_place ? d_dst.data() : d_src.as<float>(), d_dst.data(),
                                       d_src_rows.as<int32_t>(), d_dst_rows.as<int32_t>(),
                                       c.num_rows, c.row_elements}));
  KVGATE_ASSERT_OK(backend().Synchronize());
  std::vector<float> out;
  ASSERT_TRUE(d_dst.Download(backend(), &out));
  ExpectAllClose(ref, out, kAtolExact, kRtolExact);
}

// Runs (run_lengths) of 1..16 rows from a contiguous cache into shuffled pages, and
// whole pages back out (the gather of a transfer): the GPU equals the reference bit for
// bit, for bf16 -> bf16 (16-byte words), float32 -> bf16 and float32 -> float32.
TEST(CopyRowRunsTest, MatchesReference) {
  if (CudaDeviceCount() == 0) GTEST_SKIP() << "no CUDA device visible";
  KVGATE_ASSERT_OK_AND_ASSIGN(std::unique_ptr<Backend> backend, CreateCudaBackend(0));
  const int32_t page = 16, pages = 3000, head_dim = 128, cache_rows = 20000;
  std::mt19937 rng(231);
  std::vector<int32_t> page_order(pages);
  std::iota(page_order.begin(), page_order.end(), 0);
  std::shuffle(page_order.begin(), page_order.end(), rng);
  std::vector<int32_t> src_runs, dst_runs, lengths;
  for (int32_t at = 0, k = 0; at < cache_rows && k < pages; ++k) {
    const int32_t n = std::min<int32_t>(1 + static_cast<int32_t>(rng() % page), cache_rows - at);
    src_runs.push_back(at);
    dst_runs.push_back(page_order[k] * page);
    lengths.push_back(n);
    at += n;
  }
  const int32_t runs = static_cast<int32_t>(lengths.size());
  const size_t src_n = static_cast<size_t>(cache_rows) * head_dim, dst_n = static_cast<size_t>(pages) * page * head_dim;
  const std::vector<float> src = RandomFloats(rng, src_n, -2.0f, 2.0f);
  std::vector<Bf16> src_bf16(src_n);
  for (size_t i = 0; i < src_n; ++i) src_bf16[i] = F32ToBf16(src[i]);
  KVGATE_ASSERT_OK_AND_ASSIGN(DeviceBuffer d_src, Upload(*backend, src));
  KVGATE_ASSERT_OK_AND_ASSIGN(DeviceBuffer d_src_bf16, Upload(*backend, src_bf16));
  KVGATE_ASSERT_OK_AND_ASSIGN(DeviceBuffer d_src_runs, Upload(*backend, src_runs));
  KVGATE_ASSERT_OK_AND_ASSIGN(DeviceBuffer d_dst_runs, Upload(*backend, dst_runs));
  KVGATE_ASSERT_OK_AND_ASSIGN(DeviceBuffer d_lengths, Upload(*backend, lengths));
  struct Pair { KvDtype from, to; };
  for (const Pair pair : {Pair{KvDtype::kBf16, KvDtype::kBf16}, Pair{KvDtype::kFloat32, KvDtype::kBf16},
                          Pair{KvDtype::kFloat32, KvDtype::kFloat32}}) {
    SCOPED_TRACE(absl::StrCat(KvDtypeName(pair.from), " -> ", KvDtypeName(pair.to)));
    const size_t to_bytes = KvDtypeBytes(pair.to);
    std::vector<uint8_t> want(dst_n * to_bytes, 0x5A);
    const void* host_src = pair.from == KvDtype::kBf16 ? static_cast<const void*>(src_bf16.data()) : src.data();
    CopyRowsRef({host_src, want.data(), src_runs.data(), dst_runs.data(), runs, head_dim, pair.from, pair.to,
                 lengths.data()});
    KVGATE_ASSERT_OK_AND_ASSIGN(DeviceBuffer d_dst, Upload(*backend, std::vector<uint8_t>(dst_n * to_bytes, 0x5A)));
    KVGATE_ASSERT_OK(backend->CopyRows({pair.from == KvDtype::kBf16 ? d_src_bf16.data() : d_src.data(), d_dst.data(),
                                        d_src_runs.as<int32_t>(), d_dst_runs.as<int32_t>(), runs, head_dim, pair.from,
                                        pair.to, d_lengths.as<int32_t>()}));
    std::vector<uint8_t> got(want.size());
    KVGATE_ASSERT_OK(backend->CopyToHost(got.data(), d_dst.data(), got.size()));
    EXPECT_EQ(std::memcmp(got.data(), want.data(), got.size()), 0);
    // And back out: each run from its page to a contiguous buffer, in one entry a run.
    KVGATE_ASSERT_OK_AND_ASSIGN(DeviceBuffer d_back, Upload(*backend, std::vector<uint8_t>(src_n * to_bytes, 0)));
    std::vector<uint8_t> want_back(src_n * to_bytes, 0);
    CopyRowsRef({want.data(), want_back.data(), dst_runs.data(), src_runs.data(), runs, head_dim, pair.to, pair.to,
                 lengths.data()});
    KVGATE_ASSERT_OK(backend->CopyRows({d_dst.data(), d_back.data(), d_dst_runs.as<int32_t>(),
                                        d_src_runs.as<int32_t>(), runs, head_dim, pair.to, pair.to,
                                        d_lengths.as<int32_t>()}));
    std::vector<uint8_t> back(want_back.size());
    KVGATE_ASSERT_OK(backend->CopyToHost(back.data(), d_back.data(), back.size()));
    EXPECT_EQ(std::memcmp(back.data(), want_back.data(), back.size()), 0);
  }
}

INSTANTIATE_TEST_SUITE_P(
    Shapes, CopyRowsTest,
    ::testing::Values(CopyRowsCase{1, 1, 1, false, 221}, CopyRowsCase{3, 3, 7, false, 222},
                      CopyRowsCase{54, 64, 129, false, 223}, CopyRowsCase{97, 128, 200, true, 224},
                      CopyRowsCase{129, 3, 300, true, 225}, CopyRowsCase{129, 256, 129, false, 226},
                      CopyRowsCase{4096, 128, 5000, false, 227},
                      CopyRowsCase{100000, 4, 250000, true, 228},
                      CopyRowsCase{300, 2048, 1000, false, 229}),
    CaseName<CopyRowsCase>);

// ArgMaxRows against the reference on rows of a 128k vocabulary (random, with planted
// ties) and on the hand-made rows of the rule (NaN in and out of column 0, -inf, ties).
TEST(ArgMaxRowsTest, MatchesReference) {
  if (CudaDeviceCount() == 0) GTEST_SKIP() << "no CUDA device visible";
  KVGATE_ASSERT_OK_AND_ASSIGN(std::unique_ptr<Backend> backend, CreateCudaBackend(0));
  const float nan = std::numeric_limits<float>::quiet_NaN(), inf = std::numeric_limits<float>::infinity();
  std::mt19937 rng(270);
  for (const int32_t cols : {128256, 1500, 255, 3, 1}) {
    SCOPED_TRACE(absl::StrCat(cols, " columns"));
    const int32_t rows = 48;
    std::vector<float> x = RandomFloats(rng, static_cast<size_t>(rows) * cols, -10.0f, 10.0f);
    for (int32_t r = 0; r < rows; ++r) {
      float* row = x.data() + static_cast<int64_t>(r) * cols;
      switch (r % 6) {
        case 0: row[rng() % cols] = 20.0f; row[rng() % cols] = 20.0f; break;  // a tie, maybe
        case 1: row[0] = nan; break;
        case 2: row[rng() % cols] = nan; row[cols - 1] = 30.0f; break;
        case 3: std::fill(row, row + cols, -inf); break;
        case 4: std::fill(row, row + cols, nan); break;
        default: break;
      }
    }
    std::vector<int32_t> ref(rows, -1);
    ArgMaxRowsRef({x.data(), ref.data(), rows, cols});
    KVGATE_ASSERT_OK_AND_ASSIGN(DeviceBuffer d_x, Upload(*backend, x));
    KVGATE_ASSERT_OK_AND_ASSIGN(DeviceBuffer d_out, backend->Alloc(rows * sizeof(int32_t)));
    KVGATE_ASSERT_OK(backend->ArgMaxRows({d_x.as<float>(), d_out.as<int32_t>(), rows, cols}));
    std::vector<int32_t> got(rows, -2);
    KVGATE_ASSERT_OK(backend->CopyToHost(got.data(), d_out.data(), rows * sizeof(int32_t)));
    EXPECT_EQ(got, ref);
  }
}

// Small uploads go through the backend's pinned slots: the host buffer is overwritten as
// soon as each call returns, the ring wraps many times, sizes straddle the slot size,
// and every upload must still land with the bytes it was given.
TEST(CopyToBackendTest, HostBufferMayBeReusedAtOnce) {
  if (CudaDeviceCount() == 0) GTEST_SKIP() << "no CUDA device visible";
  KVGATE_ASSERT_OK_AND_ASSIGN(std::unique_ptr<Backend> backend, CreateCudaBackend(0));
  for (const size_t n : {size_t{1}, size_t{1000}, size_t{1} << 20, (size_t{1} << 20) + 1, size_t{3} << 20}) {
    SCOPED_TRACE(absl::StrCat(n, " int32 per upload"));
    constexpr int kUploads = 40;
    KVGATE_ASSERT_OK_AND_ASSIGN(DeviceBuffer device, backend->Alloc(n * kUploads * sizeof(int32_t)));
    std::vector<int32_t> host(n);
    for (int i = 0; i < kUploads; ++i) {
      for (size_t e = 0; e < n; ++e) host[e] = static_cast<int32_t>(i * 7919 + e);
      KVGATE_ASSERT_OK(backend->CopyToBackend(device.as<int32_t>() + i * n, host.data(), n * sizeof(int32_t)));
    }
    std::fill(host.begin(), host.end(), -1);
    std::vector<int32_t> back(n * kUploads);
    KVGATE_ASSERT_OK(backend->CopyToHost(back.data(), device.data(), back.size() * sizeof(int32_t)));
    for (int i = 0; i < kUploads; ++i) {
      for (size_t e = 0; e < n; e += std::max<size_t>(1, n / 97)) {
        ASSERT_EQ(back[i * n + e], static_cast<int32_t>(i * 7919 + e)) << "upload " << i << " element " << e;
      }
      ASSERT_EQ(back[i * n + n - 1], static_cast<int32_t>(i * 7919 + n - 1)) << "upload " << i;
    }
  }
}

// The converting copies (float32 -> bf16 rounding, bf16 -> float32, bf16 -> bf16 in and
// out of place) against CopyRowsRef, bit for bit; rows not named keep their old bits.
TEST(CopyRowsDtypeTest, ConvertingCopiesMatchReferenceBits) {
  if (CudaDeviceCount() == 0) GTEST_SKIP() << "no CUDA device visible";
  KVGATE_ASSERT_OK_AND_ASSIGN(std::unique_ptr<Backend> backend, CreateCudaBackend(0));
  for (const int32_t row_elements : {128, 64, 3, 1}) {
    const int32_t num_rows = 1000, pool_rows = 2500;
    SCOPED_TRACE(absl::StrCat("row_elements ", row_elements));
    std::mt19937 rng(260 + row_elements);
    std::vector<int32_t> order(pool_rows);
    std::iota(order.begin(), order.end(), 0);
    std::shuffle(order.begin(), order.end(), rng);
    const std::vector<int32_t> src_rows(order.begin(), order.begin() + num_rows);
    const std::vector<int32_t> inplace_dst(order.begin() + num_rows, order.begin() + 2 * num_rows);
    std::shuffle(order.begin(), order.end(), rng);
    const std::vector<int32_t> dst_rows(order.begin(), order.begin() + num_rows);
    const size_t n = static_cast<size_t>(pool_rows) * row_elements;
    std::vector<float> src32 = RandomFloats(rng, n, -3.0f, 3.0f);
    src32[1] = std::numeric_limits<float>::quiet_NaN();
    src32[2] = -std::numeric_limits<float>::infinity();
    const std::vector<Bf16> src16 = paged_testing::ToBf16Bits(RandomFloats(rng, n, -3.0f, 3.0f));
    const std::vector<Bf16> dst16 = paged_testing::ToBf16Bits(RandomFloats(rng, n, -3.0f, 3.0f));
    const std::vector<float> dst32 = RandomFloats(rng, n, -3.0f, 3.0f);
    KVGATE_ASSERT_OK_AND_ASSIGN(DeviceBuffer d_src32, Upload(*backend, src32));
    KVGATE_ASSERT_OK_AND_ASSIGN(DeviceBuffer d_src16, Upload(*backend, src16));
    KVGATE_ASSERT_OK_AND_ASSIGN(DeviceBuffer d_src_rows, Upload(*backend, src_rows));
    KVGATE_ASSERT_OK_AND_ASSIGN(DeviceBuffer d_dst_rows, Upload(*backend, dst_rows));
    KVGATE_ASSERT_OK_AND_ASSIGN(DeviceBuffer d_inplace_dst, Upload(*backend, inplace_dst));
    struct Run {
      const char* what;
      KvDtype src_dtype, dst_dtype;
      bool in_place;
    };
    for (const Run& run : {Run{"float32->bf16", KvDtype::kFloat32, KvDtype::kBf16, false},
                           Run{"bf16->float32", KvDtype::kBf16, KvDtype::kFloat32, false},
                           Run{"bf16->bf16", KvDtype::kBf16, KvDtype::kBf16, false},
                           Run{"bf16->bf16 in place", KvDtype::kBf16, KvDtype::kBf16, true}}) {
      SCOPED_TRACE(run.what);
      const bool wide_out = run.dst_dtype == KvDtype::kFloat32;
      std::vector<float> ref32 = dst32;
      std::vector<Bf16> ref16 = run.in_place ? src16 : dst16;
      const void* host_src = run.src_dtype == KvDtype::kBf16 ? static_cast<const void*>(src16.data())
                                                             : static_cast<const void*>(src32.data());
      void* host_dst = wide_out ? static_cast<void*>(ref32.data()) : static_cast<void*>(ref16.data());
      const std::vector<int32_t>& rows_to = run.in_place ? inplace_dst : dst_rows;
      CopyRowsRef({run.in_place ? host_dst : host_src, host_dst, src_rows.data(), rows_to.data(), num_rows,
                   row_elements, run.src_dtype, run.dst_dtype});
      KVGATE_ASSERT_OK_AND_ASSIGN(DeviceBuffer d_dst, wide_out ? Upload(*backend, dst32)
                                                               : Upload(*backend, run.in_place ? src16 : dst16));
      const void* d_src = run.in_place ? d_dst.data() : run.src_dtype == KvDtype::kBf16 ? d_src16.data() : d_src32.data();
      KVGATE_ASSERT_OK(backend->CopyRows({d_src, d_dst.data(), d_src_rows.as<int32_t>(),
                                          (run.in_place ? d_inplace_dst : d_dst_rows).as<int32_t>(), num_rows,
                                          row_elements, run.src_dtype, run.dst_dtype}));
      const size_t bytes = n * KvDtypeBytes(run.dst_dtype);
      std::vector<uint8_t> got(bytes);
      KVGATE_ASSERT_OK(backend->CopyToHost(got.data(), d_dst.data(), bytes));
      if (wide_out) {
        EXPECT_EQ(std::memcmp(got.data(), host_dst, bytes), 0);
      } else {
        // Bit for bit, except that a NaN only has to stay a NaN (the device's canonical
        // NaN and the host's quieted payload differ).
        const auto is_nan = [](Bf16 b) { return (b & 0x7F80u) == 0x7F80u && (b & 0x007Fu) != 0; };
        for (size_t e = 0; e < n; ++e) {
          Bf16 g, w;
          std::memcpy(&g, got.data() + 2 * e, 2);
          std::memcpy(&w, static_cast<const uint8_t*>(host_dst) + 2 * e, 2);
          if (is_nan(w)) {
            ASSERT_TRUE(is_nan(g)) << "element " << e << " got 0x" << std::hex << g;
          } else {
            ASSERT_EQ(g, w) << "element " << e;
          }
        }
      }
    }
    // A converting copy within one buffer is refused.
    EXPECT_EQ(backend
                  ->CopyRows({d_src32.data(), d_src32.data(), d_src_rows.as<int32_t>(), d_inplace_dst.as<int32_t>(),
                              num_rows, row_elements, KvDtype::kFloat32, KvDtype::kBf16})
                  .code(),
              absl::StatusCode::kInvalidArgument);
  }
}

// ---------------------------------------------------------- HeadPagedDecodeAttention

// A head-paged layout (cuda/testing/head_paged_layout.h) copied to the device.
struct DeviceLayout {
  DeviceBuffer k_pages, v_pages, page_indptr, page_ids, lengths, query_masks, first_slots, gap_rows, gap_slots;
  bool with_masks = false, with_slot_offsets = false;
  int32_t page_tokens = 0, head_dim = 0;
  KvDtype dtype = KvDtype::kFloat32;
  HeadPagedKvView View() const {
    HeadPagedKvView view{k_pages.data(),            v_pages.data(),
                         page_indptr.as<int32_t>(), page_ids.as<int32_t>(),
                         lengths.as<int32_t>(),     with_masks ? query_masks.as<uint8_t>() : nullptr,
                         page_tokens,               head_dim,
                         dtype};
    view.first_slots = with_slot_offsets ? first_slots.as<int32_t>() : nullptr;
    view.gap_rows = with_slot_offsets ? gap_rows.as<int32_t>() : nullptr;
    view.gap_slots = with_slot_offsets ? gap_slots.as<int32_t>() : nullptr;
    return view;
  }
};

// With dtype bf16 the pages hold the bf16 bits of the layout's values.
absl::StatusOr<DeviceLayout> UploadLayout(Backend& backend, const paged_testing::HeadPagedLayout& host,
                                          KvDtype dtype = KvDtype::kFloat32) {
  DeviceLayout d;
  d.with_masks = !host.query_masks.empty();
  d.page_tokens = host.page_tokens;
  d.head_dim = host.head_dim;
  d.dtype = dtype;
  for (auto [dst, src] : {std::pair{&d.k_pages, &host.k_pages}, {&d.v_pages, &host.v_pages}}) {
    absl::StatusOr<DeviceBuffer> b =
        dtype == KvDtype::kBf16 ? Upload(backend, paged_testing::ToBf16Bits(*src)) : Upload(backend, *src);
    if (!b.ok()) return b.status();
    *dst = std::move(*b);
  }
  d.with_slot_offsets = !host.first_slots.empty();
  for (auto [dst, src] : {std::pair{&d.page_indptr, &host.page_indptr}, {&d.page_ids, &host.page_ids},
                          {&d.lengths, &host.lengths}, {&d.first_slots, &host.first_slots},
                          {&d.gap_rows, &host.gap_rows}, {&d.gap_slots, &host.gap_slots}}) {
    absl::StatusOr<DeviceBuffer> b = Upload(backend, *src);
    if (!b.ok()) return b.status();
    *dst = std::move(*b);
  }
  absl::StatusOr<DeviceBuffer> masks = Upload(backend, host.query_masks);
  if (!masks.ok()) return masks.status();
  d.query_masks = std::move(*masks);
  return d;
}

struct HeadPagedCase {
  const char* label;
  int32_t num_seqs, num_q_heads, num_kv_heads, head_dim, page_tokens;
  std::vector<int32_t> lengths;  // cycled over the seq heads
  bool masks;
  uint32_t seed;
  std::string Name() const {
    std::string lens;
    for (int32_t l : lengths) absl::StrAppend(&lens, "_", l);
    return absl::StrCat(label, "_seqs", num_seqs, "_q", num_q_heads, "_kv", num_kv_heads, "_hd",
                        head_dim, "_pt", page_tokens, "_len", lens, masks ? "_masks" : "",
                        seed % 2 == 1 ? "_slot_offsets" : "", "_seed", seed);
  }
};
void PrintTo(const HeadPagedCase& c, std::ostream* os) { *os << c.Name(); }

using HeadPagedDecodeAttentionTest = CudaOpTest<HeadPagedCase>;

TEST_P(HeadPagedDecodeAttentionTest, MatchesReference) {
  const HeadPagedCase c = GetParam();
  SCOPED_TRACE(c.Name());
  std::mt19937 rng(c.seed);
  std::vector<int32_t> lengths(static_cast<size_t>(c.num_seqs) * c.num_kv_heads);
  for (size_t i = 0; i < lengths.size(); ++i) lengths[i] = c.lengths[i % c.lengths.size()];
  // Odd seeds start each head at a random slot of its first page and leave a gap (a
  // ring's layouts).
  const paged_testing::HeadPagedLayout layout = paged_testing::MakeHeadPagedLayout(
      rng, lengths, c.page_tokens, c.head_dim, c.num_q_heads / c.num_kv_heads, c.masks, 5, c.seed % 2 == 1);
  const auto q = RandomFloats(rng, static_cast<size_t>(c.num_seqs) * c.num_q_heads * c.head_dim,
                              -1.0f, 1.0f);
  const float scale = 1.0f / std::sqrt(static_cast<float>(c.head_dim));
  std::vector<float> ref(q.size());
  HeadPagedDecodeAttentionRef(
      {q.data(), layout.HostView(), ref.data(), c.num_seqs, c.num_q_heads, c.num_kv_heads, scale});

  KVGATE_ASSERT_OK_AND_ASSIGN(DeviceBuffer d_q, Upload(backend(), q));
  KVGATE_ASSERT_OK_AND_ASSIGN(DeviceLayout d_layout, UploadLayout(backend(), layout));
  KVGATE_ASSERT_OK_AND_ASSIGN(GuardedBuffer d_out,
                              GuardedBuffer::Create(backend(), std::vector<float>(q.size(), 0.0f)));
  KVGATE_ASSERT_OK(backend().HeadPagedDecodeAttention({d_q.as<float>(), d_layout.View(),
                                                       d_out.data(), c.num_seqs, c.num_q_heads,
                                                       c.num_kv_heads, scale}));
  KVGATE_ASSERT_OK(backend().Synchronize());
  std::vector<float> out;
  ASSERT_TRUE(d_out.Download(backend(), &out));
  ExpectAllClose(ref, out, kAtolF32, kRtolF32);

  // The per-query-head kernel as well: the backend prefers the grouped one (head_dim 64 or
  // 128, at most 8 query heads per kv head), so without this those shapes would test
  // only it. A backend built with KVGATE_GROUPED_DECODE_ATTENTION=0 always takes the other.
  ::setenv("KVGATE_GROUPED_DECODE_ATTENTION", "0", 1);
  absl::StatusOr<std::unique_ptr<Backend>> per_head = CreateCudaBackend(0);
  ::unsetenv("KVGATE_GROUPED_DECODE_ATTENTION");
  KVGATE_ASSERT_OK(per_head.status());
  KVGATE_ASSERT_OK_AND_ASSIGN(GuardedBuffer d_out_per_head,
                              GuardedBuffer::Create(backend(), std::vector<float>(q.size(), 0.0f)));
  KVGATE_ASSERT_OK((*per_head)->HeadPagedDecodeAttention({d_q.as<float>(), d_layout.View(),
                                                          d_out_per_head.data(), c.num_seqs,
                                                          c.num_q_heads, c.num_kv_heads, scale}));
  KVGATE_ASSERT_OK((*per_head)->Synchronize());
  std::vector<float> out_per_head;
  ASSERT_TRUE(d_out_per_head.Download(backend(), &out_per_head));
  ExpectAllClose(ref, out_per_head, kAtolF32, kRtolF32);

  // bf16 pages, on both kernels: the result of float32 pages holding the rounded values,
  // bit for bit (rows are widened as loaded; the arithmetic is the float32 kernel's).
  const paged_testing::HeadPagedLayout rounded = paged_testing::RoundedToBf16(layout);
  KVGATE_ASSERT_OK_AND_ASSIGN(DeviceLayout d_rounded, UploadLayout(backend(), rounded));
  KVGATE_ASSERT_OK_AND_ASSIGN(DeviceLayout d_bf16, UploadLayout(backend(), layout, KvDtype::kBf16));
  for (Backend* b : {&backend(), per_head->get()}) {
    SCOPED_TRACE(b == &backend() ? "bf16, preferred kernel" : "bf16, per-query-head kernel");
    KVGATE_ASSERT_OK_AND_ASSIGN(GuardedBuffer d_from_f32,
                                GuardedBuffer::Create(backend(), std::vector<float>(q.size(), 0.0f)));
    KVGATE_ASSERT_OK_AND_ASSIGN(GuardedBuffer d_from_bf16,
                                GuardedBuffer::Create(backend(), std::vector<float>(q.size(), 0.0f)));
    KVGATE_ASSERT_OK(b->HeadPagedDecodeAttention(
        {d_q.as<float>(), d_rounded.View(), d_from_f32.data(), c.num_seqs, c.num_q_heads, c.num_kv_heads, scale}));
    KVGATE_ASSERT_OK(b->HeadPagedDecodeAttention(
        {d_q.as<float>(), d_bf16.View(), d_from_bf16.data(), c.num_seqs, c.num_q_heads, c.num_kv_heads, scale}));
    KVGATE_ASSERT_OK(b->Synchronize());
    std::vector<float> from_f32, from_bf16;
    ASSERT_TRUE(d_from_f32.Download(backend(), &from_f32));
    ASSERT_TRUE(d_from_bf16.Download(backend(), &from_bf16));
    EXPECT_EQ(std::memcmp(from_f32.data(), from_bf16.data(), from_f32.size() * sizeof(float)), 0);
    // And the CPU reference over the rounded values, within the float32 tolerance.
    std::vector<float> rounded_ref(q.size());
    HeadPagedDecodeAttentionRef(
        {q.data(), rounded.HostView(), rounded_ref.data(), c.num_seqs, c.num_q_heads, c.num_kv_heads, scale});
    ExpectAllClose(rounded_ref, from_bf16, kAtolF32, kRtolF32);
  }
}

// On a 132-SM H100/H200 fewer than 132 (sequence, q head) blocks split each head's rows
// (shares of at least 128 rows), so the "split" cases run the merge kernel, with empty
// splits for the short heads, and the "batch" cases run one block per head.
INSTANTIATE_TEST_SUITE_P(
    Cases, HeadPagedDecodeAttentionTest,
    ::testing::Values(
        // label, seqs, q heads, kv heads, head_dim, page_tokens, lengths, masks, seed
        HeadPagedCase{"gqa4", 3, 8, 2, 128, 16, {1, 3, 54, 97, 129, 16}, true, 231},
        HeadPagedCase{"pt1_mha", 2, 4, 4, 64, 1, {1, 3, 54, 97, 129}, false, 232},
        HeadPagedCase{"pt128_gqa7", 2, 14, 2, 64, 128, {129, 3, 97, 1}, true, 233},
        HeadPagedCase{"pt128_gqa7", 2, 14, 2, 64, 128, {129, 3, 97, 1}, false, 234},
        HeadPagedCase{"hd3", 1, 2, 1, 3, 16, {54}, true, 235},
        HeadPagedCase{"hd1", 1, 1, 1, 1, 16, {97}, false, 236},
        HeadPagedCase{"hd256", 2, 4, 2, 256, 16, {97, 129, 1, 3}, true, 237},
        HeadPagedCase{"gqa1", 2, 4, 4, 64, 16, {3, 54, 97, 129}, true, 238},
        HeadPagedCase{"batch", 24, 8, 2, 128, 16, {1, 3, 54, 97, 129, 300, 17}, true, 239},
        HeadPagedCase{"batch_pt1_gqa7", 20, 7, 1, 64, 1, {129, 1, 54, 3, 97}, true, 240},
        HeadPagedCase{"batch_hd256", 40, 4, 4, 256, 128, {300, 1, 129}, false, 241},
        HeadPagedCase{"split_long", 1, 2, 1, 128, 16, {4000}, true, 242},
        HeadPagedCase{"split_long_pt128", 1, 4, 1, 64, 128, {4095}, false, 243},
        HeadPagedCase{"split_ragged", 2, 4, 2, 128, 16, {1000, 1, 129, 3}, true, 244},
        HeadPagedCase{"split_gqa7_hd256", 1, 7, 1, 256, 16, {2500}, true, 245},
        // The grouped kernel's own shapes: a serving batch (no split), a few long heads
        // (split, with empty later splits), a ragged page size, and a head with no row.
        HeadPagedCase{"grouped_batch_gqa4", 48, 32, 8, 128, 16, {2100, 1, 700, 2047}, true, 246},
        HeadPagedCase{"grouped_batch_gqa4", 48, 32, 8, 128, 16, {2100, 1, 700, 2047}, false, 247},
        HeadPagedCase{"grouped_split_gqa8", 2, 16, 2, 64, 16, {5000, 17, 129, 0}, true, 248},
        HeadPagedCase{"grouped_pt7_gqa3", 5, 6, 2, 128, 7, {300, 1, 45, 1000, 6}, true, 249}),
    CaseName<HeadPagedCase>);

// The equivalence chain: paged decode over pages holding exactly rows [0, L) of every
// kv head equals the contiguous Attention kernel for the query at row L - 1 over a copy
// gathered from the pages on the device with CopyRows, and both equal AttentionRef over
// the same copy gathered on the host. The gathered copies must be bit-identical.
TEST(HeadPagedDecodeEquivalenceTest, PagedEqualsContiguousOnGatheredCopy) {
  if (CudaDeviceCount() == 0) GTEST_SKIP() << "no CUDA device visible";
  KVGATE_ASSERT_OK_AND_ASSIGN(std::unique_ptr<Backend> backend, CreateCudaBackend(0));
  const int32_t kv_heads = 2, q_heads = 8, head_dim = 128, page_tokens = 16;
  const float scale = 1.0f / std::sqrt(static_cast<float>(head_dim));
  // 1 and 3 sequences: split (with empty splits) and unsplit grids of both kernels.
  for (const std::vector<int32_t>& seq_lengths :
       {std::vector<int32_t>{1000}, std::vector<int32_t>{1, 54, 129}}) {
    const int32_t num_seqs = static_cast<int32_t>(seq_lengths.size());
    SCOPED_TRACE(absl::StrCat("seqs ", num_seqs, " first length ", seq_lengths[0]));
    std::vector<int32_t> lengths;
    for (int32_t l : seq_lengths) lengths.insert(lengths.end(), kv_heads, l);
    std::mt19937 rng(250 + num_seqs);
    const paged_testing::HeadPagedLayout layout =
        paged_testing::MakeHeadPagedLayout(rng, lengths, page_tokens, head_dim, 4, false, 3);
    const auto q = RandomFloats(rng, static_cast<size_t>(num_seqs) * q_heads * head_dim, -1.0f, 1.0f);
    KVGATE_ASSERT_OK_AND_ASSIGN(DeviceBuffer d_q, Upload(*backend, q));
    KVGATE_ASSERT_OK_AND_ASSIGN(DeviceLayout d_layout, UploadLayout(*backend, layout));
    KVGATE_ASSERT_OK_AND_ASSIGN(GuardedBuffer d_paged,
                                GuardedBuffer::Create(*backend, std::vector<float>(q.size(), 0.0f)));
    KVGATE_ASSERT_OK(backend->HeadPagedDecodeAttention(
        {d_q.as<float>(), d_layout.View(), d_paged.data(), num_seqs, q_heads, kv_heads, scale}));
    std::vector<float> ref(q.size()), contiguous(q.size());
    for (int32_t s = 0; s < num_seqs; ++s) {
      const int32_t length = seq_lengths[s], capacity = length + 2;  // NaN rows past the query
      const size_t cache_floats = static_cast<size_t>(kv_heads) * capacity * head_dim;
      std::vector<float> k(cache_floats, std::numeric_limits<float>::quiet_NaN()), v = k;
      std::vector<int32_t> src_rows, dst_rows;
      for (int32_t h = 0; h < kv_heads; ++h) {
        for (int32_t r = 0; r < length; ++r) {
          const int64_t pool_row = layout.PoolRow(s * kv_heads + h, r);
          std::copy_n(layout.k_pages.begin() + pool_row * head_dim, head_dim,
                      k.begin() + (static_cast<size_t>(h) * capacity + r) * head_dim);
          std::copy_n(layout.v_pages.begin() + pool_row * head_dim, head_dim,
                      v.begin() + (static_cast<size_t>(h) * capacity + r) * head_dim);
          src_rows.push_back(static_cast<int32_t>(pool_row));
          dst_rows.push_back(h * capacity + r);
        }
      }
      const size_t offset = static_cast<size_t>(s) * q_heads * head_dim;
      AttentionRef({q.data() + offset, k.data(), v.data(), ref.data() + offset, 1, q_heads,
                    kv_heads, head_dim, capacity, length - 1, 0, scale});
      // The device copy starts all NaN and is filled by CopyRows from the pages.
      const std::vector<float> nan_cache(cache_floats, std::numeric_limits<float>::quiet_NaN());
      KVGATE_ASSERT_OK_AND_ASSIGN(GuardedBuffer d_k, GuardedBuffer::Create(*backend, nan_cache));
      KVGATE_ASSERT_OK_AND_ASSIGN(GuardedBuffer d_v, GuardedBuffer::Create(*backend, nan_cache));
      KVGATE_ASSERT_OK_AND_ASSIGN(DeviceBuffer d_src_rows, Upload(*backend, src_rows));
      KVGATE_ASSERT_OK_AND_ASSIGN(DeviceBuffer d_dst_rows, Upload(*backend, dst_rows));
      for (auto [from, to] : {std::pair{&d_layout.k_pages, &d_k}, {&d_layout.v_pages, &d_v}}) {
        KVGATE_ASSERT_OK(backend->CopyRows({from->as<float>(), to->data(),
                                            d_src_rows.as<int32_t>(), d_dst_rows.as<int32_t>(),
                                            static_cast<int32_t>(src_rows.size()), head_dim}));
      }
      KVGATE_ASSERT_OK_AND_ASSIGN(
          GuardedBuffer d_out,
          GuardedBuffer::Create(*backend, std::vector<float>(static_cast<size_t>(q_heads) * head_dim, 0.0f)));
      KVGATE_ASSERT_OK(backend->Attention({d_q.as<float>() + offset, d_k.data(), d_v.data(),
                                           d_out.data(), 1, q_heads, kv_heads, head_dim, capacity,
                                           length - 1, 0, scale}));
      std::vector<float> gathered_k, gathered_v, out;
      ASSERT_TRUE(d_k.Download(*backend, &gathered_k));
      ASSERT_TRUE(d_v.Download(*backend, &gathered_v));
      ASSERT_TRUE(d_out.Download(*backend, &out));
      ASSERT_EQ(std::memcmp(gathered_k.data(), k.data(), cache_floats * sizeof(float)), 0);
      ASSERT_EQ(std::memcmp(gathered_v.data(), v.data(), cache_floats * sizeof(float)), 0);
      std::copy(out.begin(), out.end(), contiguous.begin() + offset);
    }
    std::vector<float> paged;
    ASSERT_TRUE(d_paged.Download(*backend, &paged));
    ExpectAllClose(ref, contiguous, kAtolF32, kRtolF32, "_contiguous_vs_ref");
    ExpectAllClose(ref, paged, kAtolF32, kRtolF32, "_paged_vs_ref");
    ExpectAllClose(contiguous, paged, kAtolF32, kRtolF32, "_paged_vs_contiguous");
  }
}

// Evicted keys masked out: per kv head a random subset of rows [0, L - 1) is kept, plus
// the new token at L - 1, and the pages hold only the kept rows. Paged decode must equal
// Attention with key_mask clearing the dropped rows (NaN in the contiguous cache) for
// the query at row L - 1, on the GPU and in AttentionRef.
TEST(HeadPagedDecodeEquivalenceTest, KeptRowsEqualKeyMaskedAttention) {
  if (CudaDeviceCount() == 0) GTEST_SKIP() << "no CUDA device visible";
  KVGATE_ASSERT_OK_AND_ASSIGN(std::unique_ptr<Backend> backend, CreateCudaBackend(0));
  const int32_t kv_heads = 2, q_heads = 14, head_dim = 64, page_tokens = 16;
  const float scale = 1.0f / std::sqrt(static_cast<float>(head_dim));
  for (int32_t length : {1, 3, 129, 2000}) {
    SCOPED_TRACE(absl::StrCat("length ", length));
    std::mt19937 rng(260 + length);
    std::vector<std::vector<int32_t>> kept(kv_heads);
    std::vector<int32_t> kept_lengths;
    std::bernoulli_distribution keep(0.4);
    for (int32_t h = 0; h < kv_heads; ++h) {
      for (int32_t r = 0; r < length - 1; ++r) {
        if (keep(rng)) kept[h].push_back(r);
      }
      kept[h].push_back(length - 1);
      kept_lengths.push_back(static_cast<int32_t>(kept[h].size()));
    }
    paged_testing::HeadPagedLayout layout =
        paged_testing::MakeHeadPagedLayout(rng, kept_lengths, page_tokens, head_dim, 7, false, 2);
    const int32_t capacity = length + 1;
    std::vector<float> k(static_cast<size_t>(kv_heads) * capacity * head_dim,
                         std::numeric_limits<float>::quiet_NaN());
    std::vector<float> v = k;
    std::vector<uint8_t> key_mask(static_cast<size_t>(kv_heads) * capacity, 0);
    for (int32_t h = 0; h < kv_heads; ++h) {
      for (size_t j = 0; j < kept[h].size(); ++j) {
        const size_t row = static_cast<size_t>(h) * capacity + kept[h][j];
        key_mask[row] = 1;
        std::copy_n(layout.K(h, static_cast<int32_t>(j)), head_dim, k.begin() + row * head_dim);
        std::copy_n(layout.V(h, static_cast<int32_t>(j)), head_dim, v.begin() + row * head_dim);
      }
    }
    const auto q = RandomFloats(rng, static_cast<size_t>(q_heads) * head_dim, -1.0f, 1.0f);
    std::vector<float> ref(q.size());
    AttentionRef({q.data(), k.data(), v.data(), ref.data(), 1, q_heads, kv_heads, head_dim,
                  capacity, length - 1, 0, scale, key_mask.data()});

    KVGATE_ASSERT_OK_AND_ASSIGN(DeviceBuffer d_q, Upload(*backend, q));
    KVGATE_ASSERT_OK_AND_ASSIGN(DeviceBuffer d_k, Upload(*backend, k));
    KVGATE_ASSERT_OK_AND_ASSIGN(DeviceBuffer d_v, Upload(*backend, v));
    KVGATE_ASSERT_OK_AND_ASSIGN(DeviceBuffer d_mask, Upload(*backend, key_mask));
    KVGATE_ASSERT_OK_AND_ASSIGN(DeviceLayout d_layout, UploadLayout(*backend, layout));
    KVGATE_ASSERT_OK_AND_ASSIGN(GuardedBuffer d_masked,
                                GuardedBuffer::Create(*backend, std::vector<float>(q.size(), 0.0f)));
    KVGATE_ASSERT_OK_AND_ASSIGN(GuardedBuffer d_paged,
                                GuardedBuffer::Create(*backend, std::vector<float>(q.size(), 0.0f)));
    KVGATE_ASSERT_OK(backend->Attention({d_q.as<float>(), d_k.as<float>(), d_v.as<float>(),
                                         d_masked.data(), 1, q_heads, kv_heads, head_dim, capacity,
                                         length - 1, 0, scale, d_mask.as<uint8_t>()}));
    KVGATE_ASSERT_OK(backend->HeadPagedDecodeAttention(
        {d_q.as<float>(), d_layout.View(), d_paged.data(), 1, q_heads, kv_heads, scale}));
    std::vector<float> masked, paged;
    ASSERT_TRUE(d_masked.Download(*backend, &masked));
    ASSERT_TRUE(d_paged.Download(*backend, &paged));
    ExpectAllClose(ref, masked, kAtolF32, kRtolF32, "_masked_vs_ref");
    ExpectAllClose(ref, paged, kAtolF32, kRtolF32, "_paged_vs_ref");
    ExpectAllClose(masked, paged, kAtolF32, kRtolF32, "_paged_vs_masked");
  }
}

// SAGE-KV's cache: as above, and every kept row also carries random query-head bits (the
// new token all of them). Paged decode with query_masks must equal Attention with a
// per-query-head key_mask (key_mask_per_query_head) clearing, for query head g, every
// row that is not kept or whose bit g is clear, on the GPU and in AttentionRef.
TEST(HeadPagedDecodeEquivalenceTest, QueryMaskedRowsEqualPerQueryHeadMaskedAttention) {
  if (CudaDeviceCount() == 0) GTEST_SKIP() << "no CUDA device visible";
  KVGATE_ASSERT_OK_AND_ASSIGN(std::unique_ptr<Backend> backend, CreateCudaBackend(0));
  const int32_t kv_heads = 2, head_dim = 64, page_tokens = 16;
  const float scale = 1.0f / std::sqrt(static_cast<float>(head_dim));
  for (int32_t q_heads : {8, 14}) {
    const int32_t group = q_heads / kv_heads;
    for (int32_t length : {1, 3, 129, 2000}) {
      SCOPED_TRACE(absl::StrCat("q_heads ", q_heads, " length ", length));
      std::mt19937 rng(280 + length + q_heads);
      std::vector<std::vector<int32_t>> kept(kv_heads);
      std::vector<int32_t> kept_lengths;
      std::bernoulli_distribution keep(0.6);
      for (int32_t h = 0; h < kv_heads; ++h) {
        for (int32_t r = 0; r < length - 1; ++r) {
          if (keep(rng)) kept[h].push_back(r);
        }
        kept[h].push_back(length - 1);
        kept_lengths.push_back(static_cast<int32_t>(kept[h].size()));
      }
      paged_testing::HeadPagedLayout layout =
          paged_testing::MakeHeadPagedLayout(rng, kept_lengths, page_tokens, head_dim, group, true, 2);
      const int32_t capacity = length + 1;
      std::vector<float> k(static_cast<size_t>(kv_heads) * capacity * head_dim,
                           std::numeric_limits<float>::quiet_NaN());
      std::vector<float> v = k;
      std::vector<uint8_t> key_mask(static_cast<size_t>(q_heads) * capacity, 0);
      for (int32_t h = 0; h < kv_heads; ++h) {
        for (size_t j = 0; j < kept[h].size(); ++j) {
          const int32_t r = kept[h][j];
          const uint8_t bits = layout.query_masks[layout.PoolRow(h, static_cast<int32_t>(j))];
          for (int32_t g = 0; g < group; ++g) {
            key_mask[static_cast<size_t>(h * group + g) * capacity + r] = (bits >> g) & 1;
          }
          const size_t row = static_cast<size_t>(h) * capacity + r;
          std::copy_n(layout.K(h, static_cast<int32_t>(j)), head_dim, k.begin() + row * head_dim);
          std::copy_n(layout.V(h, static_cast<int32_t>(j)), head_dim, v.begin() + row * head_dim);
        }
      }
      const auto q = RandomFloats(rng, static_cast<size_t>(q_heads) * head_dim, -1.0f, 1.0f);
      std::vector<float> ref(q.size());
      AttentionRef({q.data(), k.data(), v.data(), ref.data(), 1, q_heads, kv_heads, head_dim,
                    capacity, length - 1, 0, scale, key_mask.data(), true});

      KVGATE_ASSERT_OK_AND_ASSIGN(DeviceBuffer d_q, Upload(*backend, q));
      KVGATE_ASSERT_OK_AND_ASSIGN(DeviceBuffer d_k, Upload(*backend, k));
      KVGATE_ASSERT_OK_AND_ASSIGN(DeviceBuffer d_v, Upload(*backend, v));
      KVGATE_ASSERT_OK_AND_ASSIGN(DeviceBuffer d_mask, Upload(*backend, key_mask));
      KVGATE_ASSERT_OK_AND_ASSIGN(DeviceLayout d_layout, UploadLayout(*backend, layout));
      KVGATE_ASSERT_OK_AND_ASSIGN(GuardedBuffer d_masked,
                                  GuardedBuffer::Create(*backend, std::vector<float>(q.size(), 0.0f)));
      KVGATE_ASSERT_OK_AND_ASSIGN(GuardedBuffer d_paged,
                                  GuardedBuffer::Create(*backend, std::vector<float>(q.size(), 0.0f)));
      KVGATE_ASSERT_OK(backend->Attention({d_q.as<float>(), d_k.as<float>(), d_v.as<float>(),
                                           d_masked.data(), 1, q_heads, kv_heads, head_dim, capacity,
                                           length - 1, 0, scale, d_mask.as<uint8_t>(), true}));
      KVGATE_ASSERT_OK(backend->HeadPagedDecodeAttention(
          {d_q.as<float>(), d_layout.View(), d_paged.data(), 1, q_heads, kv_heads, scale}));
      std::vector<float> masked, paged;
      ASSERT_TRUE(d_masked.Download(*backend, &masked));
      ASSERT_TRUE(d_paged.Download(*backend, &paged));
      ExpectAllClose(ref, masked, kAtolF32, kRtolF32, "_masked_vs_ref");
      ExpectAllClose(ref, paged, kAtolF32, kRtolF32, "_paged_vs_ref");
      ExpectAllClose(masked, paged, kAtolF32, kRtolF32, "_paged_vs_masked");
    }
  }
}

// A head with no visible row (length 0, or every mask bit clear) gets zeros, not NaN,
// in the one-block grid and in the split grid.
TEST(HeadPagedDecodeEdgeTest, NoVisibleRowGivesZeros) {
  if (CudaDeviceCount() == 0) GTEST_SKIP() << "no CUDA device visible";
  KVGATE_ASSERT_OK_AND_ASSIGN(std::unique_ptr<Backend> backend, CreateCudaBackend(0));
  const int32_t head_dim = 64, q_heads = 4, kv_heads = 2;
  // 1 sequence: split grid; 40 sequences: one block per head.
  for (int32_t num_seqs : {1, 40}) {
    SCOPED_TRACE(absl::StrCat("seqs ", num_seqs));
    std::vector<int32_t> lengths;
    for (int32_t s = 0; s < num_seqs; ++s) lengths.insert(lengths.end(), {0, 300});
    std::mt19937 rng(270 + num_seqs);
    paged_testing::HeadPagedLayout layout =
        paged_testing::MakeHeadPagedLayout(rng, lengths, 16, head_dim, 2, false, 1);
    // Every row visible to q head 0 of its group only: q head 3 of each sequence sees none.
    layout.query_masks.assign(static_cast<size_t>(layout.num_pages) * layout.page_tokens, 1);
    const auto q = RandomFloats(rng, static_cast<size_t>(num_seqs) * q_heads * head_dim, -1.0f, 1.0f);
    std::vector<float> ref(q.size());
    HeadPagedDecodeAttentionRef(
        {q.data(), layout.HostView(), ref.data(), num_seqs, q_heads, kv_heads, 0.125f});
    KVGATE_ASSERT_OK_AND_ASSIGN(DeviceBuffer d_q, Upload(*backend, q));
    KVGATE_ASSERT_OK_AND_ASSIGN(DeviceLayout d_layout, UploadLayout(*backend, layout));
    KVGATE_ASSERT_OK_AND_ASSIGN(GuardedBuffer d_out,
                                GuardedBuffer::Create(*backend, std::vector<float>(q.size(), 7.0f)));
    KVGATE_ASSERT_OK(backend->HeadPagedDecodeAttention(
        {d_q.as<float>(), d_layout.View(), d_out.data(), num_seqs, q_heads, kv_heads, 0.125f}));
    std::vector<float> out;
    ASSERT_TRUE(d_out.Download(*backend, &out));
    ExpectAllClose(ref, out, kAtolF32, kRtolF32);
    for (int32_t s = 0; s < num_seqs; ++s) {
      for (int32_t h : {0, 1, 3}) {
        const size_t offset = (static_cast<size_t>(s) * q_heads + h) * head_dim;
        for (int32_t d = 0; d < head_dim; ++d) ASSERT_EQ(out[offset + d], 0.0f) << s << " " << h;
      }
    }
  }
}

// -------------------------------------------------------------------------- graphs

// A recorded op does not run until replayed, and each replay reads its buffers' contents
// at that time.
TEST(GraphTest, RecordedOpsRunOnEachReplayWithCurrentContents) {
  if (CudaDeviceCount() == 0) GTEST_SKIP() << "no CUDA device visible";
  KVGATE_ASSERT_OK_AND_ASSIGN(std::unique_ptr<Backend> backend, CreateCudaBackend(0));
  const std::vector<float> x0 = {1.0f, 2.0f, 3.0f, 4.0f};
  std::vector<float> y = {0.5f, -1.0f, 8.0f, 0.25f};
  KVGATE_ASSERT_OK_AND_ASSIGN(DeviceBuffer d_x, Upload(*backend, x0));
  KVGATE_ASSERT_OK_AND_ASSIGN(DeviceBuffer d_y, Upload(*backend, y));
  const AddArgs add{d_x.as<float>(), d_y.as<float>(), 4};
  KVGATE_ASSERT_OK_AND_ASSIGN(std::unique_ptr<OpGraph> graph, backend->RecordGraph([&] {
    KVGATE_RETURN_IF_ERROR(backend->Add(add));
    return backend->Add(add);  // x += 2y per replay
  }));
  std::vector<float> x(4);
  KVGATE_ASSERT_OK(backend->CopyToHost(x.data(), d_x.data(), 16));
  EXPECT_EQ(x, x0) << "recording ran the ops";
  KVGATE_ASSERT_OK(backend->ReplayGraph(*graph));
  KVGATE_ASSERT_OK(backend->ReplayGraph(*graph));
  KVGATE_ASSERT_OK(backend->CopyToHost(x.data(), d_x.data(), 16));
  for (int i = 0; i < 4; ++i) EXPECT_EQ(x[i], x0[i] + 4 * y[i]) << i;
  const std::vector<float> after_two = x;
  y = {100.0f, 200.0f, 300.0f, 400.0f};
  KVGATE_ASSERT_OK(backend->CopyToBackend(d_y.data(), y.data(), 16));
  KVGATE_ASSERT_OK(backend->ReplayGraph(*graph));
  KVGATE_ASSERT_OK(backend->CopyToHost(x.data(), d_x.data(), 16));
  for (int i = 0; i < 4; ++i) EXPECT_EQ(x[i], after_two[i] + 2 * y[i]) << i;
}

// What a graph cannot hold is refused while recording; the error comes back, nothing
// is recorded, and the backend runs ops as before.
TEST(GraphTest, HostCopiesAllocationAndSyncAreRefusedWhileRecording) {
  if (CudaDeviceCount() == 0) GTEST_SKIP() << "no CUDA device visible";
  KVGATE_ASSERT_OK_AND_ASSIGN(std::unique_ptr<Backend> backend, CreateCudaBackend(0));
  const std::vector<float> x0 = {1.0f, 2.0f};
  KVGATE_ASSERT_OK_AND_ASSIGN(DeviceBuffer d_x, Upload(*backend, x0));
  std::vector<float> host(2, 5.0f);
  const std::vector<std::pair<std::string, std::function<absl::Status()>>> refused = {
      {"CopyToBackend", [&] { return backend->CopyToBackend(d_x.data(), host.data(), 8); }},
      {"CopyToHost", [&] { return backend->CopyToHost(host.data(), d_x.data(), 8); }},
      {"Alloc", [&] { return backend->Alloc(64).status(); }},
      {"Synchronize", [&] { return backend->Synchronize(); }},
      {"RecordGraph", [&] { return backend->RecordGraph([] { return absl::OkStatus(); }).status(); }},
  };
  for (const auto& [name, op] : refused) {
    SCOPED_TRACE(name);
    absl::Status inner;
    const auto graph = backend->RecordGraph([&] {
      KVGATE_RETURN_IF_ERROR(backend->Add({d_x.as<float>(), d_x.as<float>(), 2}));
      inner = op();
      return inner;
    });
    EXPECT_EQ(inner.code(), absl::StatusCode::kFailedPrecondition) << inner;
    EXPECT_NE(inner.message().find(name), std::string::npos) << inner;
    EXPECT_EQ(graph.status().code(), absl::StatusCode::kFailedPrecondition) << graph.status();
  }
  std::vector<float> x(2);
  KVGATE_ASSERT_OK(backend->CopyToHost(x.data(), d_x.data(), 8));
  EXPECT_EQ(x, x0) << "a failed recording ran its ops";
  KVGATE_ASSERT_OK(backend->Add({d_x.as<float>(), d_x.as<float>(), 2}));
  KVGATE_ASSERT_OK(backend->CopyToHost(x.data(), d_x.data(), 8));
  EXPECT_EQ(x, (std::vector<float>{2.0f, 4.0f}));
  KVGATE_ASSERT_OK(backend->Synchronize());
}

// Split decode attention recorded and replayed gives the bits of the op run directly;
// once a later op grows the shared workspace, the graph is refused as stale.
// The split count fills the last wave: H100, 132 SMs x 6 resident blocks = 792 a wave.
TEST(DecodeSplitPlanTest, SplitsFillTheLastWave) {
  EXPECT_EQ(ChooseDecodeSplits(512, 792, 64), 3);   // batch 64 x 8 kv heads: 1536 blocks, 1.94 waves
  EXPECT_EQ(ChooseDecodeSplits(256, 792, 64), 3);   // batch 32: 768 blocks, 0.97 of a wave
  EXPECT_EQ(ChooseDecodeSplits(8, 792, 64), 64);    // batch 1: as many as allowed
  EXPECT_EQ(ChooseDecodeSplits(792, 792, 64), 1);   // one full wave already
  EXPECT_EQ(ChooseDecodeSplits(1584, 792, 64), 1);  // two full waves
  EXPECT_EQ(ChooseDecodeSplits(1024, 792, 64), 2);  // batch 128: 1.29 waves unsplit, 2.59 split in 2
  EXPECT_EQ(ChooseDecodeSplits(0, 792, 64), 1);
  EXPECT_EQ(ChooseDecodeSplits(512, 0, 64), 1);
  EXPECT_EQ(ChooseDecodeSplits(512, 792, 1), 1);
}

TEST(GraphTest, ReplayEqualsDirectRunAndGoesStaleWhenTheWorkspaceMoves) {
  if (CudaDeviceCount() == 0) GTEST_SKIP() << "no CUDA device visible";
  KVGATE_ASSERT_OK_AND_ASSIGN(std::unique_ptr<Backend> backend, CreateCudaBackend(0));
  std::mt19937 rng(4242);
  const int32_t head_dim = 128;
  // One sequence, 4 query heads over 2 kv heads of 3000 rows: split across many blocks.
  paged_testing::HeadPagedLayout small = paged_testing::MakeHeadPagedLayout(rng, {3000, 2900}, 16, head_dim, 2, false, 1);
  const auto q = RandomFloats(rng, size_t{4} * head_dim, -1.0f, 1.0f);
  KVGATE_ASSERT_OK_AND_ASSIGN(DeviceBuffer d_q, Upload(*backend, q));
  KVGATE_ASSERT_OK_AND_ASSIGN(DeviceLayout d_small, UploadLayout(*backend, small));
  KVGATE_ASSERT_OK_AND_ASSIGN(DeviceBuffer d_direct, backend->Alloc(q.size() * sizeof(float)));
  KVGATE_ASSERT_OK_AND_ASSIGN(DeviceBuffer d_replayed, backend->Alloc(q.size() * sizeof(float)));
  const HeadPagedDecodeAttentionArgs direct{d_q.as<float>(), d_small.View(), d_direct.as<float>(), 1, 4, 2, 0.088f};
  HeadPagedDecodeAttentionArgs replayed = direct;
  replayed.out = d_replayed.as<float>();
  KVGATE_ASSERT_OK(backend->HeadPagedDecodeAttention(direct));  // sizes the workspace
  KVGATE_ASSERT_OK_AND_ASSIGN(std::unique_ptr<OpGraph> graph,
                              backend->RecordGraph([&] { return backend->HeadPagedDecodeAttention(replayed); }));
  KVGATE_ASSERT_OK(backend->ReplayGraph(*graph));
  std::vector<float> want(q.size()), got(q.size());
  KVGATE_ASSERT_OK(backend->CopyToHost(want.data(), d_direct.data(), want.size() * sizeof(float)));
  KVGATE_ASSERT_OK(backend->CopyToHost(got.data(), d_replayed.data(), got.size() * sizeof(float)));
  ASSERT_EQ(std::memcmp(want.data(), got.data(), want.size() * sizeof(float)), 0);

  // 16 sequences x 32 query heads over 8 kv heads need a larger split workspace.
  const std::vector<int32_t> lengths(16 * 8, 2000);
  paged_testing::HeadPagedLayout large = paged_testing::MakeHeadPagedLayout(rng, lengths, 16, head_dim, 4, false, 1);
  const auto q_large = RandomFloats(rng, size_t{16} * 32 * head_dim, -1.0f, 1.0f);
  KVGATE_ASSERT_OK_AND_ASSIGN(DeviceBuffer d_q_large, Upload(*backend, q_large));
  KVGATE_ASSERT_OK_AND_ASSIGN(DeviceLayout d_large, UploadLayout(*backend, large));
  KVGATE_ASSERT_OK_AND_ASSIGN(DeviceBuffer d_out_large, backend->Alloc(q_large.size() * sizeof(float)));
  KVGATE_ASSERT_OK(backend->HeadPagedDecodeAttention(
      {d_q_large.as<float>(), d_large.View(), d_out_large.as<float>(), 16, 32, 8, 0.088f}));
  const absl::Status stale = backend->ReplayGraph(*graph);
  EXPECT_EQ(stale.code(), absl::StatusCode::kFailedPrecondition) << stale;
  KVGATE_ASSERT_OK(backend->Synchronize());
}

// -------------------------------------------------------------------------- SiluMul

enum class SiluAlias { kNone, kGate, kUp };

struct SiluMulCase {
  int64_t n;
  SiluAlias alias;
  uint32_t seed;
  std::string Name() const {
    const char* alias_name =
        alias == SiluAlias::kNone ? "" : (alias == SiluAlias::kGate ? "_outisgate" : "_outisup");
    return absl::StrCat("n", n, alias_name, "_seed", seed);
  }
};
void PrintTo(const SiluMulCase& c, std::ostream* os) { *os << c.Name(); }

using SiluMulTest = CudaOpTest<SiluMulCase>;

TEST_P(SiluMulTest, MatchesReference) {
  const SiluMulCase c = GetParam();
  SCOPED_TRACE(c.Name());
  std::mt19937 rng(c.seed);
  const auto gate = RandomFloats(rng, c.n, -12.0f, 12.0f);
  const auto up = RandomFloats(rng, c.n, -2.0f, 2.0f);

  std::vector<float> ref(c.n);
  SiluMulRef({gate.data(), up.data(), ref.data(), c.n});

  KVGATE_ASSERT_OK_AND_ASSIGN(DeviceBuffer d_gate, Upload(backend(), gate));
  KVGATE_ASSERT_OK_AND_ASSIGN(DeviceBuffer d_up, Upload(backend(), up));
  // With aliasing, the aliased input lives in the guarded output buffer.
  const std::vector<float>& init =
      c.alias == SiluAlias::kGate ? gate : (c.alias == SiluAlias::kUp ? up : ref);
  KVGATE_ASSERT_OK_AND_ASSIGN(
      GuardedBuffer d_out,
      GuardedBuffer::Create(backend(),
                            c.alias == SiluAlias::kNone ? std::vector<float>(c.n, 0.0f) : init));
  const float* gate_ptr = c.alias == SiluAlias::kGate ? d_out.data() : d_gate.as<float>();
  const float* up_ptr = c.alias == SiluAlias::kUp ? d_out.data() : d_up.as<float>();
  KVGATE_ASSERT_OK(backend().SiluMul({gate_ptr, up_ptr, d_out.data(), c.n}));
  KVGATE_ASSERT_OK(backend().Synchronize());
  std::vector<float> out;
  ASSERT_TRUE(d_out.Download(backend(), &out));
  ExpectAllClose(ref, out, kAtolF32, kRtolF32);
}

INSTANTIATE_TEST_SUITE_P(Shapes, SiluMulTest,
                         ::testing::Values(SiluMulCase{1, SiluAlias::kNone, 101},
                                           SiluMulCase{3, SiluAlias::kGate, 102},
                                           SiluMulCase{54, SiluAlias::kUp, 103},
                                           SiluMulCase{97, SiluAlias::kNone, 104},
                                           SiluMulCase{129, SiluAlias::kGate, 105},
                                           SiluMulCase{100003, SiluAlias::kNone, 106},
                                           SiluMulCase{1 << 22, SiluAlias::kUp, 107}),
                         CaseName<SiluMulCase>);

// ------------------------------------------------------------------------------ Add

struct AddCase {
  int64_t n;
  uint32_t seed;
  std::string Name() const { return absl::StrCat("n", n, "_seed", seed); }
};
void PrintTo(const AddCase& c, std::ostream* os) { *os << c.Name(); }

using AddTest = CudaOpTest<AddCase>;

TEST_P(AddTest, MatchesReference) {
  const AddCase c = GetParam();
  SCOPED_TRACE(c.Name());
  std::mt19937 rng(c.seed);
  const auto x = RandomFloats(rng, c.n, -4.0f, 4.0f);
  const auto y = RandomFloats(rng, c.n, -4.0f, 4.0f);

  std::vector<float> ref = x;
  AddRef({ref.data(), y.data(), c.n});

  KVGATE_ASSERT_OK_AND_ASSIGN(DeviceBuffer d_y, Upload(backend(), y));
  KVGATE_ASSERT_OK_AND_ASSIGN(GuardedBuffer d_x, GuardedBuffer::Create(backend(), x));
  KVGATE_ASSERT_OK(backend().Add({d_x.data(), d_y.as<float>(), c.n}));
  KVGATE_ASSERT_OK(backend().Synchronize());
  std::vector<float> out;
  ASSERT_TRUE(d_x.Download(backend(), &out));
  ExpectAllClose(ref, out, kAtolExact, kRtolExact);
}

INSTANTIATE_TEST_SUITE_P(Shapes, AddTest,
                         ::testing::Values(AddCase{1, 111}, AddCase{3, 112}, AddCase{54, 113},
                                           AddCase{97, 114}, AddCase{129, 115},
                                           AddCase{100003, 116}, AddCase{1 << 22, 117}),
                         CaseName<AddCase>);

// ---------------------------------------------------------------- factory and errors

// Holds with or without a GPU: an ordinal past the visible devices is UNAVAILABLE.
TEST(CudaBackendFactoryTest, OrdinalPastDeviceCountIsUnavailable) {
  const int count = CudaDeviceCount();
  for (int ordinal : {count, count + 1, 1000}) {
    const absl::StatusOr<std::unique_ptr<Backend>> backend = CreateCudaBackend(ordinal);
    EXPECT_EQ(backend.status().code(), absl::StatusCode::kUnavailable)
        << "ordinal " << ordinal << ": " << backend.status();
    if (count == 0) {
      EXPECT_NE(backend.status().message().find("no CUDA device visible"), std::string::npos)
          << backend.status();
    }
  }
}

TEST(CudaBackendFactoryTest, NegativeOrdinalIsInvalid) {
  EXPECT_EQ(CreateCudaBackend(-1).status().code(), absl::StatusCode::kInvalidArgument);
}

TEST(CudaBackendFactoryTest, NameAndLastDevice) {
  const int count = CudaDeviceCount();
  if (count == 0) GTEST_SKIP() << "no CUDA device visible";
  for (int ordinal : {0, count - 1}) {
    KVGATE_ASSERT_OK_AND_ASSIGN(std::unique_ptr<Backend> backend, CreateCudaBackend(ordinal));
    EXPECT_EQ(backend->Name(), absl::StrCat("cuda:", ordinal));
  }
}

// Bad shapes are answered with INVALID_ARGUMENT before any launch, and the backend
// stays usable afterwards.
TEST(CudaBackendErrorTest, InvalidArgumentsAreRejected) {
  if (CudaDeviceCount() == 0) GTEST_SKIP() << "no CUDA device visible";
  KVGATE_ASSERT_OK_AND_ASSIGN(std::unique_ptr<Backend> backend, CreateCudaBackend(0));
  KVGATE_ASSERT_OK_AND_ASSIGN(DeviceBuffer buffer, backend->Alloc(1024 * sizeof(float)));
  float* p = buffer.as<float>();
  AttentionArgs attention{p, p, p, p, 1, 2, 2, 512, 8, 0, 0, 1.0f};  // head_dim > 256
  EXPECT_EQ(backend->Attention(attention).code(), absl::StatusCode::kInvalidArgument);
  attention.head_dim = 16;
  attention.num_q_heads = 3;  // not a multiple of 2 kv heads
  EXPECT_EQ(backend->Attention(attention).code(), absl::StatusCode::kInvalidArgument);
  attention.num_q_heads = 2;
  attention.q_start_row = 8;  // row 8 of an 8-row cache
  EXPECT_EQ(backend->Attention(attention).code(), absl::StatusCode::kInvalidArgument);
  const StoreKvArgs store{p, p, p, p, 2, 1, 16, 8, 7};  // rows 7..8 of an 8-row cache
  EXPECT_EQ(backend->StoreKv(store).code(), absl::StatusCode::kInvalidArgument);
  const RopeArgs rope{p, nullptr, p, 1, 1, 3};  // odd head_dim
  EXPECT_EQ(backend->Rope(rope).code(), absl::StatusCode::kInvalidArgument);
  EXPECT_EQ(backend->Alloc(0).status().code(), absl::StatusCode::kInvalidArgument);
  const int32_t* ip = buffer.as<int32_t>();
  const uint8_t* mp = buffer.as<uint8_t>();
  HeadPagedDecodeAttentionArgs paged{p, {p, p, ip, ip, ip, nullptr, 16, 512}, p, 1, 2, 1, 1.0f};
  EXPECT_EQ(backend->HeadPagedDecodeAttention(paged).code(),
            absl::StatusCode::kInvalidArgument);  // head_dim > 256
  paged.kv.head_dim = 64;
  paged.kv.page_tokens = 0;
  EXPECT_EQ(backend->HeadPagedDecodeAttention(paged).code(), absl::StatusCode::kInvalidArgument);
  paged.kv.page_tokens = 16;
  paged.num_q_heads = 3;
  paged.num_kv_heads = 2;  // not a multiple
  EXPECT_EQ(backend->HeadPagedDecodeAttention(paged).code(), absl::StatusCode::kInvalidArgument);
  paged.num_q_heads = 16;
  paged.num_kv_heads = 1;
  paged.kv.query_masks = mp;  // 16 q heads per kv head do not fit 8 mask bits
  EXPECT_EQ(backend->HeadPagedDecodeAttention(paged).code(), absl::StatusCode::kInvalidArgument);
  EXPECT_EQ(backend->CopyRows({p, p, ip, ip, -1, 4}).code(), absl::StatusCode::kInvalidArgument);
  // Empty ops are no-ops.
  KVGATE_ASSERT_OK(backend->Add({p, p, 0}));
  KVGATE_ASSERT_OK(backend->MatMul({p, p, nullptr, p, 0, 4, 4}));
  KVGATE_ASSERT_OK(backend->CopyRows({p, p, ip, ip, 0, 4}));
  paged.num_seqs = 0;
  KVGATE_ASSERT_OK(backend->HeadPagedDecodeAttention(paged));
  KVGATE_ASSERT_OK(backend->Synchronize());
}

}  // namespace
}  // namespace kvgate::ops

// ---------------------------------------------------------------- WindowAttentionProbs

namespace kvgate::ops {
namespace {

struct WindowProbsCase {
  int32_t window, length, capacity, num_q_heads, num_kv_heads, head_dim;
  uint32_t seed;
  bool logits = false;
  std::string Name() const {
    return absl::StrCat("w", window, "_len", length, "_cap", capacity, "_h", num_q_heads, "x", num_kv_heads, "_d",
                        head_dim, "_seed", seed, logits ? "_logits" : "");
  }
};
void PrintTo(const WindowProbsCase& c, std::ostream* os) { *os << c.Name(); }

using WindowAttentionProbsTest = CudaOpTest<WindowProbsCase>;

// Parity with the double-precision reference, each window query's probabilities summing
// to 1 (so every output row sums to 1), and the same bits on a second run.
TEST_P(WindowAttentionProbsTest, MatchesReferenceAndRepeatsBitForBit) {
  const WindowProbsCase& c = GetParam();
  std::mt19937 rng(c.seed);
  const auto q = RandomFloats(rng, static_cast<size_t>(c.window) * c.num_q_heads * c.head_dim, -1.0f, 1.0f);
  // Keys large enough that softmaxes are peaked, as real ones are.
  const auto k = RandomFloats(rng, static_cast<size_t>(c.num_kv_heads) * c.capacity * c.head_dim, -3.0f, 3.0f);
  WindowAttentionProbsArgs args;
  args.window = c.window;
  args.length = c.length;
  args.capacity_tokens = c.capacity;
  args.num_q_heads = c.num_q_heads;
  args.num_kv_heads = c.num_kv_heads;
  args.head_dim = c.head_dim;
  args.scale = 1.0f / std::sqrt(static_cast<float>(c.head_dim));
  args.logits = c.logits;
  std::vector<float> ref(static_cast<size_t>(c.num_q_heads) * c.length);
  WindowAttentionProbsArgs host = args;
  host.q = q.data();
  host.k_cache = k.data();
  host.out = ref.data();
  WindowAttentionProbsRef(host);
  auto q_dev = Upload(backend(), q);
  auto k_dev = Upload(backend(), k);
  ASSERT_TRUE(q_dev.ok() && k_dev.ok());
  auto out = GuardedBuffer::Create(backend(), std::vector<float>(ref.size(), -7.0f));
  ASSERT_TRUE(out.ok()) << out.status();
  args.q = q_dev->as<float>();
  args.k_cache = k_dev->as<float>();
  args.out = out->data();
  ASSERT_TRUE(backend().WindowAttentionProbs(args).ok());
  std::vector<float> got, again;
  ASSERT_TRUE(out->Download(backend(), &got));
  ExpectAllClose(ref, got, c.logits ? 1e-4f : 1e-6f, 1e-4f);
  for (int32_t h = 0; h < c.num_q_heads && !c.logits; ++h) {
    double sum = 0.0;
    for (int32_t j = 0; j < c.length; ++j) sum += got[static_cast<size_t>(h) * c.length + j];
    EXPECT_NEAR(sum, 1.0, 1e-4) << "query head " << h;
  }
  ASSERT_TRUE(backend().WindowAttentionProbs(args).ok());
  ASSERT_TRUE(out->Download(backend(), &again));
  EXPECT_EQ(0, std::memcmp(got.data(), again.data(), got.size() * sizeof(float))) << "not deterministic";
  WindowAttentionProbsArgs bad = args;
  bad.window = c.length + 1;
  EXPECT_EQ(backend().WindowAttentionProbs(bad).code(), absl::StatusCode::kInvalidArgument);
}

INSTANTIATE_TEST_SUITE_P(Shapes, WindowAttentionProbsTest,
                         ::testing::Values(WindowProbsCase{1, 1, 1, 1, 1, 64, 1}, WindowProbsCase{1, 300, 320, 8, 2, 128, 2},
                                           WindowProbsCase{8, 77, 80, 4, 4, 64, 3},
                                           WindowProbsCase{64, 1000, 1024, 32, 8, 128, 4},
                                           WindowProbsCase{64, 64, 64, 4, 1, 128, 5},
                                           WindowProbsCase{13, 513, 600, 6, 2, 256, 6},
                                           WindowProbsCase{5, 129, 130, 2, 1, 40, 7},
                                           WindowProbsCase{3, 70, 70, 2, 2, 512, 8},
                                           WindowProbsCase{1, 1000, 1024, 32, 8, 128, 9, true},
                                           WindowProbsCase{1, 33, 40, 4, 2, 64, 10, true},
                                           // Logits of more than 2^26 floats: the kv heads go in two chunks.
                                           WindowProbsCase{1024, 16400, 16400, 8, 2, 16, 11}),
                         CaseName<WindowProbsCase>);


// -------------------------------------------------------- PoolWindowScores, SelectTop

struct SelectCase {
  int32_t rows, n, rows_per_selection, merge_rows;
  int64_t need;
  int32_t distinct_scores;  // scores drawn from this many values (ties), 0 = continuous
  bool with_candidates, with_nan;
  uint32_t seed;
  std::string Name() const {
    return absl::StrCat("rows", rows, "_n", n, "_sel", rows_per_selection, "_merge", merge_rows, "_need", need < 0 ? 0 : need,
                        need < 0 ? "neg" : "", "_distinct", distinct_scores, with_candidates ? "_cand" : "",
                        with_nan ? "_nan" : "", "_seed", seed);
  }
};
void PrintTo(const SelectCase& c, std::ostream* os) { *os << c.Name(); }

using SelectTopTest = CudaOpTest<SelectCase>;

// The same keep bytes as the reference (an exact selection: equality, not closeness),
// ties, NaN, -0/+0, excluded candidates and need beyond the candidates included.
TEST_P(SelectTopTest, EqualsTheReference) {
  const SelectCase& c = GetParam();
  std::mt19937 rng(c.seed);
  std::vector<float> scores(static_cast<size_t>(c.rows) * c.n);
  std::uniform_real_distribution<float> uniform(-4.0f, 4.0f);
  std::uniform_int_distribution<int> level(0, std::max(1, c.distinct_scores) - 1);
  for (size_t i = 0; i < scores.size(); ++i) {
    scores[i] = c.distinct_scores > 0 ? static_cast<float>(level(rng)) - 1.0f : uniform(rng);
    if (c.distinct_scores > 0 && scores[i] == 0.0f && (i % 2) == 1) scores[i] = -0.0f;
    if (c.with_nan && i % 97 == 5) scores[i] = std::numeric_limits<float>::quiet_NaN();
    if (c.with_nan && i % 89 == 7) scores[i] = -std::numeric_limits<float>::infinity();
  }
  std::vector<uint8_t> candidates(static_cast<size_t>(c.n), 1);
  if (c.with_candidates) {
    for (int32_t p = 0; p < c.n; ++p) candidates[p] = (p % 7 == 0 || p >= c.n - 5) ? 0 : 1;
  }
  // Some cases also exclude entries row by row (AdaKV's second stage), merged and wide ones among them.
  const bool excluding = c.seed % 3 == 0 || c.seed == 7;
  std::vector<uint8_t> exclude(scores.size());
  for (size_t i = 0; i < exclude.size(); ++i) exclude[i] = excluding && i % 11 == 4 ? 1 : 0;
  SelectTopArgs args;
  args.rows = c.rows;
  args.n = c.n;
  args.rows_per_selection = c.rows_per_selection;
  args.merge_rows = c.merge_rows;
  args.need = c.need;
  std::vector<uint8_t> want(static_cast<size_t>(c.rows / c.merge_rows) * c.n, 0xee);
  SelectTopArgs host = args;
  host.scores = scores.data();
  host.candidates = c.with_candidates ? candidates.data() : nullptr;
  host.exclude = excluding ? exclude.data() : nullptr;
  host.keep = want.data();
  SelectTopRef(host);
  KVGATE_ASSERT_OK_AND_ASSIGN(DeviceBuffer d_scores, Upload(backend(), scores));
  KVGATE_ASSERT_OK_AND_ASSIGN(DeviceBuffer d_candidates, Upload(backend(), candidates));
  KVGATE_ASSERT_OK_AND_ASSIGN(DeviceBuffer d_exclude, Upload(backend(), exclude));
  KVGATE_ASSERT_OK_AND_ASSIGN(DeviceBuffer d_keep, Upload(backend(), std::vector<uint8_t>(want.size(), 0xee)));
  args.scores = d_scores.as<float>();
  args.candidates = c.with_candidates ? d_candidates.as<uint8_t>() : nullptr;
  args.exclude = excluding ? d_exclude.as<uint8_t>() : nullptr;
  args.keep = d_keep.as<uint8_t>();
  ASSERT_TRUE(backend().SelectTop(args).ok());
  std::vector<uint8_t> got(want.size());
  ASSERT_TRUE(backend().CopyToHost(got.data(), d_keep.data(), got.size()).ok());
  size_t mismatches = 0, first = got.size();
  for (size_t i = 0; i < got.size(); ++i) {
    if (got[i] != want[i]) {
      ++mismatches;
      first = std::min(first, i);
    }
  }
  EXPECT_EQ(mismatches, 0u) << "first at " << first << ": got " << int(got[first % got.size()]) << " want "
                            << int(want[first % got.size()]);
  SelectTopArgs bad = args;
  bad.merge_rows = 9;
  EXPECT_EQ(backend().SelectTop(bad).code(), absl::StatusCode::kInvalidArgument);
}

INSTANTIATE_TEST_SUITE_P(
    Shapes, SelectTopTest,
    ::testing::Values(SelectCase{1, 1, 1, 1, 1, 0, false, false, 1}, SelectCase{4, 100, 1, 1, 30, 0, false, false, 2},
                      SelectCase{64, 8192, 1, 1, 2400, 0, true, false, 3},   // snapkv per head
                      SelectCase{256, 8192, 1, 4, 600, 0, true, true, 4},    // sage_kv, 4 query heads a kv head
                      SelectCase{16, 3000, 8, 1, 7000, 5, true, false, 5},   // per layer, many ties
                      SelectCase{24, 2000, 24, 1, 10000, 3, false, true, 6}, // global
                      SelectCase{8, 513, 1, 8, 100, 2, false, false, 7},     // 8 merged rows, ties
                      SelectCase{6, 50, 2, 1, 1000, 0, true, false, 8},      // need beyond the candidates
                      SelectCase{6, 50, 1, 2, 0, 0, false, false, 9},        // need 0
                      SelectCase{6, 50, 3, 1, -5, 0, false, false, 10},      // need < 0
                      SelectCase{2, 5000, 1, 1, 1, 1, true, false, 11},      // every score tied, need 1
                      // Few selections of many entries: the multi-block passes.
                      SelectCase{64, 8192, 64, 1, 150000, 0, true, true, 12},  // fast_kvzip's one threshold
                      SelectCase{8, 40000, 8, 1, 5000, 2, true, true, 13},     // ties over many slices
                      SelectCase{4, 9000, 4, 1, 40000, 0, true, false, 14},    // need beyond the candidates
                      SelectCase{4, 9000, 2, 1, 0, 0, false, false, 15},       // need 0, two selections
                      SelectCase{3, 20000, 3, 1, 1, 1, true, false, 16}),      // every score tied, need 1
    CaseName<SelectCase>);

struct PoolCase {
  int32_t layers, q_heads, kv_heads, n, window, kernel;
  uint32_t seed;
  std::string Name() const {
    return absl::StrCat("l", layers, "_h", q_heads, "x", kv_heads, "_n", n, "_w", window, "_k", kernel, "_seed", seed);
  }
};
void PrintTo(const PoolCase& c, std::ostream* os) { *os << c.Name(); }

using PoolWindowScoresTest = CudaOpTest<PoolCase>;

// Bit for bit the reference: double sums in the same order.
TEST_P(PoolWindowScoresTest, EqualsTheReferenceBitForBit) {
  const PoolCase& c = GetParam();
  std::mt19937 rng(c.seed);
  const auto probs = RandomFloats(rng, static_cast<size_t>(c.layers) * c.q_heads * c.n, 0.0f, 0.01f);
  PoolWindowScoresArgs args;
  args.num_layers = c.layers;
  args.num_q_heads = c.q_heads;
  args.num_kv_heads = c.kv_heads;
  args.n = c.n;
  args.window = c.window;
  args.kernel = c.kernel;
  std::vector<float> want(static_cast<size_t>(c.layers) * c.kv_heads * c.n);
  PoolWindowScoresArgs host = args;
  host.probs = probs.data();
  host.out = want.data();
  PoolWindowScoresRef(host);
  KVGATE_ASSERT_OK_AND_ASSIGN(DeviceBuffer d_probs, Upload(backend(), probs));
  KVGATE_ASSERT_OK_AND_ASSIGN(GuardedBuffer out, GuardedBuffer::Create(backend(), std::vector<float>(want.size(), 3.0f)));
  args.probs = d_probs.as<float>();
  args.out = out.data();
  ASSERT_TRUE(backend().PoolWindowScores(args).ok());
  std::vector<float> got;
  ASSERT_TRUE(out.Download(backend(), &got));
  EXPECT_EQ(0, std::memcmp(got.data(), want.data(), got.size() * sizeof(float)));
  PoolWindowScoresArgs bad = args;
  bad.kernel = 4;
  EXPECT_EQ(backend().PoolWindowScores(bad).code(), absl::StatusCode::kInvalidArgument);
}

INSTANTIATE_TEST_SUITE_P(Shapes, PoolWindowScoresTest,
                         ::testing::Values(PoolCase{1, 1, 1, 1, 1, 1, 1}, PoolCase{2, 8, 2, 100, 10, 5, 2},
                                           PoolCase{8, 32, 8, 8192, 64, 5, 3}, PoolCase{3, 6, 3, 77, 76, 7, 4},
                                           PoolCase{1, 4, 4, 300, 1, 9, 5}),
                         CaseName<PoolCase>);

// ---------------------------------------------------------------------- SinkGateScores

struct SinkGateCase {
  int32_t n, hidden, kv_heads, group, rank, sinks, stride_pad;
  uint32_t seed;
  std::string Name() const {
    return absl::StrCat("n", n, "_d", hidden, "_h", kv_heads, "_g", group, "_r", rank, "_s", sinks, "_pad", stride_pad,
                        "_seed", seed);
  }
};
void PrintTo(const SinkGateCase& c, std::ostream* os) { *os << c.Name(); }

using SinkGateScoresTest = CudaOpTest<SinkGateCase>;

// Against the CPU implementation (the host gate of gates/fast_kvzip): scores in (0, 1)
// within fp32 rounding; nothing outside [h * out_stride, h * out_stride + n) is written.
TEST_P(SinkGateScoresTest, MatchesTheCpuGate) {
  const SinkGateCase& c = GetParam();
  std::mt19937 rng(c.seed);
  const int32_t q_width = c.kv_heads * c.group * c.rank, k_width = c.kv_heads * c.rank;
  const float scale = 1.0f / std::sqrt(static_cast<float>(c.hidden));
  const auto x = RandomFloats(rng, static_cast<size_t>(c.n) * c.hidden, -1.0f, 1.0f);
  const auto q_weight = RandomFloats(rng, static_cast<size_t>(q_width) * c.hidden, -2.0f * scale, 2.0f * scale);
  const auto q_bias = RandomFloats(rng, q_width, -0.5f, 0.5f);
  const auto k_weight = RandomFloats(rng, static_cast<size_t>(k_width) * c.hidden, -2.0f * scale, 2.0f * scale);
  const auto q_norm = RandomFloats(rng, c.rank, 0.5f, 1.5f);
  const auto k_norm = RandomFloats(rng, c.rank, 0.5f, 1.5f);
  const auto k_base = RandomFloats(rng, std::max<size_t>(1, static_cast<size_t>(c.kv_heads) * c.sinks * c.rank), -1.0f, 1.0f);
  const auto b = RandomFloats(rng, static_cast<size_t>(c.kv_heads) * c.group, -1.0f, 1.0f);
  SinkGateScoresArgs args;
  args.n = c.n;
  args.hidden = c.hidden;
  args.kv_heads = c.kv_heads;
  args.group = c.group;
  args.rank = c.rank;
  args.sinks = c.sinks;
  args.out_stride = c.n + c.stride_pad;
  std::vector<float> want(static_cast<size_t>(c.kv_heads) * args.out_stride, 5.0f);
  SinkGateScoresArgs host = args;
  host.x = x.data();
  host.q_weight = q_weight.data();
  host.q_bias = q_bias.data();
  host.k_weight = k_weight.data();
  host.q_norm = q_norm.data();
  host.k_norm = k_norm.data();
  host.k_base = k_base.data();
  host.b = b.data();
  host.out = want.data();
  SinkGateScoresCpu(host);
  KVGATE_ASSERT_OK_AND_ASSIGN(DeviceBuffer d_x, Upload(backend(), x));
  KVGATE_ASSERT_OK_AND_ASSIGN(DeviceBuffer d_qw, Upload(backend(), q_weight));
  KVGATE_ASSERT_OK_AND_ASSIGN(DeviceBuffer d_qb, Upload(backend(), q_bias));
  KVGATE_ASSERT_OK_AND_ASSIGN(DeviceBuffer d_kw, Upload(backend(), k_weight));
  KVGATE_ASSERT_OK_AND_ASSIGN(DeviceBuffer d_qn, Upload(backend(), q_norm));
  KVGATE_ASSERT_OK_AND_ASSIGN(DeviceBuffer d_kn, Upload(backend(), k_norm));
  KVGATE_ASSERT_OK_AND_ASSIGN(DeviceBuffer d_base, Upload(backend(), k_base));
  KVGATE_ASSERT_OK_AND_ASSIGN(DeviceBuffer d_b, Upload(backend(), b));
  KVGATE_ASSERT_OK_AND_ASSIGN(GuardedBuffer out, GuardedBuffer::Create(backend(), std::vector<float>(want.size(), 5.0f)));
  args.x = d_x.as<float>();
  args.q_weight = d_qw.as<float>();
  args.q_bias = d_qb.as<float>();
  args.k_weight = d_kw.as<float>();
  args.q_norm = d_qn.as<float>();
  args.k_norm = d_kn.as<float>();
  args.k_base = d_base.as<float>();
  args.b = d_b.as<float>();
  args.out = out.data();
  ASSERT_TRUE(backend().SinkGateScores(args).ok());
  std::vector<float> got;
  ASSERT_TRUE(out.Download(backend(), &got));
  ExpectAllClose(want, got, 2e-5f, 1e-4f);
  for (int32_t h = 0; h < c.kv_heads; ++h) {
    for (int32_t t = 0; t < c.n; ++t) {
      const float score = got[static_cast<size_t>(h) * args.out_stride + t];
      EXPECT_TRUE(score > 0.0f && score <= 1.0f) << "h " << h << " t " << t << ": " << score;
    }
  }
  // TF32 projections (what the policy asks for): the same scores within TF32's rounding.
  args.allow_tf32 = true;
  ASSERT_TRUE(backend().SinkGateScores(args).ok());
  ASSERT_TRUE(out.Download(backend(), &got));
  ExpectAllClose(want, got, 5e-3f, 1e-2f);
  SinkGateScoresArgs bad = args;
  bad.rank = 65;
  EXPECT_EQ(backend().SinkGateScores(bad).code(), absl::StatusCode::kInvalidArgument);

  // The bf16 form (a bf16 model's layer input, one GEMM on [q_weight; k_weight] in bf16)
  // against the CPU twin on the same bf16 values: fp32 sums, so fp32 rounding apart.
  std::vector<Bf16> x_bf16(x.size()), qk_bf16;
  for (size_t i = 0; i < x.size(); ++i) x_bf16[i] = F32ToBf16(x[i]);
  for (float v : q_weight) qk_bf16.push_back(F32ToBf16(v));
  for (float v : k_weight) qk_bf16.push_back(F32ToBf16(v));
  std::vector<float> want_bf16(want.size(), 5.0f);
  SinkGateScoresArgs host_bf16 = host;
  host_bf16.x = nullptr;
  host_bf16.x_bf16 = x_bf16.data();
  host_bf16.qk_weight_bf16 = qk_bf16.data();
  host_bf16.out = want_bf16.data();
  SinkGateScoresCpu(host_bf16);
  ExpectAllClose(want, want_bf16, 5e-2f, 5e-2f);  // the rounding moves scores, not their scale
  KVGATE_ASSERT_OK_AND_ASSIGN(DeviceBuffer d_x_bf16, Upload(backend(), x_bf16));
  KVGATE_ASSERT_OK_AND_ASSIGN(DeviceBuffer d_qk_bf16, Upload(backend(), qk_bf16));
  KVGATE_ASSERT_OK_AND_ASSIGN(GuardedBuffer out_bf16,
                              GuardedBuffer::Create(backend(), std::vector<float>(want.size(), 5.0f)));
  SinkGateScoresArgs on_bf16 = args;
  on_bf16.x = nullptr;
  on_bf16.x_bf16 = d_x_bf16.as<Bf16>();
  on_bf16.qk_weight_bf16 = d_qk_bf16.as<Bf16>();
  on_bf16.out = out_bf16.data();
  ASSERT_TRUE(backend().SinkGateScores(on_bf16).ok());
  ASSERT_TRUE(out_bf16.Download(backend(), &got));
  ExpectAllClose(want_bf16, got, 2e-5f, 1e-4f);
  on_bf16.qk_weight_bf16 = nullptr;
  EXPECT_EQ(backend().SinkGateScores(on_bf16).code(), absl::StatusCode::kInvalidArgument);
}

INSTANTIATE_TEST_SUITE_P(Shapes, SinkGateScoresTest,
                         ::testing::Values(SinkGateCase{1, 8, 1, 1, 1, 0, 0, 1}, SinkGateCase{100, 64, 2, 3, 16, 16, 7, 2},
                                           SinkGateCase{129, 256, 8, 4, 16, 16, 0, 3},
                                           SinkGateCase{2048, 4096, 8, 4, 16, 16, 100, 4},
                                           SinkGateCase{70, 96, 3, 2, 64, 64, 1, 5}, SinkGateCase{33, 40, 2, 1, 8, 0, 3, 6},
                                           SinkGateCase{300, 64, 4, 7, 32, 16, 5, 7},
                                           SinkGateCase{50, 32, 2, 5, 12, 4, 0, 8}),
                         CaseName<SinkGateCase>);

// Shareable buffers come from one slab, named once: two buffers' names differ only in
// their offsets. A plain Alloc buffer cannot be exported, and a name of this process or
// one pointing past its slab is refused before CUDA is asked.
TEST(ShareableMemoryTest, BuffersShareOneNamedSlab) {
  if (CudaDeviceCount() == 0) GTEST_SKIP() << "no CUDA device visible";
  KVGATE_ASSERT_OK_AND_ASSIGN(std::unique_ptr<Backend> backend, CreateCudaBackend(0));
  KVGATE_ASSERT_OK_AND_ASSIGN(DeviceBuffer a, backend->AllocShareable(1000));
  KVGATE_ASSERT_OK_AND_ASSIGN(DeviceBuffer b, backend->AllocShareable(5000));
  KVGATE_ASSERT_OK_AND_ASSIGN(std::string name_a, backend->ExportIpc(a));
  KVGATE_ASSERT_OK_AND_ASSIGN(std::string name_b, backend->ExportIpc(b));
  ASSERT_EQ(name_a.size(), sizeof(IpcName));
  IpcName ia, ib;
  std::memcpy(&ia, name_a.data(), sizeof(ia));
  std::memcpy(&ib, name_b.data(), sizeof(ib));
  EXPECT_EQ(std::memcmp(&ia.handle, &ib.handle, sizeof(ia.handle)), 0) << "one slab, one handle";
  EXPECT_EQ(ia.slab_bytes, ib.slab_bytes);
  EXPECT_EQ(ib.offset - ia.offset, static_cast<uint64_t>(static_cast<char*>(b.data()) - static_cast<char*>(a.data())));
  EXPECT_EQ(ia.offset % 256, 0u);
  // The buffers are ordinary device memory.
  std::vector<float> host(250, 1.5f), back(250, 0.0f);
  KVGATE_ASSERT_OK(backend->CopyToBackend(a.data(), host.data(), 1000));
  KVGATE_ASSERT_OK(backend->CopyWithinBackend(b.data(), a.data(), 1000));
  KVGATE_ASSERT_OK(backend->CopyToHost(back.data(), b.data(), 1000));
  EXPECT_EQ(back, host);

  KVGATE_ASSERT_OK_AND_ASSIGN(DeviceBuffer plain, backend->Alloc(1000));
  EXPECT_EQ(backend->ExportIpc(plain).status().code(), absl::StatusCode::kFailedPrecondition);
  EXPECT_EQ(backend->OpenIpc(name_a, 1000).status().code(), absl::StatusCode::kFailedPrecondition)
      << "CUDA maps a name only in another process";
  EXPECT_EQ(backend->OpenIpc(name_a, ia.slab_bytes + 1).status().code(), absl::StatusCode::kInvalidArgument)
      << "past the end of the slab";
  EXPECT_EQ(backend->OpenIpc(name_a.substr(1), 10).status().code(), absl::StatusCode::kInvalidArgument);
  EXPECT_EQ(backend->AllocShareable(0).status().code(), absl::StatusCode::kInvalidArgument);

  // A released range is handed out again; a request larger than a slab gets its own.
  const void* where = a.data();
  a = DeviceBuffer();
  KVGATE_ASSERT_OK_AND_ASSIGN(DeviceBuffer c, backend->AllocShareable(900));
  EXPECT_EQ(c.data(), where);
  KVGATE_ASSERT_OK_AND_ASSIGN(DeviceBuffer big, backend->AllocShareable(size_t{300} << 20));
  KVGATE_ASSERT_OK_AND_ASSIGN(std::string name_big, backend->ExportIpc(big));
  IpcName ig;
  std::memcpy(&ig, name_big.data(), sizeof(ig));
  EXPECT_NE(std::memcmp(&ig.handle, &ia.handle, sizeof(ig.handle)), 0);
  EXPECT_GE(ig.slab_bytes, size_t{300} << 20);
}

}  // namespace
}  // namespace kvgate::ops
