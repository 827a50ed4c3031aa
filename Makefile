# The two commands of the README's quick start. Both are idempotent and work on a fresh machine.
VENV := .venv
PY := $(VENV)/bin/python

.PHONY: setup run test bench clean

setup:
	@scripts/setup.sh

# Run the agent in the foreground on the bundled default policies (Ctrl-C stops it; enforcement
# stays pinned in the kernel until `hostagent uninstall`).
run: setup
	$(PY) -m hostagent run --config packaging/hostagent.yaml --policy-dir policies $(ARGS)

test: setup
	$(PY) -m pytest $(ARGS)

bench: setup
	$(PY) -m bench.run $(ARGS)

clean:
	rm -rf $(VENV) .pytest_cache hostagent/v1

# hostagent's resolver next to dnsmasq and unbound (dnsperf, cached answers); `ARGS=--quick`
# for a smoke run. Writes docs/benchmarks-dns.md after a full run.
.PHONY: bench-dns
bench-dns: setup
	$(PY) -m bench.dns $(ARGS)

# Connection events kernel -> agent -> one gRPC subscriber (and the collector's SQLite), next to
# the raw ring-buffer read rate; `ARGS=--quick` for a smoke run, `ARGS=--profile` adds py-spy
# profiles (needs py-spy in .venv). Writes docs/benchmarks-events.md after a full run.
.PHONY: bench-events
bench-events: setup
	$(PY) -m bench.events $(ARGS)
