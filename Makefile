# make demo   set up .venv and run the agent with the demo backends (Ctrl-C stops it)
# make test   set up .venv and run the whole test suite
# make bench  run every benchmark (~10 minutes; results: docs/BENCHMARKS.md, docs/RELIABILITY.md)
PYTHON ?= python3
VENV := .venv
STAMP := $(VENV)/.installed-stamp

$(STAMP): pyproject.toml clients/python/pyproject.toml
	$(PYTHON) -m venv $(VENV)
	$(VENV)/bin/pip install --quiet --upgrade pip
	$(VENV)/bin/pip install --quiet -e clients/python -e '.[test]'
	touch $(STAMP)

.PHONY: demo test bench setup
setup: $(STAMP)

demo: $(STAMP)
	$(VENV)/bin/python examples/demo.py

test: $(STAMP)
	scripts/ensure-packages
	$(VENV)/bin/python -m pytest -q

bench: $(STAMP)
	$(VENV)/bin/python bench/resolve.py
	$(VENV)/bin/python bench/policies.py
	$(VENV)/bin/python bench/consul_propagation.py
	-$(VENV)/bin/python bench/bystander.py  # exits 1 when a target (p99 <= 5 ms) is missed
	-$(VENV)/bin/python bench/soak.py
	scripts/ensure-packages  # wrk and HAProxy for the proxy's comparison
	$(VENV)/bin/python bench/proxy.py
	$(VENV)/bin/python bench/bulk_relays.py
