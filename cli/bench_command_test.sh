#!/usr/bin/env bash
# `kvgate bench` against a real `kvgate serve` (CPU backend, models/kvgate-tiny) on
# loopback: a closed-loop run with a policy mix and SLO targets, then an open-loop
# (Poisson) run for a fixed duration; checks the JSON report (ghz's summary fields and
# the streaming measures) and the counts against what was asked. A few seconds.
# usage: cli/bench_command_test.sh KVGATE_BINARY SOURCE_DIR
set -euo pipefail
kvgate="$1"
src="$2"
work="$(mktemp -d)"
source "$src/tests/testing/serve_on_loopback.sh"
trap 'stop_kvgate_serve; rm -rf "$work"' EXIT

model="$src/models/kvgate-tiny"
start_kvgate_serve "$kvgate" "$work/serve.log" --model "$model" --backend cpu --kv-sequences 8 \
    --shutdown-grace-ms 1000

# Closed loop: 4 streams, 16 requests, three policies, 8 output tokens each.
"$kvgate" bench --server "127.0.0.1:$port" --concurrency 4 --requests 16 --warmup 2 \
    --prompt-tokens 24-64 --max-tokens 8 --policy-mix full:1,streaming_llm@0.5:1,snapkv@0.5:1 \
    --ttft-target-ms 60000 --tpot-target-ms 60000 --json "$work/closed.json" --name closed >"$work/closed.txt"
cat "$work/closed.txt"
# Open loop: Poisson arrivals at 8 requests/s for 1.5 s.
"$kvgate" bench --server "127.0.0.1:$port" --rate 8 --duration 1.5 --max-inflight 16 \
    --prompt-tokens 32:1,64:1 --max-tokens 4 --json "$work/open.json" --name open --quiet >"$work/open.txt"
cat "$work/open.txt"
# A usage error exits 2 and a server that is not there exits 1.
set +e
"$kvgate" bench --server "127.0.0.1:$port" --concurrency 2 --rate 3 >/dev/null 2>&1; usage_rc=$?
"$kvgate" bench --server 127.0.0.1:1 --requests 1 --quiet >/dev/null 2>&1; down_rc=$?
set -e

python3 - "$work/closed.json" "$work/open.json" "$usage_rc" "$down_rc" <<'PY'
import json, sys
closed, opened = json.load(open(sys.argv[1])), json.load(open(sys.argv[2]))
usage_rc, down_rc = int(sys.argv[3]), int(sys.argv[4])
failures = []
def check(cond, what):
    print(("PASS " if cond else "FAIL ") + what)
    if not cond:
        failures.append(what)
ghz_keys = ["name", "endReason", "date", "options", "count", "total", "average", "fastest", "slowest", "rps",
            "errorDistribution", "statusCodeDistribution", "latencyDistribution", "histogram", "details"]
for name, r in (("closed", closed), ("open", opened)):
    check(all(k in r for k in ghz_keys), f"{name}: every ghz summary field")
    check(r["endReason"] == "normal", f"{name}: endReason normal")
    check(r["statusCodeDistribution"] == {"OK": r["count"]}, f"{name}: every request OK ({r['statusCodeDistribution']})")
    check(len(r["details"]) == r["count"], f"{name}: one detail per request")
    check([d["percentage"] for d in r["latencyDistribution"]] == [10, 25, 50, 75, 90, 95, 99], f"{name}: ghz percentiles")
    check(0 < r["fastest"] <= r["average"] <= r["slowest"], f"{name}: fastest <= average <= slowest (ns)")
    k = r["kvgate"]
    for m in ("latency_ms", "ttft_ms", "itl_ms", "tpot_ms"):
        s = k[m]
        check(all(q in s for q in ("p50", "p90", "p95", "p99", "p99.9")) and
              s["p50"] <= s["p90"] <= s["p95"] <= s["p99"] <= s["p99.9"], f"{name}: {m} percentiles ordered")
    check(k["ttft_ms"]["p50"] <= k["latency_ms"]["p50"], f"{name}: TTFT below latency")
    check(k["requests_per_s"] > 0 and k["output_tokens_per_s"] > 0, f"{name}: throughput measured")
    # bytes_transferred also counts each kept row's position (4 bytes), which bytes_full
    # (K and V rows only) does not: a full cache moves slightly more than "full".
    check(0 < k["kv"]["bytes_full"] and 0 < k["kv"]["bytes_transferred"] <= 1.05 * k["kv"]["bytes_full"],
          f"{name}: KV bytes moved ({k['kv']})")
check(closed["count"] == 16 and closed["kvgate"]["output_tokens"] == 16 * 8, "closed: 16 requests x 8 tokens")
check(closed["options"]["concurrency"] == 4 and closed["options"]["total"] == 16, "closed: options")
check(closed["kvgate"]["goodput"]["requests"] == 16, "closed: every request within the loose SLO")
check(set(closed["kvgate"]["by_policy"]) <= {"full", "streaming_llm@0.5", "snapkv@0.5"} and
      len(closed["kvgate"]["by_policy"]) >= 2, f"closed: policy mix {sorted(closed['kvgate']['by_policy'])}")
full = closed["kvgate"]["by_policy"].get("full")
if full:
    check(full["bytes_transferred"] >= full["bytes_full"], "closed: policy full moves the whole cache")
for name, p in closed["kvgate"]["by_policy"].items():
    if name != "full":
        check(p["bytes_transferred"] < 0.75 * p["bytes_full"], f"closed: {name} moves less than the full cache")
check(opened["kvgate"]["mode"] == "open-loop" and opened["options"]["load-schedule"] == "poisson", "open: Poisson")
check(3 <= opened["count"] <= 40, f"open: about 12 arrivals in 1.5 s at 8/s (got {opened['count']})")
check(opened["kvgate"]["output_tokens"] == opened["count"] * 4, "open: 4 tokens per request")
check(usage_rc == 2, f"--concurrency with --rate is a usage error (exit {usage_rc})")
check(down_rc == 1, f"no server: exit 1 (exit {down_rc})")
print(f"bench test: {len(failures)} failure(s)")
sys.exit(1 if failures else 0)
PY
