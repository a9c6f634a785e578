"""`make bench` plans by the CPU: without native bf16 its bf16 rows are listed as not run.

The hardware flags are the one input patched here: no one machine has both kinds of CPU. The
whole bench ran on a two-core AVX2 EPYC (README, "And on a CPU without native bf16")."""

from __future__ import annotations

import pytest

from benchmarks import run as bench
from benchmarks.cases import CASES
from harness import precision


@pytest.mark.parametrize("flags", [(), ("avx512_bf16",), ("amx_bf16", "avx512_bf16")])
def test_bf16_rows_only_where_the_cpu_computes_bf16(monkeypatch, flags):
    monkeypatch.setattr(precision, "cpu_bf16_flags", lambda: flags)
    for case in CASES:
        planned, skipped = bench.for_this_cpu(case)
        bf16 = [c for c in case.comparisons if "bfloat16" in c.tool + str(c.baseline)]
        if flags:
            assert planned == case and skipped == []
            continue
        assert not any("bfloat16" in t for t in planned.tools), planned.tools
        assert [c for c in planned.comparisons] == [c for c in case.comparisons if c not in bf16]
        assert [(r["case"], r["tool"]) for r in skipped] == [(case.name, c.tool) for c in bf16]
        assert all("no native bf16" in r["note"] for r in skipped)


def test_the_default_run_stands_for_its_dtype():
    """``harness:auto`` is run; the harness row of the dtype it resolves to is that same run."""
    for case in CASES:
        for auto in ("float32", "bfloat16"):
            tools, alias = bench.run_plan(case, auto)
            assert "harness:auto" in tools and f"harness:{auto}" not in tools
            assert alias == (f"harness:{auto}" if f"harness:{auto}" in case.tools else None)
            assert set(tools) | {alias} - {None} == set(case.tools)
    sliding = next(c for c in CASES if c.name == "smollm2 L1024 S512")
    assert bench.run_plan(sliding, "float32") == (["harness:auto", "hf-guide:float32", "harness:bfloat16", "hf-guide:bfloat16"], "harness:float32")
    assert bench.run_plan(sliding, "bfloat16") == (["harness:float32", "harness:auto", "hf-guide:float32", "hf-guide:bfloat16"], "harness:bfloat16")


def test_a_dtype_set_for_the_harness_is_what_auto_runs_in():
    assert bench.default_dtype([], "bfloat16") == "bfloat16"
    assert bench.default_dtype(["eval.compile=true", "model.dtype=float32"], "bfloat16") == "float32"
    assert bench.default_dtype(["model.dtype=float32", "model.dtype = auto"], "bfloat16") == "bfloat16"


def test_speed_targets_are_judged_where_auto_is_bf16():
    case = next(c for c in CASES if c.name == "smollm2 L1024 S512")
    default, same = case.comparisons
    assert bench.verdict(case, default, {"speedup": 3.6, "dtype": "bfloat16"}) == "met >= 3.5x"
    assert bench.verdict(case, default, {"speedup": 3.4, "dtype": "bfloat16"}) == "MISSED >= 3.5x"
    assert bench.verdict(case, default, {"speedup": 1.2, "dtype": "float32"}).startswith("n/a: >= 3.5x is set for auto in bf16")
    assert bench.verdict(case, same, {"speedup": 1.2, "dtype": "bfloat16", "peak_fraction": 0.61}) == "MISSED >= 1.3x, met >= 60% of peak"
