// The CPU backend: GEMMs through OpenBLAS, everything else as threaded loops with the
// same arithmetic as the references (float accumulation where the reference uses double
// only for the specification's sake).
#include "cuda/cpu/cpu_backend.h"

#include <cblas.h>

#include <algorithm>
#include <cmath>
#include <cstdlib>
#include <cstring>
#include <new>
#include <thread>
#include <vector>

#include "absl/strings/str_cat.h"
#include "cuda/bf16.h"
#include "cuda/cpu/flash_attention.h"
#include "cuda/cpu/parallel_for.h"
#include "cuda/cpu/reference_ops.h"
#include "cuda/cpu/sink_gate_scores.h"
#include "cuda/cpu/row_invariant_matmul.h"

namespace kvgate::ops {
namespace {

// Below this many float operations a loop runs on one thread: waking the pool costs
// more than it saves (decode-time RMSNorm of one row, say).
constexpr int64_t kMinParallelWork = 1 << 15;

inline float Widen(float x) { return x; }
inline float Widen(Bf16 x) { return Bf16ToF32(x); }

bool KnownKvDtype(KvDtype dtype) { return dtype == KvDtype::kFloat32 || dtype == KvDtype::kBf16; }

// One (sequence, query head) of HeadPagedDecodeAttention over rows of element type T,
// widened to float as they are read (so a bf16 view computes what a float32 view of the
// same values computes, bit for bit). `scores` and `rows` are the caller's scratch.
template <typename T>
void AttendPagedItem(const HeadPagedDecodeAttentionArgs& a, int64_t item, std::vector<float>* scores,
                     std::vector<int64_t>* rows) {
  const HeadPagedKvView& kv = a.kv;
  const int32_t group = a.num_q_heads / a.num_kv_heads;
  const int32_t h = static_cast<int32_t>(item % a.num_q_heads);
  const int64_t seq_head = item / a.num_q_heads * a.num_kv_heads + h / group;
  const int32_t* pages = kv.page_ids + kv.page_indptr[seq_head];
  const float* q = a.q + item * kv.head_dim;
  const T* k_pages = static_cast<const T*>(kv.k_pages);
  const T* v_pages = static_cast<const T*>(kv.v_pages);
  rows->clear();
  scores->clear();
  float max_score = -INFINITY;
  const int32_t first_slot = kv.first_slots != nullptr ? kv.first_slots[seq_head] : 0;
  const int32_t gap_row = kv.gap_rows != nullptr ? kv.gap_rows[seq_head] : 0;
  const int32_t gap_slots = kv.gap_slots != nullptr ? kv.gap_slots[seq_head] : 0;
  for (int32_t r = 0; r < kv.lengths[seq_head]; ++r) {
    const int32_t slot = first_slot + r + (r >= gap_row ? gap_slots : 0);
    const int64_t row = static_cast<int64_t>(pages[slot / kv.page_tokens]) * kv.page_tokens + slot % kv.page_tokens;
    if (kv.query_masks != nullptr && ((kv.query_masks[row] >> (h % group)) & 1) == 0) continue;
    const T* k = k_pages + row * kv.head_dim;
    float dot = 0.0f;
    for (int32_t i = 0; i < kv.head_dim; ++i) dot += q[i] * Widen(k[i]);
    rows->push_back(row);
    scores->push_back(dot * a.scale);
    max_score = std::max(max_score, scores->back());
  }
  float denom = 0.0f;
  for (float& s : *scores) {
    s = std::exp(s - max_score);
    denom += s;
  }
  float* out = a.out + item * kv.head_dim;
  std::fill(out, out + kv.head_dim, 0.0f);  // also the answer when no row is visible
  for (size_t j = 0; j < rows->size(); ++j) {
    const float p = (*scores)[j] / denom;
    const T* v = v_pages + (*rows)[j] * kv.head_dim;
    for (int32_t i = 0; i < kv.head_dim; ++i) out[i] += p * Widen(v[i]);
  }
}
// Below this a GEMM is not worth waking the pool for (about 50 us on one core).
constexpr int64_t kMinParallelGemmFlops = int64_t{1} << 21;

class CpuBackend final : public Backend {
 public:
  // OpenBLAS runs single-threaded: its own pool of spinning threads competed with ours for
  // the cores (sched_yield took a fifth of a prefill). Large GEMMs are split over our pool
  // instead (MatMul); flash attention's per-tile GEMMs already run inside it.
  explicit CpuBackend(int num_threads) : pool_(num_threads) { openblas_set_num_threads(1); }

  std::string_view Name() const override { return "cpu"; }

  absl::StatusOr<DeviceBuffer> Alloc(size_t bytes) override {
    if (bytes == 0) return absl::InvalidArgumentError("Alloc of 0 bytes");
    // 64-byte alignment keeps rows cache-line aligned for BLAS.
    void* data = std::aligned_alloc(64, (bytes + 63) / 64 * 64);
    if (data == nullptr) {
      return absl::ResourceExhaustedError(absl::StrCat("cpu backend: cannot allocate ", bytes, " bytes"));
    }
    return DeviceBuffer(data, bytes, [](void* p) { std::free(p); });
  }

  // An empty copy may name a null pointer (an empty vector's data()); memcpy may not.
  absl::Status CopyToBackend(void* dst, const void* src, size_t bytes) override {
    if (bytes > 0) std::memcpy(dst, src, bytes);
    return absl::OkStatus();
  }
  absl::Status CopyToHost(void* dst, const void* src, size_t bytes) override {
    if (bytes > 0) std::memcpy(dst, src, bytes);
    return absl::OkStatus();
  }
  absl::Status CopyWithinBackend(void* dst, const void* src, size_t bytes) override {
    if (bytes > 0) std::memmove(dst, src, bytes);
    return absl::OkStatus();
  }

  absl::Status Embed(const EmbedArgs& args) override {
    EmbedRef(args);
    return absl::OkStatus();
  }

  absl::Status MatMul(const MatMulArgs& a) override {
    if (a.m <= kRowInvariantMaxRows) {
      RowInvariantMatMul(a, &pool_);
      return absl::OkStatus();
    }
    // Each thread takes a slice of output columns (rows of w), a multiple of 16 wide.
    const int64_t parts = pool_.num_threads();
    const int64_t flops = int64_t{2} * a.m * a.n * a.k;
    const int32_t width = parts > 1 && flops >= kMinParallelGemmFlops
                              ? static_cast<int32_t>((a.n + parts * 16 - 1) / (parts * 16) * 16)
                              : a.n;
    const int64_t slices = (a.n + width - 1) / width;
    const auto run_slices = [&](int64_t begin, int64_t end) {
      for (int64_t slice = begin; slice < end; ++slice) {
        const int32_t n0 = static_cast<int32_t>(slice * width), n1 = std::min(a.n, n0 + width);
        cblas_sgemm(CblasRowMajor, CblasNoTrans, CblasTrans, a.m, n1 - n0, a.k, 1.0f, a.x, a.k,
                    a.w + static_cast<int64_t>(n0) * a.k, a.k, 0.0f, a.y + n0, a.n);
        if (a.bias == nullptr) continue;
        for (int32_t i = 0; i < a.m; ++i) {
          float* row = a.y + static_cast<int64_t>(i) * a.n;
          for (int32_t j = n0; j < n1; ++j) row[j] += a.bias[j];
        }
      }
    };
    if (slices == 1) {
      run_slices(0, 1);
    } else {
      pool_.ParallelFor(slices, run_slices);
    }
    return absl::OkStatus();
  }

  absl::Status RmsNorm(const RmsNormArgs& a) override {
    ParallelRows(a.rows, static_cast<int64_t>(a.dim) * 3, [&](int64_t begin, int64_t end) {
      for (int64_t r = begin; r < end; ++r) {
        const float* x = a.x + r * a.dim;
        float* out = a.out + r * a.dim;
        float sum_sq = 0.0f;
        for (int32_t i = 0; i < a.dim; ++i) sum_sq += x[i] * x[i];
        const float inv_rms = 1.0f / std::sqrt(sum_sq / a.dim + a.eps);
        for (int32_t i = 0; i < a.dim; ++i) out[i] = a.weight[i] * (x[i] * inv_rms);
      }
    });
    return absl::OkStatus();
  }

  absl::Status Rope(const RopeArgs& a) override {
    ParallelRows(a.num_tokens, static_cast<int64_t>(a.num_heads) * a.head_dim * 8,
                 [&](int64_t begin, int64_t end) {
                   RopeArgs part = a;
                   part.x = a.x + begin * a.num_heads * a.head_dim;
                   part.positions = a.positions + begin;
                   part.num_tokens = static_cast<int32_t>(end - begin);
                   RopeRef(part);
                 });
    return absl::OkStatus();
  }

  absl::Status StoreKv(const StoreKvArgs& args) override {
    StoreKvRef(args);
    return absl::OkStatus();
  }

  // Tiled on SGEMM calls, threaded over (kv head, query tile): cuda/cpu/flash_attention.h.
  absl::Status Attention(const AttentionArgs& a) override {
    FlashAttention(a, pool_);
    return absl::OkStatus();
  }

  absl::Status SiluMul(const SiluMulArgs& a) override {
    ParallelRows(a.n, 16, [&](int64_t begin, int64_t end) {
      for (int64_t i = begin; i < end; ++i) {
        const float g = a.gate[i];
        a.out[i] = (g / (1.0f + std::exp(-g))) * a.up[i];
      }
    });
    return absl::OkStatus();
  }

  absl::Status Add(const AddArgs& args) override {
    AddRef(args);
    return absl::OkStatus();
  }

  // Rows are independent (destinations distinct, never read as sources), so any split
  // of them over the pool is safe. memmove: a row copied onto itself is harmless.
  absl::Status CopyRows(const CopyRowsArgs& a) override {
    if (a.num_rows < 0 || a.row_elements < 0) {
      return absl::InvalidArgumentError("CopyRows: negative size");
    }
    if (!KnownKvDtype(a.src_dtype) || !KnownKvDtype(a.dst_dtype)) {
      return absl::InvalidArgumentError(absl::StrCat("CopyRows: unknown dtype ", static_cast<int>(a.src_dtype),
                                                     " -> ", static_cast<int>(a.dst_dtype)));
    }
    if (a.src_dtype != a.dst_dtype && a.src == a.dst && a.num_rows > 0) {
      return absl::InvalidArgumentError("CopyRows: a converting copy within one buffer");
    }
    auto run = [&](int64_t i) -> int64_t { return a.run_lengths != nullptr ? a.run_lengths[i] : 1; };
    const int32_t work_per_entry = a.row_elements * (a.run_lengths != nullptr ? 16 : 1);  // a rough page
    if (a.src_dtype == a.dst_dtype) {
      const size_t element_bytes = KvDtypeBytes(a.src_dtype);
      const size_t row_bytes = static_cast<size_t>(a.row_elements) * element_bytes;
      const char* src = static_cast<const char*>(a.src);
      char* dst = static_cast<char*>(a.dst);
      ParallelRows(a.num_rows, work_per_entry, [&](int64_t begin, int64_t end) {
        for (int64_t i = begin; i < end; ++i) {
          std::memmove(dst + static_cast<int64_t>(a.dst_rows[i]) * row_bytes,
                       src + static_cast<int64_t>(a.src_rows[i]) * row_bytes, row_bytes * run(i));
        }
      });
      return absl::OkStatus();
    }
    ParallelRows(a.num_rows, work_per_entry, [&](int64_t begin, int64_t end) {
      for (int64_t i = begin; i < end; ++i) {
        const int64_t src = static_cast<int64_t>(a.src_rows[i]) * a.row_elements;
        const int64_t dst = static_cast<int64_t>(a.dst_rows[i]) * a.row_elements;
        const int64_t elements = int64_t{a.row_elements} * run(i);
        if (a.dst_dtype == KvDtype::kBf16) {
          const float* from = static_cast<const float*>(a.src) + src;
          Bf16* to = static_cast<Bf16*>(a.dst) + dst;
          for (int64_t e = 0; e < elements; ++e) to[e] = F32ToBf16(from[e]);
        } else {
          const Bf16* from = static_cast<const Bf16*>(a.src) + src;
          float* to = static_cast<float*>(a.dst) + dst;
          for (int64_t e = 0; e < elements; ++e) to[e] = Bf16ToF32(from[e]);
        }
      }
    });
    return absl::OkStatus();
  }

  // One item per (sequence, query head), as HeadPagedDecodeAttentionRef, in float.
  absl::Status HeadPagedDecodeAttention(const HeadPagedDecodeAttentionArgs& a) override {
    const HeadPagedKvView& kv = a.kv;
    if (a.num_seqs < 0 || a.num_q_heads < 0 || a.num_kv_heads < 0 || kv.head_dim < 0) {
      return absl::InvalidArgumentError("HeadPagedDecodeAttention: negative size");
    }
    if (a.num_seqs == 0 || a.num_q_heads == 0) return absl::OkStatus();
    if (a.num_kv_heads == 0 || a.num_q_heads % a.num_kv_heads != 0 || kv.page_tokens < 1 ||
        (kv.query_masks != nullptr && a.num_q_heads / a.num_kv_heads > 8) || !KnownKvDtype(kv.dtype)) {
      return absl::InvalidArgumentError(absl::StrCat(
          "HeadPagedDecodeAttention: ", a.num_q_heads, " q heads over ", a.num_kv_heads,
          " kv heads (masks ", kv.query_masks != nullptr, ", at most 8 per group), page_tokens ",
          kv.page_tokens, ", dtype ", static_cast<int>(kv.dtype)));
    }
    const int32_t group = a.num_q_heads / a.num_kv_heads;
    const int64_t items = static_cast<int64_t>(a.num_seqs) * a.num_q_heads;
    int64_t total_rows = 0;
    for (int64_t i = 0; i < static_cast<int64_t>(a.num_seqs) * a.num_kv_heads; ++i) {
      total_rows += kv.lengths[i];
    }
    const int64_t work_per_item = total_rows * group * kv.head_dim * 4 / items + 1;
    ParallelRows(items, work_per_item, [&](int64_t begin, int64_t end) {
      std::vector<float> scores;
      std::vector<int64_t> rows;
      for (int64_t item = begin; item < end; ++item) {
        if (kv.dtype == KvDtype::kBf16) {
          AttendPagedItem<Bf16>(a, item, &scores, &rows);
        } else {
          AttendPagedItem<float>(a, item, &scores, &rows);
        }
      }
    });
    return absl::OkStatus();
  }

  absl::Status ArgMaxRows(const ArgMaxRowsArgs& a) override {
    if (a.rows < 0 || a.cols < 1) {
      return absl::InvalidArgumentError(absl::StrCat("ArgMaxRows of ", a.rows, " rows x ", a.cols, " columns"));
    }
    ParallelRows(a.rows, a.cols, [&](int64_t begin, int64_t end) {
      ArgMaxRowsArgs part = a;
      part.x = a.x + begin * a.cols;
      part.out = a.out + begin;
      part.rows = static_cast<int32_t>(end - begin);
      ArgMaxRowsRef(part);
    });
    return absl::OkStatus();
  }

  absl::Status WindowAttentionProbs(const WindowAttentionProbsArgs& a) override {
    if (std::string error = WindowAttentionProbsArgsError(a); !error.empty()) {
      return absl::InvalidArgumentError(error);
    }
    ParallelRows(a.num_q_heads, int64_t{a.window} * a.length * a.head_dim, [&](int64_t begin, int64_t end) {
      WindowAttentionProbsRefHeads(a, static_cast<int32_t>(begin), static_cast<int32_t>(end));
    });
    return absl::OkStatus();
  }

  absl::Status PoolWindowScores(const PoolWindowScoresArgs& a) override {
    if (std::string error = PoolWindowScoresArgsError(a); !error.empty()) return absl::InvalidArgumentError(error);
    ParallelRows(a.num_layers, int64_t{a.num_q_heads} * a.n * a.kernel, [&](int64_t begin, int64_t end) {
      PoolWindowScoresArgs part = a;
      part.probs = a.probs + begin * a.num_q_heads * a.n;
      part.out = a.out + begin * a.num_kv_heads * a.n;
      part.num_layers = static_cast<int32_t>(end - begin);
      PoolWindowScoresRef(part);
    });
    return absl::OkStatus();
  }

  absl::Status SelectTop(const SelectTopArgs& a) override {
    if (std::string error = SelectTopArgsError(a); !error.empty()) return absl::InvalidArgumentError(error);
    const int32_t units = a.merge_rows > 1 ? a.rows / a.merge_rows : a.rows / a.rows_per_selection;
    const int64_t rows_per_unit = a.merge_rows > 1 ? a.merge_rows : a.rows_per_selection;
    ParallelRows(units, rows_per_unit * a.n * 16, [&](int64_t begin, int64_t end) {
      SelectTopRefGroups(a, static_cast<int32_t>(begin), static_cast<int32_t>(end));
    });
    return absl::OkStatus();
  }

  absl::Status SinkGateScores(const SinkGateScoresArgs& a) override {
    if (std::string error = SinkGateScoresArgsError(a); !error.empty()) return absl::InvalidArgumentError(error);
    SinkGateScoresCpu(a);
    return absl::OkStatus();
  }

  // Backend memory is host memory here: the host data is the constant.
  absl::StatusOr<const void*> ConstantOnBackend(uint64_t owner, int32_t key, const void* host, size_t bytes) override {
    if (owner == 0 || host == nullptr || bytes == 0) {
      return absl::InvalidArgumentError("ConstantOnBackend: owner 0, no data or 0 bytes");
    }
    return host;
  }

  absl::Status Synchronize() override { return absl::OkStatus(); }

 private:
  // Splits [0, rows) over the pool when the total work is worth it.
  template <typename Body>
  void ParallelRows(int64_t rows, int64_t work_per_row, Body&& body) {
    if (rows * work_per_row < kMinParallelWork) {
      body(int64_t{0}, rows);
      return;
    }
    pool_.ParallelFor(rows, body);
  }

  ThreadPool pool_;
};

}  // namespace

std::unique_ptr<Backend> CreateCpuBackend(int num_threads) {
  if (num_threads <= 0) num_threads = std::max(1u, std::thread::hardware_concurrency());
  return std::make_unique<CpuBackend>(num_threads);
}

}  // namespace kvgate::ops
