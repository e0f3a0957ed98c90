// File: where tests find the repository and ../shared (set by kvgate_add_test through
// KVGATE_SOURCE_DIR; the current directory otherwise).
#pragma once

#include <cstdlib>
#include <filesystem>
#include <string>

#include <unistd.h>

namespace kvgate::testing {

inline std::filesystem::path SourceDir() {
  const char* dir = std::getenv("KVGATE_SOURCE_DIR");
  return dir != nullptr ? std::filesystem::path(dir) : std::filesystem::current_path();
}

// The real TinyStories checkpoint beside the checkout (CI has it too).
inline std::string TinyStoriesDir() {
  return (SourceDir().parent_path() / "shared" / "models" / "tinystories-656k").string();
}

inline std::filesystem::path GoldenDir() { return SourceDir() / "tests" / "golden"; }

// A fresh empty directory under the system temp dir.
inline std::filesystem::path MakeTempDir(const std::string& name) {
  auto dir = std::filesystem::temp_directory_path() /
             (name + "-" + std::to_string(std::rand()) + "-" + std::to_string(::getpid()));
  std::filesystem::remove_all(dir);
  std::filesystem::create_directories(dir);
  return dir;
}

}  // namespace kvgate::testing
