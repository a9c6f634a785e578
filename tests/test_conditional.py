"""Conditional corpora (pairs, chat): only the targets are scored, each with its sample's context.

The harness is held to a plain reference written here: render the sample, tokenize it once,
mark the target tokens by the rule in conditional.py (a token is a target token when the
character it begins at lies in a target span), run the model over the sample in float64 and sum
the NLL of the target tokens only. Samples longer than the window use the rolling rule of
``windows.plan_targets``, restated plainly in ``reference_sample``.
"""

from __future__ import annotations

import json
import math
from pathlib import Path

import numpy as np
import pandas as pd
import pytest

from harness.config import validate
from harness.errors import HarnessError
from harness.runner import run
from harness.windows import plan_targets

from .conftest import MIRROR, SMOLLM2
from .reference import full_logprobs
from .threads import one_thread  # noqa: F401 (a fixture)

TEMPLATES = {
    # name: (Jinja template, header before an assistant turn's content, end-of-turn marker)
    "chatml": (
        "{% for m in messages %}{{ '<|im_start|>' + m['role'] + '\\n' + m['content'] + '<|im_end|>' + '\\n' }}{% endfor %}",
        "<|im_start|>assistant\n", "<|im_end|>",
    ),
    "llama3": (
        "{{ bos_token }}{% for m in messages %}{{ '<|start_header_id|>' + m['role'] + '<|end_header_id|>\\n\\n' + m['content'] | trim + '<|eot_id|>' }}{% endfor %}",
        "<|start_header_id|>assistant<|end_header_id|>\n\n", "<|eot_id|>",
    ),
    "gemma": (
        "{{ bos_token }}{% for m in messages %}{% set role = 'model' if m['role'] == 'assistant' else m['role'] %}"
        "{{ '<start_of_turn>' + role + '\\n' + m['content'] | trim + '<end_of_turn>\\n' }}{% endfor %}",
        "<start_of_turn>model\n", "<end_of_turn>",
    ),
}

PAIRS = [
    {"q": "What is two and two?", "a": "Four. The river rises in the hills."},
    {"q": "Name a fox.", "a": "The quick brown fox jumps over the lazy dog."},
    {"q": "Tell me about the bridge over the river, please, in a few words.",
     "a": "In 1998 the town built a bridge ( the first one ) over it ; it is still in use today . " * 3},
    {"q": "Why?", "a": "Tokens, bytes and words are counted on the text that was scored."},
    {"q": "A long question. " * 20, "a": "A short answer."},
]

CHATS = [
    [{"role": "system", "content": "Be brief."}, {"role": "user", "content": "What is perplexity?"},
     {"role": "assistant", "content": "The exponential of the mean negative log-likelihood."},
     {"role": "user", "content": "And a sliding window?"},
     {"role": "assistant", "content": "Each window re-reads some earlier tokens as context and scores only the new ones."},
     {"role": "user", "content": "Thanks."}, {"role": "assistant", "content": "You are welcome."}],
    [{"role": "user", "content": "Name a fox."}, {"role": "assistant", "content": " The quick brown fox jumps over the lazy dog. "}],
    [{"role": "user", "content": "Where does the river rise?"}, {"role": "assistant", "content": "In the hills. " * 8},
     {"role": "user", "content": "And then?"}, {"role": "assistant", "content": "It flows 1,200 km east and meets the sea at a wide delta."}],
]


def write_jsonl(path: Path, rows: list[dict]) -> Path:
    path.write_text("".join(json.dumps(r) + "\n" for r in rows))
    return path


def reference_sample(model, tok, text: str, spans: list[tuple[int, int]], L: int, add_special_tokens: bool) -> tuple[float, int]:
    """(sum of target NLLs, target tokens) of one rendered sample, the plain way."""
    enc = tok(text, add_special_tokens=add_special_tokens, return_offsets_mapping=True)
    ids, offsets = enc["input_ids"], enc["offset_mapping"]
    # a token is a target token when its first character is inside a target span; t[0] has no context
    target = [k >= 1 and any(s <= offsets[k][0] < e for s, e in spans) and offsets[k] != (0, 0) for k in range(len(ids))]
    runs, k = [], 0
    while k < len(ids):
        if target[k]:
            a = k
            while k < len(ids) and target[k]:
                k += 1
            runs.append((a, k))
        else:
            k += 1
    total, count = 0.0, 0
    if len(ids) - 1 <= L:  # the sample fits: one full forward over all of it
        logp = full_logprobs(model, ids)
        for a, b in runs:
            for p in range(a, b):
                total -= float(logp[p - 1, ids[p]])
                count += 1
        return total, count
    for a, b in runs:
        # a run whose context fits is scored in one window over t[0 : b-1]; a longer one in pieces of
        # L // 2 targets, each predicted from the L tokens before the piece's last target
        piece = b - a if b - 1 <= L else L // 2
        for s in range(a, b, piece):
            e = min(b, s + piece)
            begin = max(0, e - 1 - L)
            logp = full_logprobs(model, ids[begin : e - 1])
            for p in range(s, e):
                total -= float(logp[p - 1 - begin, ids[p]])
                count += 1
    return total, count


def chat_spans(text: str, messages: list[dict], header: str, end: str) -> list[tuple[int, int]]:
    """Spans of the assistant turns, found by their known header and end marker (not by the harness's way)."""
    spans, pos = [], 0
    for m in messages:
        if m["role"] != "assistant":
            continue
        # the content as given, or stripped where the template trims it
        content = m["content"] if header + m["content"] + end in text[pos:] else m["content"].strip()
        at = text.index(header + content + end, pos) + len(header)
        pos = at + len(content) + len(end)
        spans.append((at, pos))
    return spans


def assert_samples_match(res, expected: list[tuple[float, int]]) -> None:
    samples = res.samples.sort_values("sample")
    assert list(samples.target_tokens) == [c for _, c in expected]
    assert samples.target_nll.to_numpy() == pytest.approx([t for t, _ in expected], rel=1e-6)
    total = sum(t for t, _ in expected)
    assert res["scored_tokens"] == sum(c for _, c in expected)
    assert math.isclose(res["sum_nll"], total, rel_tol=1e-6)
    assert math.isclose(res["perplexity"], math.exp(total / res["scored_tokens"]), rel_tol=1e-6)
    macro = np.mean([math.exp(t / c) for t, c in expected])
    assert math.isclose(res["conditional"]["macro_perplexity"], macro, rel_tol=1e-6)


def pairs_config(folder, path, L=512, batch_size=1, **corpus) -> dict:
    return {"model": {"name_or_path": str(folder), "device": "cpu", "dtype": "float32"},  # float32: the invariances are exact
            "corpus": {"path": str(path), "format": "pairs", "prompt_field": "q", "target_field": "a", **corpus},
            "eval": {"max_length": L, "batch_size": batch_size, "bootstrap": 20}}


# ---------------------------------------------------------------------------------------------
# The planner


def test_plan_targets_worked_example_and_properties():
    ws = plan_targets(12, [(3, 5), (8, 12)], 4)
    assert [(w.begin, w.end, w.score_begin, w.score_end) for w in ws] == [(0, 4, 3, 5), (5, 9, 8, 10), (7, 11, 10, 12)]
    rng = np.random.default_rng(0)
    for _ in range(300):
        n, L = int(rng.integers(2, 80)), int(rng.integers(2, 20))
        cuts = sorted(set(rng.integers(1, n + 1, size=int(rng.integers(2, 8))).tolist()))
        spans = [(a, b) for a, b in zip(cuts[::2], cuts[1::2]) if b > a]
        scored = []
        for w in plan_targets(n, spans, L):
            assert w.input_length <= L and w.begin <= w.score_begin - 1 and w.score_end <= w.end + 1
            scored.extend(range(w.score_begin, w.score_end))
        assert scored == [p for a, b in spans for p in range(a, b)]  # every target token once, nothing else
    with pytest.raises(ValueError):
        plan_targets(10, [(0, 3)], 4)


# ---------------------------------------------------------------------------------------------
# Against the reference on the tiny model


@pytest.mark.parametrize("batch_size", [1, 3, 8])
@pytest.mark.parametrize("L", [512, 24], ids=["shorter-than-L", "longer-than-L"])
def test_pairs_match_reference(tiny, tmp_path, batch_size, L, one_thread):
    folder, model, tok = tiny
    path = write_jsonl(tmp_path / "pairs.jsonl", PAIRS)
    res = run(validate(pairs_config(folder, path, L, batch_size)), model=model, tokenizer=tok, progress=False, write=False)
    assert res["protocol"]["format"] == "pairs"
    expected = []
    for r in PAIRS:
        head = r["q"] + "\n"
        expected.append(reference_sample(model, tok, head + r["a"], [(len(head), len(head + r["a"]))], L, True))
    assert_samples_match(res, expected)
    # bytes and words of the scored target text: each target starts at a token boundary here
    s = res.samples.sort_values("sample")
    assert list(s.target_bytes) == [len(r["a"].encode()) for r in PAIRS]
    assert list(s.target_words) == [len(r["a"].split()) for r in PAIRS]
    assert list(s.target) == [r["a"] for r in PAIRS]


def test_token_straddling_the_target_start_is_context(tiny, tmp_path):
    """With separator ' ', the byte-level token 'Ġthe' begins in the separator: it is context."""
    folder, model, tok = tiny
    path = write_jsonl(tmp_path / "p.jsonl", [{"q": "It rises in", "a": "the hills."}])
    res = run(validate(pairs_config(folder, path, separator=" ")), model=model, tokenizer=tok, progress=False, write=False)
    text = "It rises in the hills."
    assert "Ġthe" in tok.convert_ids_to_tokens(tok(text)["input_ids"])
    assert res.samples.target.iloc[0] == " hills."
    assert res.samples.target_words.iloc[0] == 1 and res.samples.target_bytes.iloc[0] == len(" hills.")
    assert_samples_match(res, [reference_sample(model, tok, text, [(12, len(text))], 512, True)])


@pytest.mark.parametrize("template", sorted(TEMPLATES))
@pytest.mark.parametrize("L", [512, 48], ids=["shorter-than-L", "longer-than-L"])
def test_chat_templates_match_reference(tiny, tmp_path, template, L, one_thread):
    folder, model, tok = tiny
    jinja, header, end = TEMPLATES[template]
    (tmp_path / "t.jinja").write_text(jinja)
    path = write_jsonl(tmp_path / "chat.jsonl", [{"messages": m} for m in CHATS])
    cfg = {"model": {"name_or_path": str(folder), "device": "cpu", "dtype": "float32"},
           "corpus": {"path": str(path), "format": "chat", "chat_template": str(tmp_path / "t.jinja")},
           "eval": {"max_length": L, "batch_size": 3, "bootstrap": 20}}
    res = run(validate(cfg), model=model, tokenizer=tok, progress=False, write=False)
    expected = []
    for messages in CHATS:
        text = tok.apply_chat_template(messages, tokenize=False, chat_template=jinja)
        expected.append(reference_sample(model, tok, text, chat_spans(text, messages, header, end), L, False))
    assert_samples_match(res, expected)
    first = res.samples.sort_values("sample").target.iloc[0].split("\n")
    # each assistant turn's content and its end-of-turn marker, never the header
    assert first[0] == CHATS[0][2]["content"] + end and "assistant" not in res.samples.target.str.cat()


def test_pairs_as_chat_is_one_user_and_one_assistant_turn(tiny, tmp_path):
    folder, model, tok = tiny
    jinja, header, end = TEMPLATES["chatml"]
    (tmp_path / "t.jinja").write_text(jinja)
    path = write_jsonl(tmp_path / "pairs.jsonl", PAIRS[:3])
    res = run(validate(pairs_config(folder, path, as_chat=True, chat_template=str(tmp_path / "t.jinja"))),
              model=model, tokenizer=tok, progress=False, write=False)
    expected = []
    for r in PAIRS[:3]:
        messages = [{"role": "user", "content": r["q"]}, {"role": "assistant", "content": r["a"]}]
        text = tok.apply_chat_template(messages, tokenize=False, chat_template=jinja)
        expected.append(reference_sample(model, tok, text, chat_spans(text, messages, header, end), 512, False))
    assert_samples_match(res, expected)


# ---------------------------------------------------------------------------------------------
# Outputs and the other paths (cache, streaming, KL) on pairs


def test_outputs_cache_and_streaming_on_pairs(tiny, tmp_path, monkeypatch, capsys, one_thread):
    folder, model, tok = tiny
    monkeypatch.setenv("PPL_CACHE_DIR", str(tmp_path / "cache"))
    path = write_jsonl(tmp_path / "pairs.jsonl", PAIRS)
    cfg = pairs_config(folder, path, 24, 3)
    cfg["output"] = {"save_tokens": True}
    first = run(validate(cfg), tmp_path / "a", model=model, tokenizer=tok, progress=False)
    assert "token cache: stored" in capsys.readouterr().err
    again = run(validate(cfg), tmp_path / "b", model=model, tokenizer=tok, progress=False)
    assert "token cache: hit" in capsys.readouterr().err
    cfg["corpus"].update(streaming=True, cache=False)
    streamed = run(validate(cfg), tmp_path / "c", model=model, tokenizer=tok, progress=False)
    for other in (again, streamed):
        assert other["sum_nll"] == first["sum_nll"] and other["scored_tokens"] == first["scored_tokens"]
        assert other["corpus"]["text_sha256"] == first["corpus"]["text_sha256"]
    # beside the record: the per-sample table and every scored token
    samples = pd.read_parquet(tmp_path / "a" / "samples.parquet")
    assert list(samples.columns) == ["sample", "prompt_tokens", "target_tokens", "target_nll", "target_perplexity",
                                     "target_bytes", "target_words", "prompt", "target"]
    tokens = pd.read_parquet(tmp_path / "a" / "tokens.parquet")
    assert len(tokens) == first["scored_tokens"]
    assert tokens.nll.astype("float64").sum() == pytest.approx(first["sum_nll"], rel=1e-6)
    by_sample = tokens.groupby("document").nll.sum().to_numpy()
    assert by_sample == pytest.approx(samples.sort_values("sample").target_nll.to_numpy(), rel=1e-5)
    enc = tok(PAIRS[0]["q"] + "\n" + PAIRS[0]["a"])["input_ids"]
    mine = tokens[tokens.document == 0].sort_values("position")
    assert list(mine.token_id) == [enc[p] for p in mine.position]
    assert list(mine.token) == tok.convert_ids_to_tokens([enc[p] for p in mine.position])
    assert first["conditional"]["format"] == "pairs" and "micro" in first["conditional"]["metrics"]


def test_kl_on_pairs(tiny, tmp_path):
    folder, model, tok = tiny
    path = write_jsonl(tmp_path / "pairs.jsonl", PAIRS[:3])
    cfg = pairs_config(folder, path, 24, 2)
    cfg["baseline_model"] = {"name_or_path": str(folder), "device": "cpu", "dtype": "float32"}
    res = run(validate(cfg), model=model, tokenizer=tok, baseline_model=model, progress=False, write=False)
    assert res["kl"]["mean"] == pytest.approx(0.0, abs=1e-6) and res["kl"]["top1_agreement"] == 1.0
    plain = run(validate(pairs_config(folder, path, 24, 2)), model=model, tokenizer=tok, progress=False, write=False)
    assert res["sum_nll"] == pytest.approx(plain["sum_nll"], rel=1e-9) and res["scored_tokens"] == plain["scored_tokens"]


# ---------------------------------------------------------------------------------------------
# Bad input: one line, nothing written


def _fails(tmp_path, tiny, cfg: dict, *needles: str) -> None:
    folder, model, tok = tiny
    results = tmp_path / "results"
    with pytest.raises(HarnessError) as info:
        run(validate(cfg), results / "r", model=model, tokenizer=tok, progress=False)
    msg = str(info.value)
    assert "\n" not in msg, msg
    for needle in needles:
        assert needle in msg, msg
    assert not results.exists() or not any(results.glob("**/*.json")), "something was written"


def test_bad_conditional_input_is_one_line(tiny, tmp_path):
    folder, _, _ = tiny
    jinja = tmp_path / "t.jinja"
    jinja.write_text(TEMPLATES["chatml"][0])

    def chat(rows, **corpus):
        path = write_jsonl(tmp_path / "c.jsonl", rows)
        return {"model": {"name_or_path": str(folder), "device": "cpu", "dtype": "float32"},
                "corpus": {"path": str(path), "format": "chat", "chat_template": str(jinja), **corpus}, "eval": {"max_length": 64}}

    pairs = write_jsonl(tmp_path / "p.jsonl", PAIRS[:2])
    _fails(tmp_path, tiny, pairs_config(folder, pairs, prompt_field="question"), "corpus.prompt_field", "'question' not found")
    _fails(tmp_path, tiny, pairs_config(folder, write_jsonl(tmp_path / "e.jsonl", [{"q": "x", "a": ""}])), "target of row 0 is empty")
    _fails(tmp_path, tiny, chat([{"messages": [{"content": "hi"}]}]), "message 0 of row 0 has no role")
    _fails(tmp_path, tiny, chat([{"turns": []}]), "corpus.messages_field", "'messages' not found")
    _fails(tmp_path, tiny, chat([{"messages": [{"role": "user", "content": "q"}, {"role": "assistant", "content": "  "}]}]),
           "assistant turn 1 of row 0 is empty")
    _fails(tmp_path, tiny, chat([{"messages": [{"role": "user", "content": "q"}]}]), "no assistant turn to score")
    jinja.write_text("{% for m in messages %}{{ m.content | no_such_filter }}{% endfor %}")
    _fails(tmp_path, tiny, chat([{"messages": CHATS[1]}]), "corpus.chat_template: the chat template does not render")
    _fails(tmp_path, tiny, chat([{"messages": CHATS[1]}], chat_template=str(tmp_path / "none.jinja")), "chat template file not found")
    _fails(tmp_path, tiny, chat([{"messages": CHATS[1]}], chat_template=None), "ships no chat template")
    gptq = pairs_config(folder, pairs)
    gptq["eval"]["protocol"] = "gptq"
    _fails(tmp_path, tiny, gptq, "eval.protocol: gptq", "corpus.format: pairs")


# ---------------------------------------------------------------------------------------------
# The real SmolLM2-135M-Instruct on GSM8K


def gsm8k(n: int) -> list[dict]:
    return pd.read_parquet(MIRROR / "openai/gsm8k/main/test.parquet").head(n).to_dict("records")


GSM8K = {"dataset": "openai/gsm8k", "config": "main", "split": "test", "format": "pairs", "prompt_field": "question",
         "target_field": "answer", "max_documents": 8}


@pytest.mark.parametrize("as_chat", [False, True], ids=["pairs", "chat"])
def test_smollm2_gsm8k_matches_reference(smollm2, as_chat, one_thread):
    model, tok = smollm2
    cfg = {"model": SMOLLM2, "corpus": {**GSM8K, "as_chat": as_chat}, "eval": {"max_length": 2048, "batch_size": 3, "bootstrap": 20}}
    res = run(validate(cfg), model=model, tokenizer=tok, progress=False, write=False)
    expected = []
    for r in gsm8k(8):
        if as_chat:
            messages = [{"role": "user", "content": r["question"]}, {"role": "assistant", "content": r["answer"]}]
            text = tok.apply_chat_template(messages, tokenize=False)
            expected.append(reference_sample(model, tok, text, chat_spans(text, messages, "<|im_start|>assistant\n", "<|im_end|>"), 2048, False))
        else:
            head = r["question"] + "\n"
            expected.append(reference_sample(model, tok, head + r["answer"], [(len(head), len(head + r["answer"]))], 2048, True))
    assert_samples_match(res, expected)
    assert 1.0 < res["perplexity"] < 20


# ---------------------------------------------------------------------------------------------
# compare, show, data parallel and resume on pairs


def test_compare_pairs_with_chat_by_sample_and_show_worst(tiny, tmp_path):
    from harness.compare import compare
    from harness.paired import paired_bootstrap
    from harness.worst import worst

    folder, model, tok = tiny
    (tmp_path / "t.jinja").write_text(TEMPLATES["chatml"][0])
    path = write_jsonl(tmp_path / "pairs.jsonl", PAIRS)
    raw = run(validate(pairs_config(folder, path, 24, 2)), tmp_path / "res" / "raw", model=model, tokenizer=tok, progress=False)
    chat = run(validate(pairs_config(folder, path, 24, 2, as_chat=True, chat_template=str(tmp_path / "t.jinja"))),
               tmp_path / "res" / "chat", model=model, tokenizer=tok, progress=False)
    comp = compare([str(tmp_path / "res" / "raw"), str(tmp_path / "res" / "chat")], samples=200)
    row = comp.table.set_index("run").loc["chat"]
    assert comp.metric == "bits_per_byte" and row.compared_on.startswith("bits per byte of the targets, by sample")
    assert row.test == f"paired bootstrap over {len(PAIRS)} samples"
    # the same interval from the two per-sample tables, the plain way
    a, b = raw.samples.sort_values("sample"), chat.samples.sort_values("sample")
    ref = paired_bootstrap(a.target_nll, b.target_nll, a.target_bytes, b.target_bytes, metric="bits_per_byte", samples=200)
    assert [row.delta_ci95_low, row.delta_ci95_high] == pytest.approx(ref.ci95)
    bpb = lambda s: s.target_nll.sum() / (s.target_bytes.sum() * math.log(2))  # noqa: E731
    assert row.delta_bpb == pytest.approx(bpb(b) - bpb(a), rel=1e-9)
    # ppl show --worst: the samples by mean target NLL, with their text
    kind, frame = worst(tmp_path / "res" / "raw", 3)
    mean = (a.target_nll / a.target_tokens).to_numpy()
    assert kind == "samples" and list(frame["sample"]) == list(np.argsort(-mean)[:3])
    assert list(frame.target) == [PAIRS[i]["a"] for i in frame["sample"]]


def test_show_worst_windows_of_a_text_run(tiny, tiny_corpus, tmp_path):
    from harness.worst import render, worst

    from .conftest import tiny_config
    from .test_errors import cli

    folder, model, tok = tiny
    res = run(validate(tiny_config(folder, tiny_corpus)), tmp_path / "r", model=model, tokenizer=tok, progress=False)
    kind, frame = worst(tmp_path / "r", 5, tokenizer=tok)
    w = res.windows.assign(mean=res.windows.sum_nll / res.windows.tokens).sort_values("mean", ascending=False).head(5)
    assert kind == "windows" and list(frame["index"]) == list(w["index"])
    ids = tok("\n\n".join(json.loads(line)["text"] for line in tiny_corpus.read_text().splitlines()))["input_ids"]
    assert list(frame.text) == [tok.decode(ids[a:b]) for a, b in zip(w.score_begin, w.score_end)]
    assert "highest mean NLL" in render(kind, frame)
    proc = cli("show", str(tmp_path / "r"), "--worst", "3")
    assert proc.returncode == 0, proc.stderr[-2000:]
    assert proc.stdout.count("\n|") >= 4  # the header, the rule and three windows


def test_two_processes_equal_one_on_pairs(tiny, tmp_path, one_thread):
    from .test_distributed import assert_same_record, torchrun

    folder, model, tok = tiny
    path = write_jsonl(tmp_path / "pairs.jsonl", PAIRS)
    config = pairs_config(folder, path, 24, 2, cache=False)
    single = run(validate(config), model=model, tokenizer=tok, write=False, progress=False)
    assert single["windows"] % 2 == 1, "the test wants work that does not split evenly over 2 ranks"
    config["output"] = {"save_tokens": True}
    out = tmp_path / "results" / "dp"
    multi = torchrun(config, out, tmp_path)
    assert_same_record(multi, single.record, same_config=True)
    samples = pd.read_parquet(out / "samples.parquet")
    assert samples.target_nll.to_numpy() == pytest.approx(single.samples.target_nll.to_numpy(), rel=1e-6)
    assert len(pd.read_parquet(out / "tokens.parquet")) == single["scored_tokens"]  # every rank's tokens, once


def test_killed_pairs_run_resumes(tiny, tmp_path, one_thread):
    import signal

    from .test_resume import _cli, _start, _stop_after

    folder, model, tok = tiny
    config = {"model": {"name_or_path": str(folder), "device": "cpu", "dtype": "float32"},
              "corpus": {**GSM8K, "max_documents": 12, "cache": False}, "eval": {"max_length": 16, "batch_size": 1, "bootstrap": 20}}
    out = tmp_path / "results" / "run"
    proc, path = _start(config, out, tmp_path)
    kept = _stop_after(proc, out, 30, signal.SIGKILL)
    proc.wait(timeout=60)
    whole = run(validate(config), model=model, tokenizer=tok, write=False, progress=False)
    assert kept < whole["windows"]
    done = _cli(path, out)
    assert done.returncode == 0, done.stderr[-2000:]
    resumed = json.loads((out / "result.json").read_text())
    assert kept <= resumed["resumed_windows"] < whole["windows"]
    assert resumed["scored_tokens"] == whole["scored_tokens"]
    assert math.isclose(resumed["sum_nll"], whole["sum_nll"], rel_tol=1e-6)
    assert resumed["conditional"]["macro_perplexity"] == pytest.approx(whole["conditional"]["macro_perplexity"], rel=1e-6)
