#!/usr/bin/env bash
# Measures one `telemeter-client --once` (release build): scrape ~10,000+ series from a real local
# Prometheus and push them to a trivial receiver. Prints wall time and peak RSS (GNU time -v).
#
#   cargo build --release -p telemeter-client && client/bench/once-10k.sh [JOBS]
#
# Prometheus is started with JOBS (default 18) scrape jobs of itself under distinct job names, which
# gives ~560 series each (~12,000 in all with 18); it is killed at the end.
set -euo pipefail
jobs=${1:-18}
root=$(cd "$(dirname "$0")/../.." && pwd)
bin="$root/target/release/telemeter-client"
work=$(mktemp -d)
pids=()
cleanup() { for p in "${pids[@]}"; do kill "$p" 2>/dev/null || true; done; rm -rf "$work"; }
trap cleanup EXIT
free_port() { python3 -c 'import socket; s=socket.socket(); s.bind(("127.0.0.1",0)); print(s.getsockname()[1])'; }

prom_port=$(free_port)
{ echo "global: {scrape_interval: 1s}"; echo "scrape_configs:"
  for j in $(seq 1 "$jobs"); do
    echo "  - {job_name: self-$j, static_configs: [{targets: ['127.0.0.1:$prom_port']}]}"
  done; } > "$work/prometheus.yml"
/usr/bin/prometheus --config.file="$work/prometheus.yml" --storage.tsdb.path="$work/data" \
  --web.listen-address="127.0.0.1:$prom_port" --log.level=warn >"$work/prom.log" 2>&1 &
pids+=($!)

# A trivial receiver: /authorize gives a token, /upload reads the body and answers 200.
recv_port=$(free_port)
python3 - "$recv_port" >"$work/recv.log" 2>&1 <<'PY' &
import json, sys
from http.server import BaseHTTPRequestHandler, HTTPServer
class H(BaseHTTPRequestHandler):
    def do_POST(self):
        n = int(self.headers.get("Content-Length") or 0)
        body = self.rfile.read(n)
        if self.path.startswith("/authorize"):
            out = json.dumps({"version": 1, "token": "t", "expiresInSeconds": 3600,
                              "labels": {"_id": "bench"}}).encode()
            self.send_response(200); self.send_header("Content-Type", "application/json")
            self.send_header("Content-Length", str(len(out))); self.end_headers(); self.wfile.write(out)
        else:
            sys.stderr.write("upload %d bytes\n" % len(body)); sys.stderr.flush()
            self.send_response(200); self.send_header("Content-Length", "0"); self.end_headers()
    def log_message(self, *a): pass
HTTPServer(("127.0.0.1", int(sys.argv[1])), H).serve_forever()
PY
pids+=($!)

federate="http://127.0.0.1:$prom_port/federate"
want=$((jobs * 500))
for _ in $(seq 1 120); do
  n=$(curl -s -G --data-urlencode 'match[]={__name__=~".+"}' "$federate" | grep -vc '^#' || true)
  [ "$n" -ge "$want" ] && break
  sleep 0.5
done
sleep 2
n=$(curl -s -G --data-urlencode 'match[]={__name__=~".+"}' "$federate" | grep -vc '^#' || true)
echo "Prometheus /federate serves $n series (text lines) from $jobs jobs"

args=(--once --from "http://127.0.0.1:$prom_port" --to "http://127.0.0.1:$recv_port"
      --to-token bench --id bench --match '{__name__=~".+"}' --anonymize-labels instance
      --anonymize-salt s)
echo "load average: $(cut -d' ' -f1-3 /proc/loadavg)"
for f in 'application/vnd.google.protobuf;proto=io.prometheus.client.MetricFamily;encoding=delimited' 'text/plain'; do
  curl -s -o /dev/null -w "curl of /federate alone ($f): %{time_total} s, %{size_download} bytes\n" \
    -H "Accept: $f" -G --data-urlencode 'match[]={__name__=~".+"}' "$federate"
done
"$bin" "${args[@]}"   # warm-up: Prometheus's own caches, page cache of the binary
for i in 1 2 3 4 5; do
  start=$(date +%s%N)
  RUST_LOG=info /usr/bin/time -v "$bin" "${args[@]}" 2>"$work/time.txt"
  end=$(date +%s%N)
  echo "run $i: wall $(( (end - start) / 1000000 )) ms, peak RSS $(awk '/Maximum resident/ {print $6}' "$work/time.txt") KiB"
  grep -E "User time|System time|pushed" "$work/time.txt" | sed 's/^.*INFO  telemeter_client: /\t/' 
done
tail -1 "$work/recv.log"
