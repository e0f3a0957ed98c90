#!/usr/bin/env bash
# Starts `kvgate serve` (CPU backend, models/kvgate-tiny) on loopback, waits until
# grpc.health.v1 says SERVING, and runs one client the project did not write against it:
#   python  Debian's python3-grpcio with protoc-generated stubs (python_client.py)
#   node    @grpc/grpc-js + grpc-js-reflection-client from npm, reflection only
#           (node/reflection_client.js; `npm ci` into CACHE_DIR, pinned by package-lock.json)
# Fails (never skips) when the client's packages are missing or npm is unreachable.
# usage: tests/interop/run_interop.sh python|node KVGATE_BINARY SOURCE_DIR CACHE_DIR
set -euo pipefail
which="$1"
kvgate="$2"
src="$3"
cache="$4"
here="$(cd "$(dirname "$0")" && pwd)"
work="$(mktemp -d)"
server_pid=""
cleanup() {
  if [[ -n "$server_pid" ]]; then kill -TERM "$server_pid" 2>/dev/null || true; wait "$server_pid" 2>/dev/null || true; fi
  rm -rf "$work"
}
trap cleanup EXIT

# The clients must run as a user's would, on the system's libraries; only kvgate keeps the
# caller's LD_LIBRARY_PATH. The ThreadSanitizer run points it at abseil and gRPC built with
# -fsanitize=thread under the system's sonames; Debian's python3-grpcio links that abseil, and
# the instrumented one brings libtsan, which `import grpc` cannot dlopen ("cannot allocate
# memory in static TLS block"). Both clients need python3 (the health check).
kvgate_env=(env ${LD_LIBRARY_PATH+"LD_LIBRARY_PATH=$LD_LIBRARY_PATH"})
unset LD_LIBRARY_PATH

# Debian's Python (its python3-grpcio and python3-protobuf), whatever python3 is first on PATH.
py=/usr/bin/python3
"$py" -c 'import grpc, google.protobuf' 2>"$work/import.log" \
  || { cat "$work/import.log"; echo "FAIL python3-grpcio / python3-protobuf do not import (not installed? scripts/install-deps.sh)"; exit 1; }

if [[ "$which" == node ]]; then
  command -v node >/dev/null && command -v npm >/dev/null || { echo "FAIL node/npm not installed"; exit 1; }
  modules="$cache/interop-node"
  if ! cmp -s "$here/node/package-lock.json" "$modules/package-lock.json" 2>/dev/null \
     || [[ ! -d "$modules/node_modules/grpc-js-reflection-client" ]]; then
    rm -rf "$modules" && mkdir -p "$modules"
    cp "$here/node/package.json" "$here/node/package-lock.json" "$modules/"
    (cd "$modules" && npm ci --silent --no-audit --no-fund --cache "$cache/npm-cache" >/dev/null) \
      || { echo "FAIL npm ci of the Node interop client failed (registry unreachable?)"; exit 1; }
    rm -rf "$cache/npm-cache"
  fi
fi

# With kvgate-tiny's trained gates, as `make demo` runs it: the ghz payloads use fast_kvzip.
model="$src/models/kvgate-tiny"
"${kvgate_env[@]}" "$kvgate" serve --model "$model" --host 127.0.0.1 --port 0 --backend cpu --kv-sequences 8 \
    --fast-kvzip-gate "$model/gates/fast_kvzip.safetensors" \
    --attention-gate "$model/gates/attention_gate.safetensors" --shutdown-grace-ms 1000 >"$work/serve.log" 2>&1 &
server_pid=$!
port=""
for _ in $(seq 1 600); do
  port="$(sed -n 's/.*listening on [^ ]*:\([0-9][0-9]*\).*/\1/p' "$work/serve.log" | head -n1)"
  [[ -n "$port" ]] && break
  kill -0 "$server_pid" 2>/dev/null || { cat "$work/serve.log"; echo "FAIL serve exited"; exit 1; }
  sleep 0.1
done
[[ -n "$port" ]] || { cat "$work/serve.log"; echo "FAIL serve did not print its port"; exit 1; }
# grpc.health.v1.Health/Check with an empty request; SERVING is the bytes 08 01.
"$py" - "127.0.0.1:$port" <<'PY'
import sys, time, grpc
channel = grpc.insecure_channel(sys.argv[1])
check = channel.unary_unary("/grpc.health.v1.Health/Check", request_serializer=lambda b: b,
                            response_deserializer=lambda b: b)
deadline = time.time() + 60
while True:
    try:
        if check(b"", timeout=2) == b"\x08\x01":
            break
    except grpc.RpcError:
        pass
    if time.time() > deadline:
        print("FAIL the server never reported SERVING")
        sys.exit(1)
    time.sleep(0.1)
PY

if [[ "$which" == python ]]; then
  "$py" "$here/python_client.py" "$(command -v protoc)" "$(command -v grpc_python_plugin)" "$src/protos" \
      "127.0.0.1:$port" "$src/deploy/ghz/generate-smoke.json" "$src/deploy/ghz/generate-policy-mix.json"
else
  NODE_PATH="$cache/interop-node/node_modules" node "$here/node/reflection_client.js" "127.0.0.1:$port"
fi
