# Two entry points: `make demo` (the main job, end to end) and `make test` (the whole suite).
PY ?= python3.11
VENV := .venv
BIN := $(VENV)/bin
STAMP := $(VENV)/.installed

.PHONY: setup test lint demo clean chromium postgresql

setup: $(STAMP) chromium postgresql

# tests/api/test_e2e.py's console tests drive Debian's chromium (Playwright with executable_path: no browser download). Installed
# here when it is missing and we are root; if apt-get fails, setup goes on and that test is skipped, saying why.
chromium:
	@if [ ! -x /usr/bin/chromium ] && [ "$$(id -u)" = 0 ] && command -v apt-get >/dev/null; then \
	  (apt-get update -qq && DEBIAN_FRONTEND=noninteractive apt-get install -y -qq chromium >/dev/null) || \
	  echo "apt-get could not install chromium: the console tests of tests/api/test_e2e.py will be skipped"; fi

# tests/api/test_store.py (and a test of tests/api/test_app.py) run the gateway's store on a real PostgreSQL server as
# well as SQLite: tests/conftest.py starts a throwaway one from Debian's server programs (/usr/lib/postgresql/<major>/bin,
# run as the `postgres` user when we are root). Installed here when missing and we are root; if apt-get fails, setup
# goes on and those tests are skipped, saying why.
postgresql:
	@if ! command -v initdb >/dev/null && ! ls /usr/lib/postgresql/*/bin/initdb >/dev/null 2>&1 && \
	  [ "$$(id -u)" = 0 ] && command -v apt-get >/dev/null; then \
	  (apt-get update -qq && DEBIAN_FRONTEND=noninteractive apt-get install -y -qq postgresql >/dev/null) || \
	  echo "apt-get could not install postgresql: the PostgreSQL tests of tests/api/ will be skipped"; fi

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

# Two xdist workers: the modules that start Ray run one after another on one of them (tests/conftest.py RAY_MODULES),
# the rest fill both; each worker gets half the cores for torch.
test: setup lint
	RAY_USAGE_STATS_ENABLED=0 $(BIN)/pytest -q -n 2

demo: setup
	RAY_USAGE_STATS_ENABLED=0 $(BIN)/flm demo

clean:
	rm -rf $(VENV) runs .pytest_cache
