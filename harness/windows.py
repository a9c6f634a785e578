"""Window planning: pure functions from token counts to the windows a protocol scores.

Nothing here touches a model, a tokenizer or a tensor: integers in, a list of small frozen
``Window`` records out. The maths of each protocol is in ``../shared/docs/PROTOCOLS.md``;
each planner's docstring restates its contract with a worked example.

Coordinates. A document's token stream is ``t[0..N)``. A window feeds the model the input

    [BOS if prefix] + t[begin:end]            (with t[begin] overwritten by BOS if replace_first)

and the logit at each input position predicts the *next* stream token. So the stream token
``t[p]`` can be scored by this window when ``p - 1`` lies in ``[begin, end)``, or when
``p == begin`` and a prefix token stands before it. A window scores exactly the tokens
``t[score_begin:score_end]``, which therefore satisfy

    begin + 1 - prefix <= score_begin <= score_end <= min(end + 1, N)

(``score_end == end + 1`` happens in the ``lm-eval`` rolling windows, where the input stops one
token short of the last target).
"""

from __future__ import annotations

from dataclasses import dataclass
from enum import Enum


class BosPolicy(str, Enum):
    """Where a beginning-of-sequence token goes (PROTOCOLS.md, "BOS policies")."""

    NONE = "none"  # no BOS anywhere (GPT-2 style); the stream is tokenized without special tokens
    STREAM = "stream"  # the tokenizer's own behaviour, once per tokenized text (first window only)
    EVERY = "every"  # BOS prepended to every window; the window length includes it
    REPLACE = "replace"  # the first token of every window is overwritten by BOS (llama.cpp)


@dataclass(frozen=True, slots=True)
class Window:
    """One model input and the stream tokens it scores (see the module docstring)."""

    index: int  # position in the whole plan (0-based, over all documents)
    doc: int  # which document's stream (0 for a single concatenated stream)
    begin: int  # input span start in the document's stream
    end: int  # input span end (exclusive)
    score_begin: int  # first scored stream token
    score_end: int  # one past the last scored stream token
    prefix: bool = False  # a BOS/prefix token is prepended to the input
    replace_first: bool = False  # the input's first token is overwritten by BOS

    @property
    def input_length(self) -> int:
        return self.end - self.begin + int(self.prefix)

    @property
    def scored(self) -> int:
        return self.score_end - self.score_begin

    @property
    def first_target_offset(self) -> int:
        """Input position whose logit predicts ``t[score_begin]``."""
        return self.score_begin - self.begin - 1 + int(self.prefix)


class TooFewTokens(ValueError):
    """The stream is too short for the protocol at all (llama.cpp refuses fewer than 2 chunks):
    a problem with the corpus, where other ``ValueError``s here are problems with the settings."""


def renumber(windows: list[Window], start: int = 0) -> list[Window]:
    """Give windows consecutive plan indices (planners number each document from zero)."""
    from dataclasses import replace

    return [replace(w, index=start + i) for i, w in enumerate(windows)]


def plan_sliding(
    n_tokens: int,
    max_length: int,
    stride: int,
    bos: BosPolicy = BosPolicy.STREAM,
    doc: int = 0,
) -> list[Window]:
    """The Hugging Face guide's strided sliding window (PROTOCOLS.md section 1).

    Windows begin at ``b = 0, S, 2S, ...`` and cover ``t[b : min(b + L, N)]``; the loop stops
    after the window that reaches ``N``. A window scores only what no earlier window scored,
    ``t[prev_end : end]``, and never its own first position (it has no context), so with
    ``S < L`` every token but ``t[0]`` is scored once, and with ``S == L`` the first token of every
    window is unscored.

    Worked example, ``N = 10, L = 4, S = 2``: inputs ``[0,4) [2,6) [4,8) [6,10)``, scored
    ``[1,4) [4,6) [6,8) [8,10)``: 9 tokens, each once. With ``S = L = 4``: inputs
    ``[0,4) [4,8) [8,10)``, scored ``[1,4) [5,8) [9,10)``: 7 tokens.

    BOS policies: ``every`` prepends BOS, so a window holds ``L - 1`` stream tokens and its
    first real token is scored with BOS as context (then every token is scored, ``t[0]`` too);
    this needs ``S <= L - 1`` or tokens would fall between windows. ``replace`` overwrites each
    window's first token with BOS, so that token is context only. ``none`` and ``stream`` change
    nothing here (they decide whether the tokenizer put a BOS at ``t[0]``).
    """
    if n_tokens < 0:
        raise ValueError(f"n_tokens must be non-negative, got {n_tokens}")
    if max_length < 2:
        raise ValueError(f"max_length must be at least 2, got {max_length}")
    prefix = bos == BosPolicy.EVERY
    capacity = max_length - int(prefix)
    if not 0 < stride <= capacity:
        raise ValueError(f"stride must be in 1..{capacity} for bos={bos.value}, got {stride}")
    windows: list[Window] = []
    prev_end = 0
    begin = 0
    while begin < n_tokens:
        end = min(begin + capacity, n_tokens)
        score_begin = max(prev_end, begin + 1 - int(prefix))
        if end > score_begin:
            windows.append(
                Window(
                    index=len(windows),
                    doc=doc,
                    begin=begin,
                    end=end,
                    score_begin=score_begin,
                    score_end=end,
                    prefix=prefix,
                    replace_first=bos == BosPolicy.REPLACE,
                )
            )
        prev_end = end
        if end == n_tokens:
            break
        begin += stride
    return windows


def _check_counts(n_tokens: int, max_length: int, name: str = "max_length") -> None:
    """The argument checks every planner shares: a stream length and a window length."""
    if n_tokens < 0:
        raise ValueError(f"n_tokens must be non-negative, got {n_tokens}")
    if max_length < 2:
        raise ValueError(f"{name} must be at least 2, got {max_length}")


def plan_disjoint(
    n_tokens: int,
    max_length: int,
    bos: BosPolicy = BosPolicy.STREAM,
    doc: int = 0,
) -> list[Window]:
    """The quantization papers' disjoint windows, the ``gptq`` protocol (PROTOCOLS.md section 2).

    ``n = N // L`` windows ``t[kL : (k+1)L]``, ``k = 0 .. n-1``; the tail ``t[nL:N]`` is dropped.
    A window's first token has no context, so each window scores ``t[kL+1 : (k+1)L]``:
    ``L - 1`` tokens, ``n * (L - 1)`` in all, and every window weighs the same.

    Worked example, ``N = 10, L = 4``: ``n = 2``, inputs ``[0,4) [4,8)``, scored ``[1,4) [5,8)``:
    6 tokens; ``t[0], t[4]`` are context only and the tail ``t[8:10]`` is dropped.

    BOS policies, as in ``plan_sliding``: ``every`` prepends BOS, so a window holds ``L - 1``
    stream tokens, ``n = N // (L - 1)``, and all of them are scored (window ``k`` is
    ``t[k(L-1) : (k+1)(L-1)]``, scored whole; ``N = 10, L = 4`` gives inputs and scores
    ``[0,3) [3,6) [6,9)``, 9 tokens). ``replace`` overwrites each window's first token with BOS
    (still context only, so the windows and scores are those of ``none``). ``none`` and ``stream``
    change nothing (they decide whether the tokenizer put a BOS at ``t[0]``).
    """
    _check_counts(n_tokens, max_length)
    bos = BosPolicy(bos)
    prefix = bos is BosPolicy.EVERY
    width = max_length - int(prefix)  # stream tokens per window
    skip = 0 if prefix else 1  # unscored leading tokens per window
    return [
        Window(
            index=k,
            doc=doc,
            begin=k * width,
            end=(k + 1) * width,
            score_begin=k * width + skip,
            score_end=(k + 1) * width,
            prefix=prefix,
            replace_first=bos is BosPolicy.REPLACE,
        )
        for k in range(n_tokens // width)
    ]


def plan_llamacpp(
    n_tokens: int,
    ctx: int = 512,
    replace_bos: bool = True,
    doc: int = 0,
) -> list[Window]:
    """``llama-perplexity`` from llama.cpp, the ``llamacpp`` protocol (PROTOCOLS.md section 3).

    ``n = N // C`` disjoint chunks ``t[kC : (k+1)C]``; the tail is dropped, and fewer than ``2C``
    tokens is an error (``TooFewTokens``, as llama.cpp refuses to run). Only the second half of a
    chunk is scored: with ``first = C // 2`` the logits at chunk positions ``first .. C-2`` score
    ``t[kC+first+1 : (k+1)C]``, i.e. ``C - first - 1`` tokens per chunk (255 at ``C = 512``), so
    every scored token has at least ``first`` tokens of context. If ``replace_bos`` (the model's
    "add BOS" setting) the first token of every chunk is overwritten by BOS, never prepended.

    Worked example, ``N = 13, C = 6``: ``first = 3``, ``n = 2``, inputs ``[0,6) [6,12)``, scored
    ``[4,6) [10,12)``: 4 of 13 tokens. ``C`` must be at least 3, or a chunk scores nothing.
    """
    if n_tokens < 0:
        raise ValueError(f"n_tokens must be non-negative, got {n_tokens}")
    if ctx < 3:
        raise ValueError(
            f"ctx must be at least 3 (a chunk of C tokens scores C - C//2 - 1 of them), got {ctx}"
        )
    if n_tokens < 2 * ctx:
        raise TooFewTokens(
            f"llamacpp protocol needs at least 2×ctx = {2 * ctx} tokens, "
            f"the corpus has {n_tokens}"
        )
    first = ctx // 2
    return [
        Window(
            index=k,
            doc=doc,
            begin=k * ctx,
            end=(k + 1) * ctx,
            score_begin=k * ctx + first + 1,
            score_end=(k + 1) * ctx,
            prefix=False,
            replace_first=bool(replace_bos),
        )
        for k in range(n_tokens // ctx)
    ]


def plan_rolling(n_tokens: int, max_length: int, doc: int = 0) -> list[Window]:
    """lm-evaluation-harness's disjoint rolling windows, the ``lm-eval`` protocol (section 4).

    The spans of lm-eval's ``get_rolling_token_windows(..., context_len=1)`` followed by
    ``make_disjoint_window``: the document is cut into blocks of ``L`` *predicted* tokens, and
    every token is scored exactly once, ``t[0]`` included.

    - Window 0 prepends the prefix token (BOS, or EOS when there is none): input
      ``[prefix] + t[0 : f-1]`` with ``f = min(L, N)``, scoring ``t[0 : f]``.
    - Window ``j`` (a full block) has input ``t[jL-1 : (j+1)L-1]`` and scores ``t[jL : (j+1)L]``:
      one token of carried context.
    - The last, partial block ``t[jL : N]`` is scored with the ``L`` tokens before its end as
      input, ``t[N-L-1 : N-1]`` (lm-eval keeps the input full rather than shrinking it).

    Every window's input stops one token short of its last target, so ``score_end == end + 1``,
    and every input holds at most ``L`` tokens (exactly ``L`` after the first window).

    Worked example, ``N = 10, L = 4``: inputs ``[P]+t[0:3]``, ``t[3:7]``, ``t[5:9]``, scored
    ``[0,4) [4,8) [8,10)``: all 10 tokens once. ``N = 3, L = 4``: one window, ``[P]+t[0:2]``
    scoring ``[0,3)``.
    """
    _check_counts(n_tokens, max_length)
    if n_tokens == 0:
        return []
    first = min(max_length, n_tokens)
    windows = [
        Window(index=0, doc=doc, begin=0, end=first - 1, score_begin=0, score_end=first, prefix=True)
    ]
    scored = first
    while scored < n_tokens:
        block_end = min(scored + max_length, n_tokens)
        windows.append(
            Window(
                index=len(windows),
                doc=doc,
                begin=block_end - max_length - 1,
                end=block_end - 1,
                score_begin=scored,
                score_end=block_end,
            )
        )
        scored = block_end
    return windows


def plan_paloma(n_tokens: int, max_length: int = 2048, doc: int = 0) -> list[Window]:
    """AI2's Paloma (and the Pile's) per-document windows, the ``paloma`` protocol (section 5).

    Each document stands alone, prefixed with the BOS (or EOS) token, and documents longer than
    ``L`` (2048 in Paloma) are split into disjoint windows exactly as in ``lm-eval``: this is
    ``plan_rolling(n_tokens, max_length, doc)``, with Paloma's default ``L``. Every token,
    ``t[0]`` included, is scored once.

    Worked example, ``N = 5000, L = 2048``: inputs ``[P]+t[0:2047]``, ``t[2047:4095]``,
    ``t[2951:4999]``, scored ``[0,2048) [2048,4096) [4096,5000)``.
    """
    return plan_rolling(n_tokens, max_length, doc)


def plan_targets(n_tokens: int, spans, max_length: int, doc: int = 0, piece: int | None = None) -> list[Window]:
    """Windows that score only the target spans of a sample (conditional corpora, ``pairs``/``chat``).

    ``spans`` are token spans ``[a, b)`` (non-overlapping, increasing, ``a >= 1``); every token
    of every span is scored exactly once, each with the tokens before it as context:

    - if the whole sample up to the span's last target fits in a window (``b - 1 <= L``), one
      window, input ``t[0 : b-1]``, scores ``t[a : b]``: every target token sees all of the
      sample before it (what one full forward of the sample gives);
    - otherwise the span is cut into pieces of at most ``P`` tokens (``piece``, the config's
      ``eval.stride``; default ``max(1, L // 2)``),
      ``[a, a+P), [a+P, a+2P), ...``, and the piece ``[s, e)`` is scored by the window whose
      input is the ``L`` tokens before its last target, ``t[max(0, e-1-L) : e-1]``: the most
      recent context, at least ``L - P`` tokens of it for every scored token.

    A window's input stops one token short of its last target (``score_end == end + 1``), as in
    ``plan_rolling``. Worked example, ``N = 12``, spans ``[(3, 5), (8, 12)]``, ``L = 4``: span 1
    fits (``5 - 1 <= 4``): input ``[0,4)`` scores ``[3,5)``; span 2 does not (``11 > 4``), ``P = 2``:
    pieces ``[8,10)`` (input ``[5,9)``) and ``[10,12)`` (input ``[7,11)``).
    """
    _check_counts(n_tokens, max_length)
    P = piece or max(1, max_length // 2)
    if not 1 <= P <= max_length:
        raise ValueError(f"the piece length must be in 1..{max_length}, got {P}")
    windows: list[Window] = []
    prev = 0
    for a, b in spans:
        a, b = int(a), int(b)
        if not (1 <= a < b <= n_tokens and a >= prev):
            raise ValueError(f"target spans must be increasing, non-overlapping, within 1..{n_tokens}; got [{a}, {b})")
        prev = b
        step = b - a if b - 1 <= max_length else P
        s = a
        while s < b:
            e = min(b, s + step)
            windows.append(Window(index=len(windows), doc=doc, begin=max(0, e - 1 - max_length), end=e - 1, score_begin=s, score_end=e))
            s = e
    return windows
