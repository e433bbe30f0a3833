# Two entry points: `make demo` (the main job, end to end) and `make test` (the whole suite).
PY ?= python3.11
VENV := .venv
BIN := $(VENV)/bin
STAMP := $(VENV)/.installed

# torch comes from TORCH_INDEX when given (GPUs: make setup TORCH_INDEX=https://download.pytorch.org/whl/cu130, the
# index of your CUDA version), else from the PyTorch CPU index when it answers within 3 s (on Linux a plain
# `pip install torch` pulls the multi-GB CUDA build), else as this machine's pip configuration says (`pip config list`).
TORCH_VERSION ?= 2.13.0
TORCH_INDEX ?=
TORCH_CPU_INDEX := https://download.pytorch.org/whl/cpu
CHECK_PY ?= python3.12

.PHONY: setup test lint demo compose-check clean system-packages check-client check-py check-py312

setup: $(STAMP) system-packages

# Debian packages the suite uses, installed with one apt-get call when missing and we are root (`make -j2 setup`, as
# .ci/run does, runs it beside the venv's installs: apt's downloads and pip's overlap). If apt-get fails, setup goes
# on and the tests that need them are skipped, saying why:
# - chromium: tests/api/test_e2e.py's console tests drive it (Playwright with executable_path: no browser download);
# - postgresql: tests/api/test_store.py (and a test of tests/api/test_app.py) run the gateway's store on a real
#   PostgreSQL server as well as SQLite: tests/conftest.py starts a throwaway one from Debian's server programs
#   (/usr/lib/postgresql/<major>/bin, run as the `postgres` user when we are root).
system-packages:
	@missing=""; \
	[ -x /usr/bin/chromium ] || missing="$$missing chromium"; \
	command -v initdb >/dev/null || ls /usr/lib/postgresql/*/bin/initdb >/dev/null 2>&1 || missing="$$missing postgresql"; \
	if [ -n "$$missing" ] && [ "$$(id -u)" = 0 ] && command -v apt-get >/dev/null; then \
	  echo "apt-get install$$missing"; \
	  (apt-get update -qq && DEBIAN_FRONTEND=noninteractive apt-get install -y -qq $$missing >/dev/null) || \
	  echo "apt-get could not install$$missing: the tests that need it are skipped (console: chromium; store: postgresql)"; fi

# torch==$(TORCH_VERSION) into the venv whose bin/ is $(1) (a shell word), from TORCH_INDEX (see above)
install_torch = index="$(TORCH_INDEX)"; \
	if [ -z "$$index" ]; then \
	  if $(1)/python -c "import urllib.request as u; u.urlopen('$(TORCH_CPU_INDEX)/torch/', timeout=3)" 2>/dev/null; \
	  then index=$(TORCH_CPU_INDEX); \
	  else echo "torch: $(TORCH_CPU_INDEX) does not answer; torch==$(TORCH_VERSION) as pip's configuration says"; fi; fi; \
	echo "$(1)/pip install torch==$(TORCH_VERSION)$${index:+ --index-url $$index}"; \
	$(1)/pip install --quiet torch==$(TORCH_VERSION) $${index:+--index-url $$index}

# torch first, pinned (above). deepspeed ships as an sdist whose setup.py imports torch: build it against that torch
# (no isolation). dev brings every extra the suite exercises (pyproject.toml).
$(STAMP): pyproject.toml
	test -x $(BIN)/python || $(PY) -m venv $(VENV)
	$(BIN)/pip install --quiet --upgrade pip setuptools wheel
	@$(call install_torch,$(BIN))
	DS_BUILD_OPS=0 $(BIN)/pip install --quiet --no-build-isolation "deepspeed>=0.15"
	$(BIN)/pip install --quiet -e ".[dev]" torch==$(TORCH_VERSION)
	touch $(STAMP)

# docker-compose.yml run for real (not part of `make test`: it builds images, ~8 min from nothing here; needs root, which
# installs docker.io, docker-compose and debootstrap when missing): benchmarks/compose_check.py
compose-check: setup
	RAY_USAGE_STATS_ENABLED=0 $(BIN)/python benchmarks/compose_check.py

lint: setup
	$(BIN)/ruff check .

# Two xdist workers: the modules that start Ray run one after another on one of them (tests/conftest.py RAY_MODULES),
# the rest fill both; each worker gets half the cores for torch.
test: setup lint
	RAY_USAGE_STATS_ENABLED=0 $(BIN)/pytest -q -n 2

demo: setup
	RAY_USAGE_STATS_ENABLED=0 $(BIN)/flm demo

# What `pip install 'flm[client]'` gives, in a throwaway venv (downloads from PyPI; 3 min here): the wheel, no torch,
# Ray or DeepSpeed, and the REST commands start; `flm train` names the extra it needs (exit 2). Not part of `make test`.
check-client:
	@set -e; dir=$$(mktemp -d); trap 'rm -rf "$$dir"' EXIT; \
	$(PY) -m venv "$$dir/venv"; bin="$$dir/venv/bin"; \
	mkdir "$$dir/src"; git ls-files -co --exclude-standard | tar -cf - -T - | tar -xf - -C "$$dir/src"; \
	echo "$$bin/pip install '.[client]' (a copy of the working tree)"; $$bin/pip install --quiet "$$dir/src[client]"; \
	cd "$$dir"; \
	for m in torch ray deepspeed datasets fastapi; do \
	  if $$bin/python -c "import $$m" 2>/dev/null; then echo "flm[client] installed $$m"; exit 1; fi; done; \
	$$bin/flm --help >/dev/null; \
	for c in submit jobs status logs cancel resume deploy undeploy generate; do $$bin/flm $$c --help >/dev/null; done; \
	FLM_URL=http://127.0.0.1:9 FLM_API_KEY=flm-none $$bin/flm jobs 2>&1 | grep -q "nothing answers"; \
	code=0; $$bin/flm train $(CURDIR)/configs/tiny.yaml >train.txt 2>&1 || code=$$?; \
	if [ $$code != 2 ] || ! grep -q "pip install 'flm\[train\]'" train.txt; then cat train.txt; exit 1; fi; \
	echo "check-client: flm[client] has no torch, ray, deepspeed, datasets or fastapi; flm --help, the REST commands' --help and flm jobs run; flm train asks for flm[train]"

# The package on another Python (CHECK_PY, default python3.12; CI keeps 3.11): a throwaway venv with
# .[train,serve,dev] and torch==$(TORCH_VERSION), which imports every package and runs the fast tests. Downloads several
# GB from PyPI where only the CUDA build of torch is at hand (28 min here). Not part of `make test`.
check-py:
	@set -e; $(CHECK_PY) --version; dir=$$(mktemp -d); trap 'rm -rf "$$dir"' EXIT; \
	$(CHECK_PY) -m venv "$$dir/venv"; bin="$$dir/venv/bin"; \
	$$bin/pip install --quiet --upgrade pip setuptools wheel; \
	$(call install_torch,$$bin); \
	DS_BUILD_OPS=0 $$bin/pip install --quiet --no-build-isolation "deepspeed>=0.15"; \
	$$bin/pip install --quiet -e ".[train,serve,dev]" torch==$(TORCH_VERSION); \
	$$bin/python -c "import flm.cli, flm.train, cluster.train, service.app, api.app, sys; print('imported on', sys.version)"; \
	RAY_USAGE_STATS_ENABLED=0 $$bin/python -m pytest -q -p no:cacheprovider tests/flm/test_model.py tests/flm/test_config.py \
	  tests/test_imports.py tests/test_packaging.py

check-py312:
	$(MAKE) check-py CHECK_PY=python3.12

clean:
	rm -rf $(VENV) runs .pytest_cache
