# make setup      create .venv and install everything (again when requirements*.txt or pyproject.toml change)
# make reinstall  install everything again (e.g. after changing TORCH_SPEC)
# make setup-gpu  on a CUDA machine: setup plus the pinned GPU extras (vLLM, DeepSpeed, Liger)
# make test    run the whole test suite (what CI runs)
# make demo    run the whole pipeline on the CPU recipe
VENV ?= .venv
PY := $(VENV)/bin/python
TORCH_SPEC ?= torch==2.13.0
# CPU wheel here; on a CUDA machine, the CUDA build of the same torch, e.g.: make setup TORCH_INDEX=https://download.pytorch.org/whl/cu128
TORCH_INDEX ?=
RECIPE ?= cpu
RAW_DIR ?=
REDO ?=
LANES ?=
export ECG_RAW_DIR ?= $(if $(wildcard data/raw/ECG-Expert-QA),data/raw/ECG-Expert-QA,../shared/ECG-Expert-QA)

.PHONY: setup reinstall setup-gpu test test-fast demo clean
setup: $(VENV)/.setup-done

reinstall:
	rm -f $(VENV)/.setup-done $(VENV)/.setup-gpu-done
	$(MAKE) setup

setup-gpu: $(VENV)/.setup-gpu-done

$(VENV)/.setup-gpu-done: $(VENV)/.setup-done requirements-gpu.txt
	DS_BUILD_OPS=0 $(PY) -m pip install -q -r requirements-gpu.txt
	touch $@

$(VENV)/.setup-done: requirements.txt requirements-offline.txt pyproject.toml
	test -x $(PY) || python3 -m venv $(VENV)
	$(PY) -m pip install -q --upgrade pip
	$(PY) -m pip install -q "$(TORCH_SPEC)" $(if $(TORCH_INDEX),--index-url $(TORCH_INDEX))
	# DS_BUILD_OPS=0: DeepSpeed builds its C++/CUDA ops on first use, not at install
	DS_BUILD_OPS=0 $(PY) -m pip install -q -r requirements.txt
	$(PY) -m pip install -q --no-deps -r requirements-offline.txt
	# the library as an editable package: scripts, tests and notebooks import `utils` the same way
	$(PY) -m pip install -q --no-deps -e .
	# METEOR's WordNet, offline; evaluation leaves METEOR empty (with a warning) if this fails
	PY=$(PY) bash scripts/setup_wordnet.sh || echo "WordNet not installed: METEOR will be left empty"
	touch $@

test: setup
	$(PY) -m pytest -m "slow or not slow" -q --durations=15

test-fast: setup
	$(PY) -m pytest -q

demo: setup
	RECIPE=$(RECIPE) PYTHON=$(PY) RAW_DIR=$(RAW_DIR) REDO=$(REDO) LANES=$(LANES) bash scripts/run_pipeline.sh

clean:
	rm -rf data/processed models/sft models/reward models/rlhf reports
