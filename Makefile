# Set-up and test commands (the README lists them). The virtualenv lives at .venv.
#   make install   create .venv and install everything (scripts/install.sh; a no-op when done)
#   make test      install, then run the whole test suite
#   make test-kong run the real-Kong tests against KONG_PROXY_URL
#   make demo / make bench / make clean
SHELL := /bin/bash
VENV ?= .venv
PYTHON := $(VENV)/bin/python
PYTEST_TIMEOUT ?= 300
PYTEST_ARGS ?=
export TIKTOKEN_CACHE_DIR ?= $(CURDIR)/.cache/tiktoken
export HF_HUB_OFFLINE := 1
export TRANSFORMERS_OFFLINE := 1

.PHONY: install test test-kong demo bench clean distclean

install:
	VENV="$(VENV)" scripts/install.sh

# pytest's exit code is kept: 5 ("no tests collected") fails like any other non-zero code.
# PYTEST_EXIT_FILE, when set (by .ci/run), receives that code so callers can tell 5 apart.
test: install
	@set +e; "$(PYTHON)" -m pytest -q --timeout=$(PYTEST_TIMEOUT) $(PYTEST_ARGS); rc=$$?; \
	if [ -n "$${PYTEST_EXIT_FILE:-}" ]; then echo $$rc > "$$PYTEST_EXIT_FILE"; fi; \
	if [ $$rc -eq 5 ]; then echo "make test: pytest collected no tests (exit code 5)" >&2; fi; \
	exit $$rc

test-kong: install
	@if [ -z "$${KONG_PROXY_URL:-}" ]; then \
	  echo "make test-kong: set KONG_PROXY_URL to a real Kong proxy, e.g. KONG_PROXY_URL=http://127.0.0.1:8000 (docker/compose.yml)" >&2; \
	  exit 2; fi
	"$(PYTHON)" -m pytest -q --timeout=$(PYTEST_TIMEOUT) -m kong $(PYTEST_ARGS)

demo: install
	"$(VENV)/bin/aigov" demo

# The benchmark compares against RedisVL (the optional `bench` extra), installed here if missing.
bench:
	VENV="$(VENV)" AIGOV_EXTRAS=bench scripts/install.sh
	"$(VENV)/bin/aigov" bench

# Build and test leftovers; keeps .venv (distclean removes it too).
clean:
	rm -rf .cache .pytest_cache build out *.egg-info
	find . -path ./$(VENV) -prune -o -type d -name __pycache__ -print0 | xargs -0 rm -rf

distclean: clean
	rm -rf "$(VENV)"
