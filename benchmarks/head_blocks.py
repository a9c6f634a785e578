"""The output head and its log-sum-exp: by vocabulary blocks (``head.block_nlls``) against whole chunks.

    python benchmarks/head_blocks.py [--models smollm2 gemma3] [--rows 1024 2048] [--repeats 5]

On a Llama-shaped model with SmolLM2's (49,152 x 576) or Gemma-3's (262,144 x 640) head, random
weights at the real heads' scale, NLLs of ``rows`` random hidden states:

- ``chunks``: what ``token_nlls`` did before: the float32 logits of a whole chunk of rows written
  into the reused workspace (``head_logits``), then the log-sum-exp over them (``chunk_nll``);
- ``blocks <kind>``: ``block_nlls`` with each block matmul it can take on this CPU
  (``head.block_gemm``): MKL's bf16 x bf16 -> float32 (AMX CPUs), oneDNN's float32 matmul in
  bf16 precision, plain float32.

bf16 heads (the body's dtype under ``model.dtype: auto`` here), then float32 heads. Timed in turn
(A B C A B C ...), medians; the error is the largest |NLL - float64 NLL| over the first 256 rows
(the float64 reference: the upcast operands' logits, ``torch.logsumexp``).
"""

from __future__ import annotations

import argparse
import statistics
import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))  # run as a script from anywhere

HEADS = {"gemma3": (262_144, 640, 0.03), "smollm2": (49_152, 576, 0.08)}  # vocab, width, weight std


def head_model(vocab: int, width: int, std: float, dtype):
    """A one-layer Llama whose (tied) head is ``vocab x width``, weights ~ N(0, std)."""
    import torch
    from transformers import LlamaConfig, LlamaForCausalLM

    config = LlamaConfig(vocab_size=vocab, hidden_size=width, intermediate_size=64, num_hidden_layers=1,
                         num_attention_heads=width // 64, num_key_value_heads=1, tie_word_embeddings=True)
    torch.manual_seed(0)
    model = LlamaForCausalLM(config).eval()
    with torch.no_grad():
        model.get_output_embeddings().weight.normal_(0, std)
    return model.to(dtype)


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--models", nargs="+", default=list(HEADS), choices=list(HEADS))
    ap.add_argument("--rows", nargs="+", type=int, default=[1024, 2048])
    ap.add_argument("--repeats", type=int, default=5)
    args = ap.parse_args()
    import torch

    from benchmarks.timing import alternate
    from harness.allocator import keep_freed_memory
    from harness.head import block_nlls, chunk_nll, head_logits, head_workspace
    from harness.precision import cpu_bf16_flags, mkl_bf16_gemm

    keep_freed_memory()  # as a harness run does
    torch.set_grad_enabled(False)
    print(f"torch {torch.__version__}, {torch.get_num_threads()} threads, cpu bf16: {cpu_bf16_flags() or 'none'}; "
          f"ms per 1,024 rows (medians of {args.repeats}) and the largest |NLL - float64 NLL|")
    print("| head | rows | path | ms / 1,024 rows | vs chunks | max NLL error |")
    print("|---|---|---|---|---|---|")
    for name in args.models:
        for dtype in (torch.bfloat16, torch.float32):
            model = head_model(*HEADS[name], dtype)
            w = model.get_output_embeddings().weight
            kinds = (["mkl"] if dtype == torch.bfloat16 and mkl_bf16_gemm() else []) + \
                (["bf16-products"] if dtype == torch.bfloat16 and cpu_bf16_flags() else []) + ["float32"]
            for m in args.rows:
                gen = torch.Generator().manual_seed(m)
                hidden = (torch.randn(m, w.shape[1], generator=gen) * 3).to(dtype)  # final-norm scale
                targets = torch.randint(0, w.shape[0], (m,), generator=gen)
                workspace = head_workspace(model, m)

                def chunks():
                    return chunk_nll(head_logits(model, hidden, workspace), targets, lambda rows: head_logits(model, hidden[rows]))

                paths = {"chunks": chunks} | {f"blocks {k}": (lambda k=k: block_nlls(model, hidden, targets, k)) for k in kinds}
                e = min(m, 256)
                ref = hidden[:e].double() @ w.double().T
                ref = torch.logsumexp(ref, 1) - ref.gather(1, targets[:e, None])[:, 0]
                err = {k: (fn()[:e].double() - ref).abs().max().item() for k, fn in paths.items()}
                del ref
                times = alternate(paths, args.repeats)
                ms = {k: statistics.median(t) * 1e3 * 1024 / m for k, t in times.items()}
                for k in paths:
                    print(f"| {name} {str(dtype).removeprefix('torch.')} | {m} | {k} | {ms[k]:.1f} | "
                          f"{ms['chunks'] / ms[k]:.2f}x | {err[k]:.1e} |", flush=True)
                del workspace
            del model


if __name__ == "__main__":
    main()
