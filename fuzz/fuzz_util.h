// File: helpers shared by the fuzz targets: where the repository's fixtures are (the
// source dir compiled in as KVGATE_SOURCE_DIR, overridable by $KVGATE_SOURCE_DIR, so a
// target runs from any folder).
#pragma once

#include <algorithm>
#include <cstdio>
#include <cstdlib>
#include <filesystem>
#include <string>
#include <vector>

#include "absl/strings/str_cat.h"

// A property the target checks: on failure, prints the condition (and `detail`, any
// absl::StrCat-able values) and aborts, which libFuzzer reports as a crash with its input.
// (Debian's abseil predates absl/log.)
#define KVGATE_FUZZ_CHECK(cond, ...)                                                       \
  do {                                                                                     \
    if (!(cond)) {                                                                         \
      std::fprintf(stderr, "%s:%d: fuzz check failed: %s %s\n", __FILE__, __LINE__, #cond, \
                   absl::StrCat("" __VA_OPT__(, ) __VA_ARGS__).c_str());                   \
      std::abort();                                                                        \
    }                                                                                      \
  } while (0)

namespace kvgate::fuzz {

inline std::string SourceDir() {
  if (const char* env = std::getenv("KVGATE_SOURCE_DIR"); env != nullptr && *env != '\0') return env;
  return KVGATE_FUZZ_SOURCE_DIR;
}

// models/kvgate-tiny/tokenizer.json, then tests/golden/tokenizers/*/tokenizer.json sorted
// by name (a fixed order: byte 0 of a corpus file keeps naming the same tokenizer).
inline std::vector<std::string> TokenizerPaths() {
  namespace fs = std::filesystem;
  const fs::path root = SourceDir();
  std::vector<std::string> paths = {(root / "models/kvgate-tiny/tokenizer.json").string()};
  std::vector<std::string> golden;
  for (const auto& entry : fs::directory_iterator(root / "tests/golden/tokenizers")) {
    const fs::path file = entry.path() / "tokenizer.json";
    if (fs::exists(file)) golden.push_back(file.string());
  }
  std::sort(golden.begin(), golden.end());
  paths.insert(paths.end(), golden.begin(), golden.end());
  return paths;
}

}  // namespace kvgate::fuzz
