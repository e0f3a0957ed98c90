# kvgate_tokenizer: Hugging Face tokenizer.json (BPE) encode/decode, exact to HF tokenizers.
# Included from engine/CMakeLists.txt.
add_library(kvgate_tokenizer STATIC
  ${CMAKE_CURRENT_LIST_DIR}/tokenizer.cc
  ${CMAKE_CURRENT_LIST_DIR}/tokenizer_bpe.cc
  ${CMAKE_CURRENT_LIST_DIR}/tokenizer_components.cc
  ${CMAKE_CURRENT_LIST_DIR}/tokenizer_decoders.cc
  ${CMAKE_CURRENT_LIST_DIR}/tokenizer_normalizers.cc
  ${CMAKE_CURRENT_LIST_DIR}/tokenizer_pre_tokenizers.cc
  ${CMAKE_CURRENT_LIST_DIR}/tokenizer_unicode_data.cc
  ${CMAKE_CURRENT_LIST_DIR}/tokenizer_util.cc)
add_library(kvgate::tokenizer ALIAS kvgate_tokenizer)
target_include_directories(kvgate_tokenizer PUBLIC ${PROJECT_SOURCE_DIR})
target_link_libraries(kvgate_tokenizer
                      PUBLIC kvgate_common nlohmann_json::nlohmann_json absl::strings absl::span
                             absl::status absl::statusor
                      PRIVATE PkgConfig::PCRE2 PkgConfig::UTF8PROC absl::flat_hash_map
                              absl::flat_hash_set absl::str_format)

kvgate_add_test(tokenizer_test SOURCES ${CMAKE_CURRENT_LIST_DIR}/tokenizer_test.cc
                LIBS kvgate_tokenizer LABELS unit)

# HF tokenizers corpora in tests/golden/tokenizers/*/corpus.jsonl (make_tokenizer_corpus.py).
kvgate_add_test(tokenizer_corpus_test SOURCES ${CMAKE_CURRENT_LIST_DIR}/tokenizer_corpus_test.cc
                LIBS kvgate_tokenizer LABELS golden)
