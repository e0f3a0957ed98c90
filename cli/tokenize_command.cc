// `kvgate tokenize --model DIR --text TEXT [--json] [--no-special]`: the ids Hugging
// Face `tokenizer(text)` returns, post-processor specials (BOS) included.
#include <filesystem>
#include <iostream>

#include "absl/strings/str_join.h"
#include "cli/commands.h"
#include "cli/flags.h"
#include "engine/tokenizer.h"
#include "nlohmann/json.hpp"

namespace kvgate::cli {

int RunTokenize(const std::vector<std::string>& args) {
  auto flags = Flags::Parse(args, {"model", "text"}, {"json", "no-special"});
  if (!flags.ok()) {
    std::cerr << "kvgate tokenize: " << flags.status().message() << "\n";
    return 2;
  }
  auto model_dir = flags->String("model");
  auto text = flags->String("text");
  if (!model_dir || !text) {
    std::cerr << "usage: kvgate tokenize --model DIR --text TEXT [--json] [--no-special]\n";
    return 2;
  }
  auto tokenizer = engine::Tokenizer::FromFile((std::filesystem::path(*model_dir) / "tokenizer.json").string());
  if (!tokenizer.ok()) {
    std::cerr << "kvgate tokenize: " << tokenizer.status().message() << "\n";
    return 1;
  }
  auto ids = (*tokenizer)->Encode(*text, /*add_special_tokens=*/!flags->Has("no-special"));
  if (!ids.ok()) {
    std::cerr << "kvgate tokenize: " << ids.status().message() << "\n";
    return 1;
  }
  if (flags->Has("json")) {
    std::cout << nlohmann::json{{"ids", *ids}}.dump() << "\n";
  } else {
    std::cout << absl::StrJoin(*ids, " ") << "\n";
  }
  return 0;
}

}  // namespace kvgate::cli
