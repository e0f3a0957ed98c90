// File: the CUDA backend: cuBLAS SGEMM for MatMul, cuBLASLt for the bf16 GEMMs and the
// kernels of cuda/kernels/ for the other ops, all on one non-blocking stream per backend instance, so ops run in
// submission order and return before the GPU is done.
#include "cuda/cuda_backend.h"

#include <cublas_v2.h>
#include <cuda_runtime.h>

#include <cstddef>
#include <cstdint>
#include <cstdlib>
#include <cstring>
#include <algorithm>
#include <map>
#include <memory>
#include <mutex>
#include <string>
#include <string_view>
#include <type_traits>
#include <utility>

#include <unistd.h>

#include "absl/status/status.h"
#include "absl/status/statusor.h"
#include "absl/strings/str_cat.h"
#include "absl/strings/string_view.h"
#include "common/status_macros.h"
#include "cuda/backend.h"
#include "cuda/kernels/add.cuh"
#include "cuda/kernels/argmax_rows.cuh"
#include "cuda/kernels/attention.cuh"
#include "cuda/kernels/attention_bf16.cuh"
#include "cuda/kernels/cast_bf16.cuh"
#include "cuda/kernels/copy_rows.cuh"
#include "cuda/kernels/cuda_check.h"
#include "cuda/kernels/embed.cuh"
#include "cuda/kernels/embed_bf16.cuh"
#include "cuda/kernels/gemm_bf16.h"
#include "cuda/kernels/grouped_decode_attention.cuh"
#include "cuda/kernels/head_paged_decode_attention.cuh"
#include "cuda/kernels/matmul_bias.cuh"
#include "cuda/kernels/pinned_upload_ring.h"
#include "cuda/kernels/rms_norm.cuh"
#include "cuda/kernels/rms_norm_bf16.cuh"
#include "cuda/kernels/rope.cuh"
#include "cuda/kernels/shareable_memory.h"
#include "cuda/kernels/silu_mul.cuh"
#include "cuda/kernels/silu_mul_bf16.cuh"
#include "cuda/kernels/store_kv.cuh"
#include "cuda/kernels/window_attention_probs.cuh"
#include "cuda/kernels/pool_window_scores.cuh"
#include "cuda/kernels/select_top.cuh"
#include "cuda/kernels/sink_gate_scores.cuh"
#include "cuda/cpu/sink_gate_scores.h"
#include "cuda/cpu/reference_ops.h"

namespace kvgate::ops {
namespace {

class CudaOpGraph final : public OpGraph {
 public:
  CudaOpGraph(cudaGraphExec_t exec, uint64_t workspace_epoch) : exec_(exec), workspace_epoch_(workspace_epoch) {}
  ~CudaOpGraph() override { (void)cudaGraphExecDestroy(exec_); }
  cudaGraphExec_t exec() const { return exec_; }
  uint64_t workspace_epoch() const { return workspace_epoch_; }

 private:
  cudaGraphExec_t exec_;
  uint64_t workspace_epoch_;  // CudaBackend::workspace_epoch_ when recorded
};

// Shareable slabs grow by at least this much: a 2k-token 8B-shaped cache is 268 MB.
constexpr uint64_t kShareableSlabBytes = uint64_t{256} << 20;
// Mapped slabs of other processes kept open (LRU): a few per prefill worker.
constexpr size_t kMaxIpcMappings = 64;

absl::Status DeviceUuid(int device, char out[16]) {
  cudaDeviceProp prop;
  KVGATE_CUDA_RETURN_IF_ERROR(cudaGetDeviceProperties(&prop, device));
  static_assert(sizeof(prop.uuid.bytes) == 16);
  std::memcpy(out, prop.uuid.bytes, 16);
  return absl::OkStatus();
}

class CudaBackend final : public Backend {
 public:
  explicit CudaBackend(int device) : device_(device), name_(absl::StrCat("cuda:", device)) {}

  ~CudaBackend() override {
    // Best effort: errors here cannot be reported and a poisoned context fails anyway.
    if (cudaSetDevice(device_) != cudaSuccess) (void)cudaGetLastError();
    if (cublas_ != nullptr) cublasDestroy(cublas_);
    if (stream_ != nullptr) {
      (void)cudaStreamSynchronize(stream_);
      gemm_bf16_.reset();
      gemm_workspace_ = DeviceBuffer();
      attention_bf16_workspace_ = DeviceBuffer();
      attention_workspace_ = DeviceBuffer();
      scoring_workspace_ = DeviceBuffer();
      gate_workspace_ = DeviceBuffer();
      select_workspace_ = DeviceBuffer();
      constants_.clear();
      (void)cudaStreamDestroy(stream_);
    }
    (void)cudaGetLastError();
  }

  // Creates the stream and the cuBLAS handle on `device_`.
  absl::Status Init() {
    KVGATE_CUDA_RETURN_IF_ERROR(cudaSetDevice(device_));
    KVGATE_CUDA_RETURN_IF_ERROR(cudaStreamCreateWithFlags(&stream_, cudaStreamNonBlocking));
    KVGATE_CUBLAS_RETURN_IF_ERROR(cublasCreate(&cublas_));
    KVGATE_CUBLAS_RETURN_IF_ERROR(cublasSetStream(cublas_, stream_));
    // Plain FP32: no TF32 tensor-op shortcut, so MatMul stays within fp32 tolerances
    // of the reference.
    KVGATE_CUBLAS_RETURN_IF_ERROR(cublasSetMathMode(cublas_, CUBLAS_DEFAULT_MATH));
    KVGATE_CUDA_RETURN_IF_ERROR(
        cudaDeviceGetAttribute(&num_sms_, cudaDevAttrMultiProcessorCount, device_));
    KVGATE_RETURN_IF_ERROR(DeviceUuid(device_, uuid_));
    shareable_ = std::make_unique<ShareableSlabs>(device_, uuid_, kShareableSlabBytes);
    ipc_mappings_ = std::make_unique<IpcMappings>(device_, kMaxIpcMappings);
    // KVGATE_GROUPED_DECODE_ATTENTION=0 keeps decode on attention.cu (benchmark A/B runs).
    const char* grouped = std::getenv("KVGATE_GROUPED_DECODE_ATTENTION");
    use_grouped_decode_ = grouped == nullptr || std::strcmp(grouped, "0") != 0;
    // KVGATE_PINNED_UPLOADS=0 leaves every upload to cudaMemcpyAsync (benchmark A/B runs).
    const char* pinned = std::getenv("KVGATE_PINNED_UPLOADS");
    if (pinned == nullptr || std::strcmp(pinned, "0") != 0) KVGATE_RETURN_IF_ERROR(uploads_.Init());
    KVGATE_ASSIGN_OR_RETURN(gemm_workspace_, Alloc(kGemmBf16WorkspaceBytes));
    gemm_bf16_ = std::make_unique<GemmBf16Runner>();
    return gemm_bf16_->Init(gemm_workspace_.data());
  }

  std::string_view Name() const override { return name_; }

  absl::StatusOr<DeviceBuffer> Alloc(size_t bytes) override {
    if (bytes == 0) return absl::InvalidArgumentError(absl::StrCat(name_, ": Alloc of 0 bytes"));
    KVGATE_RETURN_IF_ERROR(RefuseWhileRecording("Alloc"));
    KVGATE_CUDA_RETURN_IF_ERROR(cudaSetDevice(device_));
    void* ptr = nullptr;
    const cudaError_t err = cudaMalloc(&ptr, bytes);
    if (err != cudaSuccess) {
      (void)cudaGetLastError();
      const std::string message =
          absl::StrCat(name_, ": cudaMalloc of ", bytes, " bytes: ", cudaGetErrorString(err));
      if (err == cudaErrorMemoryAllocation) return absl::ResourceExhaustedError(message);
      return absl::InternalError(message);
    }
    const int device = device_;
    return DeviceBuffer(ptr, bytes, [device](void* p) {
      // cudaFree waits for the device; restore the caller's current device afterwards.
      int previous = -1;
      if (cudaGetDevice(&previous) == cudaSuccess && previous != device) {
        (void)cudaSetDevice(device);
        (void)cudaFree(p);
        (void)cudaSetDevice(previous);
      } else {
        (void)cudaFree(p);
      }
      (void)cudaGetLastError();
    });
  }

  // The host source may be reused as soon as this returns: small copies are staged in
  // pinned slots, large pageable ones by the runtime (a large pinned source must stay
  // alive until Synchronize()).
  absl::Status CopyToBackend(void* dst, const void* host_src, size_t bytes) override {
    if (bytes == 0) return absl::OkStatus();
    KVGATE_RETURN_IF_ERROR(RefuseWhileRecording("CopyToBackend"));
    KVGATE_CUDA_RETURN_IF_ERROR(cudaSetDevice(device_));
    // Small uploads (a step's ids, positions, page tables, row lists) never wait for the
    // stream; large ones (weights, imports) are the runtime's.
    if (bytes <= uploads_.slot_bytes()) return uploads_.Upload(dst, host_src, bytes, stream_);
    KVGATE_CUDA_RETURN_IF_ERROR(
        cudaMemcpyAsync(dst, host_src, bytes, cudaMemcpyHostToDevice, stream_));
    return absl::OkStatus();
  }

  absl::Status CopyToHost(void* host_dst, const void* src, size_t bytes) override {
    if (bytes == 0) return absl::OkStatus();
    KVGATE_RETURN_IF_ERROR(RefuseWhileRecording("CopyToHost"));
    KVGATE_CUDA_RETURN_IF_ERROR(cudaSetDevice(device_));
    KVGATE_CUDA_RETURN_IF_ERROR(
        cudaMemcpyAsync(host_dst, src, bytes, cudaMemcpyDeviceToHost, stream_));
    KVGATE_CUDA_RETURN_IF_ERROR(cudaStreamSynchronize(stream_));
    return absl::OkStatus();
  }

  absl::Status CopyWithinBackend(void* dst, const void* src, size_t bytes) override {
    if (bytes == 0) return absl::OkStatus();
    KVGATE_CUDA_RETURN_IF_ERROR(cudaSetDevice(device_));
    KVGATE_CUDA_RETURN_IF_ERROR(cudaMemcpyAsync(dst, src, bytes, cudaMemcpyDeviceToDevice, stream_));
    return absl::OkStatus();
  }

  absl::StatusOr<DeviceBuffer> AllocShareable(size_t bytes) override {
    if (bytes == 0) return absl::InvalidArgumentError(absl::StrCat(name_, ": AllocShareable of 0 bytes"));
    KVGATE_RETURN_IF_ERROR(RefuseWhileRecording("AllocShareable"));
    absl::StatusOr<DeviceBuffer> buffer = shareable_->Alloc(bytes);
    if (!buffer.ok()) return absl::Status(buffer.status().code(), absl::StrCat(name_, ": ", buffer.status().message()));
    return buffer;
  }

  absl::StatusOr<std::string> ExportIpc(const DeviceBuffer& buffer) override {
    if (buffer.data() == nullptr) return absl::InvalidArgumentError(absl::StrCat(name_, ": export of an empty buffer"));
    KVGATE_RETURN_IF_ERROR(RefuseWhileRecording("ExportIpc"));
    absl::StatusOr<IpcName> name = shareable_->NameOf(buffer.data(), buffer.bytes());
    if (absl::IsNotFound(name.status())) {
      return absl::FailedPreconditionError(
          absl::StrCat(name_, ": ExportIpc of a buffer that AllocShareable did not make"));
    }
    if (!name.ok()) return name.status();
    return std::string(reinterpret_cast<const char*>(&*name), sizeof(IpcName));
  }

  absl::StatusOr<DeviceBuffer> OpenIpc(std::string_view bytes_of_name, size_t bytes) override {
    IpcName name;
    if (bytes_of_name.size() != sizeof(name)) {
      return absl::InvalidArgumentError(
          absl::StrCat(name_, ": an IPC name of ", bytes_of_name.size(), " bytes (", sizeof(name), " expected)"));
    }
    std::memcpy(&name, bytes_of_name.data(), sizeof(name));
    if (std::memcmp(name.magic, kIpcMagic, sizeof(name.magic)) != 0) {
      return absl::InvalidArgumentError(absl::StrCat(name_, ": not a kvgate CUDA IPC name"));
    }
    if (bytes == 0 || name.offset > name.slab_bytes || bytes > name.slab_bytes - name.offset) {
      return absl::InvalidArgumentError(absl::StrCat(name_, ": IPC open of ", bytes, " bytes at offset ", name.offset,
                                                     " of an allocation of ", name.slab_bytes));
    }
    if (name.exporter_pid == static_cast<int64_t>(getpid())) {
      return absl::FailedPreconditionError(
          absl::StrCat(name_, ": the IPC name was exported by this process (CUDA maps it only in another)"));
    }
    KVGATE_RETURN_IF_ERROR(RefuseWhileRecording("OpenIpc"));
    KVGATE_CUDA_RETURN_IF_ERROR(cudaSetDevice(device_));
    if (std::memcmp(uuid_, name.device_uuid, sizeof(uuid_)) != 0) {
      // Another GPU of this host is readable through peer access, if the two can reach.
      int count = 0, reachable = 0;
      KVGATE_CUDA_RETURN_IF_ERROR(cudaGetDeviceCount(&count));
      for (int d = 0; d < count && !reachable; ++d) {
        char uuid[16];
        if (d == device_ || !DeviceUuid(d, uuid).ok() || std::memcmp(uuid, name.device_uuid, sizeof(uuid)) != 0) continue;
        KVGATE_CUDA_RETURN_IF_ERROR(cudaDeviceCanAccessPeer(&reachable, device_, d));
      }
      if (!reachable) {
        return absl::FailedPreconditionError(
            absl::StrCat(name_, ": the IPC memory lives on a GPU this process cannot reach"));
      }
    }
    absl::StatusOr<DeviceBuffer> mapped = ipc_mappings_->Open(name, bytes);
    if (!mapped.ok()) return absl::Status(mapped.status().code(), absl::StrCat(name_, ": ", mapped.status().message()));
    return mapped;
  }

  absl::Status Embed(const EmbedArgs& args) override {
    KVGATE_CUDA_RETURN_IF_ERROR(cudaSetDevice(device_));
    return LaunchEmbed(args, stream_);
  }

  // y[m, n] = x[m, k] w[n, k]^T + bias. cuBLAS is column-major: the row-major y is the
  // column-major y^T[n, m] = w[n, k] x^T[k, m], i.e. op(A) = w^T-as-stored (CUBLAS_OP_T on
  // the column-major k x n view of w) and op(B) = x (the column-major k x m view).
  absl::Status MatMul(const MatMulArgs& args) override {
    if (args.m < 0 || args.n < 0 || args.k < 0) {
      return absl::InvalidArgumentError("MatMul: negative size");
    }
    if (args.m == 0 || args.n == 0) return absl::OkStatus();
    KVGATE_CUDA_RETURN_IF_ERROR(cudaSetDevice(device_));
    if (args.k == 0) {
      // An empty sum; cuBLAS would reject lda = 0.
      KVGATE_CUDA_RETURN_IF_ERROR(cudaMemsetAsync(
          args.y, 0, static_cast<size_t>(args.m) * args.n * sizeof(float), stream_));
    } else {
      const float alpha = 1.0f;
      const float beta = 0.0f;
      KVGATE_CUBLAS_RETURN_IF_ERROR(cublasSgemm(cublas_, CUBLAS_OP_T, CUBLAS_OP_N, args.n, args.m,
                                                args.k, &alpha, args.w, args.k, args.x, args.k,
                                                &beta, args.y, args.n));
    }
    return LaunchMatMulBias(args, stream_);
  }

  absl::Status RmsNorm(const RmsNormArgs& args) override {
    KVGATE_CUDA_RETURN_IF_ERROR(cudaSetDevice(device_));
    return LaunchRmsNorm(args, stream_);
  }

  absl::Status Rope(const RopeArgs& args) override {
    KVGATE_CUDA_RETURN_IF_ERROR(cudaSetDevice(device_));
    return LaunchRope(args, stream_);
  }

  absl::Status StoreKv(const StoreKvArgs& args) override {
    KVGATE_CUDA_RETURN_IF_ERROR(cudaSetDevice(device_));
    return LaunchStoreKv(args, stream_);
  }

  // Decode-sized grids split the visible rows across blocks (see attention.cuh); the
  // split partials go to a workspace that grows on demand and is reused in stream order.
  // A few query tokens (decode) go to the grouped kernel, which reads each K/V row once
  // for all query heads of its GQA group (grouped_decode_attention.cuh).
  absl::Status Attention(const AttentionArgs& args) override {
    KVGATE_CUDA_RETURN_IF_ERROR(cudaSetDevice(device_));
    if (use_grouped_decode_ && GroupedDecodeAttentionSupported(args)) {
      const AttentionPlan plan = PlanGroupedDecodeAttention(args, num_sms_);
      KVGATE_RETURN_IF_ERROR(ReserveAttentionWorkspace(plan.workspace_floats));
      return LaunchGroupedDecodeAttention(args, plan, attention_workspace_.as<float>(), stream_);
    }
    const AttentionPlan plan = PlanAttention(args, num_sms_);
    KVGATE_RETURN_IF_ERROR(ReserveAttentionWorkspace(plan.workspace_floats));
    return LaunchAttention(args, plan, attention_workspace_.as<float>(), stream_);
  }

  absl::Status CopyRows(const CopyRowsArgs& args) override {
    KVGATE_CUDA_RETURN_IF_ERROR(cudaSetDevice(device_));
    return LaunchCopyRows(args, stream_);
  }

  // Small batches split each head's rows across blocks, as Attention does, sharing its
  // workspace (ops run in stream order, so they never use it at the same time). The
  // grouped kernel reads each K/V row once for its whole GQA group, as Attention's does.
  absl::Status HeadPagedDecodeAttention(const HeadPagedDecodeAttentionArgs& args) override {
    KVGATE_CUDA_RETURN_IF_ERROR(cudaSetDevice(device_));
    if (use_grouped_decode_ && HeadPagedGroupedSupported(args)) {
      const HeadPagedDecodePlan plan = PlanHeadPagedGroupedDecodeAttention(args, num_sms_);
      KVGATE_RETURN_IF_ERROR(ReserveAttentionWorkspace(plan.workspace_floats));
      return LaunchHeadPagedGroupedDecodeAttention(args, plan, attention_workspace_.as<float>(), stream_);
    }
    const HeadPagedDecodePlan plan = PlanHeadPagedDecodeAttention(args, num_sms_);
    KVGATE_RETURN_IF_ERROR(ReserveAttentionWorkspace(plan.workspace_floats));
    return LaunchHeadPagedDecodeAttention(args, plan, attention_workspace_.as<float>(), stream_);
  }

  absl::Status ArgMaxRows(const ArgMaxRowsArgs& args) override {
    KVGATE_CUDA_RETURN_IF_ERROR(cudaSetDevice(device_));
    return LaunchArgMaxRows(args, stream_);
  }

  // Its logits and statistics have a workspace of their own (the policies' scoring ops'),
  // so that a prefill's scoring never moves the attention workspace under the decode
  // step's recorded graphs.
  absl::Status WindowAttentionProbs(const WindowAttentionProbsArgs& args) override {
    KVGATE_CUDA_RETURN_IF_ERROR(cudaSetDevice(device_));
    if (std::string error = WindowAttentionProbsArgsError(args); !error.empty()) {
      return absl::InvalidArgumentError(error);
    }
    KVGATE_RETURN_IF_ERROR(ReserveScoringWorkspace(WindowAttentionProbsWorkspaceFloats(args)));
    return LaunchWindowAttentionProbs(args, cublas_, scoring_workspace_.as<float>(), stream_);
  }

  absl::Status PoolWindowScores(const PoolWindowScoresArgs& args) override {
    KVGATE_CUDA_RETURN_IF_ERROR(cudaSetDevice(device_));
    return LaunchPoolWindowScores(args, stream_);
  }

  absl::Status SelectTop(const SelectTopArgs& args) override {
    KVGATE_CUDA_RETURN_IF_ERROR(cudaSetDevice(device_));
    KVGATE_RETURN_IF_ERROR(GrowWorkspace(&select_workspace_, static_cast<size_t>(SelectTopWorkspaceBytes(args)),
                                         size_t{64} << 10, /*used_by_graphs=*/false, "the selection workspace"));
    return LaunchSelectTop(args, select_workspace_.data(), select_workspace_.bytes(), stream_);
  }

  absl::Status SinkGateScores(const SinkGateScoresArgs& args) override {
    KVGATE_CUDA_RETURN_IF_ERROR(cudaSetDevice(device_));
    if (std::string error = SinkGateScoresArgsError(args); !error.empty()) return absl::InvalidArgumentError(error);
    // Its own workspace, which decode graphs may hold (a decode step scores its tokens
    // with it), so its growth re-records them; a prefill's first chunk sizes it.
    KVGATE_RETURN_IF_ERROR(GrowWorkspace(&gate_workspace_, sizeof(float) * SinkGateScoresWorkspaceFloats(args),
                                         size_t{1} << 20, /*used_by_graphs=*/true, "the gate workspace"));
    if (args.x_bf16 == nullptr) return LaunchSinkGateScores(args, cublas_, gate_workspace_.as<float>(), stream_);
    if (args.n == 0) return absl::OkStatus();
    // One bf16 GEMM makes every row's [q ; k] projections side by side.
    const int32_t q_width = args.kv_heads * args.group * args.rank, width = q_width + args.kv_heads * args.rank;
    GemmBf16Args gemm;
    gemm.x = args.x_bf16;
    gemm.w = args.qk_weight_bf16;
    gemm.y = gate_workspace_.data();
    gemm.m = args.n;
    gemm.n = width;
    gemm.k = args.hidden;
    KVGATE_RETURN_IF_ERROR(gemm_bf16_->Run(gemm, stream_));
    const float* projections = gate_workspace_.as<float>();
    return LaunchSinkGateScoresOfProjections(args, projections, width, projections + q_width, width, stream_);
  }

  absl::StatusOr<const void*> ConstantOnBackend(uint64_t owner, int32_t key, const void* host, size_t bytes) override {
    if (owner == 0 || host == nullptr || bytes == 0) {
      return absl::InvalidArgumentError("ConstantOnBackend: owner 0, no data or 0 bytes");
    }
    std::lock_guard<std::mutex> lock(constants_mutex_);
    auto found = constants_.find({owner, key});
    if (found != constants_.end()) {
      if (found->second.bytes() != bytes) {
        return absl::InvalidArgumentError(absl::StrCat("ConstantOnBackend: (", owner, ", ", key, ") was ",
                                                       found->second.bytes(), " bytes, now ", bytes));
      }
      return static_cast<const void*>(found->second.data());
    }
    KVGATE_RETURN_IF_ERROR(RefuseWhileRecording("ConstantOnBackend"));
    KVGATE_ASSIGN_OR_RETURN(DeviceBuffer buffer, Alloc(bytes));
    KVGATE_RETURN_IF_ERROR(CopyToBackend(buffer.data(), host, bytes));
    const void* data = buffer.data();
    constants_.emplace(std::make_pair(owner, key), std::move(buffer));
    return data;
  }

  absl::Status SiluMul(const SiluMulArgs& args) override {
    KVGATE_CUDA_RETURN_IF_ERROR(cudaSetDevice(device_));
    return LaunchSiluMul(args, stream_);
  }

  absl::Status Add(const AddArgs& args) override {
    KVGATE_CUDA_RETURN_IF_ERROR(cudaSetDevice(device_));
    return LaunchAdd(args, stream_);
  }

  bool SupportsBf16() const override { return true; }

  absl::Status EmbedBf16(const EmbedBf16Args& args) override {
    KVGATE_CUDA_RETURN_IF_ERROR(cudaSetDevice(device_));
    return LaunchEmbedBf16(args, stream_);
  }

  absl::Status GemmBf16(const GemmBf16Args& args) override {
    KVGATE_CUDA_RETURN_IF_ERROR(cudaSetDevice(device_));
    return gemm_bf16_->Run(args, stream_);
  }

  absl::Status RmsNormBf16(const RmsNormBf16Args& args) override {
    KVGATE_CUDA_RETURN_IF_ERROR(cudaSetDevice(device_));
    return LaunchRmsNormBf16(args, stream_);
  }

  absl::Status SiluMulBf16(const SiluMulBf16Args& args) override {
    KVGATE_CUDA_RETURN_IF_ERROR(cudaSetDevice(device_));
    return LaunchSiluMulBf16(args, stream_);
  }

  absl::Status CastToBf16(const CastToBf16Args& args) override {
    KVGATE_CUDA_RETURN_IF_ERROR(cudaSetDevice(device_));
    return LaunchCastToBf16(args, stream_);
  }

  // Tensor cores where the kernel takes the args (head_dim 64/128, prefill-sized);
  // otherwise the fp32 kernel, whose exact result is inside the bf16 tolerance.
  absl::Status AttentionBf16(const AttentionArgs& args) override {
    if (!AttentionBf16Supported(args)) return Attention(args);
    KVGATE_CUDA_RETURN_IF_ERROR(cudaSetDevice(device_));
    KVGATE_RETURN_IF_ERROR(GrowWorkspace(&attention_bf16_workspace_, AttentionBf16WorkspaceBytes(args), size_t{16} << 20,
                                         /*used_by_graphs=*/true, "the bf16 attention workspace"));
    return LaunchAttentionBf16(args, attention_bf16_workspace_.data(), attention_bf16_workspace_.bytes(), stream_);
  }

  absl::Status Synchronize() override {
    KVGATE_RETURN_IF_ERROR(RefuseWhileRecording("Synchronize"));
    KVGATE_CUDA_RETURN_IF_ERROR(cudaSetDevice(device_));
    KVGATE_CUDA_RETURN_IF_ERROR(cudaStreamSynchronize(stream_));
    KVGATE_CUDA_RETURN_IF_ERROR(cudaGetLastError());
    return absl::OkStatus();
  }

  // Stream capture in thread-local mode: other threads (another role's backend in the
  // same process) keep allocating and copying while this one records.
  absl::StatusOr<std::unique_ptr<OpGraph>> RecordGraph(const std::function<absl::Status()>& record) override {
    KVGATE_RETURN_IF_ERROR(RefuseWhileRecording("RecordGraph"));
    KVGATE_CUDA_RETURN_IF_ERROR(cudaSetDevice(device_));
    KVGATE_CUDA_RETURN_IF_ERROR(cudaStreamBeginCapture(stream_, cudaStreamCaptureModeThreadLocal));
    recording_ = true;
    const absl::Status recorded = record();
    recording_ = false;
    cudaGraph_t graph = nullptr;
    const cudaError_t ended = cudaStreamEndCapture(stream_, &graph);
    (void)cudaGetLastError();
    std::unique_ptr<cudaGraph_t, void (*)(cudaGraph_t*)> graph_owner(&graph, [](cudaGraph_t* g) {
      if (*g != nullptr) (void)cudaGraphDestroy(*g);
    });
    KVGATE_RETURN_IF_ERROR(recorded);
    KVGATE_CUDA_RETURN_IF_ERROR(ended);
    cudaGraphExec_t exec = nullptr;
    KVGATE_CUDA_RETURN_IF_ERROR(cudaGraphInstantiate(&exec, graph, 0));
    return std::unique_ptr<OpGraph>(new CudaOpGraph(exec, workspace_epoch_));
  }

  absl::Status ReplayGraph(const OpGraph& graph) override {
    KVGATE_RETURN_IF_ERROR(RefuseWhileRecording("ReplayGraph"));
    const auto* cuda_graph = dynamic_cast<const CudaOpGraph*>(&graph);
    if (cuda_graph == nullptr) return absl::InvalidArgumentError(absl::StrCat(name_, ": not a CUDA graph"));
    if (cuda_graph->workspace_epoch() != workspace_epoch_) {
      return absl::FailedPreconditionError(absl::StrCat(name_, ": the graph was recorded before a workspace moved"));
    }
    KVGATE_CUDA_RETURN_IF_ERROR(cudaSetDevice(device_));
    KVGATE_CUDA_RETURN_IF_ERROR(cudaGraphLaunch(cuda_graph->exec(), stream_));
    return absl::OkStatus();
  }

 private:
  absl::Status RefuseWhileRecording(std::string_view what) const {
    if (!recording_) return absl::OkStatus();
    return absl::FailedPreconditionError(absl::StrCat(name_, ": ", absl::string_view(what.data(), what.size()), " while a graph is being recorded"));
  }

  // Grows *buffer to at least `bytes`, in granules of `granule` bytes. A workspace that
  // recorded graphs use bumps the epoch, so that they are recorded again.
  absl::Status GrowWorkspace(DeviceBuffer* buffer, size_t bytes, size_t granule, bool used_by_graphs,
                             std::string_view what) {
    if (bytes <= buffer->bytes()) return absl::OkStatus();
    KVGATE_RETURN_IF_ERROR(RefuseWhileRecording("growing " + std::string(what)));
    *buffer = DeviceBuffer();  // freeing the old block waits for the kernels that still use it
    if (used_by_graphs) ++workspace_epoch_;
    KVGATE_ASSIGN_OR_RETURN(*buffer, Alloc((bytes + granule - 1) / granule * granule));
    return absl::OkStatus();
  }

  // The scoring ops' workspace; no graph uses it, so its growth leaves decode graphs valid.
  absl::Status ReserveScoringWorkspace(int64_t floats) {
    return GrowWorkspace(&scoring_workspace_, static_cast<size_t>(std::max<int64_t>(floats, 0)) * sizeof(float),
                         size_t{1} << 20, /*used_by_graphs=*/false, "the scoring workspace");
  }

  // Grows attention_workspace_ to at least `floats` floats, in 1 MiB granules.
  // A plan of bad args may ask for a negative size; the launcher rejects those args.
  absl::Status ReserveAttentionWorkspace(int64_t floats) {
    if (floats <= 0) return absl::OkStatus();
    return GrowWorkspace(&attention_workspace_, static_cast<size_t>(floats) * sizeof(float), size_t{1} << 20,
                         /*used_by_graphs=*/true, "the attention workspace");
  }

  const int device_;
  const std::string name_;
  cudaStream_t stream_ = nullptr;
  cublasHandle_t cublas_ = nullptr;
  bool recording_ = false;       // inside RecordGraph
  uint64_t workspace_epoch_ = 0;  // + 1 whenever a workspace moves: graphs recorded before are stale
  int num_sms_ = 0;
  char uuid_[16] = {};  // this GPU's, stamped into IPC names
  std::unique_ptr<ShareableSlabs> shareable_;  // AllocShareable / ExportIpc
  std::unique_ptr<IpcMappings> ipc_mappings_;  // OpenIpc
  bool use_grouped_decode_ = true;
  DeviceBuffer attention_workspace_;  // split partials of Attention and HeadPagedDecodeAttention
  DeviceBuffer scoring_workspace_;  // WindowAttentionProbs' logits and statistics
  DeviceBuffer gate_workspace_;     // SinkGateScores' projections
  DeviceBuffer select_workspace_;   // SelectTop's multi-block state
  std::mutex constants_mutex_;
  std::map<std::pair<uint64_t, int32_t>, DeviceBuffer> constants_;  // ConstantOnBackend
  DeviceBuffer gemm_workspace_;       // cuBLASLt's, kGemmBf16WorkspaceBytes
  DeviceBuffer attention_bf16_workspace_;  // bf16 K/V rows of AttentionBf16
  std::unique_ptr<GemmBf16Runner> gemm_bf16_;
  PinnedUploadRing uploads_;  // small host-to-device copies
};

}  // namespace

int CudaDeviceCount() {
  int count = 0;
  if (cudaGetDeviceCount(&count) != cudaSuccess) {
    (void)cudaGetLastError();
    return 0;
  }
  return count;
}

absl::StatusOr<std::unique_ptr<Backend>> CreateCudaBackend(int device_ordinal) {
  if (device_ordinal < 0) {
    return absl::InvalidArgumentError(
        absl::StrCat("cuda device ordinal ", device_ordinal, " is negative"));
  }
  const int count = CudaDeviceCount();
  if (count == 0) {
    return absl::UnavailableError(absl::StrCat(
        "backend 'cuda:", device_ordinal,
        "': no CUDA device visible (no GPU, no driver, or CUDA_VISIBLE_DEVICES hides them); "
        "use --backend cpu"));
  }
  if (device_ordinal >= count) {
    return absl::UnavailableError(
        absl::StrCat("backend 'cuda:", device_ordinal, "': only ", count,
                     " CUDA device(s) visible (cuda:0 .. cuda:", count - 1, ")"));
  }
  auto backend = std::make_unique<CudaBackend>(device_ordinal);
  KVGATE_RETURN_IF_ERROR(backend->Init());
  return std::unique_ptr<Backend>(std::move(backend));
}

}  // namespace kvgate::ops
