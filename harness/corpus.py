"""The corpus: which documents are scored, read from a dataset or a local file.

A hub dataset (``corpus.dataset``) is read through ``datasets``. When offline
(``HF_DATASETS_OFFLINE=1`` or ``HF_HUB_OFFLINE=1``) or when the hub cannot be reached, it is
resolved through a mirror folder laid out as ``<dataset id>/<config>/<split>.parquet``: the
config's ``corpus.mirror``, else ``$PPL_CORPUS_MIRROR``, else ``../shared/corpora`` beside the
working directory. Local ``.txt`` (one document per file), ``.jsonl``/``.json`` (one per line)
and ``.parquet`` (one per row) files are read directly.

The result is a list of ``Document``: the text the model sees, the original text that words and
bytes are counted on (they differ when a detokenizer ran), and an optional domain.
"""

from __future__ import annotations

import json
import os
import re
from dataclasses import dataclass
from pathlib import Path
from typing import Iterable, Iterator

from .config import CorpusConfig
from .errors import HarnessError


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
    roots = [cfg.mirror, os.environ.get("PPL_CORPUS_MIRROR"), "../shared/corpora"]
    return [Path(r) for r in roots if r]


def find_in_mirror(cfg: CorpusConfig) -> Path | None:
    for root in mirror_roots(cfg):
        base = root / cfg.dataset / (cfg.config or "default")
        if base.is_dir():
            path = base / f"{cfg.split}.parquet"
            if not path.is_file():
                splits = sorted(p.stem for p in base.glob("*.parquet"))
                raise HarnessError(
                    f"corpus.split: split '{cfg.split}' not found for {cfg.dataset}/{cfg.config} "
                    f"in mirror {root}; available splits: {', '.join(splits) or 'none'}"
                )
            return path
    return None


def _hub_rows(cfg: CorpusConfig):
    """The dataset's rows: from the mirror when offline (or the hub fails), else from the hub."""
    mirrored = find_in_mirror(cfg)
    try:
        import datasets
    except ImportError:  # a mirrored parquet is read with pyarrow (a GPU node may lack datasets)
        if mirrored is None:
            raise HarnessError(f"corpus.dataset: '{cfg.dataset}' needs the datasets package (pip install datasets) or a mirror "
                               "(corpus.mirror or PPL_CORPUS_MIRROR)") from None
        return _file_rows(cfg.model_copy(update={"path": str(mirrored), "dataset": None}))
    if mirrored is not None and (_offline() or cfg.mirror):
        return datasets.load_dataset("parquet", data_files=str(mirrored), split="train", streaming=cfg.streaming)
    if _offline():
        tried = ", ".join(str(r) for r in mirror_roots(cfg))
        raise HarnessError(
            f"corpus.dataset: '{cfg.dataset}' ({cfg.config}) is not in the mirror ({tried}) and the hub is offline; "
            "set corpus.mirror or PPL_CORPUS_MIRROR to a folder holding <id>/<config>/<split>.parquet, or unset HF_DATASETS_OFFLINE"
        )
    try:
        return datasets.load_dataset(cfg.dataset, cfg.config, split=cfg.split, streaming=cfg.streaming)
    except ValueError as err:  # an unknown split is a ValueError listing the known ones
        if mirrored is None:
            raise HarnessError(f"corpus.split: {err}") from None
    except Exception as err:  # hub unreachable: fall back to the mirror when there is one
        if mirrored is None:
            raise HarnessError(
                f"corpus.dataset: cannot load '{cfg.dataset}' from the hub ({type(err).__name__}) and it is not in a mirror"
            ) from None
    return datasets.load_dataset("parquet", data_files=str(mirrored), split="train", streaming=cfg.streaming)


def _read_text_file(path: Path) -> str:
    data = path.read_bytes()
    try:
        return data.decode("utf-8")
    except UnicodeDecodeError as err:
        raise HarnessError(
            f"corpus.path: {path} is not UTF-8 text (invalid byte 0x{data[err.start]:02x} at byte offset {err.start}); "
            "convert it to UTF-8, e.g. iconv -f latin1 -t utf-8"
        ) from None


def _file_rows(cfg: CorpusConfig) -> Iterable[dict]:
    path = Path(cfg.path)
    if not path.is_file():
        raise HarnessError(f"corpus.path: file not found: {path} (check the path)")
    suffix = path.suffix.lower()
    if suffix in (".txt", ".raw", ".text", ".md", ".tokens"):
        return [{cfg.text_field: _read_text_file(path)}]
    if cfg.streaming and suffix in (".jsonl", ".json", ".parquet"):
        return _lazy_file_rows(path, suffix, cfg)
    if suffix in (".jsonl", ".json"):
        rows = []
        for n, line in enumerate(_read_text_file(path).splitlines(), 1):
            if line.strip():
                try:
                    rows.append(json.loads(line))
                except json.JSONDecodeError as err:
                    raise HarnessError(f"corpus.path: {path} line {n} is not valid JSON ({err.msg}); one JSON object per line") from None
        return rows
    if suffix == ".parquet":
        import pyarrow.parquet as pq

        return pq.read_table(path).to_pylist()
    raise HarnessError(f"corpus.path: unsupported file type '{suffix}' for {path}; use .txt, .jsonl or .parquet")


def _lazy_file_rows(path: Path, suffix: str, cfg: CorpusConfig) -> Iterator[dict]:
    """Rows one at a time (``corpus.streaming``): JSONL line by line, parquet batch by batch."""
    if suffix == ".parquet":
        import pyarrow.parquet as pq

        f = pq.ParquetFile(path)
        columns = [c for c in (cfg.text_field, cfg.domain_field) if c]
        missing = [c for c in columns if c not in f.schema_arrow.names]
        if missing:
            key = "corpus.text_field" if missing[0] == cfg.text_field else "corpus.domain_field"
            raise HarnessError(f"{key}: column '{missing[0]}' not found; available columns: {', '.join(f.schema_arrow.names)}")
        for batch in f.iter_batches(batch_size=1024, columns=columns):
            yield from batch.to_pylist()
        return
    with open(path, encoding="utf-8") as lines:
        n = 0
        try:
            for n, line in enumerate(lines, 1):
                if line.strip():
                    try:
                        yield json.loads(line)
                    except json.JSONDecodeError as err:
                        raise HarnessError(f"corpus.path: {path} line {n} is not valid JSON ({err.msg}); one JSON object per line") from None
        except UnicodeDecodeError:
            raise HarnessError(f"corpus.path: {path} is not UTF-8 text (after line {n}); convert it to UTF-8, e.g. iconv -f latin1 -t utf-8") from None


def iter_rows(cfg: CorpusConfig) -> Iterator[dict]:
    rows = _hub_rows(cfg) if cfg.dataset else _file_rows(cfg)
    columns = getattr(rows, "column_names", None)
    if columns is not None:
        for field in (cfg.text_field, cfg.domain_field):
            if field and field not in columns:
                key = "corpus.text_field" if field == cfg.text_field else "corpus.domain_field"
                raise HarnessError(f"{key}: column '{field}' not found; available columns: {', '.join(columns)}")
    for n, row in enumerate(rows):
        if cfg.max_documents is not None and n >= cfg.max_documents:
            break
        if cfg.text_field not in row:
            raise HarnessError(
                f"corpus.text_field: field '{cfg.text_field}' not found in row {n}; available fields: {', '.join(map(str, row))}"
            )
        yield row


def load_documents(cfg: CorpusConfig) -> list[Document]:
    """Read the corpus into documents (detokenized when configured), before any joining."""
    detok = DETOKENIZERS[cfg.detokenizer or "none"]
    docs = []
    for row in iter_rows(cfg):
        text = row[cfg.text_field]
        if not isinstance(text, str):
            raise HarnessError(f"corpus.text_field: '{cfg.text_field}' holds {type(text).__name__}, not text; name a text column")
        domain = str(row.get(cfg.domain_field)) if cfg.domain_field else None
        docs.append(Document(detok(text) if detok else text, text, domain))
    if not docs or not any(d.text for d in docs):
        raise HarnessError("corpus: the corpus is empty (no text); check corpus.split, corpus.text_field and corpus.max_documents")
    return docs


def concatenate(docs: list[Document], join: str) -> Document:
    """One stream of all documents joined with ``join`` (the ``sliding``/``gptq`` corpus form)."""
    return Document(join.join(d.text for d in docs), join.join(d.original for d in docs), None)
