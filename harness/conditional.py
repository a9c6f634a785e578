r"""Conditional corpora: score a *target* given its *context* (``corpus.format: pairs | chat``).

A sample is rendered to one text, tokenized once, and its target character spans are mapped
to token spans through the tokenizer's offsets; the target is never tokenized on its own (that
would change the tokens at the boundary).

- ``pairs``: ``text = prompt + separator + target``; one target span, ``[len(prompt + separator),
  len(text))``. With ``corpus.as_chat`` the pair becomes the chat ``[user: prompt, assistant:
  target]`` and is rendered as below.
- ``chat``: ``text = apply_chat_template(messages, tokenize=False)`` (the tokenizer's template,
  or the Jinja file ``corpus.chat_template``). For each message whose role is in
  ``corpus.score_roles``, the span runs from the start of its content in the rendered text to
  the end of its rendered turn with trailing whitespace removed: the content and the
  end-of-turn marker (``<|im_end|>``, ``<|eot_id|>``, ``<end_of_turn>``), never the role header.
  The turn is found by rendering ``messages[:i]`` and ``messages[:i+1]``: the first must be a
  prefix of the second, and the content (as given, else stripped, as templates often strip it)
  must appear in the difference.

The token rule (exact, tested): token ``k`` is a target token when the character it begins at
lies inside a target span, ``start <= c_k < end``. A token that straddles the start of a target
(it begins in the prompt) is context; ending the prompt at a token boundary (the default
separator ``"\n"``, a chat template's newline after the role header) avoids such a token. A
target token ``t[0]`` (no context) cannot be scored and is dropped. A sample whose target has
no token left is an error.

Chat text is tokenized without the tokenizer's own special tokens (templates write BOS
themselves); pairs follow the protocol's BOS policy, like plain text.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Iterator

import numpy as np

from .config import CorpusConfig
from .errors import HarnessError
from .files import existing_file, reading
from .tokens import TokenStream, boundaries, encode


@dataclass(frozen=True)
class Sample:
    text: str  # the rendered sample the model sees
    spans: list[tuple[int, int]]  # target character spans in ``text``


def _field(row: dict, name: str, key: str, n: int):
    if name not in row:
        raise HarnessError(f"{key}: field '{name}' not found in row {n}; available fields: {', '.join(map(str, row))}")
    return row[name]


def _text(value, key: str, name: str, n: int) -> str:
    if not isinstance(value, str):
        raise HarnessError(f"{key}: '{name}' in row {n} holds {type(value).__name__}, not text; name a text column")
    return value


def load_template(cfg: CorpusConfig) -> str | None:
    if not cfg.chat_template:
        return None
    path = existing_file(cfg.chat_template, "corpus.chat_template", "chat template file")
    with reading(path, "corpus.chat_template", "Jinja template file", "save the template as UTF-8 text"):
        return path.read_text(encoding="utf-8")


class Renderer:
    """Renders a chat with the tokenizer's template (or ``corpus.chat_template``)."""

    def __init__(self, tokenizer, template: str | None):
        self.tok, self.template = tokenizer, template
        if template is None and not getattr(tokenizer, "chat_template", None):
            raise HarnessError(
                "corpus.chat_template: this tokenizer ships no chat template; name a Jinja template file in corpus.chat_template"
            )

    def __call__(self, messages: list[dict], n: int) -> str:
        if not messages:
            return ""
        try:
            out = self.tok.apply_chat_template(messages, tokenize=False, chat_template=self.template)
        except Exception as err:  # noqa: BLE001 - jinja raises many kinds; each is a template that does not render
            first = (str(err).strip().splitlines() or [type(err).__name__])[0]
            raise HarnessError(
                f"corpus.chat_template: the chat template does not render row {n} ({type(err).__name__}: {first}); fix the template or the messages"
            ) from None
        if not isinstance(out, str):
            raise HarnessError(f"corpus.chat_template: the chat template rendered {type(out).__name__}, not text (row {n})")
        return out


def _messages(value, key: str, n: int) -> list[dict]:
    if not isinstance(value, (list, tuple)) or not value:
        raise HarnessError(f"{key}: row {n} holds {type(value).__name__}, not a non-empty list of {{role, content}} messages")
    out = []
    for i, m in enumerate(value):
        if not isinstance(m, dict) or "role" not in m or m["role"] is None:
            raise HarnessError(f"{key}: message {i} of row {n} has no role; each message is {{role, content}}")
        if not isinstance(m.get("content"), str):
            raise HarnessError(f"{key}: message {i} of row {n} has no text content; each message is {{role, content}}")
        out.append({"role": str(m["role"]), "content": m["content"]})
    return out


def render_chat(messages: list[dict], render: Renderer, roles: list[str], n: int) -> Sample:
    """The rendered chat and the span of each scored turn (content + end-of-turn marker)."""
    text = render(messages, n)
    spans = []
    for i, m in enumerate(messages):
        if m["role"] not in roles:
            continue
        before, upto = render(messages[:i], n), render(messages[: i + 1], n)
        if not upto.startswith(before) or not text.startswith(upto):
            raise HarnessError(
                f"corpus.chat_template: rendering the first {i} messages of row {n} is not a prefix of rendering more; "
                "turns cannot be located in this template"
            )
        content = m["content"]
        at = upto.find(content, len(before)) if content.strip() else -1
        if at < 0 and content.strip():  # templates often strip the content
            content = content.strip()
            at = upto.find(content, len(before))
        if at < 0:
            raise HarnessError(f"corpus: the {m['role']} turn {i} of row {n} is empty or changed by the chat template; nothing to score")
        end = len(upto.rstrip())
        spans.append((at, end))
    if not spans:
        raise HarnessError(f"corpus.score_roles: row {n} has no {' or '.join(roles)} turn to score")
    return Sample(text, spans)


def samples(cfg: CorpusConfig, rows: Iterator[dict], tokenizer) -> Iterator[Sample]:
    """Each row rendered as a ``Sample`` (pairs or chat)."""
    render = Renderer(tokenizer, load_template(cfg)) if cfg.format == "chat" or cfg.as_chat else None
    for n, row in enumerate(rows):
        if cfg.format == "pairs":
            prompt = _text(_field(row, cfg.prompt_field, "corpus.prompt_field", n), "corpus.prompt_field", cfg.prompt_field, n)
            target = _text(_field(row, cfg.target_field, "corpus.target_field", n), "corpus.target_field", cfg.target_field, n)
            if cfg.as_chat:
                yield render_chat([{"role": "user", "content": prompt}, {"role": "assistant", "content": target}], render, ["assistant"], n)
            else:
                if not target:
                    raise HarnessError(f"corpus.target_field: the target of row {n} is empty; nothing to score")
                head = prompt + cfg.separator
                yield Sample(head + target, [(len(head), len(head) + len(target))])
        else:
            messages = _messages(_field(row, cfg.messages_field, "corpus.messages_field", n), "corpus.messages_field", n)
            yield render_chat(messages, render, cfg.score_roles, n)


def target_tokens(starts: np.ndarray, spans: list[tuple[int, int]]) -> np.ndarray:
    """Token spans ``[a, b)`` (an int64 array [k, 2]) of the tokens that begin inside a target span."""
    out = []
    for s, e in spans:
        a = int(np.searchsorted(starts, s, side="left"))
        b = int(np.searchsorted(starts, e, side="left"))
        a = max(a, 1)  # t[0] has no context
        if b > a:
            out.append((a, b))
    return np.array(out, dtype=np.int64).reshape(-1, 2)


def tokenize_sample(tokenizer, sample: Sample, index: int, add_special_tokens: bool, n: int) -> TokenStream:
    ids, starts = encode(tokenizer, sample.text, add_special_tokens)
    # tokens a tokenizer adds itself (BOS) begin at 0 like the first real token; they are context
    byte_bounds, word_bounds = boundaries(sample.text, np.append(starts, len(sample.text)))
    spans = target_tokens(starts, sample.spans)
    if not len(spans):
        raise HarnessError(f"corpus: the target of row {n} has no token of its own after rendering and tokenizing; nothing to score")
    return TokenStream(np.asarray(ids, dtype=np.int64), byte_bounds, word_bounds, index, None, None, None, spans)


def tokenize_samples(cfg: CorpusConfig, rows: Iterator[dict], tokenizer, add_special_tokens: bool, sha) -> tuple[list[TokenStream], int]:
    """Token streams with target spans, one per sample; ``sha`` hashes the rendered texts."""
    special = add_special_tokens and cfg.format == "pairs" and not cfg.as_chat
    streams = []
    for n, sample in enumerate(samples(cfg, rows, tokenizer)):
        sha.update((b"\x00" if n else b"") + sample.text.encode("utf-8"))
        streams.append(tokenize_sample(tokenizer, sample, n, special, n))
    return streams, len(streams)


# ---------------------------------------------------------------------------------------------
# Per-sample results


SAMPLES = "samples.parquet"


def samples_frame(records, streams, tokenizer):
    """One row per sample: prompt and target tokens, target NLL and perplexity, bytes, words, text.

    ``prompt`` is the decoded text before the first target token, ``target`` the decoded target
    tokens (turns joined by a newline)."""
    import pandas as pd

    sums: dict[int, list] = {}
    for r in records:
        acc = sums.setdefault(r.doc, [0.0, 0, 0, 0])
        acc[0] += r.sum_nll
        acc[1] += r.tokens
        acc[2] += r.bytes
        acc[3] += r.words
    rows = []
    for i, s in enumerate(streams):
        nll, tokens, nbytes, words = sums.get(i, [0.0, 0, 0, 0])
        spans = np.asarray(s.targets)
        n_target = int((spans[:, 1] - spans[:, 0]).sum())
        ids = np.asarray(s.ids)
        rows.append({
            "sample": int(s.doc), "prompt_tokens": len(s) - n_target, "target_tokens": tokens, "target_nll": nll,
            "target_perplexity": float(np.exp(nll / tokens)) if tokens else float("nan"),
            "target_bytes": nbytes, "target_words": words,
            "prompt": tokenizer.decode(ids[: spans[0, 0]].tolist()),
            "target": "\n".join(tokenizer.decode(ids[a:b].tolist()) for a, b in spans),
        })
    return pd.DataFrame(rows)


def conditional_section(frame, fmt: str) -> dict:
    """The record's ``conditional`` object: what the top-level metrics are, and the macro average."""
    ppl = frame["target_perplexity"].to_numpy(dtype=np.float64)
    return {
        "format": fmt,
        "samples": int(len(frame)),
        "prompt_tokens": int(frame["prompt_tokens"].sum()),
        "target_tokens": int(frame["target_tokens"].sum()),
        "macro_perplexity": float(ppl.mean()),
        "macro_nll": float((frame["target_nll"] / frame["target_tokens"]).mean()),
        "metrics": (
            "perplexity, bits_per_byte, word_perplexity: micro, over all target tokens, bytes and words of all samples "
            "(exp(sum target NLL / target tokens)); macro_perplexity: the mean over samples of each sample's target "
            "perplexity; only target tokens are scored, every prompt token is context"
        ),
    }
