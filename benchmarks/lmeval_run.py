"""lm-evaluation-harness on the same articles: its own ``wikitext`` task, read from the mirror.

The task is lm-eval's shipped ``wikitext.yaml`` (its detokenizer, its word and byte counts),
included as is; only the dataset source changes to the local Parquet mirror, since the hub is
unreachable here. ``HFLM`` gets the already-loaded model object, so both tools score the same
weights. Scoring time is the ``loglikelihood_rolling`` call alone; the tokens are counted (with
lm-eval's own ``tok_encode``) before the clock starts.

``add_bos_token=False``: the protocol scores a page's own tokens with no special tokens, after
the prefix token (docs/PROTOCOLS.md, section 4). lm-eval's default instead follows the
tokenizer, and a tokenizer that adds BOS (Gemma's) puts a BOS into the page, which lm-eval then
scores as a token, one per document: 3 extra tokens and a perplexity 0.7% higher on Gemma-3's
first three articles. SmolLM2's tokenizer adds nothing, so there the flag changes nothing.
"""

from __future__ import annotations

import math
import tempfile
import time
from pathlib import Path

from .cases import Case

TASK = "wikitext_mirror"


def task_dir(parquet: Path) -> Path:
    import lm_eval

    shipped = Path(lm_eval.__file__).parent / "tasks" / "wikitext" / "wikitext.yaml"
    folder = Path(tempfile.mkdtemp(prefix="lmeval-task-"))
    (folder / f"{TASK}.yaml").write_text(
        f"include: {shipped}\ntask: {TASK}\ndataset_path: parquet\ndataset_name: null\n"
        f"dataset_kwargs:\n  data_files:\n    test: {parquet}\ntraining_split: null\nvalidation_split: null\n"
    )
    return folder


def run_lm_eval(case: Case, model_dir: Path, parquet: Path) -> dict:
    import torch
    from lm_eval import simple_evaluate
    from lm_eval.models.huggingface import HFLM
    from lm_eval.tasks import TaskManager
    from transformers import AutoModelForCausalLM, AutoTokenizer

    t0 = time.perf_counter()
    tokenizer = AutoTokenizer.from_pretrained(model_dir)
    model = AutoModelForCausalLM.from_pretrained(model_dir, dtype=torch.float32).eval()
    lm = HFLM(pretrained=model, tokenizer=tokenizer, batch_size=case.batch_size, max_length=case.max_length, device="cpu",
              add_bos_token=False)
    load_s = time.perf_counter() - t0

    stats = {}
    rolling = lm.loglikelihood_rolling

    def timed(requests, disable_tqdm: bool = False):
        stats["tokens"] = sum(len(lm.tok_encode(r.args[0])) for r in requests)
        start = time.perf_counter()
        out = rolling(requests, disable_tqdm=True)
        stats["seconds"] = time.perf_counter() - start
        stats["sum_nll"] = -float(sum(out))
        return out

    lm.loglikelihood_rolling = timed
    tm = TaskManager(include_path=str(task_dir(parquet)), include_defaults=False)
    res = simple_evaluate(model=lm, tasks=[TASK], task_manager=tm, limit=case.documents, bootstrap_iters=0)
    metrics = res["results"][TASK]
    return {
        "scored_tokens": stats["tokens"], "sum_nll": stats["sum_nll"], "perplexity": math.exp(stats["sum_nll"] / stats["tokens"]),
        "word_perplexity": metrics["word_perplexity,none"], "load_s": load_s, "score_s": stats["seconds"],
    }
