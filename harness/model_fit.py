"""Whether a model is the one its files describe, said in one line where it is not.

transformers initialises a weight the config needs and the file lacks at random (and drops one
the model has no place for) with only a multi-line warning, and fails deep inside on a config
whose values cannot make a model; ``models.py`` loads through these checks
(``tests/test_model_fit.py``)."""

from __future__ import annotations

import contextlib

from . import files
from .errors import HarnessError
from .model_source import ModelSource


def config_refusals() -> tuple:
    """What transformers raises for a config.json whose values cannot make a model (heads that do
    not divide the hidden size, zero heads): huggingface_hub's strict-dataclass errors, arithmetic."""
    try:
        from huggingface_hub.errors import StrictDataclassError
    except ImportError:
        return (ArithmeticError,)
    return (ArithmeticError, StrictDataclassError)


def load_failure(err: BaseException) -> str:
    """The first line of what went wrong (of its cause, for a strict-dataclass error wrapping it)."""
    cause = err.__cause__ if isinstance(err, config_refusals()) and isinstance(err.__cause__, Exception) else err
    if isinstance(cause, KeyError):  # a name transformers has no entry for: hidden_act: "no-such-act"
        return f"the model's config names {files.first_line(cause, 200)}, which transformers does not know"
    zero = " (a size of 0?)" if isinstance(cause, ZeroDivisionError) else ""
    return files.first_line(cause, 300).rstrip(".") + zero


@contextlib.contextmanager
def no_load_report():
    """Without transformers' multi-line table of weights missing, unexpected or of another shape
    (``check_weights`` turns them into one line and refuses the model)."""
    import logging

    drop = type("DropLoadReport", (logging.Filter,), {"filter": lambda self, r: "LOAD REPORT" not in str(r.msg)})()
    logger = logging.getLogger("transformers.modeling_utils")
    logger.addFilter(drop)
    try:
        yield
    finally:
        logger.removeFilter(drop)


def check_weights(info: dict, src: ModelSource) -> None:
    """Refuse a model whose weights do not fit its config: a weight the model needs and the file
    lacks would be scored with random values (transformers initialises it and only warns), one the
    file holds and the model has no place for would be dropped, one of another shape replaced."""
    missing, unexpected = sorted(info.get("missing_keys") or ()), sorted(info.get("unexpected_keys") or ())
    mismatched = sorted(f"{k} {tuple(a)} vs {tuple(b)}" for k, a, b in info.get("mismatched_keys") or ())
    if not (missing or unexpected or mismatched):
        return
    parts = [f"{len(v)} {what} ({', '.join(v[:3])}{', ...' if len(v) > 3 else ''})" for v, what in
             ((missing, "missing"), (unexpected, "unexpected"), (mismatched, "of another shape")) if v]
    key, where, made = (("model.gguf_file", f"{src.folder}/{src.gguf_file}", "its header") if src.gguf_file
                        else ("model.name_or_path", src.folder, "its config.json"))
    raise HarnessError(f"{key}: the weights in {where} do not fit the model {made} describes: weights "
                       f"{'; '.join(parts)}; fix the config or give the weights it was saved with")
