// The one kvgate binary; the first argument picks the subcommand.
#include <iostream>
#include <string>
#include <vector>

#include "cli/commands.h"

namespace {

constexpr char kUsage[] =
    "usage: kvgate <command> [flags]\n"
    "commands:\n"
    "  generate   offline generation with a Hugging Face checkpoint (--help for flags)\n"
    "  tokenize   print the token ids of a text\n"
    "  eval       retrieval accuracy of eviction policies\n"
    "  bench      load generator for a server's streaming Generate (--help for flags)\n"
    "  serve      every service in one process (router, kv-manager, prefill, decode)\n"
    "  router | kv-manager | prefill | decode   one service per process\n";

}  // namespace

int main(int argc, char** argv) {
  if (argc < 2 || std::string(argv[1]) == "--help" || std::string(argv[1]) == "help") {
    std::cerr << kUsage;
    return argc < 2 ? 2 : 0;
  }
  const std::string command = argv[1];
  const std::vector<std::string> args(argv + 2, argv + argc);
  if (command == "generate") return kvgate::cli::RunGenerate(args);
  if (command == "tokenize") return kvgate::cli::RunTokenize(args);
  if (command == "eval") return kvgate::cli::RunEval(args);
  if (command == "bench") return kvgate::cli::RunBench(args);
  if (command == "serve") return kvgate::cli::RunServe(args);
  if (command == "router") return kvgate::cli::RunRouter(args);
  if (command == "kv-manager") return kvgate::cli::RunKvManager(args);
  if (command == "prefill") return kvgate::cli::RunPrefill(args);
  if (command == "decode") return kvgate::cli::RunDecode(args);
  std::cerr << "kvgate: unknown command '" << command << "'\n" << kUsage;
  return 2;
}
