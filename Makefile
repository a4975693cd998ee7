# The two commands of the README: `make run` (the main job) and `make test` (the test suite).
# Both create or reuse a virtual environment in $(VENV) and install the project into it.
PYTHON ?= python3
VENV ?= .venv
# torch first and pinned, so that the CPU wheel present on CPU machines is taken; override on GPU
# hosts, e.g. `make run TORCH_SPEC="torch==2.13.0 --index-url ..."`.
TORCH_SPEC ?= torch==2.13.0
PY := $(VENV)/bin/python
STAMP := $(VENV)/.installed
# One file per torch spec: a changed TORCH_SPEC (a CUDA build on a GPU host after a CPU one) makes
# a new name, so torch is reinstalled, and the project after it.
TORCH_STAMP := $(VENV)/.torch-$(shell printf '%s' '$(TORCH_SPEC)' | cksum | cut -d' ' -f1)
# The tests also run a real Prometheus server and promtool (Debian's prometheus package) and render
# the Kubernetes manifests with `kubectl kustomize`; installed here when missing and run as root.
SYSTEM_TOOLS := prometheus promtool prometheus-pushgateway

.PHONY: run test install clean system-tools gpu-check

$(TORCH_STAMP):
	test -x $(PY) || $(PYTHON) -m venv $(VENV)
	$(PY) -m pip install --quiet --upgrade pip
	@# The installed torch may satisfy the new spec's version and still be the wrong build
	@# (2.13.0+cpu for torch==2.13.0 from a CUDA index): uninstall it first.
	$(PY) -m pip uninstall --quiet --yes torch 2>/dev/null || true
	$(PY) -m pip install --quiet $(TORCH_SPEC)
	rm -f $(VENV)/.torch-*
	touch $@

$(STAMP): setup.py $(TORCH_STAMP)
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
# It installs first, like run and test; on a host without a package registry run the script itself
# with a Python that has CUDA torch and the dependencies: `python bench/gpu_check.py` (README, "GPUs").
gpu-check: $(STAMP)
	$(PY) bench/gpu_check.py $(ARGS)

clean:
	rm -rf $(VENV) build *.egg-info .pytest_cache
