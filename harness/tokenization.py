"""Corpus to tokens: read, tokenize, and keep the token streams in an on-disk cache for later runs.

Tokenizing a large corpus takes longer than many evaluations, and gives the same tokens every
time. The cache key is a hash of everything the tokens depend on:

- the tokenizer (its whole ``tokenizer.json`` for a fast tokenizer, else its vocabulary),
- the corpus (the sha256 of the source file's bytes: ``corpus.path`` or the mirrored parquet;
  a hub dataset read online is named by id, config and split), from the same ``corpus.source``
  decision the reader follows,
- the preprocessing (text and domain fields, mode, join string, detokenizer, BOS, max_documents
  and max_tokens), and the source code of the modules that read and tokenize.

An entry is a folder under ``$PPL_CACHE_DIR`` (default ``~/.cache/ppl-harness``)``/tokens/<key>``:
the ids and the byte and word boundaries of every stream as ``.npy`` files (memory-mapped when
read back) and ``meta.json``. Entries are written to a temporary folder and renamed into place,
so a reader never sees half an entry. ``corpus.cache: false`` turns the cache off.
"""

from __future__ import annotations

import hashlib
import json
import os
import shutil
import sys
import tempfile
import time
from dataclasses import dataclass
from pathlib import Path

import numpy as np

from . import conditional, corpus as corpus_module, files, streaming, tokens as tokens_module
from .config import CorpusConfig
from .corpus import Source, concatenate, load_documents, source
from .distributed import SingleProcess
from .errors import HarnessError
from .tokens import TokenStream, tokenize

FORMAT = 1


@dataclass
class TokenizedCorpus:
    streams: list[TokenStream]
    documents: int  # documents read (before joining)
    text_sha256: str  # of the text fed to the tokenizer
    cache: dict  # what the token cache did: {"hit", "key", "path", "seconds"}


def cache_root() -> Path:
    return files.cache_root() / "tokens"


def _sha256_file(path: Path) -> str:
    h = hashlib.sha256()
    with open(path, "rb") as f:
        for block in iter(lambda: f.read(1 << 22), b""):
            h.update(block)
    return h.hexdigest()


def corpus_fingerprint(src: Source) -> str:
    """What the tokens were read from: the file's bytes, or the hub dataset's name."""
    if src.kind in ("file", "mirror"):
        return f"{src.kind}:" + _sha256_file(src.path)
    return "hub"


def tokenizer_fingerprint(tokenizer) -> str:
    backend = getattr(tokenizer, "backend_tokenizer", None)
    body = backend.to_str() if backend is not None else json.dumps(sorted(tokenizer.get_vocab().items()))
    return hashlib.sha256(f"{type(tokenizer).__name__}\x00{body}".encode()).hexdigest()


CONDITIONAL_FIELDS = ("format", "prompt_field", "target_field", "separator", "as_chat", "messages_field", "score_roles", "chat_template")


def _code_fingerprint() -> str:
    h = hashlib.sha256()
    for module in (corpus_module, tokens_module, streaming, conditional):
        h.update(Path(module.__file__).read_bytes())
    return h.hexdigest()


def cache_key(cfg: CorpusConfig, settings, tokenizer, src: Source | None = None) -> str:
    src = src or source(cfg)
    fingerprint = corpus_fingerprint(src)
    parts = {
        "format": FORMAT,
        "code": _code_fingerprint(),
        "tokenizer": tokenizer_fingerprint(tokenizer),
        "corpus": f"hub:{cfg.dataset}/{cfg.config}/{cfg.split}" if fingerprint == "hub" else fingerprint,
        "preprocessing": {
            "dataset": cfg.dataset, "config": cfg.config, "split": cfg.split, "text_field": cfg.text_field,
            "domain_field": cfg.domain_field, "max_documents": cfg.max_documents, "max_tokens": cfg.max_tokens,
            "mode": settings.mode, "join": settings.join, "detokenizer": settings.detokenizer,
            "add_special_tokens": settings.add_special_tokens,
        },
    }
    if cfg.format != "text":  # how samples are rendered decides the tokens and the target spans
        parts["conditional"] = {k: getattr(cfg, k) for k in CONDITIONAL_FIELDS}
        template = conditional.load_template(cfg)  # its text, read through files.py
        if template is not None:
            parts["conditional"]["chat_template_sha256"] = hashlib.sha256(template.encode()).hexdigest()
        parts["conditional"]["tokenizer_template"] = getattr(tokenizer, "chat_template", None)
    return hashlib.sha256(json.dumps(parts, sort_keys=True).encode()).hexdigest()[:32]


# ---------------------------------------------------------------------------------------------
# Entries


def _store(folder: Path, streams: list[TokenStream], documents: int, text_sha256: str) -> None:
    folder.parent.mkdir(parents=True, exist_ok=True)
    tmp = Path(tempfile.mkdtemp(prefix=f".{folder.name}.", dir=folder.parent))
    try:
        np.save(tmp / "ids.npy", np.concatenate([s.ids for s in streams]))
        np.save(tmp / "bytes.npy", np.concatenate([s.byte_bounds for s in streams]))
        np.save(tmp / "words.npy", np.concatenate([s.word_bounds for s in streams]))
        conditional = streams[0].targets is not None
        if conditional:  # the target token spans of a pairs/chat corpus travel with the tokens
            np.save(tmp / "targets.npy", np.concatenate([s.targets for s in streams]))
        meta = {
            "format": FORMAT, "documents": documents, "text_sha256": text_sha256,
            "streams": [[len(s), s.doc, s.domain, s.count_bytes, s.count_words] + ([len(s.targets)] if conditional else []) for s in streams],
        }
        (tmp / "meta.json").write_text(json.dumps(meta))
        os.rename(tmp, folder)  # atomic; fails if another process stored it first, which is fine
    except OSError:
        pass  # a cache that cannot be written only costs time
    finally:
        shutil.rmtree(tmp, ignore_errors=True)


def _load(folder: Path) -> tuple[list[TokenStream], int, str] | None:
    try:
        meta = json.loads((folder / "meta.json").read_text())
        ids, byte_b, word_b = (np.load(folder / f"{n}.npy", mmap_mode="r") for n in ("ids", "bytes", "words"))
        targets = np.load(folder / "targets.npy") if (folder / "targets.npy").exists() else None
    except (OSError, ValueError):
        return None
    streams, t, b, k = [], 0, 0, 0
    for n, doc, domain, count_bytes, count_words, *spans in meta["streams"]:
        mine = targets[k : k + spans[0]] if spans else None
        streams.append(TokenStream(ids[t : t + n], byte_b[b : b + n + 1], word_b[b : b + n + 1], doc, domain, count_bytes, count_words, mine))
        t, b, k = t + n, b + n + 1, k + (spans[0] if spans else 0)
    return streams, meta["documents"], meta["text_sha256"]


# ---------------------------------------------------------------------------------------------
# The step the runner calls


def _read_and_tokenize(cfg: CorpusConfig, tokenizer, settings, dist, src: Source) -> tuple[list[TokenStream], int, str]:
    if cfg.format != "text":  # samples are short: rows are read lazily and each sample tokenized whole
        h = hashlib.sha256()
        streams, n = conditional.tokenize_samples(cfg, corpus_module.iter_rows(cfg, src, require_text=False), tokenizer, settings.add_special_tokens, h)
        if n == 0:
            raise HarnessError(corpus_module.EMPTY)
        return streams, n, h.hexdigest()
    if cfg.streaming:
        streams, documents, sha = streaming.tokenize_lazily(cfg, tokenizer, settings, dist.rank, dist.world, src)
        if streaming.shards_documents(cfg, settings, dist.world):  # each rank tokenized its share of documents
            streams = sorted(dist.gather(streams), key=lambda s: s.doc)
        return streams, documents, sha
    docs = load_documents(cfg, settings, src)
    n_docs = len(docs)
    if settings.mode == "concat":
        docs = [concatenate(docs, settings.join)]
    h = hashlib.sha256()
    for i, d in enumerate(docs):
        h.update((b"\x00" if i else b"") + d.text.encode("utf-8"))
    return tokenize(tokenizer, docs, settings.add_special_tokens, cfg.max_tokens), n_docs, h.hexdigest()


def tokenized_corpus(cfg: CorpusConfig, tokenizer, settings, dist=None) -> TokenizedCorpus:
    """The corpus as token streams: from the cache when it holds them, else read and tokenized.

    ``settings`` is the protocol's corpus side (``protocols.CorpusSettings``): mode, join,
    detokenizer and special tokens come from it, never from the corpus config. ``dist`` (a
    ``Distributor``) shares the tokenizing of a streamed corpus by documents."""
    dist = dist or SingleProcess()
    src = source(cfg)  # decided once: the key names what is read
    is_main = dist.is_main

    def say(msg: str) -> None:
        if is_main:
            print(msg, file=sys.stderr)

    t0 = time.perf_counter()
    key = folder = None
    if cfg.cache:
        key = cache_key(cfg, settings, tokenizer, src)
        folder = cache_root() / key
        hit = _load(folder) if folder.is_dir() else None
        if dist.world > 1:  # all ranks hit, or all tokenize (the sharded tokenizing gathers)
            hit = hit if all(dist.gather([hit is not None])) else None
        if hit is not None:
            say(f"token cache: hit {folder}; tokenization skipped")
            return TokenizedCorpus(*hit, {"hit": True, "key": key, "path": str(folder), "seconds": time.perf_counter() - t0})
    streams, documents, sha = _read_and_tokenize(cfg, tokenizer, settings, dist, src)
    if not streams:
        raise HarnessError("corpus: no tokens after tokenizing; check the corpus and corpus.max_tokens")
    seconds = time.perf_counter() - t0
    if folder is not None and is_main:
        _store(folder, streams, documents, sha)
        say(f"token cache: stored {folder} (tokenizing took {seconds:.1f} s)")
    return TokenizedCorpus(streams, documents, sha, {"hit": False, "key": key, "path": str(folder) if folder else None, "seconds": seconds})
