# tts-gateway — `make run` serves on 127.0.0.1:8001, `make test` runs the suite.
# Both create .venv and install everything on a fresh Debian machine with only Python.
PYTHON ?= python3
VENV   := .venv
BIN    := $(VENV)/bin
STAMP  := $(VENV)/.installed-$(shell cat pyproject.toml Makefile | sha256sum | cut -c1-12)
APT_PACKAGES ?= espeak-ng
TEST_APT_PACKAGES ?= espeak-ng chromium postgresql
PYTEST_ARGS ?=

.PHONY: run test test-ray lint bench fuzz install system-deps test-system-deps tiny-xtts clean

run: install system-deps
	$(BIN)/tts-gateway serve

test: install test-system-deps
	$(BIN)/python -m pytest --ignore=tests/test_ray.py $(PYTEST_ARGS)

# The Ray Serve backend: its own bounded step (one local cluster, never in parallel).
test-ray: install
	$(BIN)/pip install -e ".[dev,ray]"
	timeout 1200 $(BIN)/python -m pytest tests/test_ray.py -m ray $(PYTEST_ARGS)

lint: install
	$(BIN)/ruff check .
	$(BIN)/mypy tts_gateway
	$(BIN)/lint-imports

bench: install system-deps
	$(BIN)/python -m benchmarks.run

fuzz: install
	$(BIN)/python -m pytest tests/test_fuzz.py -m fuzz $(PYTEST_ARGS)

install: $(STAMP)

$(BIN)/python:
	$(PYTHON) -m venv $(VENV)
	$(BIN)/python -m pip install --quiet --upgrade pip setuptools wheel

$(STAMP): pyproject.toml Makefile | $(BIN)/python
	# CPU torch first (the local CPU wheel); the project's range then installs nothing more.
	$(BIN)/pip install "torch==2.13.0"
	$(BIN)/pip install -e ".[dev]"
	# coqui-tts needs these *packages* present; their compiled parts are bypassed (see
	# engines/torch_compat.py), so no deps: they would pull another torch.
	$(BIN)/pip install --no-deps "torchaudio==2.11.0" "torchcodec==0.17.0"
	rm -f $(VENV)/.installed-*
	touch $@

# System packages: installed when root (apt); otherwise the engine reports itself unavailable.
system-deps:
	@$(MAKE) --no-print-directory apt-install PKGS="$(APT_PACKAGES)"

test-system-deps:
	@$(MAKE) --no-print-directory apt-install PKGS="$(TEST_APT_PACKAGES)"

apt-install:
	@missing=""; for p in $(PKGS); do dpkg -s $$p >/dev/null 2>&1 || missing="$$missing $$p"; done; \
	if [ -z "$$missing" ]; then exit 0; fi; \
	if [ "$$(id -u)" = 0 ] && command -v apt-get >/dev/null; then \
		echo "installing system packages:$$missing"; \
		(apt-get update -qq || true) && DEBIAN_FRONTEND=noninteractive apt-get install -y -qq $$missing >/dev/null; \
	else \
		echo "note: missing system packages:$$missing (not root: engines that need them report unavailable)"; \
	fi

tiny-xtts: install
	$(BIN)/tts-gateway dev tiny-xtts .cache/tiny-xtts

clean:
	rm -rf $(VENV) .pytest_cache .mypy_cache .ruff_cache build *.egg-info
