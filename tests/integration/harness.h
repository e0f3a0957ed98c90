// File: what the integration tests share: kvgate deployments as child processes (`serve`
// with every role in one process, or kv-manager + prefill + decode + router as four), a
// client over real TCP sockets (generated kvgate.v1 stubs, grpc.health.v1 and server
// reflection through grpc::GenericStub), a raw HTTP scrape of /metrics, polling of
// ServerInfo, and the offline reference: the in-process engine::Generator with
// kv::CreatePolicyPlanner, as `kvgate generate --model` runs it.
#pragma once

#include <cstdint>
#include <functional>
#include <map>
#include <memory>
#include <optional>
#include <string>
#include <vector>

#include <grpcpp/grpcpp.h>

#include "absl/status/statusor.h"
#include "absl/time/time.h"
#include "engine/generator.h"
#include "engine/model.h"
#include "engine/tokenizer.h"
#include "gates/eviction_spec.h"
#include "kvgate/v1/inference.grpc.pb.h"
#include "tests/integration/process.h"

namespace kvgate::integration {

// Seed of the random fast_kvzip / attention_gate gates (`--random-gates`), on the servers
// and in the offline reference alike.
inline constexpr uint64_t kGateSeed = 7;

std::string ModelDir();  // the TinyStories checkpoint

// The components' internal token of split deployments (written to InternalTokenFile(),
// passed as --internal-token-file to every process of a split deployment).
const std::string& InternalToken();
const std::string& InternalTokenFile();

// ---- Deployments ----------------------------------------------------------------------

struct DeploymentOptions {
  bool split = false;               // four processes instead of `serve`
  std::string transport = "inproc"; // serve only; split is always tcp
  // Flags added to every server process (e.g. --kv-sequences 80, --token T).
  std::vector<std::string> extra_args;
  std::vector<std::string> router_args;  // the router (or serve) only
  std::vector<std::string> decode_args;  // the decode worker (or serve) only
  std::vector<std::string> prefill_args; // the prefill worker (or serve) only
  bool metrics = false;             // --metrics-port 0 on every process
  // How the tests (and the readiness probe) reach the servers; null: plaintext.
  std::shared_ptr<grpc::ChannelCredentials> credentials;
  // Wait until every process's health is SERVING and the decode pool is visible.
  bool wait_ready = true;
  // The client token the readiness poll sends (else the value of a --token flag above).
  std::string token;
};

class Deployment {
 public:
  static absl::StatusOr<std::unique_ptr<Deployment>> Start(const DeploymentOptions& options);
  ~Deployment();  // stops every process (SIGTERM, then SIGKILL)

  // The public endpoint (serve, or the router).
  std::string address() const { return Address(router()); }
  std::shared_ptr<grpc::Channel> channel() const { return channel_; }
  v1::Inference::Stub& stub() const { return *stub_; }

  Process& router() const { return *processes_.back(); }  // serve when not split
  Process* manager() const;  // split only, else null
  Process* prefill() const;
  Process* decode() const;
  int port(const Process& p) const;
  std::string Address(const Process& p) const;

  // Restarts the KV manager (split) on its old port.
  absl::Status RestartManager();

  // Every process's output, for failure messages.
  std::string Logs() const;

 private:
  Deployment() = default;
  DeploymentOptions options_;
  std::vector<std::unique_ptr<Process>> processes_;  // [manager, prefill, decode,] router
  std::map<const Process*, int> ports_;
  std::shared_ptr<grpc::Channel> channel_;
  std::unique_ptr<v1::Inference::Stub> stub_;
};

// ---- Client ---------------------------------------------------------------------------

std::shared_ptr<grpc::Channel> Connect(const std::string& address,
                                       std::shared_ptr<grpc::ChannelCredentials> credentials = nullptr);

struct StreamResult {
  grpc::Status status;
  std::vector<int32_t> tokens;  // every chunk's ids, in order
  std::string text;
  int32_t chunks = 0;
  std::optional<v1::GenerateComplete> complete;
  int32_t messages_after_complete = 0;  // must stay 0
  absl::Duration elapsed;
};

// `d` times KVGATE_TEST_TIME_SCALE (default 1): the patience of streams and queues, not the
// release bounds the tests assert, grows for a build that runs many times slower
// (scripts/tsan-service-tests.sh sets 5 for ThreadSanitizer).
absl::Duration ScaledPatience(absl::Duration d);

struct CallOptions {
  absl::Duration timeout = absl::Seconds(60);  // the call's deadline
  std::string token;                           // bearer token; empty: none
  // Called after each chunk with the context; return false to stop reading (the
  // caller's hook usually cancels, aborts or kills something).
  std::function<void(grpc::ClientContext*, const StreamResult&)> on_chunk;
};

// CallOptions with a deadline (and a bearer token) only.
CallOptions Within(absl::Duration timeout, std::string token = "");

// One Generate call read to its end.
StreamResult Generate(v1::Inference::Stub& stub, const v1::GenerateRequest& request, const CallOptions& options = {});

// `request_ids`: the requests whose state ServerInfo.requests should carry.
absl::StatusOr<v1::ServerInfo> GetServerInfo(v1::Inference::Stub& stub, const std::string& token = "",
                                             const std::vector<std::string>& request_ids = {});
absl::StatusOr<v1::ModelInfo> GetModelInfo(v1::Inference::Stub& stub, const std::string& token = "");

// Polls `predicate` every 20 ms until it holds (true) or `timeout` passed (false).
bool PollUntil(const std::function<bool()>& predicate, absl::Duration timeout);

// The ServerInfo as soon as `predicate` holds for it (within `timeout`), else the last
// one seen (or the last error).
absl::StatusOr<v1::ServerInfo> WaitServerInfo(v1::Inference::Stub& stub,
                                              const std::function<bool(const v1::ServerInfo&)>& predicate,
                                              absl::Duration timeout, const std::string& token = "",
                                              const std::vector<std::string>& request_ids = {});

// A request's phase in ServerInfo.requests (PHASE_UNSPECIFIED when absent).
v1::RequestState::Phase PhaseOf(const v1::ServerInfo& info, const std::string& request_id);
// kv_pages_free == kv_pages_total > 0, no leases, transfers or requests in flight.
bool Idle(const v1::ServerInfo& info);
std::string Describe(const v1::ServerInfo& info);  // counters and request phases

// grpc.health.v1.Health/Check of the whole server ("") or of `service`: 1 SERVING,
// 2 NOT_SERVING; a failed call returns its status (NOT_FOUND for an unknown service).
absl::StatusOr<int> HealthStatus(const std::shared_ptr<grpc::Channel>& channel, absl::Duration timeout,
                                 const std::string& service = "");
inline constexpr int kServing = 1;
inline constexpr int kNotServing = 2;

// ServerReflection list_services through grpc.reflection.<version> ("v1alpha", "v1").
absl::StatusOr<std::vector<std::string>> ReflectionServices(const std::shared_ptr<grpc::Channel>& channel,
                                                            const std::string& version = "v1alpha");

// GET http://127.0.0.1:port/path over a raw socket; the response body.
absl::StatusOr<std::string> HttpGet(int port, const std::string& path);
// The value of the sample `name` (with its labels, e.g. `x_total{status="OK"}`) in a
// Prometheus text exposition; nullopt when absent.
std::optional<double> MetricValue(const std::string& exposition, const std::string& name);
// Polls the prefill worker's kvgate_kv_pages_used gauge (refreshed every heartbeat; the
// deployment needs metrics on) until it reads 0 or `timeout` passes; the last value read,
// nullopt when none could be.
std::optional<double> AwaitPrefillPagesFree(Deployment& d, absl::Duration timeout);

// ---- Requests and the offline reference -------------------------------------------------

// A prompt of about `tokens` token ids: TinyStories-like text, tokenized (BOS first).
std::vector<int32_t> StoryPrompt(const engine::Tokenizer& tokenizer, int32_t tokens, int32_t variant = 0);

struct Case {
  std::string policy = "full";
  float keep_ratio = 0;  // 0: unset
  std::vector<int32_t> prompt;  // the ids the server will see (Encode(text) for a text prompt)
  std::string text;             // when set, the request carries the prompt as text
  int32_t max_tokens = 40;
  bool ignore_eos = true;
  std::string request_id;

  std::string Name() const;
  v1::GenerateRequest Request() const;
  engine::GenerateOptions Options() const;
  gates::EvictionSpec Spec() const;
};

class OfflineReference {
 public:
  static absl::StatusOr<std::unique_ptr<OfflineReference>> Load();
  // Greedy generation on this process's engine with the case's policy (seeded random
  // gates for fast_kvzip / attention_gate, as `--random-gates kGateSeed`).
  absl::StatusOr<engine::GenerateResult> Run(const Case& c);
  const engine::Tokenizer& tokenizer() const { return *tokenizer_; }
  const engine::ModelConfig& config() const { return model_->config(); }

 private:
  std::unique_ptr<ops::Backend> backend_;
  std::unique_ptr<engine::Model> model_;
  std::unique_ptr<engine::Tokenizer> tokenizer_;
};

// Shared by every test of one binary (loaded once).
OfflineReference& Reference();

// "CODE: message" for failure output.
std::string ToString(const grpc::Status& status);

}  // namespace kvgate::integration
