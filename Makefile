# Red Dwarf. `make demo` and `make test` set up everything they need on a fresh Debian 12 machine.
SHELL := /bin/bash
PYTHON ?= python3.11
VENV := .venv
PY := $(VENV)/bin/python
PIP := $(VENV)/bin/pip
APT_PACKAGES := lxc debootstrap mariadb-server mariadb-client mariadb-backup tgt libiscsi-bin openssh-server \
	e2fsprogs zstd sysbench iproute2 iputils-ping rsync memcached prometheus qemu-system-common qemu-block-extra uidmap \
	galera-4 postgresql-15
PROTOS := $(wildcard protos/reddwarf/v1/*.proto)
GEN_STAMP := gen/reddwarf/v1/.stamp
PYTEST_ARGS ?=

.PHONY: setup apt venv gen test test-fast demo demo-stop demo-fleet demo-fleet-stop demo-ha demo-ha-stop bench chaos lint clean

setup: apt venv gen $(VENV)/.installed

# apt-get only when something is missing, so a warm machine pays nothing.
apt:
	@missing=$$(for p in $(APT_PACKAGES); do dpkg-query -W -f='$${Status}\n' $$p 2>/dev/null | grep -q 'install ok installed' || echo $$p; done); \
	if [ -n "$$missing" ]; then \
	  echo "installing: $$missing"; \
	  apt-get update -q && DEBIAN_FRONTEND=noninteractive apt-get install -y -q $$missing; \
	  systemctl disable --now mariadb tgt memcached prometheus prometheus-node-exporter postgresql >/dev/null 2>&1 || true; \
	fi

$(VENV)/bin/python:
	$(PYTHON) -m venv $(VENV)
	$(PIP) install -q --upgrade pip setuptools wheel

venv: $(VENV)/bin/python
	@$(PY) -c 'import grpc_tools, mypy_protobuf' 2>/dev/null || $(PIP) install -q grpcio-tools mypy-protobuf googleapis-common-protos

# Generated code is not committed: it is produced here from protos/ and imported as reddwarf.v1.
gen: venv $(GEN_STAMP)
$(GEN_STAMP): $(PROTOS)
	rm -rf gen && mkdir -p gen
	$(PY) tools/gen_protos.py
	touch $@

$(VENV)/.installed: pyproject.toml setup.py $(GEN_STAMP)
	$(PIP) install -q -e '.[dev]'
	touch $@

test: setup
	REDDWARF_LEAK_CHECK=1 $(VENV)/bin/pytest --durations=30 $(PYTEST_ARGS)

# Local loop: everything but the slow end-to-end tests.
test-fast: setup
	$(VENV)/bin/pytest -m 'not slow' $(PYTEST_ARGS)

demo: setup
	$(PY) -m reddwarf.client.demo up

demo-stop:
	$(PY) -m reddwarf.client.demo down

# A fleet instead of one host: two compute hosts and a SAN node, each in its own network namespace on a bridge
# the demo makes, and an instance whose datadir is an iSCSI LUN (clients/demo_fleet.py). `make demo` stays the default.
demo-fleet: setup
	$(PY) -m reddwarf.client.demo_fleet up

demo-fleet-stop:
	$(PY) -m reddwarf.client.demo_fleet down

# Three Galera nodes, SeaweedFS, two servers, a hostd and an instance (clients/demo_ha.py).
demo-ha: setup
	$(PY) -m reddwarf.client.demo_ha up

demo-ha-stop:
	$(PY) -m reddwarf.client.demo_ha down

bench: setup
	$(PY) -m bench.run

# A new seed each run unless one is given (REDDWARF_CHAOS_SEED=N make chaos replays a failing plan).
chaos: setup
	REDDWARF_CHAOS_SEED=$${REDDWARF_CHAOS_SEED:-$$(date +%s)}; echo "chaos seed $$REDDWARF_CHAOS_SEED"; \
	REDDWARF_CHAOS_SEED=$$REDDWARF_CHAOS_SEED $(VENV)/bin/pytest tests/chaos --chaos-full -rA

lint: setup
	$(VENV)/bin/ruff check common server hostd agent clients tests bench
	$(PY) tools/unasync.py --check
	cd gen && ../$(VENV)/bin/mypy --config-file ../pyproject.toml -p reddwarf.common -p reddwarf.server -p reddwarf.hostd -p reddwarf.agent -p reddwarf.client

clean:
	rm -rf $(VENV) gen build *.egg-info
