#!/usr/bin/env bash
# The checks of the kvgate binary that need ../shared (the TinyStories checkpoint): its
# `tokenize` ids equal Hugging Face's, recorded in tests/golden/tinystories-656k. Without
# ../shared it exits 77, which ctest reports as skipped (SKIP_RETURN_CODE).
#   cli_shared_test.sh PATH_TO_KVGATE SOURCE_DIR
set -uo pipefail
kvgate=${1:?kvgate binary}
source_dir=${2:?source dir}
model="${KVGATE_SHARED_DIR:-$source_dir/../shared}/models/tinystories-656k"
if [ ! -d "$model" ]; then
  echo "SKIPPED: needs $model, which is not here (../shared is not beside this checkout; CI has it)"
  exit 77
fi

ids=$("$kvgate" tokenize --model "$model" --text "Once upon a time" --json |
  python3 -c 'import json,sys; print(",".join(map(str, json.load(sys.stdin)["ids"])))')
want_ids=$(python3 -c 'import json,sys; e=json.load(open(sys.argv[1])); assert e["texts"][0]=="Once upon a time"; print(",".join(map(str,e["prompts"][0]["ids"])))' \
  "$source_dir/tests/golden/tinystories-656k/expected.json")
if [ "$ids" != "$want_ids" ]; then
  echo "FAIL: tokenize ids $ids, transformers gives $want_ids"
  exit 1
fi
"$kvgate" generate --model "$model" --prompt "Once upon a time" --max-tokens 8 --json > /dev/null ||
  { echo "FAIL: generate on TinyStories exited $?"; exit 1; }
echo "cli_shared_test: all checks passed"
