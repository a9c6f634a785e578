"""One rule for "the same model": ``model_key`` is the whole model config, and ``ModelPool``
loads each key once, holding a bounded number of models."""

from __future__ import annotations

import gc
import weakref

import pytest
import torch

from harness.config import ModelConfig
from harness.models import ModelPool, model_key


def _linears(model) -> dict[str, torch.Tensor]:
    return {n: m.weight.detach().clone() for n, m in model.base_model.named_modules() if isinstance(m, torch.nn.Linear)}


def test_every_model_field_is_part_of_the_key(tiny):
    folder, _, _ = tiny
    base = ModelConfig(name_or_path=str(folder), device="cpu")
    changed = {"quantize": "int8-weight-only", "dtype": "bfloat16", "attn_implementation": "eager", "revision": "r1",
               "tokenizer": "t", "gguf_file": "g.gguf", "device": "auto", "device_map": "auto", "allow_pickle": True,
               "trust_remote_code": True, "name_or_path": "other"}
    assert all(f'"{f}"' in model_key(base) for f in ModelConfig.model_fields)  # fields added later too
    for key, value in changed.items():
        assert model_key(base.model_copy(update={key: value})) != model_key(base), key
    assert model_key(ModelConfig(name_or_path=str(folder), device="cpu")) == model_key(base)


def test_pool_loads_once_per_key_and_quantize_is_another_model(tiny):
    """The same config twice is the same object; a config differing only in quantize is another
    model, quantized, while the plain one keeps the weights on disk."""
    folder, fixture_model, _ = tiny
    plain = ModelConfig(name_or_path=str(folder), device="cpu", dtype="float32")  # as the weights on disk
    quantized = plain.model_copy(update={"quantize": "int8-weight-only"})
    pool = ModelPool(keep=2)
    m1, t1 = pool.get(plain)
    m2, t2 = pool.get(ModelConfig(name_or_path=str(folder), device="cpu", dtype="float32"))
    assert m1 is m2 and t1 is t2
    q, _ = pool.get(quantized)
    assert q is not m1 and pool.get(plain)[0] is m1 and len(pool) == 2
    on_disk, w_plain, w_q = _linears(fixture_model), _linears(m1), _linears(q)
    assert on_disk.keys() == w_plain.keys() == w_q.keys() and len(on_disk) == 14
    for name, w in on_disk.items():
        assert torch.equal(w_plain[name], w), name  # untouched
        assert not torch.equal(w_q[name], w), name
        # int8-weight-only: every row is an integer multiple of its scale max|w| / 127
        scale = w_q[name].abs().amax(dim=1, keepdim=True) / 127
        steps = w_q[name] / scale
        assert torch.allclose(steps, steps.round(), atol=1e-3), name


def test_pool_holds_at_most_keep_models(tiny):
    """With keep=1 the previous model is released before the next loads; put() models stay."""
    folder, fixture_model, fixture_tok = tiny
    a = ModelConfig(name_or_path=str(folder), device="cpu")
    b = a.model_copy(update={"quantize": "int8-weight-only"})
    pool = ModelPool()
    pool.put(a.model_copy(update={"name_or_path": "given"}), fixture_model, fixture_tok)
    first = weakref.ref(pool.get(a)[0])
    second = pool.get(b)[0]
    gc.collect()
    assert first() is None and len(pool) == 2
    assert pool.get(a.model_copy(update={"name_or_path": "given"}))[0] is fixture_model
    pool.drop(b)
    assert len(pool) == 1 and pool.get(b)[0] is not second
    with pytest.raises(ValueError, match="keep must be at least 1"):
        ModelPool(keep=0)


def test_a_gguf_loaded_in_bf16_is_the_float32_load_rounded(smollm2, capfd, caplog):
    """Loading the real SmolLM2 GGUF in bf16 gives the session's float32 load rounded to bf16,
    tensor for tensor (what the bf16 tests build by ``.to(torch.bfloat16)``), as plain dense
    modules, and without transformers' warning about packed GGUF kernels (the harness asks for
    dequantized weights)."""
    from harness.config import ModelConfig
    from harness.models import load_model

    from .conftest import SMOLLM2

    f32, _ = smollm2
    capfd.readouterr()
    with caplog.at_level("WARNING"):  # transformers' logger reaches stderr or pytest's log capture
        bf16 = load_model(ModelConfig(**{**SMOLLM2, "dtype": "bfloat16"}), device="cpu")
    said = capfd.readouterr().err + caplog.text
    assert "packed" not in said, said
    want = {k: v.to(torch.bfloat16) for k, v in f32.state_dict().items()}
    got = bf16.state_dict()
    assert got.keys() == want.keys()
    for name, tensor in got.items():
        assert tensor.dtype == torch.bfloat16 and torch.equal(tensor, want[name]), name
    assert {type(m).__module__.split(".")[0] for m in bf16.modules()} <= {"torch", "transformers", "harness"}
