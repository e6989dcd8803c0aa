# telemeter — build, test, run.
#
#   make                 release binaries in target/release/
#   make setup           install what a fresh Debian machine lacks (Prometheus, musl, ...); the
#                        targets below that need it run it first
#   make check           what CI runs: fmt, clippy -D warnings, every unit and end-to-end test
#   make test-integration  the two-server + client + real Prometheus scenario (tests/integration.sh)
#   make test-reliability  crash safety, hostile input, slow clients, full disk, gossip fuzzing,
#                        and the memory bound (make test-memory)
#   make demo            the same system, left running in the foreground (Ctrl-C stops it)
#   make static          static x86_64-unknown-linux-musl release binaries in target/static/
#   make fixtures        regenerate tests/fixtures/ from a real Prometheus

CARGO ?= cargo
MUSL_TARGET := x86_64-unknown-linux-musl
BINARIES := telemeter-server telemeter-client

.PHONY: all build setup check fmt-check clippy test test-integration test-reliability test-memory demo static fixtures clean

all: build

build:
	$(CARGO) build --release --workspace --bins

setup:
	./tests/setup.sh

check: setup fmt-check clippy test

fmt-check:
	$(CARGO) fmt --all -- --check

# Every `unsafe` block says why it is sound (a `// SAFETY:` comment), in every crate.
clippy:
	$(CARGO) clippy --workspace --all-targets -- -D warnings -D clippy::undocumented_unsafe_blocks

# The binaries are built first: end-to-end tests of one crate start the other crate's binary too.
test:
	$(CARGO) build --workspace --bins
	$(CARGO) test --workspace

# The reliability suite (server/tests/{crash,hostile,disk_full,slow_clients,fuzz}.rs). The quick ones
# also run in `make test`; here the 3-node crash test gets 20 rounds instead of 5, and the ignored
# 60 s slow/idle connections test runs too (it prints the server's peak threads and memory).
RELIABILITY_TESTS := --test crash --test hostile --test disk_full --test fuzz --test slow_clients

# The servers' own log lines (`[server] ...`) are left out of the output; the tests' findings stay.
test-reliability: SHELL := /bin/bash
test-reliability: setup test-memory
	$(CARGO) build -p telemeter-server --bins
	set -o pipefail; CRASH_CLUSTER_ROUNDS=20 $(CARGO) test -p telemeter-server $(RELIABILITY_TESTS) \
	  -- --include-ignored --nocapture --test-threads 1 2>&1 | grep -v '^\[server\]'

# The memory bound the README states: 64 concurrent worst-case uploads of each kind, against the
# release binary (a debug build takes minutes to decode them; memory is the same), peak RSS per kind.
test-memory: SHELL := /bin/bash
test-memory: setup build
	set -o pipefail; TELEMETER_SERVER_BIN=$(CURDIR)/target/release/telemeter-server \
	  $(CARGO) test -p telemeter-server --test memory -- --include-ignored --nocapture 2>&1 \
	  | grep -v '^\[server\]'

test-integration: setup build
	./tests/integration-port-in-use.sh
	./tests/integration.sh

demo: setup build
	./tests/integration.sh --demo

# Static binaries are for copying onto hosts with nothing installed, so size matters more than the
# last percent of speed: optimized for size (edge devices and appliances care about the download),
# and non-PIE so they are plain static executables (`file`: statically linked). ring's C and
# assembly parts build with musl-gcc (musl-tools), which the cc crate finds by itself.
STATIC_RUSTFLAGS := -C target-feature=+crt-static -C relocation-model=static

static: setup
	CARGO_PROFILE_RELEASE_OPT_LEVEL=s RUSTFLAGS="$(STATIC_RUSTFLAGS)" \
	  $(CARGO) build --release --workspace --bins --target $(MUSL_TARGET)
	mkdir -p target/static
	for b in $(BINARIES); do cp target/$(MUSL_TARGET)/release/$$b target/static/$$b; done
	@for b in $(BINARIES); do printf '%s: %s bytes\n' $$b $$(stat -c %s target/static/$$b); file target/static/$$b; done

fixtures:
	./tests/fixtures/make-prometheus-fixtures.sh

# The speed figures against the targets, in one bounded run; writes bench/RESULTS.md.
.PHONY: bench
bench: setup
	./tests/bench.sh

clean:
	$(CARGO) clean
