"""The corpus: which documents are scored, read from a dataset or a local file.

A hub dataset (``corpus.dataset``) is read through ``datasets``. When offline
(``HF_DATASETS_OFFLINE=1`` or ``HF_HUB_OFFLINE=1``) or when the hub cannot be reached, it is
resolved through a mirror folder laid out as ``<dataset id>/<config>/<split>.parquet``: the
config's ``corpus.mirror``, else ``$PPL_CORPUS_MIRROR``, else ``../shared/corpora`` beside the
working directory. Local ``.txt`` (one document per file), ``.jsonl``/``.json`` (one per line)
and ``.parquet`` (one per row) files are read directly.

Where the rows come from is decided once, by ``source(cfg)``; the reader and the token cache's
key (tokenization.py) both follow that decision. Every local file is opened through
``files.py``: a folder, a missing file, a file that is not Parquet, a truncated one, a bad JSON
line (named by its number) or non-UTF-8 text each end in one line naming the file. Documents are
read by one function, ``iter_documents``, lazily; ``load_documents`` is its list.

The result is a list of ``Document``: the text the model sees, the original text that words and
bytes are counted on (they differ when a detokenizer ran), and an optional domain.
"""

from __future__ import annotations

import contextlib
import json
import logging
import os
import re
from dataclasses import dataclass
from pathlib import Path
from typing import Iterable, Iterator

from .config import CorpusConfig, printable
from .errors import HarnessError
from .files import existing_file, reading


@dataclass(frozen=True, slots=True)
class Document:
    text: str  # what the model is fed
    original: str  # what bytes and words are counted on (== text unless detokenized)
    domain: str | None = None


# ---------------------------------------------------------------------------------------------
# Detokenizers


# lm-evaluation-harness's wikitext detokenizer, as an ordered table of plain replacements and
# regular expressions (PROTOCOLS.md section 4). The order matters and follows lm-eval's.
_WIKITEXT_RULES: list[tuple[str, str, bool]] = [
    ("s '", "s'", False),
    (r"/' [0-9]/", r"/'[0-9]/", True),
    (" @-@ ", "-", False),
    (" @,@ ", ",", False),
    (" @.@ ", ".", False),
    (" : ", ": ", False),
    (" ; ", "; ", False),
    (" . ", ". ", False),
    (" ! ", "! ", False),
    (" ? ", "? ", False),
    (" , ", ", ", False),
    (r"\(\s*([^\)]*?)\s*\)", r"(\1)", True),
    (r"\[\s*([^\]]*?)\s*\]", r"[\1]", True),
    (r"{\s*([^}]*?)\s*}", r"{\1}", True),
    (r"\"\s*([^\"]*?)\s*\"", r'"\1"', True),
    (r"'\s*([^']*?)\s*'", r"'\1'", True),
    ("= = = =", "====", False),
    ("= = =", "===", False),
    ("= =", "==", False),
    (" \u00b0 ", "\u00b0", False),
    (" \n", "\n", False),
    ("\n ", "\n", False),
    (" N ", " 1 ", False),
    (" 's", "'s", False),
]


def wikitext_detokenize(text: str) -> str:
    """Undo WikiText's tokenization the way lm-evaluation-harness does (``@-@`` -> ``-``, ...)."""
    for pattern, repl, is_regex in _WIKITEXT_RULES:
        text = re.sub(pattern, repl, text) if is_regex else text.replace(pattern, repl)
    return text


def wikitext_raw_line(row: str) -> str:
    """A row of ``Salesforce/wikitext`` back to its line of the released ``wiki.*.raw`` file.

    The dataset keeps every line with its newline but turns whitespace-only lines (``" \\n"`` in
    the file) into ``""``; with ``corpus.join: ""`` the rows then concatenate to the file that
    ``llama-perplexity -f wiki.test.raw`` reads.
    """
    return row if row else " \n"


DETOKENIZERS = {"none": None, "wikitext": wikitext_detokenize, "wikitext-raw": wikitext_raw_line}


# ---------------------------------------------------------------------------------------------
# Sources


def _offline() -> bool:
    return any(os.environ.get(v, "").lower() in ("1", "true", "yes") for v in ("HF_DATASETS_OFFLINE", "HF_HUB_OFFLINE"))


def mirror_roots(cfg: CorpusConfig) -> list[Path]:
    """The folders searched for a mirrored dataset, in order.

    ``corpus.mirror`` is named by the config itself, so one that is not an existing folder is an
    error: reading the dataset from another mirror instead would score text the config did not
    name. ``$PPL_CORPUS_MIRROR`` and ``../shared/corpora`` are the environment's defaults (the
    Makefile sets the variable whether or not the folder exists, and an online run needs no
    mirror): one that is not a folder is skipped, and marked so in the error when no mirror holds
    the dataset offline."""
    if cfg.mirror is not None:
        mirror = Path(cfg.mirror).expanduser()
        if not cfg.mirror.strip() or not mirror.is_dir():
            what = "is empty" if not cfg.mirror.strip() else (
                "is a file, not a folder" if mirror.exists() else "names no folder (not found)")
            raise HarnessError(
                f"corpus.mirror: '{printable(cfg.mirror)}' {what}; set it to a folder holding "
                "<id>/<config>/<split>.parquet, or remove the key to use $PPL_CORPUS_MIRROR"
            )
    roots = [cfg.mirror, os.environ.get("PPL_CORPUS_MIRROR"), "../shared/corpora"]
    return [Path(r).expanduser() for r in roots if r]


def find_in_mirror(cfg: CorpusConfig) -> Path | None:
    for root in mirror_roots(cfg):
        base = root / cfg.dataset / (cfg.config or "default")
        if base.is_dir():
            path = base / f"{cfg.split}.parquet"
            if not path.is_file():
                splits = sorted(p.stem for p in base.glob("*.parquet"))
                raise HarnessError(
                    f"corpus.split: split '{printable(cfg.split)}' not found for {cfg.dataset}/{cfg.config} "
                    f"in mirror {root}; available splits: {', '.join(splits) or 'none'}"
                )
            return path
    return None


@dataclass(frozen=True)
class Source:
    """Where the rows come from, decided once (``source``) for the reader and the token cache key.

    ``kind`` is ``file`` (``corpus.path``), ``mirror`` (a mirrored parquet, used when offline or
    when ``corpus.mirror`` is set) or ``hub`` (``datasets`` online; ``fallback`` is the mirrored
    file read instead if the hub cannot be reached).
    """

    kind: str
    path: Path | None = None
    fallback: Path | None = None


def source(cfg: CorpusConfig) -> Source:
    """The one place that chooses between the file, the mirror and the hub."""
    if cfg.path:
        return Source("file", existing_file(cfg.path, "corpus.path", "file"))
    mirrored = find_in_mirror(cfg)
    if mirrored is not None and (_offline() or cfg.mirror):
        return Source("mirror", mirrored)
    if _offline():
        tried = ", ".join(str(r) if r.is_dir() else f"{r} (no such folder)" for r in mirror_roots(cfg))
        raise HarnessError(
            f"corpus.dataset: '{cfg.dataset}' ({cfg.config}) is not in the mirror ({tried}) and the hub is offline; "
            "set corpus.mirror or PPL_CORPUS_MIRROR to a folder holding <id>/<config>/<split>.parquet, or unset HF_DATASETS_OFFLINE"
        )
    return Source("hub", None, mirrored)


_FIX = {"parquet": "give a Parquet file (e.g. written by pandas.DataFrame.to_parquet)",
        "text": "convert it to UTF-8, e.g. iconv -f latin1 -t utf-8",
        "jsonl": "one JSON object per line, UTF-8"}


def _mirrored_rows(path: Path, cfg: CorpusConfig):
    try:
        import datasets
    except ImportError:  # a GPU node may lack datasets: pyarrow reads the mirrored parquet as well
        return _parquet_rows(path, cfg)
    with reading(path, "corpus.dataset", "Parquet file", "the mirror file is damaged; copy it again"), _quiet_datasets():
        return datasets.load_dataset("parquet", data_files=str(path), split="train", streaming=cfg.streaming)


@contextlib.contextmanager
def _quiet_datasets():
    """Silence the ``datasets`` library's own log while it reads: on a damaged file it logs the
    error ("Failed to read schema from ...") and then raises it, and the raised error is already
    turned into the one line the user sees."""
    log = logging.getLogger("datasets")
    level = log.level
    log.setLevel(logging.CRITICAL)
    try:
        yield
    finally:
        log.setLevel(level)


def _hub_rows(cfg: CorpusConfig, src: Source):
    """The dataset's rows: from the mirror, or from the hub (falling back to the mirror if it fails)."""
    if src.kind == "mirror":
        return _mirrored_rows(src.path, cfg)
    import datasets

    try:
        return datasets.load_dataset(cfg.dataset, cfg.config, split=cfg.split, streaming=cfg.streaming)
    except ValueError as err:  # an unknown split is a ValueError listing the known ones
        if src.fallback is None:
            raise HarnessError(f"corpus.split: {err}") from None
    except Exception as err:  # hub unreachable: fall back to the mirror when there is one
        if src.fallback is None:
            raise HarnessError(
                f"corpus.dataset: cannot load '{cfg.dataset}' from the hub ({type(err).__name__}) and it is not in a mirror"
            ) from None
    return _mirrored_rows(src.fallback, cfg)


def _read_text_file(path: Path) -> str:
    with reading(path, "corpus.path", "text file", _FIX["text"]):
        data = path.read_bytes()
    try:
        return data.decode("utf-8-sig")  # a byte-order mark is not text (a .jsonl's is dropped too)
    except UnicodeDecodeError as err:
        raise HarnessError(
            f"corpus.path: {path} is not UTF-8 text (invalid byte 0x{data[err.start]:02x} at byte offset {err.start}); {_FIX['text']}"
        ) from None


def _json_row(path: Path, n: int, line: str) -> dict:
    try:
        row = json.loads(line)
    except json.JSONDecodeError as err:
        raise HarnessError(f"corpus.path: {path} line {n} is not valid JSON ({err.msg}); one JSON object per line") from None
    if not isinstance(row, dict):
        raise HarnessError(f"corpus.path: {path} line {n} is a JSON {type(row).__name__}, not an object; one JSON object per line")
    return row


def _missing_column(cfg: CorpusConfig, names: list[str]) -> None:
    for field, key in _fields(cfg):
        if field not in names:
            raise HarnessError(f"{key}: column '{field}' not found; available columns: {', '.join(map(str, names))}")


def _parquet_rows(path: Path, cfg: CorpusConfig) -> Iterator[dict]:
    """Rows of a Parquet file batch by batch; a file that is not Parquet is one line."""
    import pyarrow.parquet as pq

    with reading(path, "corpus.path", "Parquet file", _FIX["parquet"]):
        f = pq.ParquetFile(path)
        _missing_column(cfg, f.schema_arrow.names)
        columns = [c for c, _ in _fields(cfg)]
        for batch in f.iter_batches(batch_size=1024, columns=columns):
            yield from batch.to_pylist()


def _jsonl_rows(path: Path) -> Iterator[dict]:
    """Rows of a JSONL file line by line; a bad line is named by its number."""
    n = 0
    with reading(path, "corpus.path", "JSONL file", _FIX["jsonl"]), open(path, encoding="utf-8-sig") as lines:
        try:
            for n, line in enumerate(lines, 1):
                if line.strip():
                    yield _json_row(path, n, line)
        except UnicodeDecodeError:
            raise HarnessError(f"corpus.path: {path} is not UTF-8 text (after line {n}); {_FIX['text']}") from None


def _file_rows(cfg: CorpusConfig, path: Path) -> Iterable[dict]:
    suffix = path.suffix.lower()
    if suffix in (".txt", ".raw", ".text", ".md", ".tokens"):
        return [{cfg.text_field: _read_text_file(path)}]
    if suffix in (".jsonl", ".json"):
        return _jsonl_rows(path)
    if suffix == ".parquet":
        return _parquet_rows(path, cfg)
    raise HarnessError(f"corpus.path: unsupported file type '{suffix}' for {path}; use .txt, .jsonl or .parquet")


def _fields(cfg: CorpusConfig) -> list[tuple[str, str]]:
    """(column, config key) of every column a row must have."""
    if cfg.format == "pairs":
        named = ((cfg.prompt_field, "corpus.prompt_field"), (cfg.target_field, "corpus.target_field"))
    elif cfg.format == "chat":
        named = ((cfg.messages_field, "corpus.messages_field"),)
    else:
        named = ((cfg.text_field, "corpus.text_field"), (cfg.domain_field, "corpus.domain_field"))
    return [(f, k) for f, k in named if f]


def iter_rows(cfg: CorpusConfig, src: Source | None = None, require_text: bool = True) -> Iterator[dict]:
    """The rows of the corpus (the first ``max_documents``), lazily, each with its text field
    (unless ``require_text`` is false: conditional corpora check their own fields)."""
    src = src or source(cfg)
    rows = _file_rows(cfg, src.path) if src.kind == "file" else _hub_rows(cfg, src)
    columns = getattr(rows, "column_names", None)
    if columns is not None:
        _missing_column(cfg, columns)
    for n, row in enumerate(rows):
        if cfg.max_documents is not None and n >= cfg.max_documents:
            break
        if require_text and cfg.text_field not in row:
            raise HarnessError(
                f"corpus.text_field: field '{cfg.text_field}' not found in row {n}; available fields: {', '.join(map(str, row))}"
            )
        yield row


EMPTY = "corpus: the corpus is empty (no text); check corpus.split, corpus.text_field and corpus.max_documents"


def iter_documents(cfg: CorpusConfig, settings=None, src: Source | None = None) -> Iterator[Document]:
    """Each row as a ``Document`` (detokenized per ``settings.detokenizer``), lazily.

    ``settings`` is the protocol's ``CorpusSettings``; without it the config's own detokenizer is
    used (for reading a corpus outside a run)."""
    name = settings.detokenizer if settings is not None else (cfg.detokenizer or "none")
    detok = DETOKENIZERS[name]
    for n, row in enumerate(iter_rows(cfg, src)):
        text = row[cfg.text_field]
        if not isinstance(text, str):
            raise HarnessError(f"corpus.text_field: '{cfg.text_field}' in row {n} holds {type(text).__name__}, not text; "
                               "fix that row, or name the text column")
        yield Document(detok(text) if detok else text, text, _domain(cfg, row, n))


def _domain(cfg: CorpusConfig, row: dict, n: int) -> str | None:
    """Row ``n``'s domain (``corpus.domain_field``): a name, never a stand-in (a missing field or
    a null had made a domain called 'None' that held every such document)."""
    if not cfg.domain_field:
        return None
    if cfg.domain_field not in row:
        raise HarnessError(f"corpus.domain_field: field '{cfg.domain_field}' not found in row {n}; available fields: "
                           f"{', '.join(map(str, row))}")
    domain = row[cfg.domain_field]
    if not isinstance(domain, str):
        raise HarnessError(f"corpus.domain_field: '{cfg.domain_field}' in row {n} holds {type(domain).__name__}, not a "
                           "domain name; give every row a domain name")
    return domain


def load_documents(cfg: CorpusConfig, settings=None, src: Source | None = None) -> list[Document]:
    """Read the corpus into documents (detokenized when configured), before any joining."""
    docs = list(iter_documents(cfg, settings, src))
    if not docs or not any(d.text for d in docs):
        raise HarnessError(EMPTY)
    return docs


def concatenate(docs: list[Document], join: str) -> Document:
    """One stream of all documents joined with ``join`` (the ``sliding``/``gptq`` corpus form)."""
    return Document(join.join(d.text for d in docs), join.join(d.original for d in docs), None)
