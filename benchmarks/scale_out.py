"""Streaming memory and token-cache time on a corpus several times WikiText-2's test split.

    python benchmarks/scale_out.py [--repeat 5] [--work /tmp/ppl-scale-out]

Builds the tiny random model of the tests (its small vocabulary makes scoring cheap, so the
corpus side dominates), writes WikiText-2 test repeated ``--repeat`` times to a parquet file,
and runs ``python -m harness run`` in a fresh process for each case (so each peak RSS is its
own): materialised vs streamed (token cache off), then a cache miss and a cache hit.
Prints one line per run from its record.
"""

from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
from pathlib import Path

import pyarrow as pa
import pyarrow.parquet as pq
import yaml

REPO = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(REPO))


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--repeat", type=int, default=5)
    ap.add_argument("--work", type=Path, default=Path("/tmp/ppl-scale-out"))
    args = ap.parse_args()
    from tests.conftest import _train_tokenizer, build_tiny_model

    work = args.work
    (work / "model").mkdir(parents=True, exist_ok=True)
    tok = _train_tokenizer(work / "model")
    build_tiny_model(work / "model", len(tok))
    mirror = Path(os.environ.get("PPL_CORPUS_MIRROR", REPO.parent / "shared" / "corpora"))
    rows = pq.read_table(mirror / "Salesforce/wikitext/wikitext-2-raw-v1/test.parquet").column("text").to_pylist()
    corpus = work / f"wikitext2-x{args.repeat}.parquet"
    pq.write_table(pa.table({"text": rows * args.repeat}), corpus, row_group_size=2048)
    print(f"corpus: {corpus} ({corpus.stat().st_size / 2**20:.1f} MiB parquet, {len(rows) * args.repeat} rows, "
          f"{sum(len(r) for r in rows) * args.repeat / 1e6:.1f} M characters)")
    config = {
        "model": {"name_or_path": str(work / "model"), "device": "cpu"},
        "corpus": {"path": str(corpus), "text_field": "text"},
        "eval": {"protocol": "gptq", "max_length": 512, "batch_size": 16, "bootstrap": 0},
        "output": {"save_windows": False},
    }
    (work / "config.yaml").write_text(yaml.safe_dump(config))
    env = {**os.environ, "OMP_NUM_THREADS": "1", "PPL_CACHE_DIR": str(work / "cache"), "PYTHONPATH": str(REPO)}
    cases = [
        ("materialised", ["corpus.streaming=false", "corpus.cache=false"]),
        ("streamed", ["corpus.streaming=true", "corpus.cache=false"]),
        ("cache miss", ["corpus.cache=true"]),
        ("cache hit", ["corpus.cache=true"]),
    ]
    subprocess.run(["rm", "-rf", str(work / "cache"), str(work / "results")], check=True)
    for name, overrides in cases:
        out = work / "results" / name.replace(" ", "-")
        cmd = [sys.executable, "-m", "harness", "run", str(work / "config.yaml"), "-o", str(out), "--no-progress", *overrides]
        subprocess.run(cmd, cwd=REPO, env=env, check=True, capture_output=True)
        r = json.loads((out / "result.json").read_text())
        print(f"{name:>13}: peak RSS {r['peak_memory_bytes'] / 2**20:7.0f} MiB  corpus step {r['corpus_seconds']:6.1f} s  "
              f"wall {r['wall_seconds']:6.1f} s  tokens {r['corpus']['tokens']:,}  ppl {r['perplexity']:.6f}  "
              f"cache hit {r['corpus']['token_cache']['hit']}")


if __name__ == "__main__":
    main()
