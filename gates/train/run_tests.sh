#!/bin/sh
# Runs the Python tests of gates/train (llama_torch, gate tokenizer, gate trainers) with the
# first python3 that has torch (Debian's python3-torch lives in /usr/bin/python3, which a
# pyenv python3 may hide); without torch, only the tests that need none run, the rest skip.
# KVGATE_BIN (the built `kvgate`) lets the trainer tests check the C++ gate loader.
cd "$(dirname "$0")" || exit 1
PY=""
for candidate in "${KVGATE_PYTHON:-}" python3 /usr/bin/python3; do
  [ -n "$candidate" ] || continue
  if "$candidate" -c "import torch" >/dev/null 2>&1; then PY="$candidate"; break; fi
done
if [ -z "$PY" ]; then
  PY=python3
  echo "run_tests.sh: no python3 with torch; torch tests are skipped"
fi
exec "$PY" -m unittest -v test_llama_torch test_gate_trainers
