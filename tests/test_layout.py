"""The layout's own rules: one list of protocol names, each preset's planner, and only
``harness/distributed.py`` knowing about processes."""

from __future__ import annotations

import ast
from dataclasses import replace
from pathlib import Path

import pytest

from harness import protocols
from harness import windows as W
from harness.config import PROTOCOLS, EvalConfig, validate
from harness.errors import HarnessError
from harness.protocols import PRESETS, plan, resolve
from harness.windows import BosPolicy

HARNESS = Path(protocols.__file__).resolve().parent


def test_schema_admits_exactly_the_registered_protocols():
    """The config schema's literal (what the YAML may name) is the registry's list of presets."""
    enum = EvalConfig.model_json_schema()["properties"]["protocol"]["enum"]
    assert enum == list(PRESETS) == list(PROTOCOLS)
    assert all(PRESETS[name].name == name for name in PRESETS)


def _settings(protocol: str, adds_bos: bool, **eval_kwargs) -> protocols.Settings:
    cfg = validate({
        "model": {"name_or_path": "unused"},
        "corpus": {"path": "unused.txt"},
        "eval": {"protocol": protocol, **eval_kwargs},
    })
    return resolve(cfg, adds_bos, None)


def _by_hand(s: protocols.Settings, lengths: list[int]) -> list[W.Window]:
    """The dispatch written out the long way, from PROTOCOLS.md's table of presets."""
    out, bos = [], BosPolicy(s.bos)
    for doc, n in enumerate(lengths):
        if s.protocol == "sliding":
            ws = W.plan_sliding(n, s.max_length, s.stride, bos, doc)
        elif s.protocol == "gptq":
            ws = W.plan_disjoint(n, s.max_length, bos, doc)
        elif s.protocol == "llamacpp":
            ws = W.plan_llamacpp(n, s.max_length, bos == BosPolicy.REPLACE, doc)
        elif s.protocol in ("lm-eval", "paloma"):
            ws = W.plan_rolling(n, s.max_length, doc)
        out.extend(ws)
    return [replace(w, index=i) for i, w in enumerate(out)]


@pytest.mark.parametrize("protocol, adds_bos, eval_kwargs", [
    ("sliding", True, {"max_length": 8, "stride": 3}),
    ("sliding", False, {"max_length": 8, "bos": "every"}),
    ("gptq", True, {"max_length": 8}),
    ("gptq", True, {"max_length": 8, "bos": "every"}),
    ("llamacpp", True, {"max_length": 8}),
    ("llamacpp", False, {"max_length": 8}),
    ("lm-eval", True, {"max_length": 8}),
    ("paloma", False, {"max_length": 8}),
])
def test_each_preset_plans_with_its_own_planner(protocol, adds_bos, eval_kwargs):
    """Every preset's planner gives the windows of the planner PROTOCOLS.md names, with its
    length, stride and BOS policy, numbered over all documents."""
    s = _settings(protocol, adds_bos, **eval_kwargs)
    lengths = [40, 33] if protocol == "llamacpp" else [40, 17, 0, 33]  # llama.cpp refuses a stream under 2 chunks
    got = plan(s, lengths)
    assert got == _by_hand(s, lengths)
    assert [w.index for w in got] == list(range(len(got))) and {w.doc for w in got} == {0, len(lengths) - 1} | (
        {1} if len(lengths) > 2 else set())
    if protocol == "llamacpp":
        assert all(w.replace_first == adds_bos for w in got)


def test_planner_errors_become_one_line_harness_errors():
    """A corpus too short for llama.cpp is the corpus's fault; a bad window setting is eval's."""
    with pytest.raises(HarnessError, match=r"^corpus: llamacpp protocol needs at least 2×ctx = 16 tokens, the corpus has 15 "
                                           r"\(eval.max_length is ctx\); use more text"):
        plan(_settings("llamacpp", True, max_length=8), [15])
    s = _settings("sliding", True, max_length=8, stride=4)
    with pytest.raises(HarnessError, match=r"^eval: stride must be in 1\.\.8"):
        plan(protocols.Settings(**{**s.as_dict(), "stride": 9}), [40])
    with pytest.raises(HarnessError, match="^corpus: too short for one scored window of gptq"):
        plan(_settings("gptq", True, max_length=8), [7])


# ------------------------------------------------------------------------------------------
# only distributed.py knows about processes

PROCESS_ENV = {"RANK", "LOCAL_RANK", "WORLD_SIZE", "LOCAL_WORLD_SIZE", "NODE_RANK"}


def _process_knowledge(path: Path) -> list[str]:
    """Where a module imports accelerate or torch.distributed, or names a launcher's variable."""
    found = []
    for node in ast.walk(ast.parse(path.read_text(encoding="utf-8"), str(path))):
        modules = []
        if isinstance(node, ast.Import):
            modules = [a.name for a in node.names]
        elif isinstance(node, ast.ImportFrom) and node.module and node.level == 0:
            modules = [node.module] + [f"{node.module}.{a.name}" for a in node.names]
        for m in modules:
            if m.split(".")[0] == "accelerate" or m.startswith("torch.distributed"):
                found.append(f"{path.name}:{node.lineno} imports {m}")
        if isinstance(node, ast.Constant) and node.value in PROCESS_ENV:
            found.append(f"{path.name}:{node.lineno} names {node.value}")
    return found


def test_only_the_distributed_module_knows_about_processes():
    modules = sorted(HARNESS.glob("*.py"))
    assert len(modules) > 15 and HARNESS / "distributed.py" in modules
    offenders = [hit for m in modules if m.name != "distributed.py" for hit in _process_knowledge(m)]
    assert offenders == []
    # the check finds what it looks for
    assert any("imports accelerate" in h for h in _process_knowledge(HARNESS / "distributed.py"))
    assert any("names WORLD_SIZE" in h for h in _process_knowledge(HARNESS / "distributed.py"))


def test_process_questions_are_answered_from_the_launchers_variables(monkeypatch):
    from harness.distributed import SingleProcess, is_main_process, world_size

    for var in ("RANK", "WORLD_SIZE"):
        monkeypatch.delenv(var, raising=False)
    assert (world_size(), is_main_process()) == (1, True)  # launched plainly
    monkeypatch.setenv("WORLD_SIZE", "4")
    monkeypatch.setenv("RANK", "2")
    assert (world_size(), is_main_process()) == (4, False)
    monkeypatch.setenv("RANK", "0")
    assert is_main_process()
    one = SingleProcess()
    assert (one.rank, one.world, one.is_main, one.gather([3, 1]), one.broadcast("x")) == (0, 1, True, [3, 1], "x")
