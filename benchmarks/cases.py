"""What is benchmarked: the cases, and the models they use, prepared once into a local cache.

Every case names a shipped config (its model and corpus) and the window settings to run. Each
(case, tool) runs in its own subprocess so its peak resident memory can be read from outside.

The GGUF models are dequantized by transformers on every load (minutes for Gemma-3 on two busy
cores), so ``prepare`` does it once and saves the float32 weights and the tokenizer as a plain
safetensors folder under ``.cache/bench-models``; every tool then loads that same folder. Load
time is reported, and excluded from tokens per second.
"""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path

REPO = Path(__file__).resolve().parent.parent
CACHE = REPO / ".cache" / "bench-models"
DOC_LEVEL = "EleutherAI/wikitext_document_level"

MODELS = {"smollm2": REPO / "configs" / "smollm2-wikitext2.yaml", "gemma3": REPO / "configs" / "gemma3-wikitext2.yaml"}


@dataclass(frozen=True)
class Comparison:
    """One table row pair: ``tool`` against ``baseline`` (tool names as in ``Case.tools``)."""

    kind: str  # "default vs default" or "same precision (bf16)"
    tool: str
    baseline: str | None
    speedup_target: float | None = None  # ratio of median tokens/s
    peak_fraction_target: float | None = None  # achieved FLOP/s over the measured bf16 GEMM peak


@dataclass(frozen=True)
class Case:
    name: str
    model: str  # key of MODELS
    protocol: str  # "sliding" (vs the HF guide's loop) or "lm-eval" (vs lm-evaluation-harness)
    max_length: int
    stride: int
    batch_size: int
    tokens: int  # sliding: first N tokens of the WikiText-2 stream
    documents: int = 0  # lm-eval: first N articles of the document-level split
    memory_limit_gb: float | None = None  # target for the harness process's peak RSS
    comparisons: tuple = ()  # of Comparison; tool names are TOOL:DTYPE
    overrides: tuple = ()  # extra harness config overrides (run.py --set), e.g. eval.compile=true
    in_default: bool = True  # in a plain `make bench` (else only with --only naming it)

    @property
    def tools(self) -> tuple[str, ...]:
        """Every tool run, the float32 harness (the ΔPPL reference) first."""
        names = ["harness:float32"] if any(c.baseline for c in self.comparisons) else []
        for c in self.comparisons:
            names += [c.tool] + ([c.baseline] if c.baseline else [])
        return tuple(dict.fromkeys(names))

    @property
    def timed(self) -> tuple[str, ...]:
        """The tools whose speed is compared (run ``--repeats`` times); the others run once."""
        return tuple(dict.fromkeys(t for c in self.comparisons if c.baseline for t in (c.tool, c.baseline)))


# The harness as shipped (model.dtype: auto) against the other tools as shipped (float32), and
# everything in bf16. ``harness:auto`` is the user's default: bf16 where the CPU computes it
# natively (the precision policy), float32 elsewhere.
def _sliding(default_target: float, bf16_target: float, peak: float | None = None) -> tuple:
    return (
        Comparison("default vs default", "harness:auto", "hf-guide:float32", default_target),
        Comparison("same precision (bf16)", "harness:bfloat16", "hf-guide:bfloat16", bf16_target, peak),
    )


# Token slices sized so `make bench` takes minutes on two cores; --scale multiplies them. A
# sliding slice's first window scores every position in every tool, later ones only the stride:
# with S256 that first window is 1 of 13 at 4,096 tokens (1 of 5 at 2,048, where it made the
# ratio 1.7x against 2.75x at 8,192; the full split has 1,100 windows). SmolLM2's slice is 16,384
# tokens (31 windows; the full split has ~560). The lm-eval cases take the first three articles
# (9,728 SmolLM2 tokens); one article alone is two windows.
#
# Before the cases run, each model's layers are compiled ahead of time into the harness's cache
# (as `ppl compile` or any long run does once per machine; the time is printed), so the harness's
# default (eval.compile: auto) runs them compiled at every length.
CASES = [
    Case("smollm2 L1024 S512", "smollm2", "sliding", 1024, 512, 4, tokens=16384, comparisons=_sliding(3.5, 1.3, 0.6)),
    Case("gemma3 L1024 S256", "gemma3", "sliding", 1024, 256, 4, tokens=4096, comparisons=_sliding(5.0, 2.0)),
    Case("gemma3 L2048 b8", "gemma3", "sliding", 2048, 2048, 8, tokens=8 * 2048, memory_limit_gb=3.5,
         comparisons=(Comparison("default (memory)", "harness:auto", None),)),
    Case("smollm2 lm-eval L1024", "smollm2", "lm-eval", 1024, 1024, 4, tokens=0, documents=3,
         comparisons=(Comparison("default vs default", "harness:auto", "lm_eval:float32", 3.0),)),
    # kept out of a plain run so that `make bench` stays under ~20 minutes: --only "gemma3 lm-eval"
    Case("gemma3 lm-eval L1024", "gemma3", "lm-eval", 1024, 1024, 4, tokens=0, documents=3, in_default=False,
         comparisons=(Comparison("default vs default", "harness:auto", "lm_eval:float32", 3.0),)),
]


def cached_model(key: str) -> Path:
    return CACHE / key


def prepare(key: str) -> Path:
    """Dequantize the config's GGUF model once into ``.cache/bench-models/KEY`` (idempotent)."""
    folder = cached_model(key)
    if (folder / ".done").is_file():
        return folder
    from harness.config import load_config
    from harness.models import load_model, load_tokenizer

    cfg = load_config(MODELS[key]).model.model_copy(update={"dtype": "float32"})  # the float32 baseline weights
    tok = load_tokenizer(cfg)
    model = load_model(cfg, device="cpu")
    # transformers marks a GGUF-loaded model "quantized" and refuses to save it, but its weights
    # are already dequantized to float32: drop the marker, the tensors are what we save
    model.hf_quantizer = None
    if hasattr(model.config, "quantization_config"):
        del model.config.quantization_config
    folder.mkdir(parents=True, exist_ok=True)
    model.save_pretrained(folder, safe_serialization=True)
    tok.save_pretrained(folder)
    from transformers import AutoTokenizer

    probe = "The tower is 324 metres (1,063 ft) tall, about the same height as an 81-storey building.\n\n = Heading = \n"
    if AutoTokenizer.from_pretrained(folder)(probe)["input_ids"] != tok(probe)["input_ids"]:
        raise RuntimeError(f"the saved tokenizer of {key} tokenizes differently from the GGUF one")
    (folder / ".done").write_text("ok\n")
    return folder
