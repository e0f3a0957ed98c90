#include "cli/flags.h"

#include "absl/strings/numbers.h"
#include "absl/strings/str_cat.h"
#include "absl/strings/str_split.h"

namespace kvgate::cli {

absl::StatusOr<Flags> Flags::Parse(const std::vector<std::string>& args,
                                   const std::set<std::string>& value_flags,
                                   const std::set<std::string>& switch_flags) {
  Flags flags;
  for (size_t i = 0; i < args.size(); ++i) {
    std::string arg = args[i];
    if (arg.rfind("--", 0) != 0) {
      return absl::InvalidArgumentError(absl::StrCat("unexpected argument '", arg, "' (flags start with --)"));
    }
    std::string name = arg.substr(2);
    std::optional<std::string> inline_value;
    if (size_t eq = name.find('='); eq != std::string::npos) {
      inline_value = name.substr(eq + 1);
      name = name.substr(0, eq);
    }
    if (switch_flags.count(name)) {
      if (inline_value) return absl::InvalidArgumentError(absl::StrCat("--", name, " takes no value"));
      flags.values_[name] = "true";
    } else if (value_flags.count(name)) {
      if (inline_value) {
        flags.values_[name] = *inline_value;
      } else if (i + 1 < args.size()) {
        flags.values_[name] = args[++i];
      } else {
        return absl::InvalidArgumentError(absl::StrCat("--", name, " needs a value"));
      }
    } else {
      return absl::InvalidArgumentError(absl::StrCat("unknown flag --", name));
    }
  }
  return flags;
}

std::optional<std::string> Flags::String(const std::string& name) const {
  auto it = values_.find(name);
  if (it == values_.end()) return std::nullopt;
  return it->second;
}

absl::StatusOr<std::optional<int64_t>> Flags::Int(const std::string& name) const {
  auto text = String(name);
  if (!text) return std::optional<int64_t>();
  int64_t value;
  if (!absl::SimpleAtoi(*text, &value)) {
    return absl::InvalidArgumentError(absl::StrCat("--", name, ": '", *text, "' is not an integer"));
  }
  return std::optional<int64_t>(value);
}

absl::StatusOr<std::optional<double>> Flags::Double(const std::string& name) const {
  auto text = String(name);
  if (!text) return std::optional<double>();
  double value;
  if (!absl::SimpleAtod(*text, &value)) {
    return absl::InvalidArgumentError(absl::StrCat("--", name, ": '", *text, "' is not a number"));
  }
  return std::optional<double>(value);
}

absl::StatusOr<std::optional<std::vector<int32_t>>> Flags::IntList(const std::string& name) const {
  auto text = String(name);
  if (!text) return std::optional<std::vector<int32_t>>();
  std::vector<int32_t> out;
  for (absl::string_view part : absl::StrSplit(*text, ',', absl::SkipWhitespace())) {
    int32_t value;
    if (!absl::SimpleAtoi(part, &value)) {
      return absl::InvalidArgumentError(absl::StrCat("--", name, ": '", part, "' is not an integer"));
    }
    out.push_back(value);
  }
  return std::optional<std::vector<int32_t>>(std::move(out));
}

}  // namespace kvgate::cli
