# The two commands of the README: `make run` (the main job) and `make test` (the test suite).
# Both create or reuse a virtual environment in $(VENV) and install the project into it.
PYTHON ?= python3
VENV ?= .venv
# torch first and pinned, so that the CPU wheel present on CPU machines is taken; override on GPU
# hosts, e.g. `make run TORCH_SPEC="torch==2.13.0 --index-url ..."`.
TORCH_SPEC ?= torch==2.13.0
PY := $(VENV)/bin/python
STAMP := $(VENV)/.installed
# The tests also run a real Prometheus server and promtool (Debian's prometheus package) and render
# the Kubernetes manifests with `kubectl kustomize`; installed here when missing and run as root.
SYSTEM_TOOLS := prometheus promtool prometheus-pushgateway

.PHONY: run test install clean system-tools gpu-check

$(STAMP): setup.py
	test -x $(PY) || $(PYTHON) -m venv $(VENV)
	$(PY) -m pip install --quiet --upgrade pip
	$(PY) -m pip install --quiet $(TORCH_SPEC)
	$(PY) -m pip install --quiet -e ".[test]"
	touch $(STAMP)

install: $(STAMP)

system-tools:
	@missing=""; for t in $(SYSTEM_TOOLS); do command -v $$t >/dev/null || missing=1; done; \
	if [ -n "$$missing" ]; then \
	  if [ "$$(id -u)" = 0 ]; then \
	    (apt-get install -y -q prometheus prometheus-pushgateway >/dev/null 2>&1 || \
	     (apt-get update -q >/dev/null && apt-get install -y -q prometheus prometheus-pushgateway >/dev/null)) && \
	    echo "installed prometheus, promtool and prometheus-pushgateway"; \
	  else echo "prometheus/promtool missing: install Debian's prometheus package (tests needing them will fail)"; fi; \
	fi

run: $(STAMP)
	$(PY) trainer/launch.py $(ARGS)

test: $(STAMP) system-tools
	$(PY) -m pytest $(PYTEST_ARGS)

# The GPU acceptance run (docs/benchmarks.md): exits 3 without CUDA. `make gpu-check ARGS="--output DIR"`.
gpu-check: $(STAMP)
	$(PY) bench/gpu_check.py $(ARGS)

clean:
	rm -rf $(VENV) build *.egg-info .pytest_cache
