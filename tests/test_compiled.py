"""``eval.compile``: compiled decoder layers give the eager numbers (float32, 1e-5).

The reference is the same run with ``eval.compile: false`` (plain eager forward). Llama-style
layers (the tiny model, SmolLM2) and Gemma-3's two kinds of layers are compiled ahead of time
into packages in the cache; the second run finds them and loads them instead of compiling. The
just-in-time path is tested on Gemma-3 with the package ruled out. Where compilation fails (here: a C++ compiler that does not exist), the run warns
once and scores uncompiled, with the same numbers.

Every test that may build a package points ``PPL_CACHE_DIR`` at a folder of its own, so no other
test of the session finds a package and compiles under ``auto``.
"""

from __future__ import annotations

import math
import warnings

import pytest

from harness import compiled
from harness.config import validate
from harness.errors import HarnessWarning
from harness.runner import run

from .conftest import GEMMA3, WIKITEXT, tiny_config


@pytest.fixture
def own_cache(tmp_path, monkeypatch):
    monkeypatch.setenv("PPL_CACHE_DIR", str(tmp_path / "cache"))
    return tmp_path / "cache"


def _pair(cfg_dict: dict, model, tok, setting=True):
    eager = run(validate({**cfg_dict, "eval": {**cfg_dict["eval"], "compile": False}}), model=model, tokenizer=tok,
                write=False, progress=False)
    cfg_dict = {**cfg_dict, "eval": {**cfg_dict["eval"], "compile": setting}}
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        comp = run(validate(cfg_dict), model=model, tokenizer=tok, write=False, progress=False)
    fell_back = [str(w.message) for w in caught if "eval.compile" in str(w.message)]
    assert not fell_back, fell_back  # no fallback: this must compile
    return eager, comp


def test_package_key_names_the_cpus_bf16_instructions(tiny, own_cache, monkeypatch):
    """A package built on an AMX machine is not the one an AVX-512-BF16-only machine loads (torch
    reports ``AVX512`` on both, and cache folders may be shared)."""
    from harness import precision

    _, model, _ = tiny
    seen = {}
    for flags in [("amx_bf16", "avx512_bf16"), ("avx512_bf16",), ()]:
        monkeypatch.setattr(precision, "cpu_bf16_flags", lambda flags=flags: flags)
        seen[flags] = compiled.package_paths(model)
    assert len({tuple(p.values()) for p in seen.values()}) == 3


def test_compiled_equals_eager_tiny_ahead_of_time(tiny, tiny_corpus, own_cache, monkeypatch):
    """Built on the first compiled run, found (auto) and loaded on the second; both equal eager,
    including the slice's short tail window: a batch of unequal lengths, padded at the end, runs
    through the package too (every layer of every batch does)."""
    folder, model, tok = tiny
    # 181 windows, the last one shorter: in batches of 7 the last batch is padded
    cfg = tiny_config(folder, tiny_corpus, max_length=32, stride=12, batch_size=7, bootstrap=0)
    widths = []
    package_run = compiled.Packaged.run

    def counted(self, i, hidden, cos, sin):
        widths.append(hidden.shape[1])
        return package_run(self, i, hidden, cos, sin)

    monkeypatch.setattr(compiled.Packaged, "run", counted)
    try:
        assert compiled.packable(model) is None and not compiled.cached(model)
        eager, comp = _pair(cfg, model, tok)
        batches = -(-len(comp.windows) // 7)
        lengths = (comp.windows.end - comp.windows.begin + comp.windows.prefix.astype(int)).tolist()
        ordered = sorted(lengths, reverse=True)  # the runner's length-sorted batches
        assert any(len(set(ordered[k : k + 7])) > 1 for k in range(0, len(ordered), 7))  # some batch is padded
        checks = 1  # Packaged.check runs the package once, on the second layer
        assert len(widths) == checks + batches * model.config.num_hidden_layers
        assert comp["precision"]["compile"]["how"].startswith("ahead of time")
        assert compiled.cached(model) and all(p.parent == own_cache / "compiled" for p in compiled.package_paths(model).values())
        compiled.enable(model, False)  # the next run starts from the package on disk
        _, again = _pair(cfg, model, tok, setting="auto")
        assert again["precision"]["compile"]["reason"] == "auto: the compiled layers are cached for this model"
        assert again["compile_seconds"] < comp["compile_seconds"]  # loaded, not built
        for c in (comp, again):
            assert c.scored_tokens == eager.scored_tokens
            assert math.isclose(c["sum_nll"], eager["sum_nll"], rel_tol=1e-5)
            assert c["config_hash"] != eager["config_hash"]
    finally:
        compiled.enable(model, False)


def test_compiled_equals_eager_smollm2_slice(smollm2, own_cache):
    model, tok = smollm2
    cfg = {
        "model": {"name_or_path": "unused", "device": "cpu"},
        "corpus": {**WIKITEXT, "max_tokens": 1100},
        "eval": {"protocol": "sliding", "max_length": 512, "stride": 256, "batch_size": 2, "bootstrap": 0},
    }
    eager, comp = _pair(cfg, model, tok)
    try:
        assert comp["precision"]["compile"]["how"].startswith("ahead of time")
        assert comp.scored_tokens == eager.scored_tokens == 1099
        assert math.isclose(comp["sum_nll"], eager["sum_nll"], rel_tol=1e-5)
        assert math.isclose(comp.perplexity, eager.perplexity, rel_tol=1e-5)
    finally:
        compiled.enable(model, False)


def test_compiled_equals_eager_gemma3_sliding_layers(gemma3, own_cache, monkeypatch):
    """Gemma-3 on windows longer than its 512-token sliding window. Ahead of time: one package
    per kind of layer (sliding and full attention), the sliding one with the banded attention
    traced in; the 361-token tail window is padded to whole blocks of 128. Just in time (forced
    here by saying the model cannot be packaged): the block attention is kept out of the graph.
    Both equal eager to 1e-5."""
    model, tok = gemma3
    cfg = {
        "model": dict(GEMMA3),
        "corpus": {**WIKITEXT, "max_tokens": 1000},
        "eval": {"protocol": "sliding", "max_length": 640, "stride": 320, "batch_size": 2, "bootstrap": 0},
    }
    assert compiled.packable(model) is None
    assert set(compiled.variants(model)) == {"sliding_attention", "full_attention"}
    eager, comp = _pair(cfg, model, tok)
    try:
        assert comp.scored_tokens == eager.scored_tokens == 999
        assert comp["precision"]["compile"]["how"].startswith("ahead of time")
        assert "sliding_attention" in comp["precision"]["compile"]["how"]
        assert not eager["precision"]["compile"]["on"]
        assert math.isclose(comp["sum_nll"], eager["sum_nll"], rel_tol=1e-5)
        compiled.enable(model, False)
        monkeypatch.setattr(compiled, "packable", lambda m: "forced by the test")
        _, jit = _pair(cfg, model, tok)
        assert jit["precision"]["compile"]["how"] == "just in time"
        assert math.isclose(jit["sum_nll"], eager["sum_nll"], rel_tol=1e-5)
    finally:
        compiled.enable(model, False)


def test_end_padded():
    import torch

    assert compiled.end_padded(None)
    assert compiled.end_padded(torch.tensor([[1, 1, 1], [1, 1, 0], [1, 0, 0]]))
    assert not compiled.end_padded(torch.tensor([[1, 1, 1], [0, 1, 1]]))  # padded at the start
    assert not compiled.end_padded(torch.tensor([[1, 0, 1]]))


def test_auto_compiles_long_runs_only():
    n, b = compiled.AUTO_MIN_TOKENS, compiled.AUTO_BUILD_TOKENS
    assert compiled.decide("auto", n).on and not compiled.decide("auto", n - 1).on
    assert not compiled.decide("auto", n).build and compiled.decide("auto", b).build
    assert compiled.decide("auto", 10, cached=True).on  # a cached package costs nothing to use
    assert "too short" in compiled.decide("auto", 4096).reason
    assert compiled.decide(True, 10).on and not compiled.decide(False, 10**9, cached=True).on


def test_decoder_layers_found(tiny, smollm2):
    for model in (tiny[1], smollm2[0]):
        layers = compiled.decoder_layers(model)
        assert layers is model.base_model.layers and len(layers) == model.config.num_hidden_layers


def test_record_says_what_auto_decided(tiny, tiny_corpus, own_cache):
    """auto on a short run without a package: eager, said so, hashed as an eager run."""
    folder, model, tok = tiny
    cfg = tiny_config(folder, tiny_corpus, max_length=32, stride=12, batch_size=3, bootstrap=0)
    runs = {}
    for setting in ("auto", False):
        cfg["eval"]["compile"] = setting
        runs[setting] = run(validate(cfg), model=model, tokenizer=tok, write=False, progress=False)
    auto, off = runs["auto"], runs[False]
    assert auto["precision"]["compile"]["on"] is False
    assert "window tokens <" in auto["precision"]["compile"]["reason"]
    assert auto["config_hash"] == off["config_hash"]
    assert off["compile_seconds"] == 0


def test_ppl_compile_builds_once_then_auto_uses_it(tiny, tiny_corpus, own_cache, tmp_path):
    """``ppl compile CONFIG`` builds the package (a real CLI call on the tiny model's folder); a
    second call finds it; a short run under auto then compiles, where without it it would not."""
    import yaml
    from typer.testing import CliRunner

    from harness.cli import app

    folder, model, tok = tiny
    cfg = tiny_config(folder, tiny_corpus, max_length=32, stride=12, batch_size=3, bootstrap=0)
    path = tmp_path / "tiny.yaml"
    path.write_text(yaml.safe_dump(cfg))
    compiled.enable(model, False)
    cli = CliRunner()
    first = cli.invoke(app, ["compile", str(path)])
    assert first.exit_code == 0 and "compiled in" in first.output, first.output
    again = cli.invoke(app, ["compile", str(path)])
    assert again.exit_code == 0 and "already cached" in again.output, again.output
    try:
        res = run(validate(cfg), model=model, tokenizer=tok, write=False, progress=False)  # auto, 4 windows
        assert res["precision"]["compile"]["on"] and res["precision"]["compile"]["how"].startswith("ahead of time")
    finally:
        compiled.enable(model, False)


# Last in the file: it points inductor at a compiler that does not exist, and inductor caches what
# it found about the compiler for the rest of the process, so a compile after it would fall back too.
def test_compile_failure_falls_back_with_one_warning(tiny, tiny_corpus, own_cache):
    import torch._dynamo
    import torch._inductor.config as inductor_config

    folder, model, tok = tiny
    compiled.enable(model, False)
    torch._dynamo.reset()  # nothing compiled earlier in this session may be reused
    # inductor's own patching (monkeypatch's undo left fx_graph_cache unknown to inductor, which
    # broke every later compile in the session)
    no_compiler = inductor_config.patch({"cpp.cxx": ("/nonexistent/c++",), "fx_graph_cache": False})
    cfg = tiny_config(folder, tiny_corpus, max_length=32, stride=16, batch_size=2, bootstrap=0)
    eager = run(validate(cfg), model=model, tokenizer=tok, write=False, progress=False)
    cfg["eval"]["compile"] = True
    try:
        with warnings.catch_warnings(record=True) as caught, no_compiler:
            warnings.simplefilter("always")
            comp = run(validate(cfg), model=model, tokenizer=tok, write=False, progress=False)
        ours = [w for w in caught if "eval.compile" in str(w.message) and w.category is HarnessWarning]  # printed in one line
        assert len(ours) == 1 and "\n" not in str(ours[0].message)
        assert "ahead of time" in str(ours[0].message)  # both ways were tried
        assert comp["sum_nll"] == eager["sum_nll"]
        assert comp["precision"]["compile"]["how"] == "failed"
        assert not compiled.cached(model)  # nothing half-built left in the cache
    finally:
        compiled.enable(model, False)
        torch._dynamo.reset()


def test_compiled_bf16_smollm2_calls_the_causal_kernel(smollm2, own_cache):
    """bf16 SmolLM2 with its attention and MLPs set as loading in bf16 sets them: on a CPU with
    AVX-512 BF16 the package's layer calls the harness's causal kernel and its SiLU x up kernel
    (both ops are in the package's code), and the compiled run equals the eager one, which runs
    the same kernels, within bf16 rounding. Elsewhere (or with PPL_ATTENTION_KERNEL=off /
    PPL_ACTIVATION_KERNEL=off) the package holds SDPA and inductor's activation, no call of the ops."""
    import copy
    import zipfile

    import torch

    from harness import activation, attention, causal_kernel, norm

    f32, tok = smollm2
    model = copy.deepcopy(f32).to(torch.bfloat16).eval()
    attention.install(model)
    assert attention.rotary_fused(model) == causal_kernel.available()  # queries and keys rotated inside the kernel
    assert activation.install(model) == (30 if activation.available() else 0)
    assert norm.install(model) == (61 if norm.available() else 0)  # two per layer and the final one
    cfg = {
        "model": {"name_or_path": "unused", "device": "cpu", "dtype": "bfloat16"},
        "corpus": {**WIKITEXT, "max_tokens": 1100},
        "eval": {"protocol": "sliding", "max_length": 512, "stride": 256, "batch_size": 2, "bootstrap": 0},
    }
    eager, comp = _pair(cfg, model, tok)
    try:
        assert comp["precision"]["compile"]["how"].startswith("ahead of time")
        assert comp["precision"]["attention"] == eager["precision"]["attention"]
        assert comp["precision"]["activation"] == eager["precision"]["activation"] == activation.describe(model)
        (path,) = compiled.package_paths(model).values()
        with zipfile.ZipFile(path) as z:
            code = "".join(z.read(n).decode(errors="replace") for n in z.namelist() if n.endswith((".cpp", ".json")))
        assert ("causal_attention" in code) == causal_kernel.available()
        assert ("silu_mul" in code) == activation.available()
        assert ("add_rms_norm" in code) == norm.available()
        assert comp.scored_tokens == eager.scored_tokens == 1099
        print(f"\nbf16 compiled vs eager: {comp.perplexity:.6f} vs {eager.perplexity:.6f} ({comp.perplexity / eager.perplexity - 1:+.2e})")
        # bf16 rounds differently once inductor fuses the element-wise work: on this 1,099-token
        # slice compiled and eager differed by 9.5e-4 with the kernel and 3.2e-3 with SDPA's
        # (PPL_ATTENTION_KERNEL=off); float32 holds them to 1e-5 (the tests above)
        assert math.isclose(comp.perplexity, eager.perplexity, rel_tol=5e-3)
    finally:
        compiled.enable(model, False)
