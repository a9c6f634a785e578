"""The default job on the real SmolLM2-135M: the CLI's record matches a plain reference loop."""

from __future__ import annotations

import json
import math
import os
import platform
import subprocess
import sys

import pandas as pd

from .conftest import MIRROR, REPO
from .reference import sliding_reference

# sha256 of "\n\n".join(rows) of WikiText-2 raw test, from the mirror's README
WIKITEXT2_TEST_SHA256 = "696cca6b65a171b0a358a4be6732cdfdf2dd6164a32e20fd70e3c13fc4dfae83"


def test_default_config_through_the_cli(tmp_path, smollm2):
    out = tmp_path / "results" / "smollm2"
    env = {**os.environ, "HF_HUB_OFFLINE": "1", "HF_DATASETS_OFFLINE": "1", "PPL_CORPUS_MIRROR": str(MIRROR)}
    proc = subprocess.run(
        [sys.executable, "-m", "harness", "run", "configs/smollm2-wikitext2.yaml", "corpus.max_tokens=1200",
         "eval.max_length=512", "eval.stride=256", "model.dtype=float32", "-o", str(out), "--no-progress"],
        cwd=REPO, env=env, capture_output=True, text=True, timeout=600,
    )
    assert proc.returncode == 0, proc.stderr[-3000:]
    assert "perplexity" in proc.stdout and "record:" in proc.stdout
    assert "precision  float32 -> body float32, head float32, log-sum-exp float32 (requested)" in proc.stdout
    record = json.loads((out / "result.json").read_text())
    assert record["corpus"]["text_sha256"] == WIKITEXT2_TEST_SHA256
    if platform.libc_ver()[0] == "glibc" and not any(k.startswith("MALLOC_") or k in ("GLIBC_TUNABLES", "PPL_ALLOCATOR", "LD_PRELOAD") for k in env):
        assert record["allocator"].startswith("glibc malloc keeping freed memory"), record["allocator"]
    assert record["protocol"] == {**record["protocol"], "protocol": "sliding", "max_length": 512, "stride": 256, "mode": "concat", "join": "\n\n"}

    model, tok = smollm2
    rows = pd.read_parquet(MIRROR / "Salesforce/wikitext/wikitext-2-raw-v1/test.parquet")["text"].tolist()
    ids = tok("\n\n".join(rows))["input_ids"][:1200]
    ref_sum, ref_count, ref_windows = sliding_reference(model, ids, 512, 256, "stream", tok.bos_token_id)
    assert record["scored_tokens"] == ref_count == 1199
    assert record["windows"] == ref_windows
    assert math.isclose(record["perplexity"], math.exp(ref_sum / ref_count), rel_tol=1e-6)
    # bytes counted on the scored text: everything after the first token
    first_token_bytes = len(tok.decode(ids[:1]).encode("utf-8"))
    scored_text = tok.decode(ids)
    assert abs(record["bytes"] - (len(scored_text.encode("utf-8")) - first_token_bytes)) <= 2
    table = pd.read_csv(tmp_path / "results" / "table.csv")
    assert table.perplexity[0] == record["perplexity"]
