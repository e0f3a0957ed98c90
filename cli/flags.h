// File: a small "--name value" / "--switch" parser for kvgate's subcommands. Each
// subcommand declares its flags; unknown flags and missing or malformed values are
// errors that name the flag.
#pragma once

#include <map>
#include <optional>
#include <set>
#include <string>
#include <vector>

#include "absl/status/statusor.h"

namespace kvgate::cli {

class Flags {
 public:
  // value_flags take one argument; switch_flags take none.
  static absl::StatusOr<Flags> Parse(const std::vector<std::string>& args,
                                     const std::set<std::string>& value_flags,
                                     const std::set<std::string>& switch_flags);

  bool Has(const std::string& name) const { return values_.count(name) > 0; }
  std::optional<std::string> String(const std::string& name) const;
  absl::StatusOr<std::optional<int64_t>> Int(const std::string& name) const;
  absl::StatusOr<std::optional<double>> Double(const std::string& name) const;
  // Comma-separated integers, e.g. "1,2,3".
  absl::StatusOr<std::optional<std::vector<int32_t>>> IntList(const std::string& name) const;

 private:
  std::map<std::string, std::string> values_;
};

}  // namespace kvgate::cli
