# The commands of the README: `make demo` (the main job on the embedded local default), `make
# test` (the whole suite, CI's command) and `make test-fast` (the loop to run while editing). They
# install what they need on a fresh machine.
VENV ?= .venv
PYTHON := $(VENV)/bin/python
# The CPU build of torch lies on this machine's disk; an unpinned torch may pull a CUDA build.
TORCH_PIN ?= torch==2.13.0
CLIENT_PINS := transformers==5.24.0 'lm-eval[api,hf]==0.4.13' guidellm==0.8.1

# The fast tier: pure, kmock and in-process tests, no control plane, no image build, no
# multi-process torch.distributed group; in parallel processes (pytest-xdist), the slow ones
# handed to whichever process is free. Under 2 minutes on a 2-core machine (README, "Tests").
FAST_TESTS := not integration and not e2e and not images and not distributed and not gpu
HEAVY_TESTS := integration or e2e or images or distributed or gpu
FAST_WORKERS ?= 3

.PHONY: setup system-deps test test-fast lint demo bench gpu-check gpu-wheels images images-cuda clean

# The local cluster and demo tooling is its own distribution (local/), installed beside the root.
$(VENV)/.installed: pyproject.toml local/pyproject.toml
	python3 -m venv $(VENV)
	$(PYTHON) -m pip install -q --upgrade pip
	$(PYTHON) -m pip install -q $(TORCH_PIN)
	$(PYTHON) -m pip install -q -e '.[worker,test]'
	$(PYTHON) -m pip install -q -e ./local
	# Kubernetes 1.30's schemas: a kubernetes-validate release apart (none holds 1.20 and 1.30).
	$(PYTHON) -m pip install -q --target $(VENV)/kubernetes-validate-1.31 kubernetes-validate==1.31.0
	# The ecosystem's clients the serving tests run as commands (lm-eval, guidellm): a venv of
	# their own, so their dependencies never move the worker's; torch and transformers pinned.
	python3 -m venv $(VENV)/clients
	$(VENV)/clients/bin/pip install -q $(TORCH_PIN) $(CLIENT_PINS)
	touch $@

setup: $(VENV)/.installed

system-deps:
	bash hack/install-system-deps.sh

lint: setup
	$(VENV)/bin/ruff check .
	$(VENV)/bin/ruff format --check .
	$(VENV)/bin/lint-imports

# The whole suite: the pure tier on both cores first (pytest-xdist), then the tests that start
# processes and clusters one at a time (they time what they start; two at once starve each other).
test: setup system-deps lint
	$(PYTHON) -m pytest -q -n 2 --dist worksteal -m "$(FAST_TESTS)"
	$(PYTHON) -m pytest -m "$(HEAVY_TESTS)"

test-fast: setup
	$(PYTHON) -m pytest -q -n $(FAST_WORKERS) --dist worksteal -m "$(FAST_TESTS)"

demo: setup system-deps
	$(VENV)/bin/moe-ep demo

bench: setup
	$(VENV)/bin/moe-worker bench

# The GPU check (docs/gpu-results.md): under 8 minutes on one H100/H200, refuses without CUDA.
# On the lent GPU machine it runs on that machine's python3 with the wheels of `make gpu-wheels`.
GPU_CHECK_OUT ?= out/gpu-check
GPU_CHECK_FLAGS ?=
gpu-check:
	bash hack/gpu-check.sh $(GPU_CHECK_OUT) $(GPU_CHECK_FLAGS)

# What the GPU machine's python3 (3.12, x86-64; torch, transformers, numpy, safetensors and
# prometheus-client there) lacks for the check: pydantic and its needs, the versions .venv has.
GPU_WHEEL_PYTHON ?= 3.12
GPU_WHEELS := pydantic pydantic_core annotated_types typing_inspection typing_extensions
gpu-wheels: setup
	rm -rf .whl && mkdir -p .whl
	$(PYTHON) -m pip download -q --no-deps --only-binary=:all: -d .whl \
		--python-version $(GPU_WHEEL_PYTHON) --implementation cp \
		--platform manylinux_2_28_x86_64 --platform manylinux_2_17_x86_64 \
		--platform manylinux2014_x86_64 \
		$$($(PYTHON) -c 'import importlib.metadata as m, sys; \
			print(*(f"{n}=={m.version(n)}" for n in sys.argv[1:]))' $(GPU_WHEELS))
	ls .whl

# Container images, built with buildah from a local Debian rootfs: no registry, no Docker engine.
# Names and tags come from the chart (charts/moe-ep); docs/gpu-cluster.md, "Images".
IMAGE_TORCH := $(patsubst torch==%,%,$(TORCH_PIN))

images:
	bash hack/install-system-deps.sh images
	python3 hack/build_images.py operator worker --torch-version $(IMAGE_TORCH)

# The CUDA worker: torch and NVIDIA's CUDA libraries from PyPI, several GB (never in CI).
images-cuda:
	bash hack/install-system-deps.sh images
	python3 hack/build_images.py worker-cuda --torch-version $(IMAGE_TORCH)

clean:
	rm -rf $(VENV) .pytest_cache .ruff_cache
