# Sourced by the shell tests and benches that talk to a real `kvgate serve` on loopback.
# start_kvgate_serve KVGATE LOG [SERVE FLAGS...]: starts `KVGATE serve --host 127.0.0.1
# --port 0 FLAGS...` in the background, logging to LOG, and waits (up to 120 s: weights and
# the workers' registration) for the port it prints. Sets server_pid and port; on failure
# prints the log and "FAIL ..." and returns 1. stop_kvgate_serve: SIGTERM and wait.
server_pid=""
port=""
start_kvgate_serve() {
  local kvgate=$1 log=$2
  shift 2
  "$kvgate" serve --host 127.0.0.1 --port 0 "$@" >"$log" 2>&1 &
  server_pid=$!
  port=""
  for _ in $(seq 1 1200); do
    port="$(sed -n 's/.*listening on [^ ]*:\([0-9][0-9]*\).*/\1/p' "$log" | head -n1)"
    [[ -n "$port" ]] && return 0
    kill -0 "$server_pid" 2>/dev/null || { cat "$log"; echo "FAIL serve exited"; return 1; }
    sleep 0.1
  done
  cat "$log"
  echo "FAIL serve did not print its port"
  return 1
}
stop_kvgate_serve() {
  if [[ -n "$server_pid" ]]; then kill -TERM "$server_pid" 2>/dev/null || true; wait "$server_pid" 2>/dev/null || true; fi
}
