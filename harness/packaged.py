"""``eval.compile`` ahead of time: one decoder layer of each kind, exported and compiled by
AOTInductor into a package cached on disk, then run for every layer of that kind.

One layer of each kind is exported with ``torch.export`` (batch and length dynamic) and
compiled by AOTInductor into a package under ``$PPL_CACHE_DIR/compiled/`` (default
``~/.cache/ppl-harness/compiled``), keyed by the layer's class and the model's config, attention
function, kind, dtype, torch/transformers versions, inductor options and the CPU's vector ISA.
Building takes 15-20 s for SmolLM2 and 27-42 s for Gemma-3's two kinds on two cores, once per
machine; loading takes milliseconds, so a run that finds them pays nothing for compiling.

The packages run every batch whose rows are padded at the end only (the harness pads so): under
a causal mask no real position sees a later pad, so the package leaves transformers' padding
mask out; a batch padded any other way runs its layers eagerly. Gemma-3's sliding kind traces
the banded attention (``attention.banded``) and takes whole blocks of 128 positions, at least
two: a call is padded up to them (at the end, where causality hides the padding), and a shorter
one runs eagerly.
"""

from __future__ import annotations

import hashlib
import json
import os
import warnings
from pathlib import Path

import torch

from .files import cache_root

FORMAT = 1  # of a package's inputs (hidden, cos, sin, *tensors); a change makes new cache keys
# Inductor rounds a fused kernel's intermediate values to bf16 wherever the eager code does
# (``emulate_precision_casts``), so a compiled bf16 layer rounds as the eager one does. Without
# it, Gemma-3 bf16 (L1024/S256, 4,095 tokens) moved from -0.031% (eager) to -0.149% off the
# float32 perplexity, against -0.075% with it (SmolLM2, 16,383 tokens: -0.024% eager, +0.045%
# without, +0.055% with; bf16-rounded weights alone, float32 arithmetic: Gemma-3 -0.065%).
# No effect on float32 layers.
INDUCTOR = {"emulate_precision_casts": True}


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
    os.environ.setdefault("TORCHINDUCTOR_CACHE_DIR", str(cache_root() / "inductor"))


class _Layer(torch.nn.Module):
    """What is exported: one decoder layer as a function of its input and its own tensors."""

    def __init__(self, layer: torch.nn.Module, names: list[str]):
        super().__init__()
        self.layer, self.names = layer, names

    def forward(self, hidden, cos, sin, tensors: list):
        state = dict(zip(self.names, tensors))
        return torch.func.functional_call(self.layer, state, (hidden,), {"position_embeddings": (cos, sin), "attention_mask": None})


def _tensor_names(layer) -> list[str]:
    return sorted([n for n, _ in layer.named_parameters()] + [n for n, _ in layer.named_buffers()])


def _tensors(layer, names: list[str]) -> list[torch.Tensor]:
    own = {**dict(layer.named_parameters()), **dict(layer.named_buffers())}
    return [own[n].detach() for n in names]


def _rotary(model):
    return getattr(model.base_model, "rotary_emb", None)


def _text_config(model):
    cfg = model.config
    return cfg.get_text_config() if hasattr(cfg, "get_text_config") else cfg


def variants(model) -> dict[str, list[int]]:
    """The layers' indices by kind, one package per kind: Gemma-3's ``sliding_attention`` and
    ``full_attention`` layers (``config.layer_types``) compute different things from tensors of
    the same shapes; other models have one kind, ``layer``."""
    n = len(decoder_layers(model))
    types = getattr(_text_config(model), "layer_types", None)
    if not types or len(types) < n or len(set(types[:n])) == 1:
        return {"layer": list(range(n))}
    groups: dict[str, list[int]] = {}
    for i in range(n):
        groups.setdefault(str(types[i]), []).append(i)
    return groups


def packable(model) -> str | None:
    """None if the layers can be compiled ahead of time, else why not."""
    from . import attention

    layers = decoder_layers(model)
    if layers is None:
        return "no stack of decoder layers found"
    impl = getattr(model.config, "_attn_implementation", None)
    if impl not in ("sdpa", attention.NAME, attention.CAUSAL):
        return f"attention {impl!r} (only sdpa, {attention.NAME} and {attention.CAUSAL} are packaged)"
    text = _text_config(model)
    if getattr(text, "use_bidirectional_attention", False) or getattr(text, "attn_logit_softcapping", None):
        return "bidirectional or soft-capped attention"
    if _rotary(model) is None:
        return "no rotary table module (rotary_emb)"
    tensors = [t for m in (layers, _rotary(model)) for t in (*m.parameters(), *m.buffers())]
    if any(t.device.type != "cpu" for t in tensors) or any(hasattr(m, "_hf_hook") for m in layers.modules()):
        return "not on the CPU (or offloaded)"
    import inspect

    if "position_embeddings" not in inspect.signature(type(layers[0]).forward).parameters:
        return "the layer takes no position_embeddings"
    return None


# config keys that say where a model came from or how it is called, not what its layer computes
# (the dtype is keyed from the weights themselves)
_NOT_SHAPE = {"_name_or_path", "transformers_version", "architectures", "dtype", "torch_dtype", "_commit_hash",
              "use_cache", "output_attentions", "output_hidden_states", "return_dict"}


def package_paths(model) -> dict[str, Path]:
    """Where the package of each kind of this model's layers (class, config, attention, kind,
    dtype, versions, CPU ISA) is cached. The ISA part is torch's capability level plus the CPU's
    native-bf16 flags: torch says ``AVX512`` on both an AMX Xeon and an AMD Zen 4 (AVX-512 BF16, no
    AMX), and a package built on the one may carry instructions the other does not have."""
    import transformers

    from . import activation, attention, causal_kernel, norm, precision

    layers = decoder_layers(model)
    impl = getattr(model.config, "_attn_implementation", None)
    # the harness's causal kernel is traced into the package where it runs (a call of its op)
    kernel = causal_kernel.fingerprint() if attention.kernel_runs(model) else None
    mlp_kernel = activation.fingerprint() if activation.kernel_runs(model) else None
    dtype = next(layers.parameters()).dtype
    cfg = {k: v for k, v in model.config.to_dict().items() if k not in _NOT_SHAPE}
    kinds = variants(model)
    paths = {}
    for kind in kinds:
        key = {"format": FORMAT, "layer": f"{type(layers[0]).__module__}.{type(layers[0]).__qualname__}", "config": cfg,
               "attention": impl, "attention_kernel": kernel, "rotary_in_kernel": attention.rotary_fused(model), "activation_kernel": mlp_kernel,
               "norm_kernel": norm.fingerprint() if norm.kernel_runs(model) else None, "kind": kind, "inductor": INDUCTOR,
               "dtype": str(dtype), "torch": torch.__version__, "transformers": transformers.__version__,
               "isa": [torch.backends.cpu.get_cpu_capability(), *precision.cpu_bf16_flags()], "tensors": _tensor_names(layers[0])}
        digest = hashlib.sha256(json.dumps(key, sort_keys=True, default=str).encode()).hexdigest()[:20]
        name = "-".join([cfg.get("model_type", "model"), str(dtype).removeprefix("torch."), *([kind] if len(kinds) > 1 else []), digest])
        paths[kind] = cache_root() / "compiled" / f"{name}.pt2"
    return paths


def cached(model) -> bool:
    """Compiled packages for this model are on disk (and it can use them)."""
    return packable(model) is None and all(p.is_file() for p in package_paths(model).values())


def _window(layer) -> int | None:
    return getattr(getattr(layer, "self_attn", None), "sliding_window", None)


def _lengths(model, kind: str) -> tuple[int, int]:
    """(multiple, shortest) input length of a kind's package. A sliding-window kind takes whole
    query blocks of its banded attention, at least two (``Packaged.run`` pads a call up to a
    whole block; shorter calls run eagerly); other kinds take any length from 2."""
    from . import attention

    window = _window(decoder_layers(model)[variants(model)[kind][0]])
    if not window:
        return 1, 2
    step = attention.block_size(window)
    return step, 2 * step


def _example(model, kind: str, batch: int = 2, length: int = 64):
    layer = decoder_layers(model)[variants(model)[kind][0]]
    p = next(layer.parameters())
    g = torch.Generator().manual_seed(0)
    hidden = torch.randn(batch, length, _text_config(model).hidden_size, generator=g).to(p.dtype)
    rotary, positions = _rotary(model), torch.arange(length)[None]
    import inspect

    if "layer_type" in inspect.signature(type(rotary).forward).parameters:  # Gemma-3: a table per kind of layer
        cos, sin = rotary(hidden, positions, kind)
    else:
        cos, sin = rotary(hidden, positions)
    return hidden, cos, sin


def build_package(model) -> list[Path]:
    """Export one decoder layer of each kind and compile it with AOTInductor into the cache
    (atomically); kinds already cached are kept."""
    from torch.export import Dim

    layers = decoder_layers(model)
    names = _tensor_names(layers[0])
    longest = max(int(getattr(_text_config(model), "max_position_embeddings", 0) or 2**15), 64)
    batch = Dim("batch", min=1, max=4096)
    use_cache_dir()
    from torch._inductor import aoti_compile_and_package

    kinds = variants(model)
    built = []
    for kind, path in package_paths(model).items():
        if path.is_file():
            continue
        layer = layers[kinds[kind][0]]
        multiple, shortest = _lengths(model, kind)
        if multiple == 1:
            length = Dim("length", min=shortest, max=longest)
        else:  # whole blocks: the banded attention's block count is then the length over the block
            length = multiple * Dim("blocks", min=shortest // multiple, max=-(-longest // multiple))
        hidden, cos, sin = _example(model, kind, length=max(64, 3 * multiple))
        with torch.no_grad():
            program = torch.export.export(
                _Layer(layer, names), (hidden, cos, sin, _tensors(layer, names)),
                dynamic_shapes=({0: batch, 1: length}, {1: length}, {1: length}, [None] * len(names)),
            )
        path.parent.mkdir(parents=True, exist_ok=True)
        tmp = path.with_name(f".{path.stem}.{os.getpid()}.tmp.pt2")
        try:
            with warnings.catch_warnings():
                warnings.simplefilter("ignore", FutureWarning)  # torch's own deprecation notes, not the user's
                aoti_compile_and_package(program, package_path=str(tmp), inductor_configs=dict(INDUCTOR))
            os.replace(tmp, path)  # two processes building at once: each writes whole, the last wins
        finally:
            tmp.unlink(missing_ok=True)
        built.append(path)
    return built


class Packaged:
    """The cached packages, each layer run through its kind's package with its own tensors.

    Only batches whose rows are unpadded or padded at the end run through them (``causal``, set
    by ``Body`` per batch): the package computes the causal (and sliding-window) mask itself, and
    a pad at the end of a row is seen by no real position of that row, so transformers' mask
    says nothing about the real positions that the package does not already know (the padded
    positions' outputs differ, and are never scored). Other batches run their layers eagerly.
    """

    def __init__(self, model, paths: dict[str, Path]):
        self.loaders = {kind: torch._C._aoti.AOTIModelPackageLoader(str(p), "model", False, 1, -1) for kind, p in paths.items()}
        self.layers = decoder_layers(model)
        kinds = variants(model)
        self.kind = {i: kind for kind, idx in kinds.items() for i in idx}
        self.lengths = {kind: _lengths(model, kind) for kind in kinds}
        names = _tensor_names(self.layers[0])
        self.tensors = [_tensors(layer, names) for layer in self.layers]
        self.causal = False
        for kind in kinds:
            self.check(model, kind)
        self.calls = [self._call(i, layer) for i, layer in enumerate(self.layers)]

    def takes(self, i: int, length: int) -> bool:
        return length >= self.lengths[self.kind[i]][1]

    def run(self, i: int, hidden, cos, sin) -> torch.Tensor:
        """Layer ``i`` on [B, T, H] hidden states; T padded up to the kind's multiple (causal:
        the padded positions come last, and no earlier position sees them)."""
        kind, length = self.kind[i], hidden.shape[1]
        extra = -length % self.lengths[kind][0]
        if extra:
            pad = torch.nn.functional.pad
            hidden, cos, sin = pad(hidden, (0, 0, 0, extra)), pad(cos, (0, 0, 0, extra)), pad(sin, (0, 0, 0, extra))
        out = self.loaders[kind].run([hidden.contiguous(), cos.contiguous(), sin.contiguous(), *self.tensors[i]])[0]
        return out[:, :length] if extra else out

    def check(self, model, kind: str) -> None:
        """A kind's package against the eager layer with transformers' own masking, on a small
        input longer than a sliding window and the weights of the kind's second layer (a package
        that had kept the first layer's weights would fail here)."""
        idx = variants(model)[kind]
        i = idx[1 % len(idx)]
        window = _window(self.layers[i])
        length = max(min(window + 40, 4096) if window else 48, self.lengths[kind][1])
        hidden, cos, sin = _example(model, kind, 2, length)
        mask = None
        if window:  # the stock sliding mask, [1, 1, T, T], True where a key is visible
            q, k = torch.arange(length)[:, None], torch.arange(length)[None, :]
            mask = ((k <= q) & (k > q - window))[None, None]
        with torch.inference_mode():
            got = self.run(i, hidden, cos, sin).float()
            want = self.layers[i](hidden, position_embeddings=(cos, sin), attention_mask=mask)
        if not isinstance(want, torch.Tensor):
            raise RuntimeError(f"the layer returns a {type(want).__name__}, not a tensor")
        want = want.float()
        tol = 1e-4 if hidden.dtype == torch.float32 else 3e-2
        err = ((got - want).norm() / want.norm().clamp_min(1e-30)).item()
        if not err <= tol:
            raise RuntimeError(f"the compiled {kind} differs from the eager one (relative error {err:.2e} > {tol:g})")

    def _call(self, i: int, layer):
        """Layer ``i``'s call: the package on a batch padded at the end only, the eager layer otherwise."""

        def call(hidden_states, *args, **kw):
            plain = (self.causal and not args and kw.get("position_embeddings") is not None
                     and kw.get("past_key_values") is None and kw.get("cache") is None and self.takes(i, hidden_states.shape[1]))
            if not plain:  # a mask other than end padding, a cache or a window too short for the package: eagerly
                return layer._call_impl(hidden_states, *args, **kw)
            cos, sin = kw["position_embeddings"]
            return self.run(i, hidden_states, cos, sin)

        return call


def end_padded(attention_mask: torch.Tensor | None) -> bool:
    """No padding, or every row's real tokens first and its pads after them ([B, T] of 0/1)."""
    if attention_mask is None:
        return True
    return attention_mask.dim() == 2 and bool((attention_mask[:, 1:] <= attention_mask[:, :-1]).all())
