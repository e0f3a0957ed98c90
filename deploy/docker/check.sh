#!/usr/bin/env bash
# The container build's CI check (ctest deploy_docker_check). No Docker engine runs on the
# project's machines, so the Dockerfile is parsed and linted, not built: dockerfile-ast
# and dockerfile-utils (pinned, from npm, cached in TOOLS_DIR) parse and lint it, and
# check_dockerfile.py keeps it in step with the Makefile, install-deps.sh and the chart.
# Fails loudly when npm or the registry is unreachable.
# usage: deploy/docker/check.sh TOOLS_DIR
set -euo pipefail
here="$(cd "$(dirname "$0")" && pwd)"
tools="${1:?usage: check.sh TOOLS_DIR}"
mkdir -p "$tools"
tools="$(cd "$tools" && pwd)"
prefix="$tools/dockerfile-utils"
if [[ ! -f "$prefix/node_modules/dockerfile-utils/package.json" ]] \
   || ! grep -q '"version": "0.16.3"' "$prefix/node_modules/dockerfile-utils/package.json"; then
  command -v npm >/dev/null || { echo "docker check: npm is not installed" >&2; exit 1; }
  rm -rf "$prefix" && mkdir -p "$prefix"
  npm install --silent --no-audit --no-fund --cache "$tools/npm-cache" --prefix "$prefix" \
      dockerfile-utils@0.16.3 dockerfile-ast@0.7.1 >/dev/null \
    || { echo "docker check: npm install dockerfile-utils failed (registry unreachable?)" >&2; exit 1; }
  rm -rf "$tools/npm-cache"
fi
node "$here/parse_dockerfile.js" "$prefix/node_modules" "$here/Dockerfile" > "$tools/Dockerfile.parsed.json"
python3 "$here/check_dockerfile.py" "$tools/Dockerfile.parsed.json" "$here/../.."
