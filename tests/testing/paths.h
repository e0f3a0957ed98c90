// File: where tests find the repository, its bundled model and ../shared (set by
// kvgate_add_test through KVGATE_SOURCE_DIR; the current directory otherwise).
//
// A user's clone has no ../shared beside it: tests that need it call
// KVGATE_SKIP_UNLESS_EXISTS so ctest reports them skipped, naming what is missing.
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

// The shared models and data beside the checkout (CI has them); KVGATE_SHARED_DIR
// points elsewhere (a missing folder shows what a user's clone runs).
inline std::filesystem::path SharedDir() {
  const char* dir = std::getenv("KVGATE_SHARED_DIR");
  return dir != nullptr ? std::filesystem::path(dir) : SourceDir().parent_path() / "shared";
}

// Our own 6.6M-parameter Llama, in the repository: the model of the unit and integration tests.
inline std::string KvgateTinyDir() { return (SourceDir() / "models" / "kvgate-tiny").string(); }

// The TinyStories checkpoint in ../shared (only the tests of that checkpoint itself).
inline std::string TinyStoriesDir() { return (SharedDir() / "models" / "tinystories-656k").string(); }

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

// Skips the current test (ctest counts it as skipped) when `path` does not exist.
#define KVGATE_SKIP_UNLESS_EXISTS(path)                                                         \
  do {                                                                                          \
    if (!std::filesystem::exists(path)) {                                                       \
      GTEST_SKIP() << "needs " << (path) << ", which is not here (../shared is not beside this " \
                   << "checkout; CI has it)";                                                   \
    }                                                                                           \
  } while (0)
