"""Models and tokenizers: loading them safely, from where ``model_source`` found them.

A GGUF file is dequantized to ``model.dtype`` by transformers, whatever its architecture
(``dequantized_gguf``).

Loading is safe by default: no remote code unless ``trust_remote_code``; weights through
safetensors or GGUF, never by unpickling unless ``allow_pickle``.
"""

from __future__ import annotations

import contextlib
from pathlib import Path

from . import activation, attention, files, gguf_reading, norm
from .model_fit import check_weights, config_refusals, load_failure, no_load_report
from .config import ModelConfig
from .errors import HarnessError
from .model_source import ModelSource, check_model_files, check_tokenizer_files, resolve

@contextlib.contextmanager
def _gguf_parse(src: ModelSource, key: str, parses: bool = True):
    """transformers parses a GGUF file while loading: its failures (a file cut short) are the
    file's; and the tokenizer's, the config's and the weights' loads share one parse
    (``gguf_reading``)."""
    if not (parses and src.gguf_file and Path(src.folder).is_dir()):
        yield
        return
    with files.reading(Path(src.folder) / src.gguf_file, key, "GGUF model file", files.GGUF_FIX, files.GGUF_DAMAGED):
        with gguf_reading.parsed_once():
            yield


def torch_dtype(name: str):
    import torch

    return {"auto": "auto", "float32": torch.float32, "float16": torch.float16, "bfloat16": torch.bfloat16}[name]


def dequantized_gguf():
    """The ``quantization_config`` that makes transformers dequantize a GGUF file's weights into
    plain dense ones (None where this transformers has no such option, and always dequantizes).

    transformers 5 keeps the weights of some architectures (Qwen3.5, LFM2) in their GGUF blocks,
    multiplied by kernels from the hub in float32, where one is published: another computation
    than the dense model every other load gives, with modules the harness's head and kernels do
    not know. For the rest it dequantizes, yet warns that a dtype other than float32 will cast
    around "packed" kernels (in every bf16 run of SmolLM2 or Gemma-3). Asking for dequantized
    weights gives the same dense model, whatever the architecture, without that warning.
    """
    try:
        from transformers import GgufConfig
    except ImportError:
        return None
    return GgufConfig(dequantize=True)


def vocabulary_rows(model) -> int:
    """How many token ids the model takes: the rows of its input embedding (and of its head)."""
    rows = [getattr(m, "num_embeddings", None) for m in (model.get_input_embeddings(), model.get_output_embeddings())]
    head = getattr(model.get_output_embeddings(), "weight", None)
    rows.append(int(head.shape[0]) if head is not None and head.dim() == 2 else None)
    return min((int(r) for r in rows if r), default=int(model.config.vocab_size))


def pick_device(name: str) -> str:
    from .distributed import local_device  # the one place a device is decided

    return local_device(name)


def load_tokenizer(cfg: ModelConfig):
    from transformers import AutoTokenizer

    src = resolve(cfg)
    kwargs = {"trust_remote_code": cfg.trust_remote_code, "revision": cfg.revision}
    from_gguf = bool(src.gguf_file and src.tokenizer == src.folder)
    if from_gguf:
        kwargs["gguf_file"] = src.gguf_file
    else:
        check_tokenizer_files(src.tokenizer, "model.tokenizer" if cfg.tokenizer else "model.name_or_path")
    try:
        with _gguf_parse(src, "model.gguf_file", from_gguf):
            return AutoTokenizer.from_pretrained(src.tokenizer, **kwargs)
    except config_refusals() as err:  # the folder's config.json, read to pick the tokenizer's class
        raise HarnessError(f"model.name_or_path: the config.json in '{src.tokenizer}' describes no model transformers can "
                           f"build: {load_failure(err)}; fix config.json") from None
    except (OSError, ValueError) as err:  # ValueError: a folder with no tokenizer files transformers can use
        hint = "" if cfg.tokenizer or src.gguf_file else " (give model.tokenizer, or model.gguf_file for a GGUF model)"
        why = " ".join(str(err).split())[:300] or type(err).__name__  # its first line may end in "one of:"
        raise HarnessError(f"model.tokenizer: cannot load a tokenizer from '{src.tokenizer}': {why}{hint}") from None


def _load_kwargs(cfg: ModelConfig, src: ModelSource, device: str) -> dict:
    """``from_pretrained``'s arguments for the config: dtype, GGUF or safetensors, attention, placement."""
    from .precision import resolve_dtype

    if cfg.offload_folder and Path(cfg.offload_folder).exists() and not Path(cfg.offload_folder).is_dir():
        raise HarnessError(f"model.offload_folder: {cfg.offload_folder} is a file; give a folder for the offloaded weights")
    kwargs = {"dtype": resolve_dtype(cfg.dtype, device).dtype, "trust_remote_code": cfg.trust_remote_code, "revision": cfg.revision}
    if src.gguf_file:
        kwargs["gguf_file"] = src.gguf_file
        if (dense := dequantized_gguf()) is not None:
            kwargs["quantization_config"] = dense
    elif not cfg.allow_pickle:
        kwargs["use_safetensors"] = True
    if cfg.attn_implementation:
        kwargs["attn_implementation"] = cfg.attn_implementation
    if cfg.device_map:
        kwargs["device_map"] = cfg.device_map
        if cfg.max_memory:
            kwargs["max_memory"] = cfg.max_memory
        if cfg.offload_folder:
            kwargs["offload_folder"] = cfg.offload_folder
    return kwargs


# settings transformers checks only while loading; its ValueError naming one is that key's
LOAD_SETTINGS = ("offload_folder", "attn_implementation", "device_map", "max_memory")


def _setting_refused(err: ValueError) -> HarnessError | None:
    """transformers' refusal of a ``model.*`` setting as one line naming the key (None: not one)."""
    text = str(err)
    key = next((k for k in LOAD_SETTINGS if k in text), None)
    if key == "offload_folder":
        return HarnessError("model.offload_folder: the model does not fit in model.max_memory; give a folder for the weights offloaded to disk")
    if key:
        return HarnessError(f"model.{key}: transformers refused it ({files.first_line(err, 300)}); fix or remove model.{key}")
    return None


def _from_pretrained(auto_class, src: ModelSource, kwargs: dict):
    """``auto_class.from_pretrained`` with its failures as one line: a refused setting names its
    key, a GGUF file that does not parse names the file, anything else the model's folder (a
    config.json with impossible values included); weights that do not fit the config refuse it."""
    try:
        with _gguf_parse(src, "model.gguf_file"), no_load_report():
            try:
                model, info = auto_class.from_pretrained(src.folder, **kwargs, output_loading_info=True,
                                                         ignore_mismatched_sizes=True)
            except ValueError as err:  # a setting, not the file: said before the file is blamed
                refused = _setting_refused(err)
                if refused is None:
                    raise
                raise refused from None
    except (OSError, ValueError, RuntimeError, KeyError, *config_refusals()) as err:
        first = load_failure(err)
        hint = " (set model.allow_pickle: true to load .bin weights)" if "safetensors" in first.lower() else ""
        raise HarnessError(f"model.name_or_path: cannot load a model from '{src.folder}': {first}{hint}") from None
    finally:
        gguf_reading.release()  # the weights are in (or the load failed): unmap the file
    check_weights(info, src)
    return model


def load_model(cfg: ModelConfig, device: str | None = None):
    """Load a causal LM in eval mode on ``device`` (or spread by ``device_map``)."""
    import torch
    from transformers import AutoModelForCausalLM

    if cfg.random_init:
        model = random_model(cfg).to(torch.float32 if cfg.dtype == "auto" else torch_dtype(cfg.dtype))
        model.to(device or pick_device(cfg.device)).eval()
        return quantize(model, cfg.quantize) if cfg.quantize else model

    src = resolve(cfg)
    device = device or pick_device(cfg.device)
    if not src.gguf_file:
        check_model_files(src.folder)
    model = _from_pretrained(AutoModelForCausalLM, src, _load_kwargs(cfg, src, device))
    if not cfg.device_map:
        model.to(device)
    model.eval()
    if not cfg.attn_implementation:  # Gemma-3's sliding layers by key blocks; in bf16 on AVX-512 BF16: the causal kernel
        attention.install(model)
    activation.install(model)  # in bf16 on AVX-512 BF16: SiLU x up through the harness's kernel
    norm.install(model)  # and RMSNorm (with the residual add before it) through another
    if cfg.quantize:
        quantize(model, cfg.quantize)
    return model


def random_model(cfg: ModelConfig):
    """A causal LM of the shape ``model.name_or_path`` (a config .json) names, with random
    weights drawn from ``model.seed`` on the CPU in float32: the same weights on every machine
    with the same torch (the global random state is left as it was)."""
    import torch
    from transformers import AutoModelForCausalLM

    config = _random_config(cfg)
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(cfg.seed)
        try:
            return AutoModelForCausalLM.from_config(config, dtype=torch.float32)
        except (ValueError, RuntimeError, *config_refusals()) as err:
            raise HarnessError(f"model.name_or_path: {cfg.name_or_path} describes no model transformers can build: "
                               f"{load_failure(err)}; fix the file") from None


def _random_config(cfg: ModelConfig):
    """The transformers config of a ``random_init`` model (``model.name_or_path``, a .json file)."""
    from transformers import AutoConfig

    path = Path(cfg.name_or_path).expanduser()
    if not path.is_file() or path.suffix != ".json":
        raise HarnessError(f"model.name_or_path: random_init needs a model config .json file; not found: {path} (see configs/models/)")
    try:
        config = AutoConfig.from_pretrained(str(path))
    except (OSError, ValueError, KeyError, *config_refusals()) as err:
        raise HarnessError(f"model.name_or_path: {path} is not a model config transformers can read: {load_failure(err)}") from None
    small = [f"{k}: {v}" for k in _SIZES if isinstance(v := getattr(config, k, None), int) and v < 1]
    if small:  # num_hidden_layers: -1 made a model of no layers, and it was scored
        raise HarnessError(f"model.name_or_path: {path} gives {', '.join(small)}; sizes must be at least 1")
    return config


_SIZES = ("num_hidden_layers", "hidden_size", "intermediate_size", "num_attention_heads", "num_key_value_heads", "vocab_size")


def quantize(model, method: str):
    """Quantize the transformer body's Linear layers (the output head stays as loaded).

    ``dynamic-int8`` (torch.ao ``quantize_dynamic``): int8 weights, and activations quantized to
    int8 per tensor at run time; CPU kernels, float32 model. Per-tensor activation scales suffer
    from the large outliers at the MLP down-projection of Llama-style models.
    ``int8-weight-only``: each weight rounded to int8 with one symmetric scale per output channel
    (``torch.quantize_per_channel``) and stored dequantized, so the computation is unchanged and
    only the weights' rounding error remains. Both keep the output head, as most schemes keep
    it at higher precision (and the chunked scoring reads its weight).
    """
    import warnings

    import torch
    from torch.ao.quantization import quantize_dynamic

    with warnings.catch_warnings():
        # torch.ao's eager quantization warns that it moves to torchao; it still ships and works here
        warnings.filterwarnings("ignore", category=DeprecationWarning)
        warnings.filterwarnings("ignore", message=".*quantize_per_(tensor|channel).*")
        if method == "dynamic-int8":
            quantize_dynamic(model.base_model, {torch.nn.Linear}, dtype=torch.qint8, inplace=True)
        elif method == "int8-weight-only":
            with torch.no_grad():
                for mod in model.base_model.modules():
                    if isinstance(mod, torch.nn.Linear):
                        w = mod.weight.float()
                        scale = (w.abs().amax(dim=1) / 127).clamp_min(1e-12).double()
                        zero = torch.zeros(w.shape[0], dtype=torch.int64)
                        q = torch.quantize_per_channel(w.cpu(), scale, zero, axis=0, dtype=torch.qint8)
                        mod.weight.copy_(q.dequantize().to(mod.weight.device, mod.weight.dtype))
        else:  # the config schema admits only the names above
            raise AssertionError(method)
    return model


def max_positions(model) -> int | None:
    return config_positions(getattr(model, "config", None))


def config_positions(cfg) -> int | None:
    """The maximum positions a transformers config states (None where it states none)."""
    text_cfg = cfg.get_text_config() if hasattr(cfg, "get_text_config") else cfg
    for attr in ("max_position_embeddings", "n_positions", "max_sequence_length", "seq_length"):
        value = getattr(text_cfg, attr, None)
        if isinstance(value, int) and value > 0:
            return value
    return None


def stated_positions(cfg: ModelConfig) -> int | None:
    """The model's maximum positions from its config alone, no weights loaded (a GGUF file's
    header: under a second), for checks made before any model loads (a sweep's points). None
    where the config does not load: the run that loads the model then says why."""
    from transformers import AutoConfig

    try:
        if cfg.random_init:
            return config_positions(_random_config(cfg))
        src = resolve(cfg)
        kwargs = {"trust_remote_code": cfg.trust_remote_code, "revision": cfg.revision}
        if src.gguf_file:
            kwargs["gguf_file"] = src.gguf_file
        with _gguf_parse(src, "model.gguf_file"):
            return config_positions(AutoConfig.from_pretrained(src.folder, **kwargs))
    except (OSError, ValueError, KeyError, HarnessError):
        return None
    finally:
        gguf_reading.release()


def describe_tokenizer(tokenizer) -> dict:
    return {
        "class": type(tokenizer).__name__,
        "name_or_path": getattr(tokenizer, "name_or_path", None),
        "vocab_size": len(tokenizer),
        "bos_token_id": tokenizer.bos_token_id,
        "eos_token_id": tokenizer.eos_token_id,
        "adds_bos": adds_bos(tokenizer),
    }


def adds_bos(tokenizer) -> bool:
    """Does the tokenizer put BOS in front of a text by itself?"""
    bos = tokenizer.bos_token_id
    if bos is None:
        return False
    ids = tokenizer("a", add_special_tokens=True)["input_ids"]
    return len(ids) > 0 and ids[0] == bos and ids != tokenizer("a", add_special_tokens=False)["input_ids"]


def model_key(cfg: ModelConfig) -> str:
    """The one rule for "the same model": equal keys, the same loaded model. Every field counts
    (the weights' source, dtype, quantization, placement): each can change what a load gives."""
    import json

    return json.dumps(cfg.model_dump(mode="json"), sort_keys=True)


class ModelPool:
    """Loaded ``(model, tokenizer)`` pairs by ``model_key`` and device, each loaded once.

    The pool holds at most ``keep`` models it loaded itself: loading another first drops the
    least recently used, so a table of runs ordered by model holds one model at a time.
    ``put`` adds a model loaded elsewhere (tests pass the session's model); those stay.
    """

    def __init__(self, keep: int = 1):
        if keep < 1:
            raise ValueError(f"keep must be at least 1, got {keep}")
        self.keep = keep
        self._loaded: dict[tuple, tuple] = {}  # least recently used first
        self._given: dict[tuple, tuple] = {}

    def get(self, cfg: ModelConfig, device: str | None = None) -> tuple:
        """The model and tokenizer of ``cfg`` on ``device`` (None: ``cfg.device``), loaded if new."""
        key = (model_key(cfg), device)
        if key in self._given:
            return self._given[key]
        if key not in self._loaded:
            while len(self._loaded) >= self.keep:
                self._loaded.pop(next(iter(self._loaded)))  # free memory before the next load
            tokenizer = load_tokenizer(cfg)  # first: a GGUF file's parse then serves the model's load too
            self._loaded[key] = (load_model(cfg, device), tokenizer)
        self._loaded[key] = self._loaded.pop(key)  # now the most recently used
        return self._loaded[key]

    def put(self, cfg: ModelConfig, model, tokenizer, device: str | None = None) -> None:
        self._given[(model_key(cfg), device)] = (model, tokenizer)

    def drop(self, cfg: ModelConfig, device: str | None = None) -> None:
        """Forget the pool's own load of ``cfg`` (no longer needed)."""
        self._loaded.pop((model_key(cfg), device), None)

    def __len__(self) -> int:
        return len(self._loaded) + len(self._given)
