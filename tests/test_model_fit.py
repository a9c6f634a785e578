"""A model whose files do not describe one model, or a tokenizer whose ids the model has no rows
for, stops the run before scoring with one line, exit 2, and nothing written: transformers only
warns (a weight missing from the file is initialised at random and scored; one the model has no
place for is dropped), or fails deep inside (an id past the embedding, a config whose heads do
not divide the hidden size)."""

from __future__ import annotations

import json
import re
import shutil
from pathlib import Path

import pytest
from safetensors.torch import load_file, save_file

from .conftest import _train_tokenizer, tiny_config
from .test_files import check_error, files_under, run_main, write_config


def _variant(tiny, tmp_path: Path, **changes) -> Path:
    """A copy of the tiny model's folder with ``changes`` made to its config.json."""
    folder = tmp_path / "model"
    shutil.copytree(tiny[0], folder)
    config = json.loads((folder / "config.json").read_text())
    (folder / "config.json").write_text(json.dumps({**config, **changes}))
    return folder


def _run(tmp_path, folder, corpus, capsys, monkeypatch, *overrides) -> str:
    cfg = write_config(tmp_path / "c.yaml", tiny_config(folder, corpus))
    out = tmp_path / "out"
    code, err = run_main(["run", str(cfg), *overrides, "--output-dir", str(out)], capsys, monkeypatch)
    assert files_under(out) == [] and not out.exists()
    return check_error(code, err)


@pytest.mark.parametrize("changes, needles", [
    ({"num_hidden_layers": 3}, ["9 missing (model.layers.2.input_layernorm.weight"]),  # a layer scored at random
    ({"num_hidden_layers": 0}, ["18 unexpected (model.layers.0."]),  # every layer dropped
    ({"vocab_size": 100}, ["2 of another shape (lm_head.weight (320, 32) vs (100, 32)", "model.embed_tokens.weight"]),
])
def test_weights_that_do_not_fit_the_config_are_refused(tiny, tiny_corpus, tmp_path, capsys, monkeypatch, changes, needles):
    line = _run(tmp_path, _variant(tiny, tmp_path, **changes), tiny_corpus, capsys, monkeypatch)
    assert line.startswith("error: model.name_or_path: the weights in ") and "do not fit the model its config.json describes" in line
    for needle in needles:
        assert needle in line, line
    assert "LOAD REPORT" not in capsys.readouterr().err


def test_a_weight_missing_from_the_file_is_refused(tiny, tiny_corpus, tmp_path, capsys, monkeypatch):
    folder = _variant(tiny, tmp_path)
    weights = load_file(folder / "model.safetensors")
    del weights["model.norm.weight"]
    save_file(weights, folder / "model.safetensors", metadata={"format": "pt"})
    assert "weights 1 missing (model.norm.weight)" in _run(tmp_path, folder, tiny_corpus, capsys, monkeypatch)


@pytest.mark.parametrize("heads, needle", [(5, "The hidden size (32) is not a multiple of the number of attention heads (5);"),
                                           (0, "(a size of 0?)")])
def test_a_config_no_model_can_be_built_from_is_one_line(tiny, tiny_corpus, tmp_path, capsys, monkeypatch, heads, needle):
    line = _run(tmp_path, _variant(tiny, tmp_path, num_attention_heads=heads), tiny_corpus, capsys, monkeypatch)
    assert "describes no model transformers can build" in line and needle in line, line


def test_a_config_naming_an_unknown_activation_is_one_line(tiny, tiny_corpus, tmp_path, capsys, monkeypatch):
    line = _run(tmp_path, _variant(tiny, tmp_path, hidden_act="no-such-act"), tiny_corpus, capsys, monkeypatch)
    assert line.endswith("the model's config names 'no-such-act', which transformers does not know"), line


def _random_init_config(tmp_path: Path, tokenizer: Path, corpus: Path, **changes) -> Path:
    shape = {"architectures": ["LlamaForCausalLM"], "model_type": "llama", "hidden_size": 32, "intermediate_size": 64,
             "num_hidden_layers": 2, "num_attention_heads": 4, "num_key_value_heads": 2, "max_position_embeddings": 512,
             "vocab_size": 320, "bos_token_id": 0, "eos_token_id": 1, **changes}
    (tmp_path / "shape.json").write_text(json.dumps(shape))
    cfg = tiny_config(tmp_path / "shape.json", corpus)
    cfg["model"].update(random_init=True, tokenizer=str(tokenizer))
    return write_config(tmp_path / "c.yaml", cfg)


@pytest.mark.parametrize("changes, needles", [
    ({"num_attention_heads": 5}, ["is not a model config transformers can read: The hidden size (32) is not a multiple"]),
    ({"num_hidden_layers": -1}, ["gives num_hidden_layers: -1; sizes must be at least 1"]),  # was scored with no layers
    ({"vocab_size": 100}, ["model.tokenizer: the tokenizer gives token id ", "the model's vocabulary has 100 rows"]),
])
def test_random_init_shapes_that_cannot_be_scored(tiny, tiny_corpus, tmp_path, capsys, monkeypatch, changes, needles):
    cfg = _random_init_config(tmp_path, tiny[0], tiny_corpus, **changes)
    out = tmp_path / "out"
    code, err = run_main(["run", str(cfg), "--output-dir", str(out)], capsys, monkeypatch)
    line = check_error(code, err, *needles)
    assert not out.exists(), line


def test_token_ids_past_the_vocabulary_are_refused_before_scoring(tiny, tiny_corpus, tmp_path, capsys, monkeypatch):
    """A tokenizer of 800 entries for a model of 320 rows: the corpus's largest id is named; the
    embedding had failed mid-run, leaving a resume log behind."""
    folder = tmp_path / "big-tokenizer"
    assert len(_train_tokenizer(folder, add_bos=True, vocab_size=800)) > 320
    line = _run(tmp_path, tiny[0], tiny_corpus, capsys, monkeypatch, f"model.tokenizer={folder}")
    top = re.fullmatch(r"error: model\.tokenizer: the tokenizer gives token id (\d+), but the model's vocabulary has 320 "
                       r"rows; use the tokenizer the model was trained with", line)
    assert top and int(top[1]) >= 320, line


def test_a_perplexity_past_float64_is_one_line_and_nothing_written(tiny, tiny_corpus, tmp_path, capsys, monkeypatch):
    """A broken model (the head's weights x2000: mean NLL ~13,000 nats) had written a record
    with a null perplexity that its own table, show, compare and report refused."""
    folder = _variant(tiny, tmp_path)
    weights = load_file(folder / "model.safetensors")
    weights["lm_head.weight"] = weights["lm_head.weight"] * 2000
    save_file(weights, folder / "model.safetensors", metadata={"format": "pt"})
    line = _run(tmp_path, folder, tiny_corpus, capsys, monkeypatch)
    assert re.fullmatch(r"error: the mean NLL is [\d,]+\.\d nats per token, so the perplexity overflows float64: a broken "
                        r"model \(a uniform guess over its 320-token vocabulary gives 5\.8\); check the model's weights "
                        r"and model\.dtype", line), line
