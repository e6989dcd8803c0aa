#!/usr/bin/env bash
# The integration scenario: a two-server telemeter cluster, one telemeter-client, and a real Prometheus
# on http://localhost:9005 that the client scrapes and that scrapes the servers' /federate.
#
#   tests/integration.sh                      run it as a test: wait for the data, check it, clean up
#   tests/integration.sh URL [BEARER_TOKEN]   the same, but the client scrapes the Prometheus at URL
#   tests/integration.sh --demo [URL [TOKEN]] start the same system and leave it running (Ctrl-C stops)
#
# Every wait is bounded. Exit 0 and `tests: ok` on success; non-zero with the reason otherwise.
# Environment: TELEMETER_BIN (default target/release), INTEGRATION_TIMEOUT (seconds, default 120),
# KEEP_WORKDIR=1 keeps the logs and data after the run.
set -euo pipefail

root=$(cd "$(dirname "$0")/.." && pwd)
bin=${TELEMETER_BIN:-$root/target/release}
timeout_s=${INTEGRATION_TIMEOUT:-120}
mode=test
if [ "${1:-}" = "--demo" ]; then
  mode=demo
  shift
fi
prom_port=9005
source_url=${1:-http://localhost:$prom_port}
source_token=${2:-}
cluster_id=test
client_token=integration-token
# The client anonymizes `instance` with this salt; the checks below recompute the hashes.
salt=integration-salt

# Two servers on their own loopback addresses, same ports, as on two hosts.
s1=127.0.0.2
s2=127.0.0.3
ext_port=9003
int_port=9004
gossip_port=9006
client_listen=127.0.0.1:9002

work=$(mktemp -d "${TMPDIR:-/tmp}/telemeter-integration.XXXXXX")
pids=()
names=()

log() { printf '%s integration: %s\n' "$(date -u +%H:%M:%S)" "$*" >&2; }

dump_logs() {
  for f in "$work"/*.log; do
    [ -f "$f" ] || continue
    echo "----- last lines of $(basename "$f")" >&2
    tail -n 25 "$f" >&2
  done
}

fail() {
  echo "tests: FAILED: $*" >&2
  dump_logs
  exit 1
}

cleanup() {
  local status=$?
  trap - EXIT INT TERM
  for p in "${pids[@]}"; do kill -TERM "$p" 2>/dev/null || true; done
  # Bounded: whatever has not exited after 10 s is killed.
  for _ in $(seq 1 100); do
    local alive=0
    for p in "${pids[@]}"; do kill -0 "$p" 2>/dev/null && alive=1; done
    [ "$alive" = 0 ] && break
    sleep 0.1
  done
  for p in "${pids[@]}"; do kill -KILL "$p" 2>/dev/null || true; done
  wait 2>/dev/null || true
  if [ "${KEEP_WORKDIR:-0}" = 1 ]; then
    echo "integration: logs and data kept in $work" >&2
  else
    rm -rf "$work"
  fi
  exit "$status"
}
trap cleanup EXIT
trap 'exit 130' INT TERM

# A TCP port something already listens on: name it and stop, rather than hang or fail obscurely later.
port_free() {
  local host=$1 port=$2 what=$3
  if (exec 3<>"/dev/tcp/$host/$port") 2>/dev/null; then
    fail "port $host:$port (needed for $what) is already in use; stop what listens there and retry"
  fi
}

# Runs a command in the background with its output in $work/NAME.log, and remembers it for cleanup.
start() {
  local name=$1
  shift
  "$@" >"$work/$name.log" 2>&1 &
  pids+=($!)
  names+=("$name")
}

# Waits until a command succeeds, at most `timeout_s` seconds in all for this wait.
wait_until() {
  local what=$1
  shift
  local deadline=$((SECONDS + timeout_s))
  until "$@" >/dev/null 2>&1; do
    for i in "${!pids[@]}"; do
      kill -0 "${pids[$i]}" 2>/dev/null || fail "${names[$i]} exited early (see its log below) while waiting for $what"
    done
    [ $SECONDS -lt $deadline ] || fail "timed out after ${timeout_s}s waiting for $what"
    sleep 1
  done
  log "ok: $what"
}

for b in telemeter-server telemeter-client; do
  [ -x "$bin/$b" ] || fail "$bin/$b is missing: run 'make' first (or set TELEMETER_BIN)"
done
command -v prometheus >/dev/null || fail "prometheus is not installed: apt-get install prometheus"
command -v curl >/dev/null || fail "curl is not installed"
command -v openssl >/dev/null || fail "openssl is not installed (it checks the anonymized values)"

port_free localhost $prom_port "Prometheus"
port_free 127.0.0.1 ${client_listen##*:} "telemeter-client --listen"
for s in $s1 $s2; do
  port_free $s $ext_port "telemeter-server --listen"
  port_free $s $int_port "telemeter-server --listen-internal"
done

head -c 64 /dev/urandom >"$work/shared.key"

cat >"$work/prometheus.yml" <<EOF
global:
  scrape_interval: 2s
  evaluation_interval: 2s
rule_files:
  - $root/tests/fixtures/integration-rules.yml
scrape_configs:
  - job_name: prometheus
    static_configs:
      - targets: ['localhost:$prom_port']
  # The federated clusters: honor_labels keeps the pushed job/instance labels.
  - job_name: telemeter
    honor_labels: true
    metrics_path: /federate
    static_configs:
      - targets: ['$s1:$int_port', '$s2:$int_port']
  - job_name: telemeter-server
    static_configs:
      - targets: ['$s1:$int_port', '$s2:$int_port']
  - job_name: telemeter-client
    static_configs:
      - targets: ['$client_listen']
EOF

log "starting prometheus on localhost:$prom_port (work dir $work)"
start prometheus prometheus \
  --config.file="$work/prometheus.yml" \
  --storage.tsdb.path="$work/prometheus-data" \
  --web.listen-address="localhost:$prom_port" \
  --log.level=warn

server() {
  local name=$1 addr=$2 peer=$3
  start "$name" "$bin/telemeter-server" \
    --name "$name" \
    --listen "$addr:$ext_port" \
    --listen-internal "$addr:$int_port" \
    --listen-cluster "$addr:$gossip_port" \
    --join "$peer:$gossip_port" \
    --shared-key "$work/shared.key" \
    --tokens-file "$root/tests/fixtures/tokens.json" \
    --storage-path "$work/$name-data" \
    --ratelimit 2s \
    --ttl 10m
}
log "starting telemeter-server s1 on $s1 and s2 on $s2"
RUST_LOG=${RUST_LOG:-info} server s1 $s1 $s2
RUST_LOG=${RUST_LOG:-info} server s2 $s2 $s1

wait_until "prometheus ready" curl -fsS "http://localhost:$prom_port/-/ready"
wait_until "s1 ready" curl -fsS "http://$s1:$int_port/healthz/ready"
wait_until "s2 ready" curl -fsS "http://$s2:$int_port/healthz/ready"

# Series that already carry _id came back from the servers through Prometheus: the `_id=""` matcher
# keeps the client from pushing them again.
client_args=(
  --from "$source_url"
  --to "http://$s1:$ext_port"
  --to-token "$client_token"
  --id "$cluster_id"
  --interval 5s
  --listen "$client_listen"
  --match '{__name__="up",_id=""}'
  --match '{__name__="scrape_samples_scraped",_id=""}'
  --match '{__name__="ALERTS",_id=""}'
  --match '{__name__="prometheus_build_info",_id=""}'
  --rename ALERTS=alerts,scrape_samples_scraped=scraped
  --anonymize-labels instance
  --anonymize-salt "$salt"
)
[ -n "$source_token" ] && client_args+=(--from-token "$source_token")
log "starting telemeter-client: $source_url -> http://$s1:$ext_port as cluster '$cluster_id'"
start client "$bin/telemeter-client" "${client_args[@]}"

if [ "$mode" = demo ]; then
  cat <<EOF

telemeter is running (Ctrl-C stops everything):
  Prometheus (source and central)   http://localhost:$prom_port
      try:  count({_id="$cluster_id"})   alerts{_id="$cluster_id"}   scraped{_id="$cluster_id"}
  telemeter-server s1  push  http://$s1:$ext_port   federate/metrics  http://$s1:$int_port/federate  /metrics  /debug/cluster
  telemeter-server s2  push  http://$s2:$ext_port   federate/metrics  http://$s2:$int_port/federate  /metrics  /debug/cluster
  telemeter-client     http://$client_listen/metrics
  logs and data        $work

EOF
  KEEP_WORKDIR=${KEEP_WORKDIR:-0}
  while :; do
    for i in "${!pids[@]}"; do
      kill -0 "${pids[$i]}" 2>/dev/null || fail "${names[$i]} exited"
    done
    sleep 2
  done
fi

# query PROMQL: prints the number of series in the result (0 when empty or on error).
query_count() {
  curl -fsS --get --data-urlencode "query=$1" "http://localhost:$prom_port/api/v1/query" |
    jq -r 'if .status == "success" then (.data.result | length) else 0 end'
}
has_series() { [ "$(query_count "$1")" -gt 0 ]; }

wait_until 'count({_id="test"}) > 0 in Prometheus' has_series 'count({_id="test"}) > 0'
wait_until 'scraped{_id="test"} (renamed from scrape_samples_scraped)' has_series 'scraped{_id="test"}'
wait_until 'alerts{_id="test"} (renamed from ALERTS)' has_series 'alerts{_id="test"}'

[ "$(query_count 'ALERTS{_id="test"}')" = 0 ] || fail 'ALERTS{_id="test"} present: the rename did not apply'
[ "$(query_count 'scrape_samples_scraped{_id="test"}')" = 0 ] || fail 'scrape_samples_scraped{_id="test"} present: the rename did not apply'

# --anonymize-labels instance, as upstream: a value becomes base64url(SHA-256(salt + value)[:9]),
# computed here with openssl, not with our code; an empty value (Prometheus's /federate writes
# instance="" on alerts, which have no instance) stays empty, so no fake instance is invented.
anonymized() { printf '%s%s' "$salt" "$1" | openssl dgst -sha256 -binary | head -c 9 | base64 | tr '+/' '-_'; }
if [ "$source_url" = "http://localhost:$prom_port" ]; then
  self_instance=$(anonymized "localhost:$prom_port")
  wait_until "up{_id=\"test\",job=\"prometheus\"} with instance anonymized to $self_instance" \
    has_series "up{_id=\"test\",job=\"prometheus\",instance=\"$self_instance\"}"
fi
[ "$(query_count 'up{_id="test",instance!~"[A-Za-z0-9_-]{12}"}')" = 0 ] ||
  fail 'an up{_id="test"} series has an instance that is not anonymized'
[ "$(query_count 'alerts{_id="test",instance!=""}')" = 0 ] ||
  fail 'alerts{_id="test"} carries an instance: the empty instance="" of the alert was anonymized'

# Each series comes from exactly one server: the ring owner's /federate has them, the other's none.
curl -fsS "http://$s1:$int_port/federate" | grep -F "_id=\"$cluster_id\"" | sort >"$work/s1.federate" || true
curl -fsS "http://$s2:$int_port/federate" | grep -F "_id=\"$cluster_id\"" | sort >"$work/s2.federate" || true
n1=$(wc -l <"$work/s1.federate")
n2=$(wc -l <"$work/s2.federate")
log "series of cluster '$cluster_id': s1 serves $n1, s2 serves $n2"
[ $((n1 + n2)) -gt 0 ] || fail "neither server serves cluster '$cluster_id'"
if [ "$n1" -gt 0 ] && [ "$n2" -gt 0 ]; then
  fail "cluster '$cluster_id' is served by both servers (s1: $n1 series, s2: $n2)"
fi
# The same on the servers' own /federate: alerts without a (non-empty) instance, up with a hashed one.
cat "$work/s1.federate" "$work/s2.federate" >"$work/federate"
grep -q '^alerts{' "$work/federate" || fail "no alerts series of cluster '$cluster_id' on the servers' /federate"
if grep '^alerts{' "$work/federate" | grep -q 'instance="[^"]'; then
  fail "alerts on the servers' /federate carry an instance: $(grep '^alerts{' "$work/federate" | head -n 1)"
fi
grep -q '^up{' "$work/federate" || fail "no up series of cluster '$cluster_id' on the servers' /federate"
if grep '^up{' "$work/federate" | grep -vqE 'instance="[A-Za-z0-9_-]{12}"'; then
  fail "up on the servers' /federate with an instance not anonymized: $(grep '^up{' "$work/federate" | grep -vE 'instance="[A-Za-z0-9_-]{12}"' | head -n 1)"
fi

echo "tests: ok"
