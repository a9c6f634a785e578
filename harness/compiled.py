"""``eval.compile``: the model's decoder layers through ``torch.compile`` (regional compilation).

What is compiled is one decoder layer, not the whole model: every layer of a model runs the same
code on weights of the same shapes, so the one compiled graph serves all of them (dynamo treats
the weights as inputs), and compiling costs one layer's worth of tracing instead of the whole
body's (SmolLM2: ~10 s cold instead of ~45 s; ~5-7 s with inductor's on-disk cache warm). The rest
of the body (embedding, mask, rotary tables, final norm) stays eager: it is a few operations.

The graph is compiled with dynamic shapes (``dynamic=True``): one graph serves every window
length and batch size, so nothing is padded and a tail batch does not compile again. Measured on
SmolLM2 bf16, batch 4 x 1,024: 2.17 s per batch with static shapes, 2.22 s dynamic, 2.79 s eager
(medians of 6, alternating). What it fuses is the element-wise
work (norms, rotary, activation, residual adds); matrix products and attention run the same kernels.

``eval.compile: auto`` (the default) compiles when the run is long enough for the compile to pay
for itself: at least ``AUTO_MIN_TOKENS`` window tokens planned (see there). Short runs (a few
thousand tokens) stay eager.

Inductor's on-disk cache goes under the harness's cache (``$PPL_CACHE_DIR/inductor``, default
``~/.cache/ppl-harness/inductor``) unless ``TORCHINDUCTOR_CACHE_DIR`` is set, so the second run on
a machine finds its kernels already built.

Where compilation is unavailable or fails (no C++ compiler, an unsupported model), the first
batch says so in one warning line and the run goes on uncompiled.
"""

from __future__ import annotations

import os
import time
import warnings
import weakref
from dataclasses import dataclass
from pathlib import Path

import torch

# Planned window tokens from which ``auto`` compiles. Measured in bf16 on two CPU cores
# (``benchmarks/compile_gain.py``): SmolLM2 compiles in ~7 s with inductor's cache warm (~10-15 s
# cold) and then saves ~0.2 ms per window token (batch time 2.8 s -> 2.2 s at 4 x 1,024), so it
# breaks even near 30k tokens warm; Gemma-3 compiles in ~14 s warm (~45 s cold) and saves ~0.15 ms
# per token, breaking even near 90k (a Gemma-3 run between 65k and 90k loses up to ~4 s). The full
# WikiText-2 test split at L1024/S512 is ~570k window tokens.
AUTO_MIN_TOKENS = 65_536

# model -> its compiled body (weakly keyed: goes with the model). Set by ``enable``.
_COMPILED: "weakref.WeakKeyDictionary[torch.nn.Module, Body]" = weakref.WeakKeyDictionary()


@dataclass(frozen=True)
class Decision:
    """Whether this run compiles, and why (the record's ``precision.compile``)."""

    on: bool
    reason: str

    def as_dict(self) -> dict:
        return {"on": self.on, "reason": self.reason}


def decide(setting: bool | str, planned_tokens: int) -> Decision:
    """``eval.compile`` (true, false or auto) and the run's planned window tokens -> a decision."""
    if setting == "auto":
        if planned_tokens >= AUTO_MIN_TOKENS:
            return Decision(True, f"auto: {planned_tokens:,} window tokens >= {AUTO_MIN_TOKENS:,}")
        return Decision(False, f"auto: {planned_tokens:,} window tokens < {AUTO_MIN_TOKENS:,}, too short to pay for compiling")
    return Decision(bool(setting), "requested")


def decoder_layers(model) -> torch.nn.ModuleList | None:
    """The model's stack of decoder layers: the ``ModuleList`` of the base model whose members are
    all of one class and hold the most parameters (``layers`` for Llama/Gemma, ``h`` for GPT-2)."""
    best, best_n = None, 0
    for module in model.base_model.modules():
        if isinstance(module, torch.nn.ModuleList) and len(module) > 1 and len({type(m) for m in module}) == 1:
            n = sum(p.numel() for p in module.parameters())
            if n > best_n:
                best, best_n = module, n
    return best


def use_cache_dir() -> None:
    """Point inductor's on-disk cache at the harness's cache, unless the user chose one."""
    if "TORCHINDUCTOR_CACHE_DIR" not in os.environ:
        root = Path(os.environ.get("PPL_CACHE_DIR") or Path.home() / ".cache" / "ppl-harness")
        os.environ["TORCHINDUCTOR_CACHE_DIR"] = str(root / "inductor")


class Body:
    """Runs the base model with each decoder layer's call going through its compiled graph."""

    def __init__(self, model):
        self.model = model
        self.layers = decoder_layers(model)
        if self.layers is None:
            self.fns = [torch.compile(model.base_model._call_impl, dynamic=True)]
            self.modules = [model.base_model]
        else:
            self.fns = [torch.compile(layer._call_impl, dynamic=True) for layer in self.layers]
            self.modules = list(self.layers)
        self.failed = False
        self.compile_seconds = 0.0  # wall time of the calls that compiled a graph (their compute included)

    def __call__(self, input_ids: torch.Tensor, attention_mask: torch.Tensor | None) -> torch.Tensor:
        if self.failed:
            return eager(self.model, input_ids, attention_mask)
        graphs = _graph_count()
        start = time.perf_counter()
        for module, fn in zip(self.modules, self.fns):
            module._compiled_call_impl = fn  # what nn.Module.compile() sets; undone below
        try:
            return eager(self.model, input_ids, attention_mask)
        except Exception as err:  # noqa: BLE001 - any compiler failure means: run uncompiled
            first = (str(err).strip().splitlines() or [type(err).__name__])[0][:200]
            warnings.warn(f"eval.compile: torch.compile failed ({type(err).__name__}: {first}); scoring uncompiled", stacklevel=2)
            self.failed = True
        finally:
            for module in self.modules:
                module._compiled_call_impl = None
            if _graph_count() != graphs:
                self.compile_seconds += time.perf_counter() - start
        return eager(self.model, input_ids, attention_mask)


def _graph_count() -> int:
    from torch._dynamo.utils import counters

    return counters["stats"]["unique_graphs"]


def eager(model, input_ids, attention_mask) -> torch.Tensor:
    return model.base_model(input_ids=input_ids, attention_mask=attention_mask, use_cache=False).last_hidden_state


def available() -> str | None:
    """None if torch.compile can run here, else why not."""
    try:
        import torch._dynamo

        if not torch._dynamo.is_dynamo_supported():
            return "dynamo does not support this Python"
    except Exception as err:  # noqa: BLE001
        return f"{type(err).__name__}: {err}"
    return None


def enable(model, decision: Decision | bool) -> Decision:
    """Compile ``model``'s layers for scoring, or drop a compiled body; the decision as it stands."""
    if isinstance(decision, bool):
        decision = Decision(decision, "requested")
    if not decision.on:
        _COMPILED.pop(model, None)
        return decision
    if model in _COMPILED:  # compiled by an earlier run (a model pool): this run's seconds start at 0
        _COMPILED[model].compile_seconds = 0.0
        return decision
    why = available()
    if why:
        warnings.warn(f"eval.compile: torch.compile is unavailable ({why}); scoring uncompiled", stacklevel=2)
        return Decision(False, f"unavailable: {why}")
    use_cache_dir()
    _COMPILED[model] = Body(model)
    return decision


def body(model, any_state: bool = False) -> Body | None:
    """The compiled body of ``model`` if ``enable`` made one (and it has not failed, unless
    ``any_state``), else None."""
    b = _COMPILED.get(model)
    return None if b is None or (b.failed and not any_state) else b
