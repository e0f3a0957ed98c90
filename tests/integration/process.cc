#include "tests/integration/process.h"

#include <fcntl.h>
#include <signal.h>
#include <sys/prctl.h>
#include <sys/wait.h>
#include <unistd.h>

#include <cerrno>
#include <chrono>
#include <cstdlib>
#include <cstring>
#include <regex>

#include "absl/strings/str_cat.h"
#include "absl/strings/str_join.h"

namespace kvgate::integration {

std::string KvgateBinary() {
  if (const char* path = std::getenv("KVGATE_BINARY"); path != nullptr && *path != '\0') return path;
#ifdef KVGATE_BINARY_PATH
  return KVGATE_BINARY_PATH;
#else
  return "kvgate";
#endif
}

absl::StatusOr<std::unique_ptr<Process>> Process::Start(std::string name, std::vector<std::string> args) {
  const std::string binary = KvgateBinary();
  if (access(binary.c_str(), X_OK) != 0) {
    return absl::NotFoundError(absl::StrCat("kvgate binary '", binary, "' is not executable (set KVGATE_BINARY)"));
  }
  // Everything the child needs is built before fork: after it only async-signal-safe calls.
  std::vector<std::string> argv_storage;
  argv_storage.push_back(binary);
  for (std::string& a : args) argv_storage.push_back(std::move(a));
  std::vector<char*> argv;
  for (std::string& a : argv_storage) argv.push_back(a.data());
  argv.push_back(nullptr);
  int fds[2];
  if (pipe2(fds, O_CLOEXEC) != 0) return absl::InternalError(absl::StrCat("pipe2: ", std::strerror(errno)));
  const pid_t parent = getpid();
  const pid_t pid = fork();
  if (pid < 0) {
    close(fds[0]);
    close(fds[1]);
    return absl::InternalError(absl::StrCat("fork: ", std::strerror(errno)));
  }
  if (pid == 0) {
    prctl(PR_SET_PDEATHSIG, SIGKILL);
    if (getppid() != parent) _exit(127);  // the test died between fork and prctl
    dup2(fds[1], STDOUT_FILENO);  // dup2 clears O_CLOEXEC on the copies
    dup2(fds[1], STDERR_FILENO);
    int devnull = open("/dev/null", O_RDONLY);
    if (devnull >= 0) dup2(devnull, STDIN_FILENO);
    execv(argv[0], argv.data());
    _exit(127);
  }
  close(fds[1]);
  auto process = std::unique_ptr<Process>(new Process(std::move(name), pid, fds[0]));
  process->reader_ = std::thread([p = process.get()] { p->ReadLoop(); });
  return process;
}

Process::Process(std::string name, pid_t pid, int fd) : name_(std::move(name)), pid_(pid), fd_(fd) {}

Process::~Process() { Stop(); }

void Process::ReadLoop() {
  char buffer[4096];
  while (true) {
    const ssize_t n = read(fd_, buffer, sizeof(buffer));
    if (n < 0 && errno == EINTR) continue;
    std::lock_guard<std::mutex> lock(mu_);
    if (n <= 0) {
      eof_ = true;
      changed_.notify_all();
      return;
    }
    output_.append(buffer, static_cast<size_t>(n));
    changed_.notify_all();
  }
}

absl::StatusOr<int> Process::WaitListening(absl::Duration timeout) {
  // A whole line (the port may arrive in two reads): "kvgate ROLE: listening on
  // HOST:PORT[, metrics on HOST:PORT/metrics]".
  static const std::regex kListening(R"(listening on [^\s,]*:(\d+)(, metrics on [^\s,]*:(\d+)/metrics)?\n)");
  std::unique_lock<std::mutex> lock(mu_);
  std::smatch match;
  const bool found = changed_.wait_for(lock, absl::ToChronoNanoseconds(timeout), [&] {
    return std::regex_search(output_, match, kListening) || eof_;
  });
  if (!std::regex_search(output_, match, kListening)) {
    const std::string message = absl::StrCat(
        name_, " (pid ", pid_, ") ", found ? "exited before listening" : "did not print 'listening on' in time",
        "; output:\n", output_);
    return found ? absl::UnavailableError(message) : absl::DeadlineExceededError(message);
  }
  if (match[3].matched) metrics_port_ = std::stoi(match[3].str());
  return std::stoi(match[1].str());
}

std::optional<int> Process::metrics_port() const {
  std::lock_guard<std::mutex> lock(mu_);
  return metrics_port_;
}

void Process::Signal(int signal) {
  std::lock_guard<std::mutex> lock(mu_);
  if (reaped_) return;
  if (signal == SIGTERM) term_sent_ = true;
  if (signal == SIGKILL) killed_ = true;
  kill(pid_, signal);
}

bool Process::killed() const {
  std::lock_guard<std::mutex> lock(mu_);
  return killed_;
}

std::string Process::DescribeStatus(int wait_status) {
  if (WIFEXITED(wait_status)) return absl::StrCat("exit ", WEXITSTATUS(wait_status));
  if (WIFSIGNALED(wait_status)) return absl::StrCat("signal ", WTERMSIG(wait_status));
  return absl::StrCat("wait status ", wait_status);
}

bool Process::Reap(bool block) {
  std::lock_guard<std::mutex> lock(mu_);
  if (reaped_) return true;
  int status = 0;
  const pid_t r = waitpid(pid_, &status, block ? 0 : WNOHANG);
  if (r == pid_ || (r < 0 && errno == ECHILD)) {
    reaped_ = true;
    wait_status_ = status;
    return true;
  }
  return false;
}

bool Process::Exited() { return Reap(/*block=*/false); }

int Process::Stop(absl::Duration grace) {
  if (!Exited()) {
    bool term_sent;
    {
      std::lock_guard<std::mutex> lock(mu_);
      term_sent = term_sent_;
    }
    if (!term_sent) Signal(SIGTERM);
    const absl::Time deadline = absl::Now() + grace;
    while (!Exited() && absl::Now() < deadline) std::this_thread::sleep_for(std::chrono::milliseconds(5));
    if (!Exited()) {
      Signal(SIGKILL);
      Reap(/*block=*/true);
    }
  }
  if (reader_.joinable()) {
    reader_.join();
    close(fd_);
  }
  std::lock_guard<std::mutex> lock(mu_);
  return wait_status_;
}

void Process::Kill() {
  Signal(SIGKILL);
  Reap(/*block=*/true);
}

std::string Process::Output() const {
  std::lock_guard<std::mutex> lock(mu_);
  return output_;
}

}  // namespace kvgate::integration
