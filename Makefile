# Two commands set everything up on a fresh machine: `make demo` and `make test`.
# Both create .venv if missing and install the project; where no NVIDIA GPU is present the
# CPU build of torch is installed first (an unpinned torch would pull a multi-GB CUDA build), then
# uv installs the project and its other dependencies (it leaves the installed torch as it is).

PYTHON ?= python3
VENV ?= .venv
BIN := $(VENV)/bin
TORCH_CPU_VERSION ?= 2.13.0
STAMP := $(VENV)/.installed
PYTEST_ARGS ?=

.PHONY: install browser demo test test-fast lint format clean gpu-wheels

$(BIN)/python:
	$(PYTHON) -m venv $(VENV)

$(STAMP): pyproject.toml | $(BIN)/python
	@if command -v nvidia-smi >/dev/null 2>&1 && nvidia-smi -L >/dev/null 2>&1; then \
		echo "NVIDIA GPU found: installing the default (CUDA) torch build"; \
	else \
		echo "no NVIDIA GPU: installing the CPU torch build $(TORCH_CPU_VERSION)"; \
		$(BIN)/pip install --quiet "torch==$(TORCH_CPU_VERSION)" || \
		$(BIN)/pip install --quiet "torch==$(TORCH_CPU_VERSION)" --index-url https://download.pytorch.org/whl/cpu; \
	fi
	@# uv resolves and installs the rest in about a minute where pip takes several; it keeps the torch above.
	$(BIN)/pip install --quiet "uv>=0.5"
	$(BIN)/uv pip install --quiet --python $(BIN)/python -e ".[dev]"
	@touch $(STAMP)

install: $(STAMP)

demo: install
	$(BIN)/llava-ray demo --workdir demo_run

# The chat page's test drives the OS's Chromium (Playwright, no browser download): install it where missing.
SUDO := $(shell [ "$$(id -u)" = 0 ] || echo sudo)
browser:
	@command -v chromium >/dev/null 2>&1 || command -v chromium-browser >/dev/null 2>&1 || { \
		echo "installing Chromium (Debian package) for the chat page's browser test"; \
		$(SUDO) apt-get update -qq && DEBIAN_FRONTEND=noninteractive $(SUDO) apt-get install -y -qq chromium >/dev/null; }

# Unit tests run in two processes (each single-threaded: both cores busy). Integration tests run after
# them in one: each starts Ray clusters, Ray Train worker groups and servers that already use both
# cores. Two processes took 61 min on CI, with 4 failures, where one takes 36 min on an idle 2-core
# machine; and a README command run beside another test joins that test's `ray start` cluster
# (Ray's ray.init() connects to the last `ray start` on the machine).
# Exit status 5 is "no test selected" (PYTEST_ARGS).
test: install browser
	$(BIN)/python -m pytest -m "not integration" -n 2 $(PYTEST_ARGS) || [ $$? -eq 5 ]
	$(BIN)/python -m pytest -m integration $(PYTEST_ARGS) || [ $$? -eq 5 ]

test-fast: install
	$(BIN)/python -m pytest -m "not integration" -n 2 $(PYTEST_ARGS)

# The layer contract (pyproject's [tool.importlinter]) is checked with the style: a module that imports
# from a layer above its own fails `make lint` (and tests/test_layers.py in `make test`).
lint: install
	$(BIN)/ruff check platform jobs benchmarks tests
	$(BIN)/ruff format --check platform jobs benchmarks tests
	$(BIN)/lint-imports

format: install
	$(BIN)/ruff format platform jobs benchmarks tests
	$(BIN)/ruff check --fix platform jobs benchmarks tests

# Wheels that benchmarks/gpu_benchmark.sh installs on a bare GPU machine lacking them (Python 3.12,
# x86-64): pydantic and its needs, at the versions installed here. Carry .whl/ along with the repo.
GPU_WHEEL_PACKAGES := pydantic pydantic_core annotated-types typing-inspection
gpu-wheels: install
	$(BIN)/pip download --quiet --no-deps --only-binary=:all: --python-version 3.12 --implementation cp \
		--platform manylinux_2_17_x86_64 --platform manylinux2014_x86_64 -d .whl \
		$$($(BIN)/python -c "import importlib.metadata as m; print(' '.join(f'{n}=={m.version(n)}' for n in '$(GPU_WHEEL_PACKAGES)'.split()))")

clean:
	rm -rf $(VENV) demo_run .pytest_cache
