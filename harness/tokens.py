"""Tokenization: documents to token streams that know which bytes and words each token covers.

Each stream carries, beside its token ids, two cumulative counts over token boundaries:
``byte_bounds[i]`` is the UTF-8 byte offset where token ``i`` begins (token ``i`` owns the bytes
up to the next token, whitespace included) and ``word_bounds[i]`` the number of words (runs of
non-space characters) that begin before it. The bytes and words of any scored span ``[s, e)``
are then ``bounds[e] - bounds[s]``: metrics are counted on exactly the text that was scored.
"""

from __future__ import annotations

import re
from dataclasses import dataclass

import numpy as np

from .corpus import Document

_WORD = re.compile(r"\S+")


@dataclass(slots=True)
class TokenStream:
    ids: np.ndarray  # int64 token ids
    byte_bounds: np.ndarray  # len(ids) + 1 cumulative byte offsets
    word_bounds: np.ndarray  # len(ids) + 1 cumulative word counts
    doc: int = 0
    domain: str | None = None
    count_bytes: int | None = None  # bytes of the whole original document (None once truncated)
    count_words: int | None = None  # its words, split lm-eval's way
    targets: np.ndarray | None = None  # [k, 2] token spans [a, b) to score (conditional corpora), else None

    def __len__(self) -> int:
        return len(self.ids)

    def truncate(self, n: int) -> "TokenStream":
        return TokenStream(self.ids[:n], self.byte_bounds[: n + 1], self.word_bounds[: n + 1], self.doc, self.domain)


def _utf8_byte_offsets(text: str) -> np.ndarray:
    """Byte offset of every character boundary (len(text) + 1 entries)."""
    cps = np.frombuffer(text.encode("utf-32-le"), dtype=np.uint32)
    widths = 1 + (cps >= 0x80) + (cps >= 0x800) + (cps >= 0x10000)
    out = np.zeros(len(cps) + 1, dtype=np.int64)
    np.cumsum(widths, out=out[1:])
    return out


def char_starts(tokenizer, text: str, ids: list[int], offsets) -> np.ndarray:
    """The character where each token begins (non-decreasing; token 0 begins at 0)."""
    if offsets is not None:
        starts = np.array([s for s, _ in offsets], dtype=np.int64)
    else:  # slow tokenizers have no offsets: lengths of progressively decoded prefixes
        starts = np.array([len(tokenizer.decode(ids[:i])) for i in range(len(ids))], dtype=np.int64)
    if len(starts):
        starts[0] = 0  # token 0 owns any leading text the tokenizer folded into it
        np.maximum.accumulate(starts, out=starts)
    return np.minimum(starts, len(text))


def encode(tokenizer, text: str, add_special_tokens: bool) -> tuple[list[int], np.ndarray]:
    """Token ids of ``text`` and the character where each begins."""
    enc = tokenizer(
        text,
        add_special_tokens=add_special_tokens,
        return_offsets_mapping=bool(getattr(tokenizer, "is_fast", False)),
        return_attention_mask=False,
        verbose=False,
    )
    ids = list(enc["input_ids"])
    return ids, char_starts(tokenizer, text, ids, enc.get("offset_mapping"))


def boundaries(text: str, char_bounds: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """Byte offsets and word counts at character boundaries of ``text`` (the last is ``len(text)``).

    The one token-boundary rule: token ``i`` owns the bytes from its start to the next token's
    (whitespace included), and ``word_bounds[i]`` counts the words (runs of non-space characters)
    that begin before it; the last entry is the text's bytes and words."""
    byte_bounds = _utf8_byte_offsets(text)[char_bounds]
    word_starts = np.array([m.start() for m in _WORD.finditer(text)], dtype=np.int64)
    word_bounds = np.searchsorted(word_starts, char_bounds, side="left").astype(np.int64)
    word_bounds[-1] = len(word_starts)
    return byte_bounds, word_bounds


def tokenize_document(tokenizer, doc: Document, index: int, add_special_tokens: bool) -> TokenStream:
    ids, starts = encode(tokenizer, doc.text, add_special_tokens)
    byte_bounds, word_bounds = boundaries(doc.text, np.append(starts, len(doc.text)))
    # counted on the original text, lm-eval's way (PROTOCOLS.md section 4): used by presets that
    # count on the original document, whether or not a detokenizer changed it. lm-eval's split
    # counts one more "word" than there are when the text ends in whitespace; so do we.
    count_bytes = len(doc.original.encode("utf-8"))
    count_words = len(re.split(r"\s+", doc.original))
    return TokenStream(
        np.asarray(ids, dtype=np.int64), byte_bounds, word_bounds, index, doc.domain, count_bytes, count_words
    )


def tokenize(tokenizer, docs: list[Document], add_special_tokens: bool, max_tokens: int | None = None) -> list[TokenStream]:
    """Tokenize each document; ``max_tokens`` truncates the total after tokenizing."""
    streams = []
    total = 0
    for i, doc in enumerate(docs):
        stream = tokenize_document(tokenizer, doc, i, add_special_tokens)
        if max_tokens is not None and total + len(stream) > max_tokens:
            stream = stream.truncate(max_tokens - total)
        if len(stream):
            streams.append(stream)
        total += len(stream)
        if max_tokens is not None and total >= max_tokens:
            break
    return streams
