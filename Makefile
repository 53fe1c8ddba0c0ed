# Two commands set everything up on a fresh machine:
#   make serve   - create .venv, install, start the offline demo (configs/cpu-demo.yaml)
#   make test    - create .venv, install with test tools, run the suite
#   make bench   - side-by-side benchmark: raw pipeline, this server, unbatched baseline (BENCHMARKS.md)
# Production: make serve CONFIG=serve_config.yaml

PYTHON ?= python3
VENV ?= .venv
CONFIG ?= configs/cpu-demo.yaml
# Pinned and installed first: otherwise pip resolves diffusers/accelerate to a CUDA torch of several GB.
TORCH_VERSION ?= 2.13.0
PIP := $(VENV)/bin/pip
PY := $(VENV)/bin/python
export RAY_AUTH_MODE ?= disabled

.PHONY: install install-test chromium serve test test-fast test-e2e lint bench soak clean local-cluster kuberay-manifest

$(VENV)/bin/python:
	$(PYTHON) -m venv $(VENV)
	$(PIP) install --quiet --upgrade pip

$(VENV)/.installed: $(VENV)/bin/python pyproject.toml
	$(PIP) install --quiet torch==$(TORCH_VERSION)
	$(PIP) install --quiet torch==$(TORCH_VERSION) -e .
	touch $@

$(VENV)/.installed-test: $(VENV)/.installed
	$(PIP) install --quiet torch==$(TORCH_VERSION) -e '.[test,loadtest]'
	touch $@

install: $(VENV)/.installed
install-test: $(VENV)/.installed-test chromium

# The web page's browser test drives Debian's chromium through Playwright
# (Playwright's own browser download cannot work offline). sudo only when not root.
chromium:
	@command -v chromium >/dev/null 2>&1 || { \
	  SUDO=$$([ "$$(id -u)" -eq 0 ] || echo sudo); \
	  $$SUDO apt-get update -qq && DEBIAN_FRONTEND=noninteractive $$SUDO apt-get install -y -qq chromium; }

# Checks the config (coherence, GPUs present), runs `serve run`, prints the URL once /readyz answers.
serve: install
	$(PY) -m serve_app.launch $(CONFIG)

# The unit tests on two processes (pytest-xdist: they share nothing), then the end-to-end tests in one:
# those share one Ray instance, and two at once would starve each other on two cores.
test: install-test
	$(VENV)/bin/pytest tests/unit -n 2
	$(VENV)/bin/pytest tests/e2e

# The loop while changing code: everything that runs without Ray, less a few tests of seconds each.
test-fast: install-test
	$(VENV)/bin/pytest tests/unit -m "not slow" -n 2

test-e2e: install-test
	$(VENV)/bin/pytest tests/e2e

# Raw pipeline vs this server vs an unbatched baseline, one run (BENCHMARKS.md). Options: make bench BENCH_ARGS="--duration 5"
bench: install-test
	$(PY) -m loadtest.benchmark $(BENCH_ARGS)

# Steady load against a running server for SOAK_MINUTES, sampling replica memory (not in CI).
SOAK_URL ?= http://127.0.0.1:8000
SOAK_MINUTES ?= 30
soak: install-test
	$(PY) -m loadtest.soak --url $(SOAK_URL) --minutes $(SOAK_MINUTES)

# Two Ray nodes on this machine, `serve deploy`, replicas on both, traffic, clean stop (deploy/local_cluster.py).
local-cluster: install
	$(PY) deploy/local_cluster.py

# Copy serve_config.yaml into the KubeRay manifest's serveConfigV2 (a test checks they agree).
kuberay-manifest: install
	$(PY) deploy/kuberay/sync_serve_config.py

lint: install-test
	$(VENV)/bin/ruff check serve_app tests loadtest deploy
	$(VENV)/bin/ruff format --check serve_app tests loadtest deploy

clean:
	rm -rf $(VENV) *.egg-info .pytest_cache .ruff_cache
