#!/usr/bin/env bash
# tests/integration.sh must refuse, naming the port, when a port it needs is taken — not hang.
set -euo pipefail
root=$(cd "$(dirname "$0")/.." && pwd)
port=${1:-9005}

# Occupy the port with a plain TCP listener for the duration of the check.
python3 -c '
import socket, sys, time
s = socket.socket(); s.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
s.bind(("127.0.0.1", int(sys.argv[1]))); s.listen(1); time.sleep(60)' "$port" &
holder=$!
trap 'kill $holder 2>/dev/null || true' EXIT
for _ in $(seq 1 50); do (exec 3<>"/dev/tcp/127.0.0.1/$port") 2>/dev/null && break; sleep 0.1; done

set +e
out=$(INTEGRATION_TIMEOUT=20 timeout 60 "$root/tests/integration.sh" 2>&1)
status=$?
set -e
if [ $status -eq 0 ] || [ $status -eq 124 ]; then
  echo "tests: FAILED: integration.sh exited $status with port $port taken" >&2
  exit 1
fi
if ! grep -q "port localhost:$port (needed for Prometheus) is already in use" <<<"$out"; then
  echo "tests: FAILED: no message naming port $port; got: $out" >&2
  exit 1
fi
echo "port-in-use: ok (exit $status, message names port $port)"
