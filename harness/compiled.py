"""``eval.compile``: the model's decoder layers compiled by inductor (regional compilation).

What is compiled is one decoder layer of each kind, not the whole model: every layer of a kind
runs the same code on weights of the same shapes, so one compiled layer serves all of them, with
each layer's weights passed in as inputs. Most models have one kind; Gemma-3 has two (sliding
and full attention, ``config.layer_types``). The rest of the body (embedding, mask, rotary
tables, final norm) stays eager: it is a few operations. What compiling fuses is the element-wise
work (norms, rotary, activation, residual adds); matrix products and attention run the same
kernels. Measured bf16, two CPU cores: SmolLM2 2.2-2.4 s per 4 x 1,024 batch compiled against
2.8-3.1 s eager; Gemma-3's 4,095-token bench slice 12.6 s against 14.4 s.

Two ways, tried in this order:

- **Ahead of time, cached on disk** (``packaged.py``; CPU, SDPA or Gemma-3's block attention):
  one package per kind of layer, built once per machine, loaded in milliseconds.
- **Just in time** (``torch.compile`` of each layer's call, dynamic shapes: one graph for every
  window length and batch size, nothing padded): for other models and devices (Gemma-3's block
  loop, used where transformers passes a mask, is kept out of the graph). It costs ~7 s per run
  with inductor's on-disk cache warm (~10-15 s cold) for SmolLM2, ~14 s (~45 s cold) for Gemma-3.

Both round a fused kernel's intermediate values to bf16 where the eager code does (``INDUCTOR``).

``eval.compile: auto`` (the default, ``decide``): compile whenever a cached package exists for
the model; otherwise when the run is long enough to pay for compiling (``AUTO_MIN_TOKENS`` window
tokens just in time, ``AUTO_BUILD_TOKENS`` to build a package). ``true`` compiles (building the
package if it can), ``false`` never does.

Inductor's own on-disk cache goes under the harness's cache (``$PPL_CACHE_DIR/inductor``) unless
``TORCHINDUCTOR_CACHE_DIR`` is set.

Where compilation is unavailable or fails (no C++ compiler, an unsupported model), the run says
so in one warning line and goes on uncompiled (or just in time, where only the package failed).
"""

from __future__ import annotations

import time
import warnings
import weakref
from dataclasses import dataclass

import torch

from .errors import HarnessWarning
from .files import first_line
from .packaged import INDUCTOR, Packaged, build_package, decoder_layers, end_padded, package_paths, packable, use_cache_dir
from .packaged import cached, variants  # noqa: F401 - the module's API: compiled.cached, compiled.variants

# Planned window tokens from which ``auto`` compiles just in time. Measured in bf16 on two CPU
# cores (``benchmarks/compile_gain.py``): SmolLM2 compiles in ~7 s with inductor's cache warm
# (~10-15 s cold) and then saves ~0.2 ms per window token (batch time 2.8 s -> 2.2 s at 4 x
# 1,024), so it breaks even near 30k tokens warm; Gemma-3 compiles in ~14 s warm (~45 s cold) and
# saves ~0.15 ms per token, breaking even near 90k (a Gemma-3 run between 65k and 90k loses up to
# ~4 s). The full WikiText-2 test split at L1024/S512 is ~570k window tokens.
AUTO_MIN_TOKENS = 65_536
# ... and from which it builds the ahead-of-time package when none is cached: 15-20 s for SmolLM2
# (~40 s with inductor's cache cold), paid once per machine; at ~0.2 ms saved per token this run
# alone pays for it from ~100-200k tokens.
AUTO_BUILD_TOKENS = 262_144

# model -> its compiled body (weakly keyed: goes with the model). Set by ``enable``.
_COMPILED: "weakref.WeakKeyDictionary[torch.nn.Module, Body]" = weakref.WeakKeyDictionary()


@dataclass(frozen=True)
class Decision:
    """Whether this run compiles, and why (the record's ``precision.compile``)."""

    on: bool
    reason: str
    build: bool = False  # may build the ahead-of-time package when none is cached

    def as_dict(self) -> dict:
        return {"on": self.on, "reason": self.reason}


def decide(setting: bool | str, planned_tokens: int, cached: bool = False) -> Decision:
    """``eval.compile`` (true, false or auto), the run's planned window tokens and whether a
    compiled package is cached for the model -> a decision."""
    if setting == "auto":
        if cached:
            return Decision(True, "auto: the compiled layers are cached for this model")
        if planned_tokens >= AUTO_BUILD_TOKENS:
            return Decision(True, f"auto: {planned_tokens:,} window tokens >= {AUTO_BUILD_TOKENS:,}, compiled and cached", build=True)
        if planned_tokens >= AUTO_MIN_TOKENS:
            return Decision(True, f"auto: {planned_tokens:,} window tokens >= {AUTO_MIN_TOKENS:,}")
        return Decision(False, f"auto: {planned_tokens:,} window tokens < {AUTO_MIN_TOKENS:,}, too short to pay for compiling")
    return Decision(bool(setting), "requested", build=bool(setting))


# ---------------------------------------------------------------------------------------------
# The body: the package where there is one, else just in time


class Body:
    """Runs the base model with each decoder layer's call going through its compiled form."""

    def __init__(self, model, decision: Decision):
        self.model = model
        self.decision = decision
        self.layers = decoder_layers(model)
        # the modules whose calls are replaced: the layers, or the whole body where none were found
        self.modules = list(self.layers) if self.layers is not None else [model.base_model]
        self.package: Packaged | None = None
        self.package_error: str | None = None
        self.started = False
        self.how = "not yet"
        self.failed = False
        # loading or building the package; just in time, the batches that compiled (their compute included)
        self.compile_seconds = 0.0

    def _start(self) -> None:
        """First batch: load (or build) the package, else set up compiling just in time."""
        self.started = True
        why = packable(self.model)
        if why is None:
            paths = package_paths(self.model)
            try:
                if self.decision.build:
                    build_package(self.model)
                if all(p.is_file() for p in paths.values()):
                    self.package = Packaged(self.model, paths)
                    self.how = f"ahead of time ({', '.join(p.name for p in paths.values())})"
                    return
            except Exception as err:  # noqa: BLE001 - the package is an optimisation: fall back to JIT
                self.package_error = f"{type(err).__name__}: {first_line(err, 160)}"
        use_cache_dir()
        self.fns = [torch.compile(m._call_impl, dynamic=True, options=dict(INDUCTOR)) for m in self.modules]
        self.how = "just in time"

    def __call__(self, input_ids: torch.Tensor, attention_mask: torch.Tensor | None) -> torch.Tensor:
        if self.failed:
            return eager(self.model, input_ids, attention_mask)
        first = not self.started
        if first:
            start = time.perf_counter()
            self._start()  # loading or building the package: counted whole
            self.compile_seconds += time.perf_counter() - start
        start, graphs = time.perf_counter(), _graph_count()
        try:
            if self.package is not None:
                self.package.causal = end_padded(attention_mask)
            fns = self.package.calls if self.package is not None else self.fns
            for module, fn in zip(self.modules, fns):
                module._compiled_call_impl = fn  # what nn.Module.compile() sets; undone below
            hidden = eager(self.model, input_ids, attention_mask)
        except Exception as err:  # noqa: BLE001 - any compiler failure means: run uncompiled
            line = first_line(err, 200)
            also = f"; ahead of time: {self.package_error}" if self.package_error else ""
            warnings.warn(f"eval.compile: compiling failed ({type(err).__name__}: {line}{also}); scoring uncompiled",
                          HarnessWarning, stacklevel=2)
            self.failed, self.how = True, "failed"
            hidden = None
        finally:
            for module in self.modules:
                module._compiled_call_impl = None
            if _graph_count() != graphs:  # just in time: a batch that compiled, its compute included
                self.compile_seconds += time.perf_counter() - start
        if hidden is None:
            return eager(self.model, input_ids, attention_mask)
        if first and self.package_error:
            warnings.warn(f"eval.compile: could not compile ahead of time ({self.package_error}); compiled just in time",
                          HarnessWarning, stacklevel=2)
        return hidden


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
        decision = Decision(decision, "requested", build=decision)
    if not decision.on:
        _COMPILED.pop(model, None)
        return decision
    old = _COMPILED.get(model)
    if old is not None and not old.failed:  # compiled by an earlier run (a model pool)
        old.compile_seconds = 0.0  # this run's seconds start at 0
        return decision
    why = available()
    if why:
        warnings.warn(f"eval.compile: torch.compile is unavailable ({why}); scoring uncompiled", HarnessWarning, stacklevel=2)
        return Decision(False, f"unavailable: {why}")
    _COMPILED[model] = Body(model, decision)
    return decision


def note_how(model, section: dict) -> None:
    """After scoring: add how the layers were compiled (ahead of time or just in time) to the
    record's ``precision.compile`` section of a run that compiled."""
    b = _COMPILED.get(model)
    if section.get("on") and b is not None:
        section["how"] = b.how


def body(model, any_state: bool = False) -> Body | None:
    """The compiled body of ``model`` if ``enable`` made one (and it has not failed, unless
    ``any_state``), else None."""
    b = _COMPILED.get(model)
    return None if b is None or (b.failed and not any_state) else b
