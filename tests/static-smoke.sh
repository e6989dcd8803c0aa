#!/usr/bin/env bash
# Smoke test of the static binaries of `make static` (target/static/): both answer --help (also in
# an empty root, when run as root), `file` calls them statically linked, each is under 5 MB, and a
# one-shot push with the static client lands on the static server. The client scrapes the server's
# own internal /metrics (plain text), so nothing else is needed. Every wait is bounded; the server
# is stopped and the temp dir removed however it ends.
#
#   tests/static-smoke.sh            uses target/static/
#   STATIC_BIN=DIR tests/static-smoke.sh
set -euo pipefail

root=$(cd "$(dirname "$0")/.." && pwd)
bin=${STATIC_BIN:-$root/target/static}
server=$bin/telemeter-server
client=$bin/telemeter-client
# The issue's target for each binary; STATIC_MAX_BYTES overrides it.
max_bytes=${STATIC_MAX_BYTES:-5000000}
work=$(mktemp -d "${TMPDIR:-/tmp}/telemeter-static-smoke.XXXXXX")
server_pid=

log() { printf 'static-smoke: %s\n' "$*" >&2; }

fail() {
  echo "static-smoke: FAILED: $*" >&2
  for f in "$work"/*.log; do
    [ -f "$f" ] || continue
    echo "----- last lines of $(basename "$f")" >&2
    tail -n 20 "$f" >&2
  done
  exit 1
}

cleanup() {
  local status=$?
  trap - EXIT INT TERM
  if [ -n "$server_pid" ]; then
    kill -TERM "$server_pid" 2>/dev/null || true
    for _ in $(seq 1 100); do
      kill -0 "$server_pid" 2>/dev/null || break
      sleep 0.1
    done
    kill -KILL "$server_pid" 2>/dev/null || true
    wait "$server_pid" 2>/dev/null || true
  fi
  rm -rf "$work"
  exit "$status"
}
trap cleanup EXIT INT TERM

for b in "$server" "$client"; do
  [ -x "$b" ] || fail "$b is missing: run make static first"
  description=$(file -b "$b")
  case "$description" in
    *"statically linked"* | *"static-pie linked"*) ;;
    *) fail "$b is not statically linked: $description" ;;
  esac
  "$b" --help >/dev/null || fail "$b --help failed"
  size=$(stat -c %s "$b")
  [ "$size" -lt "$max_bytes" ] || fail "$b is $size bytes, over $max_bytes"
  log "$(basename "$b"): $size bytes, $description"
  # In an empty root there is no libc, no loader and no Rust: the binary must run on its own.
  if [ "$(id -u)" = 0 ] && command -v chroot >/dev/null 2>&1; then
    mkdir -p "$work/empty-root"
    cp "$b" "$work/empty-root/"
    chroot "$work/empty-root" "/$(basename "$b")" --help >/dev/null \
      || fail "$(basename "$b") --help fails in an empty root"
    rm -f "$work/empty-root/$(basename "$b")"
    log "$(basename "$b"): runs in an empty root"
  fi
done

# Port 0 on loopback: the server logs the addresses it got.
"$server" \
  --listen 127.0.0.1:0 --listen-internal 127.0.0.1:0 \
  --storage-path "$work/data" \
  --tokens-file "$root/tests/fixtures/tokens.json" \
  --ratelimit 0s \
  </dev/null >"$work/server.log" 2>&1 &
server_pid=$!

external= internal=
for _ in $(seq 1 200); do
  line=$(grep -m1 'listening external=' "$work/server.log" || true)
  if [ -n "$line" ]; then
    external=$(sed -E 's/.*listening external=([^ ]+) internal=.*/\1/' <<<"$line")
    internal=$(sed -E 's/.*internal=([^ ]+).*/\1/' <<<"$line")
    break
  fi
  kill -0 "$server_pid" 2>/dev/null || fail "the server exited at start"
  sleep 0.1
done
[ -n "$external" ] && [ -n "$internal" ] || fail "the server never reported its addresses"
log "server: external=$external internal=$internal"

for _ in $(seq 1 100); do
  curl -fsS --max-time 2 "http://$internal/healthz" >/dev/null 2>&1 && break
  sleep 0.1
done
curl -fsS --max-time 2 "http://$internal/healthz" >/dev/null || fail "the server never became healthy"

timeout 60 "$client" --once \
  --from "http://$internal/metrics" \
  --match '{__name__=~".+"}' \
  --id static-smoke \
  --to "http://$external" \
  --to-token fleet-token \
  --listen '' \
  --timeout 10s \
  >"$work/client.log" 2>&1 || fail "telemeter-client --once exited with $?"
log "client --once: exit 0"

federate=$(curl -fsS --max-time 10 "http://$internal/federate") || fail "GET /federate failed"
grep -q '_id="static-smoke"' <<<"$federate" || fail "/federate shows no series with _id=\"static-smoke\""
log "ok: $(grep -c '_id="static-smoke"' <<<"$federate") series with _id=\"static-smoke\" on /federate"
