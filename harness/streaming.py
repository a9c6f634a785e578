"""Streaming corpora: read rows lazily and tokenize in chunks, never holding the whole text.

With ``corpus.streaming: true`` rows come one at a time (``datasets`` streaming for a hub or
mirrored dataset, line by line for JSONL, batch by batch for parquet), and the text of a stream
goes through the tokenizer in chunks of about ``CHUNK_CHARS`` characters. What stays in memory
is what the window plan needs: the token ids and their byte and word boundaries (24 bytes a
token), not the text, the rows, or the tokenizer's per-token Python objects.

A chunk is committed up to a *cut*: the start of a token that begins with whitespace right after
a non-space character, at least ``MARGIN`` characters before the end of the text read so far.
The text after the cut is tokenized again with the next chunk. At such a cut no pre-token of a
regex or byte-level tokenizer spans the boundary, so the tokens are those of tokenizing the
whole stream at once (the tests hold streaming records equal to non-streaming ones). Tokenizers
that put a prefix in front of every text they are given (SentencePiece's dummy prefix) cannot be
cut; a stream longer than one chunk is refused for them with a message saying what to use.

In documents mode under several processes, each rank tokenizes its share of the documents
(``shards_documents``) and ``cache`` gathers the streams. Bytes, words and the text hash are
counted on the fly exactly as the non-streaming path counts them, and the reading goes on to
the end after ``corpus.max_tokens`` so the corpus hash and document count describe the whole
corpus, as they do there.
"""

from __future__ import annotations

import hashlib
import re
from typing import Iterable, Iterator

import numpy as np

from .config import CorpusConfig
from .corpus import EMPTY, iter_documents
from .errors import HarnessError
from .tokens import TokenStream, boundaries, encode

CHUNK_CHARS = 1 << 18
MARGIN = 4096
_SPACE_RUN = re.compile(r"\s+")


def _cuts_are_safe(tokenizer) -> bool:
    """Does tokenizing the text after a cut on its own give the tokens the whole text gives there?"""
    text = "one two, three.\n\nFour five"
    whole = tokenizer(text, add_special_tokens=False)["input_ids"]
    for cut in (3, 15):
        left = tokenizer(text[:cut], add_special_tokens=False)["input_ids"]
        right = tokenizer(text[cut:], add_special_tokens=False)["input_ids"]
        if left + right != whole:
            return False
    return True


class _Counter:
    """bytes and ``len(re.split(r"\\s+", text))`` of a text seen in pieces (the original text)."""

    def __init__(self):
        self.bytes, self.runs, self.last_space = 0, 0, None

    def add(self, piece: str) -> None:
        if not piece:
            return
        self.bytes += len(piece.encode("utf-8"))
        self.runs += len(_SPACE_RUN.findall(piece))
        if self.last_space and _SPACE_RUN.match(piece):
            self.runs -= 1  # one run across the seam
        self.last_space = bool(_SPACE_RUN.match(piece[-1]))

    @property
    def words(self) -> int:
        return self.runs + 1


class _ChunkedStream:
    """Builds one ``TokenStream`` from text fed in pieces; stops tokenizing at ``limit`` tokens."""

    def __init__(self, tokenizer, add_special_tokens: bool, limit: int | None):
        self.tok, self.special, self.limit = tokenizer, add_special_tokens, limit
        self.buf = ""
        self.first = True
        self.dropped = False  # text was left untokenized after the limit
        self.parts: list[tuple[np.ndarray, np.ndarray, np.ndarray]] = []
        self.n = self.byte_base = self.word_base = 0
        self.safe: bool | None = None

    @property
    def full(self) -> bool:
        return self.limit is not None and self.n >= self.limit

    def feed(self, piece: str) -> None:
        if self.full:
            self.dropped = self.dropped or bool(piece)
            return
        self.buf += piece
        while len(self.buf) >= CHUNK_CHARS + MARGIN and not self.full:
            self._commit(final=False)

    def finish(self) -> None:
        if (self.buf or self.first) and not self.full:  # an empty text may still be [BOS]
            self._commit(final=True)
        self.dropped = self.dropped or bool(self.buf)

    def _commit(self, final: bool) -> None:
        text = self.buf
        ids, starts = encode(self.tok, text, self.special and self.first)
        k, cut = len(ids), len(text)
        if not final:
            self._check_safe()
            k = self._cut(text, starts)
            cut = int(starts[k])
        elif not self.first:
            self._check_safe()
        char_bounds = np.append(starts[:k], cut)
        byte_bounds, word_bounds = boundaries(text[:cut], char_bounds)
        byte_bounds, word_bounds = byte_bounds + self.byte_base, word_bounds + self.word_base
        # the bounds at the cut open the next chunk: keep them once, at the end
        self.parts.append((np.asarray(ids[:k], dtype=np.int64), byte_bounds[:-1], word_bounds[:-1]))
        self.byte_base, self.word_base = int(byte_bounds[-1]), int(word_bounds[-1])
        self.n += k
        self.buf = text[cut:]
        self.first = False

    def _cut(self, text: str, starts: np.ndarray) -> int:
        """The last token that starts with whitespace after a non-space, MARGIN before the end."""
        for k in range(int(np.searchsorted(starts, len(text) - MARGIN, side="right")) - 1, 0, -1):
            c = int(starts[k])
            if c > 0 and text[c].isspace() and not text[c - 1].isspace() and starts[k - 1] < c:
                return k
        raise HarnessError(f"corpus.streaming: no whitespace to cut the text at in {CHUNK_CHARS} characters; use corpus.streaming: false")

    def _check_safe(self) -> None:
        if self.safe is None:
            self.safe = _cuts_are_safe(self.tok)
        if not self.safe:
            raise HarnessError(
                "corpus.streaming: this tokenizer adds a prefix to every text it is given, so a long stream cannot be "
                "tokenized in chunks; use corpus.mode: documents with short documents, or corpus.streaming: false"
            )

    @property
    def truncated(self) -> bool:
        return self.limit is not None and (self.n > self.limit or (self.n == self.limit and self.dropped))

    def stream(self, doc: int, domain: str | None) -> TokenStream:
        ids = np.concatenate([p[0] for p in self.parts] + [np.zeros(0, np.int64)])
        byte_b = np.concatenate([p[1] for p in self.parts] + [np.array([self.byte_base])])
        word_b = np.concatenate([p[2] for p in self.parts] + [np.array([self.word_base])])
        stream = TokenStream(ids, byte_b, word_b, doc, domain)
        return stream.truncate(self.limit) if self.truncated else stream


def _documents(cfg: CorpusConfig, settings, src) -> Iterator[tuple[str, str, str | None]]:
    """(text fed to the model, original text, domain) of each row, read lazily."""
    for d in iter_documents(cfg, settings, src):
        yield d.text, d.original, d.domain


def _tokenize_stream(tokenizer, pieces: Iterable[tuple[str, str]], settings, limit, doc, domain, sha) -> TokenStream:
    """One stream from (text, original) pieces, with bytes and words counted on the original text
    (as ``tokens.tokenize_document`` counts them)."""
    chunked = _ChunkedStream(tokenizer, settings.add_special_tokens, limit)
    counter = _Counter()
    for text, original in pieces:
        sha.update(text.encode("utf-8"))
        chunked.feed(text)
        counter.add(original)
    chunked.finish()
    stream = chunked.stream(doc, domain)
    if not chunked.truncated:  # tokens.tokenize drops the counts of a truncated stream too
        stream.count_bytes, stream.count_words = counter.bytes, counter.words
    return stream


def shards_documents(cfg: CorpusConfig, settings, world: int) -> bool:
    """Are documents tokenized by rank? In documents mode, unless max_tokens needs a running total."""
    return world > 1 and settings.mode == "documents" and cfg.max_tokens is None


def tokenize_lazily(cfg: CorpusConfig, tokenizer, settings, rank: int = 0, world: int = 1, src=None) -> tuple[list[TokenStream], int, str]:
    """Token streams, document count and text hash, as ``tokenization._read_and_tokenize`` gives them.

    When ``shards_documents``, this rank tokenizes only documents ``rank, rank + world, ...``
    (every rank still reads all rows, for the hash); the caller gathers the streams."""
    mine = (lambda i: i % world == rank) if shards_documents(cfg, settings, world) else (lambda i: True)
    sha = hashlib.sha256()
    docs = _documents(cfg, settings, src)
    count = 0

    def counted(rows):
        nonlocal count
        for row in rows:
            count += 1
            yield row

    if settings.mode == "concat":

        def pieces():
            for i, (text, original, _) in enumerate(counted(docs)):
                if i:
                    yield settings.join, settings.join
                yield text, original

        stream = _tokenize_stream(tokenizer, pieces(), settings, cfg.max_tokens, 0, None, sha)
        streams = [stream] if len(stream) else []
    else:
        streams, total = [], 0
        for i, (text, original, domain) in enumerate(counted(docs)):
            if i:
                sha.update(b"\x00")
            left = None if cfg.max_tokens is None else cfg.max_tokens - total
            if left == 0 or not mine(i):
                sha.update(text.encode("utf-8"))  # read on for the hash and the count only
                continue
            stream = _tokenize_stream(tokenizer, [(text, original)], settings, left, i, domain, sha)
            if len(stream):
                streams.append(stream)
            total += len(stream)
    if count == 0:
        raise HarnessError(EMPTY)
    return streams, count, sha.hexdigest()
