"""``eval.compile``: the model body through ``torch.compile``, on a few fixed window shapes.

A compiled graph is specialised to its input shape, and every new shape compiles again (tens of
seconds on a CPU). Windows are therefore right-padded up to a width bucket (a multiple of
``BUCKET`` tokens, at most the window length), so a run meets a handful of shapes: the full
windows, and the tail. Under a causal mask with the padding masked out, a real position never
sees a pad, so padding cannot change a number (the tests hold the compiled path to the eager one).

Where compilation is unavailable or fails (no C++ compiler, an unsupported model), the first
batch says so in one warning line and the run goes on uncompiled.
"""

from __future__ import annotations

import warnings
import weakref

import torch

BUCKET = 256  # window widths are padded up to a multiple of this

# model -> its compiled body (weakly keyed: goes with the model). Set by ``enable``.
_COMPILED: "weakref.WeakKeyDictionary[torch.nn.Module, Body]" = weakref.WeakKeyDictionary()


class Body:
    """Calls the compiled base model on bucket-padded inputs; last hidden states at the real width."""

    def __init__(self, model, max_width: int | None):
        self.model = model
        self.max_width = max_width
        self.compiled = torch.compile(model.base_model, dynamic=False)
        self.failed = False

    def width(self, t: int) -> int:
        w = -(-t // BUCKET) * BUCKET
        return min(w, self.max_width) if self.max_width and t <= self.max_width else w

    def __call__(self, input_ids: torch.Tensor, attention_mask: torch.Tensor | None) -> torch.Tensor:
        b, t = input_ids.shape
        if self.failed:
            return eager(self.model, input_ids, attention_mask)
        w = self.width(t)
        ids = input_ids.new_zeros(b, w)
        ids[:, :t] = input_ids
        mask = input_ids.new_zeros(b, w)
        mask[:, :t] = 1 if attention_mask is None else attention_mask
        try:
            hidden = self.compiled(input_ids=ids, attention_mask=mask, use_cache=False).last_hidden_state
        except Exception as err:  # noqa: BLE001 - any compiler failure means: run uncompiled
            first = (str(err).strip().splitlines() or [type(err).__name__])[0][:200]
            warnings.warn(f"eval.compile: torch.compile failed ({type(err).__name__}: {first}); scoring uncompiled", stacklevel=2)
            self.failed = True
            return eager(self.model, input_ids, attention_mask)
        return hidden[:, :t]


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


def enable(model, on: bool, max_width: int | None = None) -> bool:
    """Compile ``model``'s body for scoring (``on``) or drop a compiled one; True if compiled."""
    if not on:
        _COMPILED.pop(model, None)
        return False
    if model in _COMPILED:
        return True
    why = available()
    if why:
        warnings.warn(f"eval.compile: torch.compile is unavailable ({why}); scoring uncompiled", stacklevel=2)
        return False
    _COMPILED[model] = Body(model, max_width)
    return True


def body(model) -> Body | None:
    """The compiled body of ``model`` if ``enable`` made one (and it has not failed), else None."""
    b = _COMPILED.get(model)
    return None if b is None or b.failed else b
