#!/usr/bin/env bash
# make bench-gpu: the harness on one GPU, on a machine that cannot fetch anything.
#
# Needs on the machine: Python >= 3.10 with torch (CUDA), transformers, accelerate, numpy, pandas,
# pyarrow, pyyaml, typer, tqdm. Travels with the repo (prepared with network access by
# `make gpu-wheels gpu-data`): .whl/ (pydantic and its small dependencies, installed into
# /tmp/site when the machine lacks them) and .gpu/ (the WikiText-2 test parquet as a corpus
# mirror, SmolLM2's tokenizer as a plain folder). datasets and gguf are not needed.
# GPU_DRY=cpu runs everything small on the CPU (to prove the script without a GPU).
set -euo pipefail
cd "$(dirname "$0")/.."
PY="${PYTHON:-python3}"

export HF_HUB_OFFLINE=1 HF_DATASETS_OFFLINE=1 TOKENIZERS_PARALLELISM=false
export PPL_CORPUS_MIRROR="$PWD/.gpu/corpora"
export PPL_CACHE_DIR="${PPL_CACHE_DIR:-/tmp/ppl-gpu-cache}"
for need in .gpu/corpora/Salesforce/wikitext/wikitext-2-raw-v1/test.parquet .gpu/tokenizer-smollm2/tokenizer.json; do
  [ -e "$need" ] || { echo "error: $need is missing; run 'make gpu-data' where the models and corpora are, and carry .gpu/" >&2; exit 2; }
done

SITE=/tmp/site
if ! "$PY" -c "import pydantic" 2>/dev/null; then
  ls .whl/*.whl >/dev/null 2>&1 || { echo "error: pydantic is missing and .whl/ holds no wheels; run 'make gpu-wheels' and carry .whl/" >&2; exit 2; }
  "$PY" -m pip install -q --no-index --no-deps --target "$SITE" .whl/*.whl ||
    "$PY" -c "import glob, zipfile; [zipfile.ZipFile(w).extractall('$SITE') for w in glob.glob('.whl/*.whl')]"  # no pip: a wheel is a zip
  export PYTHONPATH="$SITE${PYTHONPATH:+:$PYTHONPATH}"
fi
export PYTHONPATH="$PWD${PYTHONPATH:+:$PYTHONPATH}"

"$PY" -c "import sys, torch, transformers, accelerate; print(f'python {sys.version.split()[0]}, transformers {transformers.__version__}, accelerate {accelerate.__version__}')"
"$PY" -m harness.device_check --check-only || true
nvidia-smi --query-gpu=name,memory.total,driver_version --format=csv,noheader 2>/dev/null || true
exec timeout "${GPU_TIMEOUT:-570}" "$PY" benchmarks/gpu.py
