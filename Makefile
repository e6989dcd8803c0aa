# telemeter — build, test, run.
#
#   make                 release binaries in target/release/
#   make check           what CI runs: fmt, clippy -D warnings, every unit and end-to-end test
#   make test-integration  the two-server + client + real Prometheus scenario (tests/integration.sh)
#   make demo            the same system, left running in the foreground (Ctrl-C stops it)
#   make static          static x86_64-unknown-linux-musl release binaries in target/static/
#   make fixtures        regenerate tests/fixtures/ from a real Prometheus

CARGO ?= cargo
MUSL_TARGET := x86_64-unknown-linux-musl
BINARIES := telemeter-server telemeter-client

.PHONY: all build check fmt-check clippy test test-integration demo static fixtures clean

all: build

build:
	$(CARGO) build --release --workspace --bins

check: fmt-check clippy test

fmt-check:
	$(CARGO) fmt --all -- --check

clippy:
	$(CARGO) clippy --workspace --all-targets -- -D warnings

# The binaries are built first: end-to-end tests of one crate start the other crate's binary too.
test:
	$(CARGO) build --workspace --bins
	$(CARGO) test --workspace

test-integration: build
	./tests/integration-port-in-use.sh
	./tests/integration.sh

demo: build
	./tests/integration.sh --demo

static:
	$(CARGO) build --release --workspace --bins --target $(MUSL_TARGET)
	mkdir -p target/static
	for b in $(BINARIES); do cp target/$(MUSL_TARGET)/release/$$b target/static/$$b; done
	@for b in $(BINARIES); do printf '%s: %s bytes\n' $$b $$(stat -c %s target/static/$$b); file target/static/$$b; done

fixtures:
	./tests/fixtures/make-prometheus-fixtures.sh

# The speed figures against the targets, in one bounded run; writes bench/RESULTS.md.
.PHONY: bench
bench:
	./tests/bench.sh

clean:
	$(CARGO) clean
