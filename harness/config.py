"""The typed run configuration: the YAML schema, validated once at load time.

A config names a model, a corpus and an evaluation protocol. It is read as safe YAML that refuses a
key given twice, changed by dotted ``KEY=VALUE`` overrides (both ``overrides.py``), and validated by pydantic with unknown keys rejected.
Every problem is collected into one ``ConfigError`` whose message names each key at fault.

Fields left ``None`` take the protocol's customary value (see ``protocols.py``), so a config says
only what differs from the protocol it names.
"""

from __future__ import annotations

import difflib
import re
from pathlib import Path
from typing import Any, Literal, Union, get_args

import yaml
from pydantic import BaseModel, ConfigDict, Field, ValidationError, field_validator, model_validator

from .errors import ConfigError, printable
from .files import existing_file, reading
from .overrides import apply_overrides, parse_override, safe_load_unique  # noqa: F401  (re-exported)
from .windows import BosPolicy

# the one list of protocol names; protocols.PRESETS holds a preset for each (tests/test_layout.py checks)
Protocol = Literal["sliding", "gptq", "llamacpp", "lm-eval", "paloma"]
PROTOCOLS = get_args(Protocol)
Dtype = Literal["auto", "float32", "float16", "bfloat16"]


def _takes_bool(annotation) -> bool:
    return annotation is bool or annotation is Any or any(_takes_bool(a) for a in get_args(annotation))


class _Section(BaseModel):
    model_config = ConfigDict(extra="forbid", validate_assignment=True, protected_namespaces=())

    @field_validator("*", mode="before")
    @classmethod
    def _no_bool_for_numbers(cls, v: Any, info) -> Any:
        # pydantic reads true as 1 for an integer: eval.batch_size=true ran one window per batch
        if isinstance(v, bool) and not _takes_bool(cls.model_fields[info.field_name].annotation):
            raise ValueError("must be a number or a name, not true/false")
        return v


class ModelConfig(_Section):
    """Which model to load, and how."""

    name_or_path: str = Field(
        description="Hub id, local folder, or 'pkg:PACKAGE' for a folder inside an installed package."
    )
    gguf_file: str | None = Field(None, description="GGUF file name inside name_or_path (dequantized on load).")
    tokenizer: str | None = Field(None, description="Tokenizer source if not the model's own.")
    revision: str | None = None
    dtype: Dtype = Field(
        "auto", description="Body weights: auto (bf16 where the device computes it natively, else float32; see "
        "precision.py), float32, float16 or bfloat16. Head output and log-sum-exp are always float32."
    )
    device: str = Field("auto", description="auto, cpu, cuda or cuda:N.")
    device_map: str | None = Field(None, description="'auto' spreads a large model over devices (accelerate).")
    max_memory: dict[Union[int, str], Union[int, str]] | None = Field(
        None, description="With device_map: the most memory per device, e.g. {cpu: 300MB} or {0: 10GiB, cpu: 30GiB}; "
        "what does not fit is offloaded to disk (offload_folder)."
    )
    offload_folder: str | None = Field(None, description="With device_map: where weights offloaded to disk are kept.")
    attn_implementation: str | None = Field(None, description="sdpa, eager, ... (unset: the harness's choice, see harness/attention.py; transformers' default otherwise).")
    trust_remote_code: bool = Field(False, description="Run code shipped with the model; off unless set.")
    allow_pickle: bool = Field(False, description="Allow loading pickled (.bin) weights; safetensors/GGUF otherwise.")
    quantize: Literal["dynamic-int8", "int8-weight-only"] | None = Field(
        None, description="Quantize the body's Linear layers: dynamic-int8 (torch.ao dynamic: int8 weights and "
        "activations, CPU, float32) or int8-weight-only (weights rounded to int8 per output channel)."
    )

    random_init: bool = Field(
        False, description="Random weights: name_or_path is a model config .json (e.g. configs/models/llama-3-8b.json); needs tokenizer."
    )
    seed: int = Field(0, ge=0, lt=2**63, description="Seed of the random weights (random_init), drawn on the CPU in float32.")

    @model_validator(mode="after")
    def _random_init(self) -> "ModelConfig":
        if self.random_init and (self.tokenizer is None or self.gguf_file or self.device_map):
            raise ValueError("random_init: set model.tokenizer (a tokenizer folder), and neither gguf_file nor device_map")
        return self

    @field_validator("device")
    @classmethod
    def _device(cls, v: str) -> str:
        if not re.fullmatch(r"auto|cpu|mps|cuda(:\d+)?", v):
            raise ValueError("must be auto, cpu, mps, cuda or cuda:N")
        return v

    @field_validator("max_memory")
    @classmethod
    def _max_memory(cls, v: dict | None) -> dict | None:
        if v is None:
            return v
        out: dict = {}
        for key, size in v.items():
            if isinstance(key, str) and key.isdigit():
                key = int(key)
            if not (isinstance(key, int) or key in ("cpu", "mps", "disk")):
                raise ValueError(f"device '{key}' must be a GPU index (0, 1, ...), cpu, mps or disk")
            if not (isinstance(size, int) or re.fullmatch(r"\d+(\.\d+)?\s*([KMGT]i?B)", str(size))):
                raise ValueError(f"size of '{key}' must be bytes or a size such as 300MB or 10GiB")
            out[key] = size
        return out

    @model_validator(mode="after")
    def _offload(self) -> "ModelConfig":
        if (self.max_memory or self.offload_folder) and self.device_map is None:
            raise ValueError("max_memory and offload_folder place a model by device_map; set device_map: auto")
        return self

    @model_validator(mode="after")
    def _quantize(self) -> "ModelConfig":
        if self.quantize == "dynamic-int8" and (self.dtype != "float32" or self.device != "cpu" or self.device_map):
            raise ValueError("quantize: dynamic-int8 runs on the CPU in float32; set dtype: float32 and device: cpu")
        return self


class CorpusConfig(_Section):
    """Which text to score: a datasets hub id (resolved through a local mirror offline) or a file."""

    dataset: str | None = Field(None, description="datasets hub id, e.g. Salesforce/wikitext.")
    config: str | None = Field(None, description="Dataset configuration, e.g. wikitext-2-raw-v1.")
    split: str = "test"
    text_field: str = "text"
    domain_field: str | None = Field(None, description="Column naming each document's domain (paloma).")
    path: str | None = Field(None, description="A local .txt, .jsonl/.json or .parquet file instead of a dataset.")
    mode: Literal["concat", "documents"] | None = Field(
        None, description="One stream joined with `join`, or each document on its own."
    )
    join: str | None = Field(None, description='String between documents in concat mode (default "\\n\\n").')
    detokenizer: Literal["none", "wikitext", "wikitext-raw"] | None = Field(
        None, description="wikitext: lm-eval's detokenizer; wikitext-raw: rows back to wiki.*.raw lines (join '')."
    )
    max_documents: int | None = Field(None, gt=0, description="Keep only the first N documents (rows).")
    max_tokens: int | None = Field(None, gt=0, description="Truncate the token stream after tokenizing.")
    mirror: str | None = Field(None, description="Mirror folder <id>/<config>/<split>.parquet (default $PPL_CORPUS_MIRROR).")
    streaming: bool = Field(False, description="Read and tokenize lazily, in chunks (memory set by the tokens, not the text).")
    cache: bool = Field(True, description="Cache the tokenized corpus on disk ($PPL_CACHE_DIR, default ~/.cache/ppl-harness).")
    # conditional corpora (harness/conditional.py): score a target given its context
    format: Literal["text", "pairs", "chat"] = Field(
        "text", description="text: score every token; pairs: prompt + separator + target, target scored; chat: assistant turns scored."
    )
    prompt_field: str = Field("prompt", description="pairs: the column holding the prompt (context).")
    target_field: str = Field("target", description="pairs: the column holding the target (scored).")
    separator: str = Field("\n", description="pairs: inserted between prompt and target.")
    as_chat: bool = Field(False, description="pairs: render as one user turn and one assistant turn with the chat template.")
    messages_field: str = Field("messages", description="chat: the column holding a list of {role, content}.")
    score_roles: list[str] = Field(["assistant"], description="chat: roles whose turns are scored (content and end-of-turn marker).")
    chat_template: str | None = Field(None, description="chat: a Jinja template file, for tokenizers that ship none.")

    @model_validator(mode="after")
    def _one_source(self) -> "CorpusConfig":
        if (self.dataset is None) == (self.path is None):
            raise ValueError("set exactly one of corpus.dataset or corpus.path")
        return self

    @model_validator(mode="after")
    def _conditional(self) -> "CorpusConfig":
        if self.format != "text":
            if self.mode == "concat":
                raise ValueError(f"format {self.format} scores each sample on its own; remove corpus.mode: concat")
            if self.max_tokens is not None:
                raise ValueError(f"format {self.format} keeps whole samples; use corpus.max_documents instead of max_tokens")
        if self.as_chat and self.format != "pairs":
            raise ValueError("as_chat renders pairs as chat; set corpus.format: pairs (or use format: chat)")
        if self.format == "chat" and not self.score_roles:
            raise ValueError("score_roles: name at least one role to score, e.g. [assistant]")
        return self


class EvalConfig(_Section):
    """How to window and score the token stream."""

    protocol: Protocol = "sliding"
    max_length: int | None = Field(None, gt=1, description="Window length L in tokens (default: the protocol's).")
    stride: int | None = Field(None, gt=0, description="Window step S <= L (sliding); default: the protocol's.")
    batch_size: Union[int, Literal["auto"]] = Field(1, description="Windows per forward pass, or 'auto'.")
    max_batch_size: int | None = Field(
        None, gt=0, description="Where batch_size: auto starts backing off from (default 64; 8 on CPU)."
    )
    bos: BosPolicy | None = Field(None, description="none, stream, every or replace (default: the protocol's).")
    logits_chunk: int | None = Field(
        None, gt=0, description="Scored positions per vocabulary-projection chunk (default: 2,048 on the CPU, else sized to the vocabulary)."
    )
    sort_by_length: bool = Field(True, description="Batch windows of similar length together (less padding).")
    compile: Union[bool, Literal["auto"]] = Field(
        "auto",
        description="Compile the decoder layers: true, false, or auto (when a compiled package is cached for the model, or the run plans >= 65,536 window tokens; see harness/compiled.py).",
    )
    bootstrap: int = Field(
        1000, ge=0, le=1_000_000, description="Bootstrap resamples for the 95% interval (0: normal approximation only)."
    )
    seed: int = Field(0, ge=0, lt=2**63, description="Seed of the bootstrap's resampling.")
    rescale_tokens: int | None = Field(
        None, gt=0, description="Also report exp(sum_nll / N) for this original token count N (GPT-2 paper style)."
    )

    @field_validator("batch_size")
    @classmethod
    def _batch(cls, v: int | str) -> int | str:
        if isinstance(v, int) and v <= 0:
            raise ValueError("must be a positive integer or 'auto'")
        return v

    @model_validator(mode="after")
    def _window(self) -> "EvalConfig":
        if self.max_length is not None and self.stride is not None:
            capacity = self.max_length - (1 if self.bos == BosPolicy.EVERY else 0)
            if self.stride > capacity:
                extra = " (bos=every puts BOS in the window)" if self.bos == BosPolicy.EVERY else ""
                raise ValueError(
                    f"stride ({self.stride}) must be <= max_length{' - 1' if extra else ''} ({capacity}){extra}"
                )
        return self


class OutputConfig(_Section):
    dir: str = Field("results", description="Where run folders and the results table go.")
    run_id: str | None = Field(None, description="Run folder name (default: time, model, corpus, config hash).")
    save_windows: bool = True
    save_tokens: bool = Field(False, description="Write every scored token (document, position, id, text, NLL) to tokens.parquet.")

    @field_validator("run_id")
    @classmethod
    def _run_id(cls, v: str | None) -> str | None:
        # a folder name under output.dir, never a path: '../x' or '/tmp/x' would write outside it
        if v is None:
            return v
        if not v.strip():
            raise ValueError("must be a non-empty folder name")
        if "/" in v or "\\" in v or "\0" in v or v.startswith(".") or any(c.isspace() for c in v):
            raise ValueError(
                "must be a folder name, not a path: no '/', '\\', NUL, '..', leading dot or spaces "
                "(use --output-dir to write elsewhere)"
            )
        return v


class RunConfig(_Section):
    """A whole run: model, corpus, evaluation and output."""

    name: str | None = Field(None, description="A label for the run in tables.")
    model: ModelConfig
    baseline_model: ModelConfig | None = Field(None, description="Second model for KL divergence on the same windows.")
    corpus: CorpusConfig
    eval: EvalConfig = Field(default_factory=EvalConfig)
    output: OutputConfig = Field(default_factory=OutputConfig)


# ---------------------------------------------------------------------------------------------
# Loading


def _section(model: type[BaseModel], name: str) -> type[BaseModel] | None:
    """The section (sub-model) a field of ``model`` holds, or None for a plain value or no such field."""
    field = model.model_fields.get(name)
    if field is None:
        return None
    ann = field.annotation
    candidates = [ann, *(getattr(ann, "__args__", ()) or ())]
    return next((c for c in candidates if isinstance(c, type) and issubclass(c, BaseModel)), None)


def _field_names(model: type[BaseModel], path: tuple[str, ...]) -> list[str]:
    """Valid keys at a dotted location of the schema (for 'did you mean' hints)."""
    for part in path:
        sub = _section(model, part)
        if sub is None:
            return []
        model = sub
    return list(model.model_fields)


_UNION_TAG = re.compile(r"^(int|str|bool|float|none|literal\[.*\]|function-.*\[.*\]|enum\[.*\])$")


def _key_path(loc: tuple) -> tuple[str, ...]:
    """The config keys of an error's location.

    pydantic adds a union member's tag ('int', "literal['auto']", 'function-after[...]') and list
    indices after a field that holds a value. The location is walked along the schema: inside a
    section every part is a key the user wrote (one named 'none' or 'int' too), and tags are
    dropped only below a value field."""
    model: type[BaseModel] | None = RunConfig
    path: list[str] = []
    for part in loc:
        if model is not None:
            path.append(str(part))
            model = _section(model, str(part))
        elif not isinstance(part, int) and not _UNION_TAG.match(str(part)):
            path.append(str(part))
    return tuple(path)


def _unknown_key(loc: tuple[str, ...]) -> str:
    """'did you mean' the closest valid key at that level, else the list of valid keys."""
    names = _field_names(RunConfig, loc[:-1])
    close = difflib.get_close_matches(loc[-1], names, n=1) if loc else []
    if close:
        return f" (did you mean '{printable('.'.join(loc[:-1] + (close[0],)))}'?)"
    return f" (valid keys: {', '.join(names)})" if names else ""


def _format_errors(err: ValidationError) -> list[str]:
    problems: dict[str, str] = {}  # one message per key is enough (a union reports each member's complaint)
    for e in err.errors():
        loc = _key_path(e["loc"])
        key = printable(".".join(loc)) or "(top level)"
        if e["type"] == "extra_forbidden":
            problem = f"unknown key{_unknown_key(loc)}"
        elif e["type"] == "missing":
            problem = "required key is missing"
        else:
            problem = e["msg"].removeprefix("Value error, ")
            if "input" in e and not isinstance(e["input"], dict):
                problem += f" (got {e['input']!r})"
        problems.setdefault(key, f"{key}: {printable(problem)}")
    return list(problems.values())


def validate(data: Any, source: str | None = None) -> RunConfig:
    """Validate a mapping into a RunConfig, or raise ConfigError listing every problem."""
    if not isinstance(data, dict):
        raise ConfigError([f"the top level must be a mapping with model:, corpus:, eval: (got {type(data).__name__})"], source)
    try:
        return RunConfig.model_validate(data)
    except ValidationError as err:
        raise ConfigError(_format_errors(err), source) from None


def read_yaml(path: str | Path) -> dict:
    p = existing_file(path, "config", "config file", "check the path; shipped configs are under configs/")
    with reading(p, "config", "YAML config file", "save the file as UTF-8 YAML"):
        try:
            data = safe_load_unique(p.read_text(encoding="utf-8"))
        except yaml.YAMLError as err:
            mark = getattr(err, "problem_mark", None)
            where = f" at line {mark.line + 1}, column {mark.column + 1}" if mark else ""
            problem = getattr(err, "problem", None) or "not valid YAML"
            fix = "" if "given twice" in problem else " (fix the syntax)"
            raise ConfigError([f"YAML does not parse{where}: {problem}{fix}"], str(p)) from None
    return data if data is not None else {}


def load_config(path: str | Path, overrides: list[str] | None = None) -> RunConfig:
    """Read a YAML config, apply dotted overrides, validate."""
    data = read_yaml(path)
    if not isinstance(data, dict):
        raise ConfigError(["the top level must be a mapping with model:, corpus:, eval:"], str(path))
    return validate(apply_overrides(data, overrides or []), str(path))
