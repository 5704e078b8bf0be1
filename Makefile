# tts-gateway — `make run` serves on 127.0.0.1:8001, `make test` runs the suite.
# Both create .venv and install everything on a fresh Debian machine with only Python.
PYTHON ?= python3
VENV   := .venv
BIN    := $(VENV)/bin
# Torch that fits the machine, chosen here and nowhere else: TORCH=cpu (default) takes PyTorch's
# CPU-only build (no CUDA packages); TORCH=cuda takes PyPI's default Linux build (CUDA).
# The install recipe itself (torch release, indexes, the --no-deps extras) is scripts/install-python.sh,
# which the Dockerfile runs too; TORCH_VERSION=… overrides its torch release.
TORCH ?= cpu
export TORCH_VERSION
INSTALL_SCRIPT := scripts/install-python.sh
STAMP  := $(VENV)/.installed-$(shell (echo $(TORCH) $(TORCH_VERSION); cat pyproject.toml Makefile $(INSTALL_SCRIPT)) | sha256sum | cut -c1-12)
DEV_STAMP := $(STAMP)-dev
APT_PACKAGES ?= espeak-ng
TEST_APT_PACKAGES ?= espeak-ng chromium postgresql
PYTEST_ARGS ?=

.PHONY: run test test-ray test-image image lint bench fuzz install install-dev system-deps test-system-deps apt-install tiny-xtts clean

run: install system-deps
	$(BIN)/tts-gateway serve

test: install-dev test-system-deps
	$(BIN)/python -m pytest --ignore=tests/test_ray.py --ignore=tests/test_image.py $(PYTEST_ARGS)

# The Ray Serve backend: its own bounded step (one local cluster, never in parallel).
test-ray: install-dev test-system-deps
	$(BIN)/pip install -e ".[dev,ray]"
	timeout 1200 $(BIN)/python -m pytest tests/test_ray.py -m ray $(PYTEST_ARGS)

# The container image (Dockerfile), built with docker (when its daemon answers) or else podman; CONTAINER=…
# chooses. TORCH=cuda builds the CUDA variant. IMAGE_BUILD_FLAGS adds flags (scripts/container-base.sh
# prints the ones a machine without a container registry needs: a local base image, the host's wheels).
CONTAINER ?=
IMAGE ?= tts-gateway:latest
IMAGE_BUILD_FLAGS ?=
IMAGE_APT_PACKAGES ?= podman runc iptables debootstrap postgresql

# podman: the Docker image format keeps HEALTHCHECK (OCI drops it); its default ulimits can exceed the
# host's hard limits, and then no build step starts, so it asks for the host's own (nproc at most 32768);
# runc when installed (crun fails on hosts with mixed cgroup v1/v2 hierarchies).
image:
	@engine="$(CONTAINER)"; \
	if [ -z "$$engine" ]; then \
		if docker info >/dev/null 2>&1; then engine=docker; \
		elif command -v podman >/dev/null; then engine=podman; \
		else echo "make image needs docker (its daemon running) or podman"; exit 1; fi; \
	fi; \
	flags=""; \
	if [ "$${engine##*/}" = podman ]; then \
		files=$$(ulimit -Hn); procs=$$(bash -c "ulimit -Hu"); \
		if [ "$$procs" = unlimited ] || [ "$$procs" -gt 32768 ]; then procs=32768; fi; \
		flags="--format docker --ulimit nofile=$$files:$$files --ulimit nproc=$$procs:$$procs"; \
		if command -v runc >/dev/null; then engine="$$engine --runtime runc"; fi; \
	fi; \
	set -x; $$engine build $$flags --build-arg TORCH=$(TORCH) $(if $(TORCH_VERSION),--build-arg TORCH_VERSION=$(TORCH_VERSION)) \
		$(IMAGE_BUILD_FLAGS) -t $(IMAGE) .

# Builds the image (on a stand-in base: no registry needed) and speaks to it as a user would.
test-image: install-dev
	@$(MAKE) --no-print-directory apt-install PKGS="$(IMAGE_APT_PACKAGES)"
	timeout 2400 $(BIN)/python -m pytest tests/test_image.py -m image $(PYTEST_ARGS)

lint: install-dev
	$(BIN)/ruff check .
	$(BIN)/mypy tts_gateway benchmarks
	$(BIN)/lint-imports

bench: install system-deps
	$(BIN)/pip install -e ".[ray,bench]"  # ray_memory; wyoming_ttfa's peer and intelligibility's recogniser
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

$(STAMP): pyproject.toml Makefile $(INSTALL_SCRIPT) | $(BIN)/python
	$(INSTALL_SCRIPT) $(BIN)/pip $(TORCH) -e .
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
