# Two entry points: `make demo` (the main job, end to end) and `make test` (the whole suite).
PY ?= python3.11
VENV := .venv
BIN := $(VENV)/bin
STAMP := $(VENV)/.installed

.PHONY: setup test lint demo clean chromium

setup: $(STAMP) chromium

# tests/api/test_e2e.py's console tests drive Debian's chromium (Playwright with executable_path: no browser download). Installed
# here when it is missing and we are root; if apt-get fails, setup goes on and that test is skipped, saying why.
chromium:
	@if [ ! -x /usr/bin/chromium ] && [ "$$(id -u)" = 0 ] && command -v apt-get >/dev/null; then \
	  (apt-get update -qq && DEBIAN_FRONTEND=noninteractive apt-get install -y -qq chromium >/dev/null) || \
	  echo "apt-get could not install chromium: the console tests of tests/api/test_e2e.py will be skipped"; fi

# torch first, pinned to the local CPU wheel: an unpinned torch pulls a multi-GB CUDA build.
# deepspeed ships as an sdist whose setup.py imports torch: build it against that torch (no isolation).
$(STAMP): pyproject.toml
	test -x $(BIN)/python || $(PY) -m venv $(VENV)
	$(BIN)/pip install --quiet --upgrade pip setuptools wheel
	$(BIN)/pip install --quiet torch==2.13.0
	DS_BUILD_OPS=0 $(BIN)/pip install --quiet --no-build-isolation "deepspeed>=0.15"
	$(BIN)/pip install --quiet -e ".[dev,hf,eval]" torch==2.13.0
	touch $(STAMP)

lint: setup
	$(BIN)/ruff check .

test: setup lint
	RAY_USAGE_STATS_ENABLED=0 $(BIN)/pytest -q

demo: setup
	RAY_USAGE_STATS_ENABLED=0 $(BIN)/flm demo

clean:
	rm -rf $(VENV) runs .pytest_cache
