// File: the subcommands of the `kvgate` binary. Each returns the process exit code:
// 0 success, 1 runtime failure (message on stderr), 2 usage error.
#pragma once

#include <string>
#include <vector>

namespace kvgate::cli {

int RunGenerate(const std::vector<std::string>& args);
int RunTokenize(const std::vector<std::string>& args);
int RunEval(const std::vector<std::string>& args);
// Load generator for the streaming Generate (cli/bench_command.cc).
int RunBench(const std::vector<std::string>& args);
// Servers (cli/server_command.cc): every role in one process, or one role each.
int RunServe(const std::vector<std::string>& args);
int RunRouter(const std::vector<std::string>& args);
int RunKvManager(const std::vector<std::string>& args);
int RunPrefill(const std::vector<std::string>& args);
int RunDecode(const std::vector<std::string>& args);

}  // namespace kvgate::cli
