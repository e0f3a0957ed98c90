#!/usr/bin/env bash
# The soak (not in CI): `kvgate bench` holds 64 concurrent streams with a policy mix
# against the CPU all-in-one server (`kvgate serve`, models/kvgate-tiny) on loopback for
# DURATION_S seconds (default 600), while the server's RSS, open file descriptors and
# threads are sampled every 10 s. Pass criteria (issue 13):
#   - zero lost responses: every request the client started ended OK (the client never
#     cancels and its deadline is 10 minutes, so any other status is a lost response)
#   - server RSS growth under 50 MB from the first sample after a 60 s warm-up (same load) to the last
#   - file descriptors and threads flat (last sample within +4 of the first)
#   - the server's kvgate_requests_total{status=...} equal to the client's counts
# Writes OUT_DIR/soak.json (bench report + samples + verdicts) and OUT_DIR/soak.md.
#
# usage: deploy/soak.sh BUILD_DIR [OUT_DIR=bench/results] [DURATION_S=600] [CONCURRENCY=64]
set -euo pipefail
build="${1:?usage: deploy/soak.sh BUILD_DIR [OUT_DIR] [DURATION_S] [CONCURRENCY]}"
out="${2:-bench/results}"
duration="${3:-600}"
concurrency="${4:-64}"
here="$(cd "$(dirname "$0")" && pwd)"
src="$(cd "$here/.." && pwd)"
kvgate="$build/cli/kvgate"
model="$src/models/kvgate-tiny"
mkdir -p "$out"
work="$(mktemp -d)"
server_pid=""
cleanup() {
  if [[ -n "$server_pid" ]]; then kill -TERM "$server_pid" 2>/dev/null || true; wait "$server_pid" 2>/dev/null || true; fi
  rm -rf "$work"
}
trap cleanup EXIT

"$kvgate" serve --model "$model" --host 127.0.0.1 --port 0 --backend cpu --kv-sequences 64 \
    --metrics-port 0 --fast-kvzip-gate "$model/gates/fast_kvzip.safetensors" \
    --attention-gate "$model/gates/attention_gate.safetensors" --shutdown-grace-ms 5000 \
    >"$work/serve.log" 2>&1 &
server_pid=$!
port="" metrics_port=""
for _ in $(seq 1 600); do
  port="$(sed -n 's/.*listening on [^ ]*:\([0-9][0-9]*\).*/\1/p' "$work/serve.log" | head -n1)"
  metrics_port="$(sed -n 's/.*metrics on [^ ]*:\([0-9][0-9]*\)\/metrics.*/\1/p' "$work/serve.log" | head -n1)"
  [[ -n "$port" && -n "$metrics_port" ]] && break
  kill -0 "$server_pid" 2>/dev/null || { cat "$work/serve.log"; echo "soak: serve exited" >&2; exit 1; }
  sleep 0.1
done
[[ -n "$port" ]] || { cat "$work/serve.log"; echo "soak: serve did not start" >&2; exit 1; }
echo "soak: kvgate serve pid $server_pid on 127.0.0.1:$port, metrics on :$metrics_port"

sample() {  # elapsed_s rss_kb fds threads
  local rss threads fds
  rss="$(awk '/^VmRSS:/ {print $2}' "/proc/$server_pid/status")"
  threads="$(awk '/^Threads:/ {print $2}' "/proc/$server_pid/status")"
  fds="$(ls "/proc/$server_pid/fd" | wc -l)"
  echo "$1 $rss $fds $threads"
}

mix=(--prompt-tokens 32:4,128:3,512:2,1024:1 --max-tokens 16-128
     --policy-mix full:1,streaming_llm@0.3:1,snapkv@0.3:1,sage_kv@0.3:1,fast_kvzip@0.3:2,attention_gate:1)
# Warm-up with the same load for 60 s (allocations, thread pools, the largest prompts'
# buffers), then the samples' baseline.
"$kvgate" bench --server "127.0.0.1:$port" --concurrency "$concurrency" --duration 60 --quiet \
    "${mix[@]}" --seed 7 --json "$work/warmup.json" >/dev/null
python3 -c "import urllib.request,sys; sys.stdout.write(urllib.request.urlopen('http://127.0.0.1:$metrics_port/metrics').read().decode())" >"$work/metrics-before.txt"

: >"$work/samples.txt"
start=$(date +%s)
"$kvgate" bench --server "127.0.0.1:$port" --concurrency "$concurrency" --duration "$duration" \
    "${mix[@]}" --ttft-target-ms 2000 --tpot-target-ms 200 --name soak --json "$work/soak-bench.json" \
    >"$work/soak-bench.txt" &
bench_pid=$!
while kill -0 "$bench_pid" 2>/dev/null; do
  sample "$(( $(date +%s) - start ))" >>"$work/samples.txt"
  for _ in $(seq 1 100); do kill -0 "$bench_pid" 2>/dev/null || break; sleep 0.1; done
done
wait "$bench_pid" || true
sleep 1
sample "$(( $(date +%s) - start ))" >>"$work/samples.txt"
python3 -c "import urllib.request,sys; sys.stdout.write(urllib.request.urlopen('http://127.0.0.1:$metrics_port/metrics').read().decode())" >"$work/metrics-after.txt"
cat "$work/soak-bench.txt"

python3 - "$work" "$out" "$duration" "$concurrency" <<'PY'
import json, re, sys, datetime, subprocess
work, out, duration, concurrency = sys.argv[1], sys.argv[2], int(sys.argv[3]), int(sys.argv[4])
bench = json.load(open(f"{work}/soak-bench.json"))
samples = [list(map(int, l.split())) for l in open(f"{work}/samples.txt") if l.strip()]
def counts(path):
    c = {}
    for line in open(path):
        m = re.match(r'kvgate_requests_total\{status="([^"]+)"\}\s+([0-9.e+]+)', line)
        if m:
            c[m.group(1)] = int(float(m.group(2)))
    return c
before, after = counts(f"{work}/metrics-before.txt"), counts(f"{work}/metrics-after.txt")
server = {k: after.get(k, 0) - before.get(k, 0) for k in set(before) | set(after)}
server = {k: v for k, v in server.items() if v}
client = bench["statusCodeDistribution"]
# The server labels with gRPC code names (CANCELLED), the client with grpc-go's (Canceled).
GO = {"Canceled": "CANCELLED", "Unknown": "UNKNOWN", "InvalidArgument": "INVALID_ARGUMENT",
      "DeadlineExceeded": "DEADLINE_EXCEEDED", "NotFound": "NOT_FOUND", "AlreadyExists": "ALREADY_EXISTS",
      "PermissionDenied": "PERMISSION_DENIED", "ResourceExhausted": "RESOURCE_EXHAUSTED",
      "FailedPrecondition": "FAILED_PRECONDITION", "Aborted": "ABORTED", "OutOfRange": "OUT_OF_RANGE",
      "Unimplemented": "UNIMPLEMENTED", "Internal": "INTERNAL", "Unavailable": "UNAVAILABLE",
      "DataLoss": "DATA_LOSS", "Unauthenticated": "UNAUTHENTICATED", "OK": "OK"}
norm = lambda d: {GO.get(k, k).upper(): v for k, v in d.items()}
rss0, rss1 = samples[0][1], samples[-1][1]
fd0, fd1 = samples[0][2], samples[-1][2]
th0, th1 = samples[0][3], samples[-1][3]
# The client never cancels and its deadline (10 min) is far: any status but OK is a lost response.
verdicts = {
    "zero lost responses": bench["count"] == sum(client.values()) == client.get("OK", 0),
    "RSS growth < 50 MB": (rss1 - rss0) < 50 * 1024,
    "file descriptors flat": fd1 - fd0 <= 4,
    "threads flat": th1 - th0 <= 4,
    "server counts == client counts": norm(server) == norm(client),
}
k = bench["kvgate"]
commit = subprocess.run(["git", "rev-parse", "--short", "HEAD"], capture_output=True, text=True).stdout.strip()
result = {"date": datetime.datetime.utcnow().strftime("%Y-%m-%dT%H:%M:%SZ"), "commit": commit,
          "duration_s": duration, "concurrency": concurrency, "samples": samples,
          "server_counts": server, "client_counts": client, "verdicts": verdicts, "bench": bench}
json.dump(result, open(f"{out}/soak-cpu.json", "w"), indent=1)
lines = [f"# Soak: {duration} s at {concurrency} streams, CPU all-in-one (`kvgate serve`, kvgate-tiny)", "",
         f"{result['date']}, commit {commit}, `deploy/soak.sh`; policy mix full, streaming_llm@0.3, snapkv@0.3, "
         "sage_kv@0.3, fast_kvzip@0.3 (x2), attention_gate; prompts 32-1024 tokens, 16-128 output tokens.", "",
         "| check | result |", "|---|---|"]
lines += [f"| {name} | {'PASS' if ok else 'FAIL'} |" for name, ok in verdicts.items()]
lines += ["", f"- requests: {bench['count']} ({k['ok']} OK), {k['requests_per_s']:.2f} req/s, "
          f"{k['output_tokens_per_s']:.1f} output tokens/s",
          f"- TTFT p50/p99 {k['ttft_ms']['p50']:.1f}/{k['ttft_ms']['p99']:.1f} ms; TPOT p50/p99 "
          f"{k['tpot_ms']['p50']:.2f}/{k['tpot_ms']['p99']:.2f} ms; goodput {k['goodput']['requests_per_s']:.2f} req/s",
          f"- KV bytes moved {k['kv']['bytes_transferred']} of {k['kv']['bytes_full']} ({100*k['kv']['fraction']:.1f}%)",
          f"- server RSS {rss0/1024:.1f} -> {rss1/1024:.1f} MB; fds {fd0} -> {fd1}; threads {th0} -> {th1}",
          f"- client status counts {client}; server kvgate_requests_total delta {server}"]
open(f"{out}/soak-cpu.md", "w").write("\n".join(lines) + "\n")
print("\n".join(lines))
sys.exit(0 if all(verdicts.values()) else 1)
PY
