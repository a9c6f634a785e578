"""model.random_init: random weights of a shipped shape, drawn from model.seed on the CPU."""

from __future__ import annotations

import json

import pytest
import torch

from harness.config import validate
from harness.errors import ConfigError, HarnessError
from harness.models import load_model
from harness.runner import run

from .conftest import REPO, tiny_config


@pytest.fixture(scope="module")
def shape(tiny, tmp_path_factory):
    """A tiny Llama config file whose vocabulary covers the tiny tokenizer."""
    _, _, tok = tiny
    path = tmp_path_factory.mktemp("shape") / "tiny-llama.json"
    path.write_text(json.dumps({
        "model_type": "llama", "hidden_size": 32, "intermediate_size": 64, "num_hidden_layers": 2, "num_attention_heads": 4,
        "num_key_value_heads": 2, "max_position_embeddings": 256, "vocab_size": len(tok), "tie_word_embeddings": True,
    }))
    return path


def random_cfg(tiny, tiny_corpus, shape, **model):
    folder, _, _ = tiny
    data = tiny_config(folder, tiny_corpus, batch_size=2)
    data["model"] = {"name_or_path": str(shape), "random_init": True, "tokenizer": str(folder), "device": "cpu", **model}
    return validate(data)


def test_seed_decides_the_weights(tiny, tiny_corpus, shape):
    before = torch.random.get_rng_state()
    a = load_model(random_cfg(tiny, tiny_corpus, shape).model)
    b = load_model(random_cfg(tiny, tiny_corpus, shape, seed=0).model)
    c = load_model(random_cfg(tiny, tiny_corpus, shape, seed=1).model)
    assert torch.equal(torch.random.get_rng_state(), before)  # the global random state is left alone
    sa, sb, sc = a.state_dict(), b.state_dict(), c.state_dict()
    assert all(torch.equal(sa[k], sb[k]) for k in sa)
    drawn = [k for k in sa if k.endswith("proj.weight") or k.endswith("embed_tokens.weight")]
    assert len(drawn) == 1 + 2 * 7 and all(not torch.equal(sa[k], sc[k]) for k in drawn)
    assert a.model.embed_tokens.weight.dtype == torch.float32
    # bfloat16 is the float32 draw, cast: a CPU float32 run and a GPU bfloat16 run hold the same weights
    h = load_model(random_cfg(tiny, tiny_corpus, shape, dtype="bfloat16").model)
    assert torch.equal(h.model.embed_tokens.weight, sa["model.embed_tokens.weight"].to(torch.bfloat16))


def test_random_model_through_the_runner(tiny, tiny_corpus, shape):
    cfg = random_cfg(tiny, tiny_corpus, shape, seed=3)
    res = run(cfg, write=False, progress=False)
    ref = load_model(cfg.model)
    assert res["model"]["parameters"] == sum(p.numel() for p in ref.parameters())
    assert res["model"]["max_positions"] == 256 and res["device"] == "cpu"
    # the same weights in a plain run of the model built by hand give the same number
    again = run(cfg, model=ref, write=False, progress=False)
    assert res["sum_nll"] == again["sum_nll"]


def test_bad_random_init_configs(tiny, tiny_corpus, shape, tmp_path):
    with pytest.raises(HarnessError, match=r"^model.name_or_path: random_init needs a model config .json file; not found: /no/such.json"):
        run(random_cfg(tiny, tiny_corpus, shape, name_or_path="/no/such.json"), write=False, progress=False)
    bad = tmp_path / "bad.json"
    bad.write_text(json.dumps({"hidden_size": 8}))  # no model_type
    with pytest.raises(HarnessError, match=r"^model.name_or_path: .*bad.json is not a model config transformers can read"):
        run(random_cfg(tiny, tiny_corpus, shape, name_or_path=str(bad)), write=False, progress=False)
    folder, _, _ = tiny
    with pytest.raises(ConfigError, match="random_init: set model.tokenizer"):
        validate({**tiny_config(folder, tiny_corpus), "model": {"name_or_path": str(shape), "random_init": True}})


@pytest.mark.slow
def test_shipped_smollm2_shape_is_the_real_models(smollm2):
    """configs/models/smollm2-135m.json builds the real SmolLM2-135M's tensors, name for name."""
    from harness.config import ModelConfig

    real, tok = smollm2
    cfg = ModelConfig(name_or_path=str(REPO / "configs/models/smollm2-135m.json"), random_init=True, tokenizer="unused", device="cpu")
    rand = load_model(cfg)
    assert {k: v.shape for k, v in rand.state_dict().items()} == {k: v.shape for k, v in real.state_dict().items()}
    assert rand.config.rope_parameters["rope_theta"] == real.config.rope_parameters["rope_theta"] == 100000.0
    assert rand.config.max_position_embeddings == real.config.max_position_embeddings and rand.config.vocab_size >= len(tok)


def test_shipped_llama_3_8b_shape():
    from transformers import AutoConfig, AutoModelForCausalLM

    c = AutoConfig.from_pretrained(str(REPO / "configs/models/llama-3-8b.json"))
    assert (c.hidden_size, c.num_hidden_layers, c.num_attention_heads, c.num_key_value_heads, c.intermediate_size, c.vocab_size) == (
        4096, 32, 32, 8, 14336, 128256)
    assert c.rope_parameters["rope_theta"] == 500000.0 and c.max_position_embeddings == 8192 and not c.tie_word_embeddings
    with torch.device("meta"):  # count the parameters without allocating them: Llama-3-8B has 8.03e9
        m = AutoModelForCausalLM.from_config(c)
    assert sum(p.numel() for p in m.parameters()) == 8_030_261_248
