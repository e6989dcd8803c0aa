#!/usr/bin/env bash
# What the tests, the demo and the static build need on a fresh Debian machine, installed only if
# missing (so it is quick once done): a real Prometheus and promtool, the Pushgateway (benchmark
# baseline), VictoriaMetrics (a remote-write receiver for the benchmark), musl-tools and file (static build), openssl, curl and jq (scripts), Go and python3 (the
# interop tests upload through net/http and http.client, as real clients do), chromium (the status
# page is tested in a real headless browser), and the rustfmt
# and clippy components and the musl target of the Rust toolchain. `make check`, `make demo` and
# `.ci/run` run it first. Needs root (or sudo) only when a Debian package is missing.
set -euo pipefail

need=()
command -v prometheus >/dev/null 2>&1 || need+=(prometheus)
command -v promtool >/dev/null 2>&1 || need+=(prometheus)
command -v prometheus-pushgateway >/dev/null 2>&1 || need+=(prometheus-pushgateway)
# The remote-write egress benchmark ships into a real VictoriaMetrics.
command -v victoria-metrics >/dev/null 2>&1 || need+=(victoria-metrics)
command -v musl-gcc >/dev/null 2>&1 || need+=(musl-tools)
command -v file >/dev/null 2>&1 || need+=(file)
command -v openssl >/dev/null 2>&1 || need+=(openssl)
command -v curl >/dev/null 2>&1 || need+=(curl)
command -v jq >/dev/null 2>&1 || need+=(jq)
command -v go >/dev/null 2>&1 || need+=(golang-go)
command -v python3 >/dev/null 2>&1 || need+=(python3)
# The status page test renders the page in a real headless browser.
command -v chromium >/dev/null 2>&1 || need+=(chromium)
if [ ${#need[@]} -gt 0 ]; then
  # prometheus appears twice when both binaries are missing; apt-get does not mind.
  sudo=()
  if [ "$(id -u)" != 0 ]; then
    command -v sudo >/dev/null 2>&1 ||
      { echo "setup: missing Debian packages ${need[*]}: run as root, or apt-get install them" >&2; exit 1; }
    sudo=(sudo)
  fi
  echo "setup: installing ${need[*]}"
  "${sudo[@]}" apt-get update -qq
  DEBIAN_FRONTEND=noninteractive "${sudo[@]}" apt-get install -y -qq --no-install-recommends "${need[@]}" >/dev/null
fi
rustup component list --installed 2>/dev/null | grep -q '^rustfmt' || rustup component add rustfmt
rustup component list --installed 2>/dev/null | grep -q '^clippy' || rustup component add clippy
rustup target list --installed | grep -qx x86_64-unknown-linux-musl || rustup target add x86_64-unknown-linux-musl
