// File: a `kvgate` child process for the integration tests: started with fork/exec
// (stdout and stderr captured through one pipe by a reader thread), its "listening on
// HOST:PORT" line parsed, and always reaped: the destructor sends SIGTERM, then SIGKILL
// after a grace period. A child also gets SIGKILL when the test process dies
// (PR_SET_PDEATHSIG), so a crashed or killed test leaves no server behind.
//
// Start processes from the test's main thread: PR_SET_PDEATHSIG fires when the thread that
// forked exits.
#pragma once

#include <sys/types.h>

#include <condition_variable>
#include <memory>
#include <mutex>
#include <optional>
#include <string>
#include <thread>
#include <vector>

#include "absl/status/statusor.h"
#include "absl/time/time.h"

namespace kvgate::integration {

// The kvgate binary under test: $KVGATE_BINARY, else the path CMake compiled in.
std::string KvgateBinary();

class Process {
 public:
  // Runs `KvgateBinary() args...`. `name` labels its output in failure messages.
  static absl::StatusOr<std::unique_ptr<Process>> Start(std::string name, std::vector<std::string> args);
  ~Process();  // Stop(1 s) unless already reaped

  Process(const Process&) = delete;
  Process& operator=(const Process&) = delete;

  // Waits for the "listening on HOST:PORT" line and returns PORT. Also parses
  // ", metrics on HOST:PORT/metrics" when present (metrics_port()). DEADLINE_EXCEEDED at
  // `timeout`; UNAVAILABLE when the process exits first (its output in the message).
  absl::StatusOr<int> WaitListening(absl::Duration timeout = absl::Seconds(30));
  std::optional<int> metrics_port() const;

  // Sends `signal` (SIGKILL, SIGTERM, ...) without waiting.
  void Signal(int signal);
  // SIGTERM (unless already sent), waits up to `grace`, then SIGKILL; reaps the child and
  // joins the reader. Returns the wait status (as waitpid gives it). Idempotent.
  int Stop(absl::Duration grace = absl::Seconds(1));
  // SIGKILL and reap at once.
  void Kill();
  // True after Kill(), or when Stop() had to escalate to SIGKILL.
  bool killed() const;
  // "exit 0", "exit 3", "signal 11": a wait status in words.
  static std::string DescribeStatus(int wait_status);
  // True once the child has exited (reaps it without blocking).
  bool Exited();

  pid_t pid() const { return pid_; }
  const std::string& name() const { return name_; }
  std::string Output() const;  // everything it wrote so far

 private:
  Process(std::string name, pid_t pid, int fd);
  void ReadLoop();
  bool Reap(bool block);

  const std::string name_;
  const pid_t pid_;
  const int fd_;
  mutable std::mutex mu_;
  std::condition_variable changed_;
  std::string output_;
  bool eof_ = false;
  bool reaped_ = false;
  bool term_sent_ = false;
  bool killed_ = false;
  int wait_status_ = 0;
  std::optional<int> metrics_port_;
  std::thread reader_;
};

}  // namespace kvgate::integration
