# megatron-mtp-rl: `make install`, `make sglang`, `make test`, `make lint`, `make demo`.
# PYTHON may point at any Python 3.12 interpreter; by default we look for one.
PYTHON ?= $(shell for c in python3.12 $$HOME/.pyenv/versions/3.12*/bin/python3.12 /usr/bin/python3.12; do \
            command -v $$c >/dev/null 2>&1 && $$c -c 'import sys; sys.exit(sys.version_info[:2] != (3, 12))' 2>/dev/null && { command -v $$c; break; }; done)
VENV ?= .venv
PY := $(VENV)/bin/python
PYTEST_ARGS ?=

.PHONY: install sglang test test-all test-gpu lint demo docker clean

$(VENV)/.installed: setup.py
	@test -n "$(PYTHON)" || { echo "error: no Python 3.12 found; run 'make install PYTHON=/path/to/python3.12'"; exit 1; }
	$(PYTHON) -m venv $(VENV)
	$(PY) -m pip install --quiet --upgrade pip
	$(PY) -m pip install --quiet -e '.[test]'
	touch $@

install: $(VENV)/.installed

# SGLang 0.5.23 + sglang-router in their own venv, outside the clone (fresh clones reuse it), plus
# SGLang's CPU kernels built from ../shared/sglang-cpu/src where there is no CUDA. A second run: seconds.
SGLANG_VENV ?= $(or $(MTP_RL_SGLANG_VENV),$(HOME)/.cache/megatron-mtp-rl/sglang-0.5.23)
export MTP_RL_SGLANG_VENV := $(SGLANG_VENV)
sglang:
	@test -n "$(PYTHON)" || { echo "error: no Python 3.12 found; run 'make sglang PYTHON=/path/to/python3.12'"; exit 1; }
	@$(PYTHON) tools/install_sglang.py --venv "$(SGLANG_VENV)"

# The suite CI runs (7.5 to 8.5 minutes on 2 quiet cores); `make test-all` adds the `slow` tests (second variants
# of a multi-process layout, minute-long timeouts, tool smoke runs: about 15 minutes).
# Both run the files, and each file's tests, in a shuffled order from a seed they print
# ("shuffled order: --shuffle-seed N"): rerun that order with `make test SHUFFLE_SEED=N`.
SHUFFLE_SEED ?= random
test: install sglang
	$(PY) -m pytest -q -m "not slow" --shuffle-seed $(SHUFFLE_SEED) tests $(PYTEST_ARGS)

test-all: install sglang
	$(PY) -m pytest -q --shuffle-seed $(SHUFFLE_SEED) tests $(PYTEST_ARGS)

# On a machine with CUDA: the gpu-marked tests (TE + bf16 step, CPU-fp32 vs GPU-bf16 log-probs,
# THD packing, distributed optimizer + resume, speculative decoding). Elsewhere they skip, saying why.
test-gpu: install
	MTP_RL_TEST_GPU=1 $(PY) -m pytest -q -m gpu tests/gpu $(PYTEST_ARGS)

lint: install
	$(VENV)/bin/ruff check megatron_mtp_rl tests tools
	$(VENV)/bin/ruff format --check megatron_mtp_rl tests tools

DEMO_DIR ?= runs/demo

# The main job: warm start (reused when present), then RL with OCC, then the plot.
demo: install
	@test -f $(DEMO_DIR)/warmstart/latest_checkpointed_iteration.txt || \
	  $(VENV)/bin/mtp-rl pretrain --config examples/tiny_cpu/pretrain.yaml --save $(DEMO_DIR)/warmstart
	$(VENV)/bin/mtp-rl train --config examples/tiny_cpu/demo.yaml \
	  --load $(DEMO_DIR)/warmstart --finetune --save $(DEMO_DIR)/checkpoints \
	  --metrics-jsonl $(DEMO_DIR)/metrics.jsonl --tensorboard-dir $(DEMO_DIR)/tensorboard
	$(PY) tools/plot_metrics.py $(DEMO_DIR)/metrics.jsonl -o $(DEMO_DIR)/plot.png --title "tiny-moe + 2 MTP, GRPO + OCC (arith)"
	@echo "metrics:     $(DEMO_DIR)/metrics.jsonl"
	@echo "tensorboard: $(VENV)/bin/tensorboard --logdir $(DEMO_DIR)/tensorboard"
	@echo "plot:        $(DEMO_DIR)/plot.png"

# Needs a Docker engine (not available on the CPU dev machines): see docs/launching.md.
DOCKER_TAG ?= megatron-mtp-rl:0.1.0
docker:
	docker build -f docker/Dockerfile -t $(DOCKER_TAG) .

clean:
	rm -rf $(VENV) build *.egg-info
