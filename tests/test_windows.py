"""Tests of the pure window planners in ``harness.windows`` (no model, no tokenizer, no torch).

Golden tables are written out by hand from the rules in ``shared/docs/PROTOCOLS.md``; the
property tests check the coordinate contract of the module docstring for any sizes.
"""

from __future__ import annotations

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from harness.windows import (
    BosPolicy,
    Window,
    plan_disjoint,
    plan_llamacpp,
    plan_paloma,
    plan_rolling,
    plan_sliding,
)

F, T = False, True
POLICIES = list(BosPolicy)
PROPS = settings(max_examples=200, deadline=None)


def spans(windows: list[Window]) -> list[tuple[int, int, int, int, bool, bool]]:
    return [
        (w.begin, w.end, w.score_begin, w.score_end, w.prefix, w.replace_first) for w in windows
    ]


def coverage(windows: list[Window], n_tokens: int) -> list[int]:
    """How many times each stream token is scored."""
    counts = [0] * n_tokens
    for w in windows:
        for p in range(w.score_begin, w.score_end):
            counts[p] += 1
    return counts


def check_contract(windows: list[Window], n_tokens: int, max_length: int, doc: int = 0) -> None:
    """The invariants every planner's output must satisfy (module docstring)."""
    assert [w.index for w in windows] == list(range(len(windows)))
    for w in windows:
        assert isinstance(w, Window)
        assert w.doc == doc
        assert 0 <= w.begin <= w.end <= n_tokens
        assert 1 <= w.input_length <= max_length
        assert w.begin + 1 - int(w.prefix) <= w.score_begin <= w.score_end
        assert w.score_end <= min(w.end + 1, n_tokens)
        assert w.scored >= 1  # never a window that scores nothing
        assert w.first_target_offset >= 0
        if w.replace_first:
            assert w.end > w.begin  # there is a stream token to overwrite
    assert max(coverage(windows, n_tokens), default=0) <= 1


# --------------------------------------------------------------------------------------------
# Golden tables, by hand: (begin, end, score_begin, score_end, prefix, replace_first)
# --------------------------------------------------------------------------------------------

SLIDING_GOLDEN = [
    # N, L, S, policy, expected
    # N=10, L=4, S=2: windows at 0,2,4,6; each scores what is new since the previous end.
    (10, 4, 2, "none", [(0, 4, 1, 4, F, F), (2, 6, 4, 6, F, F), (4, 8, 6, 8, F, F), (6, 10, 8, 10, F, F)]),
    (10, 4, 2, "stream", [(0, 4, 1, 4, F, F), (2, 6, 4, 6, F, F), (4, 8, 6, 8, F, F), (6, 10, 8, 10, F, F)]),
    (10, 4, 2, "replace", [(0, 4, 1, 4, F, T), (2, 6, 4, 6, F, T), (4, 8, 6, 8, F, T), (6, 10, 8, 10, F, T)]),
    # every: BOS + 3 stream tokens; windows at 0,2,4,6,8; t[0] is scored after BOS.
    (10, 4, 2, "every", [(0, 3, 0, 3, T, F), (2, 5, 3, 5, T, F), (4, 7, 5, 7, T, F), (6, 9, 7, 9, T, F), (8, 10, 9, 10, T, F)]),
    # S == L: the first token of every window is unscored.
    (10, 4, 4, "none", [(0, 4, 1, 4, F, F), (4, 8, 5, 8, F, F), (8, 10, 9, 10, F, F)]),
    (10, 4, 4, "stream", [(0, 4, 1, 4, F, F), (4, 8, 5, 8, F, F), (8, 10, 9, 10, F, F)]),
    (10, 4, 4, "replace", [(0, 4, 1, 4, F, T), (4, 8, 5, 8, F, T), (8, 10, 9, 10, F, T)]),
    # every with the largest stride allowed, S = L - 1: disjoint, every token scored.
    (10, 4, 3, "every", [(0, 3, 0, 3, T, F), (3, 6, 3, 6, T, F), (6, 9, 6, 9, T, F), (9, 10, 9, 10, T, F)]),
    # N=9, L=4, S=3: the window at 6 reaches N and the loop stops.
    (9, 4, 3, "none", [(0, 4, 1, 4, F, F), (3, 7, 4, 7, F, F), (6, 9, 7, 9, F, F)]),
    (9, 4, 3, "replace", [(0, 4, 1, 4, F, T), (3, 7, 4, 7, F, T), (6, 9, 7, 9, F, T)]),
    # N=9, L=4, S=1, every: windows at 0..6, the one at 6 reaches N.
    (9, 4, 1, "every", [(0, 3, 0, 3, T, F), (1, 4, 3, 4, T, F), (2, 5, 4, 5, T, F), (3, 6, 5, 6, T, F),
                        (4, 7, 6, 7, T, F), (5, 8, 7, 8, T, F), (6, 9, 8, 9, T, F)]),
    # Shorter than one window.
    (3, 4, 2, "none", [(0, 3, 1, 3, F, F)]),
    (3, 4, 2, "every", [(0, 3, 0, 3, T, F)]),
    # One token: nothing to score without a prefix, one window with one.
    (1, 4, 4, "none", []),
    (1, 4, 4, "replace", []),
    (1, 4, 3, "every", [(0, 1, 0, 1, T, F)]),
    (0, 4, 2, "every", []),
    (0, 4, 4, "none", []),
]


@pytest.mark.parametrize("n, L, S, policy, expected", SLIDING_GOLDEN)
def test_sliding_golden(n, L, S, policy, expected):
    windows = plan_sliding(n, L, S, BosPolicy(policy), doc=3)
    assert spans(windows) == expected
    check_contract(windows, n, L, doc=3)


DISJOINT_GOLDEN = [
    # N=10, L=4: n = 2 windows [0,4) [4,8), each scores L-1 = 3; the tail t[8:10] is dropped.
    (10, 4, "none", [(0, 4, 1, 4, F, F), (4, 8, 5, 8, F, F)]),
    (10, 4, "stream", [(0, 4, 1, 4, F, F), (4, 8, 5, 8, F, F)]),
    (10, 4, "replace", [(0, 4, 1, 4, F, T), (4, 8, 5, 8, F, T)]),
    # every: BOS + 3 stream tokens, n = 10 // 3 = 3, all scored; t[9] dropped.
    (10, 4, "every", [(0, 3, 0, 3, T, F), (3, 6, 3, 6, T, F), (6, 9, 6, 9, T, F)]),
    # Exactly two windows, nothing dropped.
    (8, 4, "none", [(0, 4, 1, 4, F, F), (4, 8, 5, 8, F, F)]),
    # Shorter than a window: nothing.
    (3, 4, "none", []),
    (3, 4, "every", [(0, 3, 0, 3, T, F)]),
    (2, 4, "every", []),
    # L = 2: one scored token per window; with every, one stream token each.
    (5, 2, "none", [(0, 2, 1, 2, F, F), (2, 4, 3, 4, F, F)]),
    (3, 2, "every", [(0, 1, 0, 1, T, F), (1, 2, 1, 2, T, F), (2, 3, 2, 3, T, F)]),
    (0, 4, "none", []),
]


@pytest.mark.parametrize("n, L, policy, expected", DISJOINT_GOLDEN)
def test_disjoint_golden(n, L, policy, expected):
    windows = plan_disjoint(n, L, BosPolicy(policy), doc=2)
    assert spans(windows) == expected
    check_contract(windows, n, L, doc=2)


def test_disjoint_default_policy_is_stream_and_accepts_the_string_value():
    assert plan_disjoint(10, 4) == plan_disjoint(10, 4, BosPolicy.STREAM)
    assert plan_disjoint(10, 4, "every") == plan_disjoint(10, 4, BosPolicy.EVERY)  # type: ignore[arg-type]


LLAMACPP_GOLDEN = [
    # N, C, replace_bos, expected. first = C // 2; chunk k scores t[kC+first+1 : (k+1)C].
    # C=4: first=2, scores 4-2-1 = 1 per chunk; N=10 -> 2 chunks, t[8:10] dropped.
    (10, 4, True, [(0, 4, 3, 4, F, T), (4, 8, 7, 8, F, T)]),
    (10, 4, False, [(0, 4, 3, 4, F, F), (4, 8, 7, 8, F, F)]),
    # N = 2C exactly.
    (8, 4, True, [(0, 4, 3, 4, F, T), (4, 8, 7, 8, F, T)]),
    # C=5 (odd): first=2, scores 5-2-1 = 2 per chunk.
    (12, 5, True, [(0, 5, 3, 5, F, T), (5, 10, 8, 10, F, T)]),
    # C=6: first=3, scores 2 per chunk.
    (13, 6, True, [(0, 6, 4, 6, F, T), (6, 12, 10, 12, F, T)]),
    # C=3: first=1, scores 1 per chunk; three chunks.
    (9, 3, False, [(0, 3, 2, 3, F, F), (3, 6, 5, 6, F, F), (6, 9, 8, 9, F, F)]),
]


@pytest.mark.parametrize("n, C, replace_bos, expected", LLAMACPP_GOLDEN)
def test_llamacpp_golden(n, C, replace_bos, expected):
    windows = plan_llamacpp(n, C, replace_bos, doc=1)
    assert spans(windows) == expected
    check_contract(windows, n, C, doc=1)


def test_llamacpp_needs_two_contexts():
    with pytest.raises(ValueError, match="needs at least 2×ctx = 1024 tokens, the corpus has 700"):
        plan_llamacpp(700, 512)
    with pytest.raises(ValueError, match="2×ctx"):
        plan_llamacpp(7, 4)
    with pytest.raises(ValueError, match="2×ctx"):
        plan_llamacpp(0)  # an empty corpus is below 2C too: an error, as in llama.cpp
    assert len(plan_llamacpp(1024, 512)) == 2


@pytest.mark.parametrize("ctx", [-1, 0, 1, 2])
def test_llamacpp_rejects_chunks_that_score_nothing(ctx):
    with pytest.raises(ValueError):
        plan_llamacpp(100, ctx)


ROLLING_GOLDEN = [
    # N, L, expected. Window 0: [P] + t[0:min(L,N)-1] scores t[0:min(L,N)];
    # full block j: input t[jL-1:(j+1)L-1] scores t[jL:(j+1)L];
    # last partial block: input t[N-L-1:N-1] scores the rest.
    (10, 4, [(0, 3, 0, 4, T, F), (3, 7, 4, 8, F, F), (5, 9, 8, 10, F, F)]),
    (9, 3, [(0, 2, 0, 3, T, F), (2, 5, 3, 6, F, F), (5, 8, 6, 9, F, F)]),
    (3, 4, [(0, 2, 0, 3, T, F)]),
    (4, 4, [(0, 3, 0, 4, T, F)]),
    (5, 4, [(0, 3, 0, 4, T, F), (0, 4, 4, 5, F, F)]),
    (8, 4, [(0, 3, 0, 4, T, F), (3, 7, 4, 8, F, F)]),
    (1, 4, [(0, 0, 0, 1, T, F)]),
    (1, 2, [(0, 0, 0, 1, T, F)]),
    (0, 4, []),
]


@pytest.mark.parametrize("n, L, expected", ROLLING_GOLDEN)
def test_rolling_golden(n, L, expected):
    windows = plan_rolling(n, L, doc=5)
    assert spans(windows) == expected
    check_contract(windows, n, L, doc=5)
    assert plan_paloma(n, L, doc=5) == windows


# lm-evaluation-harness's own examples for get_rolling_token_windows(x=list(range(N)),
# prefix_token=-100, max_seq_len=L, context_len=1), as (input tokens, predicted tokens).
PREFIX = -100
LM_EVAL_EXAMPLES = [
    (34, 10, [
        ([PREFIX, 0, 1, 2, 3, 4, 5, 6, 7, 8], [0, 1, 2, 3, 4, 5, 6, 7, 8, 9]),
        ([9, 10, 11, 12, 13, 14, 15, 16, 17, 18], [10, 11, 12, 13, 14, 15, 16, 17, 18, 19]),
        ([19, 20, 21, 22, 23, 24, 25, 26, 27, 28], [20, 21, 22, 23, 24, 25, 26, 27, 28, 29]),
        ([23, 24, 25, 26, 27, 28, 29, 30, 31, 32], [30, 31, 32, 33]),
    ]),
    (30, 10, [
        ([PREFIX, 0, 1, 2, 3, 4, 5, 6, 7, 8], [0, 1, 2, 3, 4, 5, 6, 7, 8, 9]),
        ([9, 10, 11, 12, 13, 14, 15, 16, 17, 18], [10, 11, 12, 13, 14, 15, 16, 17, 18, 19]),
        ([19, 20, 21, 22, 23, 24, 25, 26, 27, 28], [20, 21, 22, 23, 24, 25, 26, 27, 28, 29]),
    ]),
    (9, 2, [
        ([PREFIX, 0], [0, 1]),
        ([1, 2], [2, 3]),
        ([3, 4], [4, 5]),
        ([5, 6], [6, 7]),
        ([6, 7], [8]),
    ]),
    (10, 4, [
        ([PREFIX, 0, 1, 2], [0, 1, 2, 3]),
        ([3, 4, 5, 6], [4, 5, 6, 7]),
        ([5, 6, 7, 8], [8, 9]),
    ]),
    (9, 3, [
        ([PREFIX, 0, 1], [0, 1, 2]),
        ([2, 3, 4], [3, 4, 5]),
        ([5, 6, 7], [6, 7, 8]),
    ]),
    (3, 4, [
        ([PREFIX, 0, 1], [0, 1, 2]),
    ]),
]


def as_token_pairs(windows: list[Window]) -> list[tuple[list[int], list[int]]]:
    """Each window as lm-eval writes it, on the stream t[i] = i."""
    return [
        (
            ([PREFIX] if w.prefix else []) + list(range(w.begin, w.end)),
            list(range(w.score_begin, w.score_end)),
        )
        for w in windows
    ]


@pytest.mark.parametrize("n, L, gold", LM_EVAL_EXAMPLES)
def test_rolling_matches_lm_eval_examples(n, L, gold):
    windows = plan_rolling(n, L)
    assert as_token_pairs(windows) == gold
    # What lm-eval's HF model actually feeds: make the window disjoint (context = input minus
    # its last len(pred)-1 tokens), then (context + continuation)[-(L+1):][:-1]. It is the
    # rolling input itself, so a Window's input is exactly the model's input.
    for inp, pred in gold:
        context = inp[: len(inp) - (len(pred) - 1)]
        assert (context + pred)[-(L + 1):][:-1] == inp


def test_paloma_defaults_to_2048():
    windows = plan_paloma(5000)
    assert spans(windows) == [
        (0, 2047, 0, 2048, T, F),
        (2047, 4095, 2048, 4096, F, F),
        (2951, 4999, 4096, 5000, F, F),
    ]
    assert plan_paloma(5000, doc=4) == plan_rolling(5000, 2048, doc=4)


# --------------------------------------------------------------------------------------------
# The exact counts of PROTOCOLS.md
# --------------------------------------------------------------------------------------------

WIKITEXT2_GPT2 = 287_644  # GPT-2 tokens in WikiText-2 raw test, "\n\n".join(rows)


@pytest.mark.parametrize("policy", [BosPolicy.NONE, BosPolicy.STREAM, BosPolicy.REPLACE])
def test_sliding_counts_from_protocols(policy):
    w = plan_sliding(WIKITEXT2_GPT2, 1024, 1024, policy)
    assert (len(w), sum(x.scored for x in w)) == (281, 287_363)
    w = plan_sliding(WIKITEXT2_GPT2, 1024, 512, policy)
    assert (len(w), sum(x.scored for x in w)) == (561, 287_643)


def test_llamacpp_counts_from_protocols():
    w = plan_llamacpp(WIKITEXT2_GPT2, 512)
    assert len(w) == WIKITEXT2_GPT2 // 512 == 561
    assert all(x.scored == 255 and x.input_length == 512 for x in w)
    assert sum(x.scored for x in w) == 561 * 255


@pytest.mark.parametrize("L", [2048, 4096])
def test_gptq_counts_from_protocols(L):
    w = plan_disjoint(WIKITEXT2_GPT2, L)
    assert len(w) == WIKITEXT2_GPT2 // L
    assert all(x.scored == L - 1 and x.input_length == L for x in w)


@PROPS
@given(n=st.integers(0, 5000), ctx=st.integers(3, 700))
def test_llamacpp_counts_any_size(n, ctx):
    if n < 2 * ctx:
        with pytest.raises(ValueError, match="2×ctx"):
            plan_llamacpp(n, ctx)
        return
    w = plan_llamacpp(n, ctx)
    assert len(w) == n // ctx
    assert all(x.scored == ctx - ctx // 2 - 1 for x in w)


# --------------------------------------------------------------------------------------------
# Invariants for any size
# --------------------------------------------------------------------------------------------

sizes = st.integers(0, 5000)
lengths = st.integers(2, 600)
policies = st.sampled_from(POLICIES)


@PROPS
@given(n=sizes, L=lengths, data=st.data(), policy=policies)
def test_sliding_invariants(n, L, data, policy):
    S = data.draw(st.integers(1, L), label="S")
    if policy is BosPolicy.EVERY and S == L:
        with pytest.raises(ValueError):
            plan_sliding(n, L, S, policy)
        return
    windows = plan_sliding(n, L, S, policy, doc=9)
    check_contract(windows, n, L, doc=9)
    counts = coverage(windows, n)
    if policy is BosPolicy.EVERY:
        assert counts == [1] * n  # t[0] too, after BOS
    elif S < L:
        assert counts == [0] * min(n, 1) + [1] * (n - 1)
    else:  # S == L: exactly the first token of each window is unscored
        assert counts == [0 if p % L == 0 else 1 for p in range(n)]
    assert all(w.prefix == (policy is BosPolicy.EVERY) for w in windows)
    assert all(w.replace_first == (policy is BosPolicy.REPLACE) for w in windows)


@PROPS
@given(n=sizes, L=lengths, policy=policies)
def test_disjoint_invariants(n, L, policy):
    windows = plan_disjoint(n, L, policy, doc=9)
    check_contract(windows, n, L, doc=9)
    counts = coverage(windows, n)
    if policy is BosPolicy.EVERY:
        width = L - 1
        assert len(windows) == n // width
        assert counts == [1 if p < len(windows) * width else 0 for p in range(n)]
    else:
        assert len(windows) == n // L
        assert all(w.scored == L - 1 and w.input_length == L for w in windows)
        assert counts == [1 if p < len(windows) * L and p % L else 0 for p in range(n)]
    assert all(w.input_length == L for w in windows)
    assert all(w.prefix == (policy is BosPolicy.EVERY) for w in windows)
    assert all(w.replace_first == (policy is BosPolicy.REPLACE) for w in windows)


@PROPS
@given(n=sizes, ctx=st.integers(3, 600), replace_bos=st.booleans())
def test_llamacpp_invariants(n, ctx, replace_bos):
    if n < 2 * ctx:
        with pytest.raises(ValueError):
            plan_llamacpp(n, ctx, replace_bos)
        return
    windows = plan_llamacpp(n, ctx, replace_bos, doc=9)
    check_contract(windows, n, ctx, doc=9)
    first = ctx // 2
    assert coverage(windows, n) == [
        1 if p < len(windows) * ctx and p % ctx > first else 0 for p in range(n)
    ]
    assert all(w.input_length == ctx and w.replace_first == replace_bos for w in windows)
    assert all(w.first_target_offset == first for w in windows)  # at least C/2 of context


@PROPS
@given(n=sizes, L=lengths)
def test_rolling_invariants(n, L):
    windows = plan_rolling(n, L, doc=9)
    check_contract(windows, n, L, doc=9)
    assert coverage(windows, n) == [1] * n  # every token once, t[0] included
    assert len(windows) == -(-n // L)  # ceil(N / L) blocks of L predicted tokens
    for j, w in enumerate(windows):
        assert w.score_begin == j * L
        assert w.score_end == min((j + 1) * L, n)
        assert w.score_end == w.end + 1  # the input stops one short of the last target
        assert w.prefix == (j == 0) and not w.replace_first
        assert w.input_length == (min(L, n) if j == 0 else L)
    assert plan_paloma(n, L, doc=9) == windows


# --------------------------------------------------------------------------------------------
# Invalid arguments raise ValueError, and nothing else
# --------------------------------------------------------------------------------------------


def outcome(fn, *args):
    """The planner's result, or the string "ValueError"; any other exception propagates."""
    try:
        return fn(*args)
    except ValueError:
        return "ValueError"


@PROPS
@given(
    n=st.integers(-5, 3000),
    L=st.integers(-3, 300),
    S=st.integers(-3, 305),
    policy=policies,
    replace_bos=st.booleans(),
)
def test_invalid_arguments_raise_value_error(n, L, S, policy, replace_bos):
    valid_n = n >= 0
    valid_L = L >= 2

    result = outcome(plan_disjoint, n, L, policy)
    assert (result == "ValueError") == (not (valid_n and valid_L))

    for planner in (plan_rolling, plan_paloma):
        result = outcome(planner, n, L)
        assert (result == "ValueError") == (not (valid_n and valid_L))

    result = outcome(plan_llamacpp, n, L, replace_bos)
    assert (result == "ValueError") == (not (valid_n and L >= 3 and n >= 2 * L))

    capacity = L - int(policy is BosPolicy.EVERY)
    result = outcome(plan_sliding, n, L, S, policy)
    if valid_L and 1 <= S <= capacity and valid_n:
        check_contract(result, n, L)  # a valid plan, not merely a list
    else:
        assert result == "ValueError"


@pytest.mark.parametrize("L", [-1, 0, 1])
def test_max_length_below_two_is_rejected(L):
    for call in (
        lambda: plan_sliding(10, L, 1),
        lambda: plan_disjoint(10, L),
        lambda: plan_rolling(10, L),
        lambda: plan_paloma(10, L),
        lambda: plan_llamacpp(10, L),
    ):
        with pytest.raises(ValueError):
            call()


def test_unknown_bos_policy_is_rejected():
    with pytest.raises(ValueError):
        plan_disjoint(10, 4, "sometimes")  # type: ignore[arg-type]


def test_empty_document_plans_nothing():
    for policy in POLICIES:
        assert plan_sliding(0, 4, 2, policy) == []
        assert plan_disjoint(0, 4, policy) == []
    assert plan_rolling(0, 4) == []
    assert plan_paloma(0) == []
