r"""Protocol presets: the closed registry of named ways to compute "perplexity on a corpus".

Each preset fixes the corpus form (one concatenated stream or each document on its own), the
join string, the detokenizer, the BOS policy, the default window length and stride, which
planner in ``windows.py`` cuts the windows, and what words and bytes are counted on. A config
names a preset in ``eval.protocol`` and overrides any setting; the resolved ``Settings`` are
recorded in every result, so two different "wikitext perplexities" never look alike.

The maths contract of each preset (PROTOCOLS.md; ``t[0..N)`` is a token stream, ``L`` the
window length, ``S`` the stride). Every preset reports ``PPL = exp(sum_nll / n_scored)`` over
the scored tokens of the whole corpus, with the sum in float64.

``sliding`` (HF guide). One stream, ``"\n\n".join(rows)``, the tokenizer's own special tokens
(BOS at ``t[0]`` only, if any). ``L = min(1024, model max)``, ``S = L // 2``. Windows
``t[b : min(b+L, N)]`` for ``b = 0, S, 2S, ...`` score ``t[prev_end : end]``, never their
first position: with ``S < L`` every token but ``t[0]`` is scored once, denominator ``N - 1``.
Example ``N = 10, L = 4, S = 2``: scored ``[1,4) [4,6) [6,8) [8,10)``, 9 tokens.

``gptq`` (GPTQ, AWQ). The same stream; ``L = min(2048, model max)``; ``N // L`` disjoint windows
``t[kL : (k+1)L]``, tail dropped, each scoring ``t[kL+1 : (k+1)L]``: denominator
``(N // L) * (L - 1)``, every window weighs the same. Example ``N = 10, L = 4``: ``[1,4) [5,8)``.

``llamacpp`` (llama-perplexity). The same stream (with ``corpus.detokenizer: wikitext-raw`` and
``corpus.join: ""`` the WikiText rows become the ``wiki.test.raw`` file llama.cpp reads),
tokenized with the model's add-BOS setting. ``C = 512``; ``N // C`` chunks, tail dropped, at
least ``2C`` tokens or an error; BOS *replaces* each chunk's first token when the model adds
BOS; each chunk scores ``t[kC + C//2 + 1 : (k+1)C]``: denominator ``(N // C) * (C - C//2 - 1)``
(255 per chunk at 512). Reports ``perplexity_pm = PPL * sqrt(var / (n - 1))`` (population
variance of the per-token NLLs) and the running PPL after each chunk (``running_perplexity``
in ``windows.parquet``). Example ``N = 13, C = 6``: ``[4,6) [10,12)``, 4 tokens.

``lm-eval`` (lm-evaluation-harness ``wikitext``). Each document on its own, wikitext-detokenized,
no special tokens; ``L`` = the model's maximum (``eval.max_length: 2048`` as published).
Rolling windows of ``L`` predicted tokens: the first is ``[prefix] + t[0 : L-1]`` scoring
``t[0 : L]`` (prefix = BOS, else EOS), window ``j`` is ``t[jL-1 : (j+1)L-1]`` scoring
``t[jL : (j+1)L]``, the last partial block keeps ``L`` tokens of input. Every token is scored:
denominator ``N`` per document. Words and bytes are counted on the *original* page
(``len(re.split(r"\s+", page))``, UTF-8 bytes): ``word_perplexity = exp(sum_nll / words)``,
``byte_perplexity = exp(sum_nll / bytes)``, ``bits_per_byte = sum_nll / (bytes ln 2)``.
Example ``N = 10, L = 4``: inputs ``[P]+t[0:3], t[3:7], t[5:9]``, scored ``[0,4) [4,8) [8,10)``.

``paloma`` (Paloma, the Pile). Each document on its own behind the prefix token, no detokenizer,
``L = min(2048, model max)``, windows exactly as ``lm-eval``. With ``corpus.domain_field`` the
record's ``domains`` holds each domain's token perplexity ``exp(sum_nll_d / n_d)`` and the macro
average ``mean_d PPL_d`` (the results table's ``macro_perplexity``). Example: domains a and b
with PPL 10 and 20 give macro 15, whatever their token counts.

Resolution happens once, in two halves: ``resolve_corpus`` (the tokenizer is enough: corpus form,
join, detokenizer, BOS policy, special tokens, what words and bytes are counted on) feeds the
corpus readers, and ``resolve_windows`` adds what needs the model (``L``, ``S``, the check that
``L`` fits). ``Settings.as_dict()`` is what records and config hashes hold.

Conditional corpora (``corpus.format: pairs | chat``, conditional.py) take ``L`` from the
``sliding``, ``lm-eval`` or ``paloma`` preset, but their windows come from
``windows.plan_targets``: only target tokens are scored, each with its sample's earlier tokens as
context (``S`` is the piece length of a target longer than the window, default ``L // 2``).
``gptq`` and ``llamacpp`` cut fixed windows from one stream and are refused for them.
"""

from __future__ import annotations

import warnings
from dataclasses import asdict, dataclass, fields
from typing import Callable

from . import windows as W
from .config import RunConfig
from .errors import HarnessError, HarnessWarning
from .windows import BosPolicy, Window


# (n_tokens, max_length L, stride S, BOS policy, document index) -> that document's windows
Planner = Callable[[int, int, int, BosPolicy, int], list[Window]]


@dataclass(frozen=True)
class Preset:
    name: str
    summary: str
    mode: str  # "concat" or "documents"
    join: str
    detokenizer: str
    bos: Callable[[bool], BosPolicy]  # from "does the tokenizer add BOS by itself"
    max_length: Callable[[int | None], int]  # from the model's maximum positions
    stride: Callable[[int], int]  # from the window length
    counts_on: str  # "scored" text, or the "original" document (lm-eval)
    planner: Planner  # one document's windows, from windows.py
    uses_prefix: bool = False  # first window of a document is preceded by BOS (or EOS)


def _cap(default: int) -> Callable[[int | None], int]:
    return lambda model_max: min(default, model_max) if model_max else default


PRESETS: dict[str, Preset] = {
    p.name: p
    for p in [
        Preset("sliding", "HF guide: strided sliding window over one stream, each token scored once",
               "concat", "\n\n", "none", lambda adds: BosPolicy.STREAM, _cap(1024), lambda L: L // 2, "scored",
               planner=W.plan_sliding),
        Preset("gptq", "GPTQ/AWQ papers: disjoint windows of L over one stream, tail dropped, first token unscored",
               "concat", "\n\n", "none", lambda adds: BosPolicy.STREAM, _cap(2048), lambda L: L, "scored",
               planner=lambda n, L, S, bos, doc: W.plan_disjoint(n, L, bos, doc)),
        Preset("llamacpp", "llama-perplexity: chunks of C, BOS replaces each chunk's first token, second half scored",
               "concat", "\n\n", "none", lambda adds: BosPolicy.REPLACE if adds else BosPolicy.NONE,
               lambda model_max: 512, lambda L: L, "scored",
               planner=lambda n, L, S, bos, doc: W.plan_llamacpp(n, L, bos == BosPolicy.REPLACE, doc)),
        Preset("lm-eval", "lm-evaluation-harness wikitext: per-document rolling windows, detokenized, prefix token",
               "documents", "\n\n", "wikitext", lambda adds: BosPolicy.NONE, lambda m: m or 2048, lambda L: L,
               "original", planner=lambda n, L, S, bos, doc: W.plan_rolling(n, L, doc), uses_prefix=True),
        Preset("paloma", "Paloma: each document on its own behind BOS, rolling windows of 2048, per-domain PPL",
               "documents", "\n\n", "none", lambda adds: BosPolicy.NONE, _cap(2048), lambda L: L,
               "scored", planner=lambda n, L, S, bos, doc: W.plan_paloma(n, L, doc), uses_prefix=True),
    ]
}


@dataclass(frozen=True)
class CorpusSettings:
    """The corpus side of a protocol: what the corpus readers and the tokenizer need (no model).

    Resolved once per run from the config, the preset and whether the tokenizer adds BOS by
    itself; the window side (``Settings``) is computed from it and the model's maximum length.
    """

    protocol: str
    bos: str
    mode: str
    join: str
    detokenizer: str
    add_special_tokens: bool
    counts_on: str
    prefix_token: str | None  # "bos" or "eos" for presets that put a prefix token first
    format: str = "text"  # text, or a conditional corpus (pairs, chat): only target spans are scored


@dataclass(frozen=True, kw_only=True)
class Settings(CorpusSettings):
    """Everything that decides which tokens are scored with which context; recorded in results:
    the corpus side, plus the window length and stride (pairs/chat: windows from
    ``windows.plan_targets``, L from the protocol, S the piece length of a long target)."""

    max_length: int
    stride: int

    def as_dict(self) -> dict:
        out = asdict(self)
        if out["format"] == "text":  # plain text records (and their config hashes) stay as they were
            del out["format"]
        return out

    @property
    def corpus(self) -> CorpusSettings:
        return CorpusSettings(**{f.name: getattr(self, f.name) for f in fields(CorpusSettings)})


def resolve_corpus(cfg: RunConfig, tokenizer_adds_bos: bool) -> CorpusSettings:
    """The corpus side: corpus form, join, detokenizer, BOS policy and special tokens (no model needed)."""
    preset = PRESETS[cfg.eval.protocol]
    if cfg.eval.bos is not None and preset.uses_prefix:
        raise HarnessError(
            f"eval.bos: the {preset.name} protocol always puts the prefix token (BOS, else EOS) before each document; remove eval.bos"
        )
    if cfg.eval.bos == BosPolicy.EVERY and preset.name == "llamacpp":
        raise HarnessError("eval.bos: llama.cpp replaces a chunk's first token with BOS, never prepends it; use replace or none")
    bos = cfg.eval.bos or preset.bos(tokenizer_adds_bos)
    fmt = cfg.corpus.format
    if fmt != "text":
        return _conditional_corpus(cfg, preset, bos)
    return CorpusSettings(
        protocol=preset.name,
        bos=bos.value,
        mode=cfg.corpus.mode or preset.mode,
        join=cfg.corpus.join if cfg.corpus.join is not None else preset.join,
        detokenizer=cfg.corpus.detokenizer or preset.detokenizer,
        # 'stream' and 'replace' keep the tokenizer's own special tokens; 'none' and 'every' do not
        add_special_tokens=bos in (BosPolicy.STREAM, BosPolicy.REPLACE) and not preset.uses_prefix,
        counts_on=preset.counts_on,
        prefix_token="bos" if preset.uses_prefix else None,
    )


CONDITIONAL_PROTOCOLS = ("sliding", "lm-eval", "paloma")


def _conditional_corpus(cfg: RunConfig, preset: Preset, bos: BosPolicy) -> CorpusSettings:
    """pairs/chat: each sample on its own, no detokenizer, counts on the scored target text.

    The protocol contributes its window length L (and, for pairs, whether the tokenizer's own
    BOS is kept); the windows come from ``windows.plan_targets``."""
    fmt = cfg.corpus.format
    if preset.name not in CONDITIONAL_PROTOCOLS:
        raise HarnessError(
            f"eval.protocol: {preset.name} cuts fixed windows from one stream, which does not apply to corpus.format: {fmt}; "
            f"use one of {', '.join(CONDITIONAL_PROTOCOLS)}"
        )
    if bos in (BosPolicy.EVERY, BosPolicy.REPLACE):
        raise HarnessError(f"eval.bos: {bos.value} does not apply to corpus.format: {fmt}; use stream or none")
    return CorpusSettings(
        protocol=preset.name, bos=bos.value, mode="documents", join=preset.join,
        detokenizer=cfg.corpus.detokenizer or "none",
        add_special_tokens=bos == BosPolicy.STREAM, counts_on="scored", prefix_token=None, format=fmt,
    )


def resolve_windows(cfg: RunConfig, corpus: CorpusSettings, model_max: int | None) -> Settings:
    """The window side: L and S from the corpus side and the model's maximum positions; checks L fits."""
    preset = PRESETS[corpus.protocol]
    L = cfg.eval.max_length or preset.max_length(model_max)
    if model_max and L > model_max:
        raise HarnessError(
            f"eval.max_length: {L} is larger than the model's {model_max} positions; set eval.max_length <= {model_max}"
        )
    bos = BosPolicy(corpus.bos)
    stride = cfg.eval.stride or preset.stride(L)
    if preset.name != "sliding" and corpus.format == "text" and stride != preset.stride(L):
        # the planner never reads S: recorded, it made runs of the same windows look incomparable
        warnings.warn(f"eval.stride: the {preset.name} protocol's windows do not slide; eval.stride={stride} is not "
                      f"used (recorded as {preset.stride(L)})", HarnessWarning, stacklevel=2)
        stride = preset.stride(L)
    if preset.name == "sliding":
        stride = min(stride, L - 1) if bos == BosPolicy.EVERY and cfg.eval.stride is None else stride
    if corpus.format != "text":  # the piece length of a target longer than the window (plan_targets)
        stride = cfg.eval.stride or max(1, L // 2)
        if stride > L:
            raise HarnessError(f"eval.stride: {stride} is larger than eval.max_length {L}; a target piece must fit in a window")
    return Settings(**asdict(corpus), max_length=L, stride=stride)


def resolve(cfg: RunConfig, tokenizer_adds_bos: bool, model_max: int | None) -> Settings:
    """Both sides at once (for callers that have the model's maximum at hand)."""
    return resolve_windows(cfg, resolve_corpus(cfg, tokenizer_adds_bos), model_max)


def plan_streams(settings: Settings, streams) -> list[Window]:
    """The windows for token streams: the protocol's planner, or the target planner for pairs/chat."""
    if settings.format == "text":
        return plan(settings, [len(s) for s in streams])
    out: list[Window] = []
    for doc, s in enumerate(streams):
        out.extend(W.renumber(W.plan_targets(len(s), s.targets, settings.max_length, doc, settings.stride), len(out)))
    return out


def plan(settings: Settings, lengths: list[int]) -> list[Window]:
    """The windows for streams of the given lengths (one per document), numbered globally."""
    out: list[Window] = []
    bos = BosPolicy(settings.bos)
    L, S = settings.max_length, settings.stride
    planner = PRESETS[settings.protocol].planner
    for doc, n in enumerate(lengths):
        try:
            ws = planner(n, L, S, bos, doc)
        except W.TooFewTokens as err:
            raise HarnessError(f"corpus: {err} (eval.max_length is ctx); use more text or a smaller eval.max_length") from None
        except ValueError as err:
            raise HarnessError(f"eval: {err}") from None
        out.extend(W.renumber(ws, len(out)))
    if not out:
        raise HarnessError(
            f"corpus: too short for one scored window of {settings.protocol} (max_length {L}); use more text or a smaller eval.max_length"
        )
    return out
