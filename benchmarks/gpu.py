"""The GPU check and measurement behind ``benchmarks/gpu.sh`` (``make bench-gpu``).

Part A, correctness: a SmolLM2-135M-shaped model with random weights (``model.random_init``,
seed 0, drawn on the CPU in float32) scores a WikiText-2 slice under the ``gptq`` protocol three
times in one process: on the CPU in float32 (the reference, computed here on this machine's CPU
with this machine's torch, so it holds the very same weights), on the GPU in float32 (must agree
to 1e-4 relative) and on the GPU in bfloat16 (the difference is stated). The three runs also put
each entry on its own device in one process (model.device per run).

Part B, speed: a Llama-3-8B-shaped random model in bfloat16 over the whole WikiText-2 test split
under ``gptq`` (L = 2048): scored tokens/s, model FLOPs utilisation against the bfloat16 matmul
peak measured here (one large matmul), and the peak device memory from the record. Target: MFU
>= 50%.

FLOPs counted: 2 per parameter of every matmul per token it processes (body: every input token;
output head: every scored token, the harness projects only those), plus causal attention
(QK^T and AV over the earlier positions only: 2 * L^2 * hidden per layer and window). The input
embedding is a lookup, not counted.

``GPU_DRY=cpu`` runs it all small on the CPU (the "GPU" is the CPU, the 8B shape is replaced by
the SmolLM2 shape): it proves the script end to end except for CUDA itself.
"""

from __future__ import annotations

import json
import math
import os
import sys
import time
from pathlib import Path

REPO = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(REPO))

DRY = os.environ.get("GPU_DRY", "") == "cpu"
TOKENIZER = os.environ.get("GPU_TOKENIZER", str(REPO / ".gpu" / "tokenizer-smollm2"))
SMOLLM2 = str(REPO / "configs" / "models" / "smollm2-135m.json")
LLAMA8B = str(REPO / "configs" / "models" / "llama-3-8b.json")
H200_BF16_DENSE = 989.4e12  # datasheet, dense (no sparsity), for reference beside the measured peak


def log(msg: str) -> None:
    print(f"[{time.strftime('%H:%M:%S')}] {msg}", flush=True)


def matmul_peak(device: str, dtype, n: int, iters: int) -> float:
    """FLOP/s of an n x n x n matmul in ``dtype`` (best of ``iters``, after warm-up)."""
    import torch

    a = torch.randn(n, n, device=device, dtype=dtype)
    b = torch.randn(n, n, device=device, dtype=dtype)
    sync = torch.cuda.synchronize if device.startswith("cuda") else (lambda: None)
    for _ in range(3):
        a @ b
    sync()
    best = math.inf
    for _ in range(iters):
        t = time.perf_counter()
        for _ in range(10):
            a @ b
        sync()
        best = min(best, (time.perf_counter() - t) / 10)
    return 2 * n**3 / best


def run_config(shape: str, device: str, dtype: str, max_tokens: int | None, batch_size: int):
    from harness.config import validate

    corpus = {"dataset": "Salesforce/wikitext", "config": "wikitext-2-raw-v1", "split": "test", "text_field": "text"}
    if max_tokens:
        corpus["max_tokens"] = max_tokens
    return validate({
        "model": {"name_or_path": shape, "random_init": True, "seed": 0, "tokenizer": TOKENIZER, "device": device, "dtype": dtype},
        "corpus": corpus,
        "eval": {"protocol": "gptq", "batch_size": batch_size, "bootstrap": 0, "max_length": 256 if DRY else None},
    })


def model_flops(res, model_cfg) -> float:
    """Matmul FLOPs of the run (see the module docstring)."""
    h, layers, vocab = model_cfg["hidden_size"], model_cfg["num_hidden_layers"], model_cfg["vocab_size"]
    params = res["model"]["parameters"]
    body = params - vocab * h * (1 if model_cfg.get("tie_word_embeddings") else 2)  # no embedding, no head
    w = res.windows
    inputs = (w.end - w.begin + w.prefix.astype(int)).to_numpy()
    return float(2 * body * inputs.sum() + 2 * vocab * h * w.tokens.sum() + (2 * layers * h * inputs.astype(float) ** 2).sum())


def main() -> int:
    import torch

    from harness.runner import run

    gpu = "cpu" if DRY else "cuda"
    out = Path(os.environ.get("OUT") or REPO / "results" / "bench-gpu")
    out.mkdir(parents=True, exist_ok=True)
    slice_tokens, batch = (1024, 2) if DRY else (16384, 8)
    report: dict = {"dry": DRY, "torch": torch.__version__, "cuda": torch.version.cuda,
                    "gpu": torch.cuda.get_device_name(0) if torch.cuda.is_available() else None, "cpu_threads": torch.get_num_threads()}

    # Part A: the same random weights on the CPU (float32), the GPU (float32) and the GPU (bfloat16)
    rows = []
    for label, device, dtype, bs in [("CPU float32", "cpu", "float32", 1), ("GPU float32", gpu, "float32", batch),
                                     ("GPU bfloat16", gpu, "bfloat16", batch)]:
        t = time.perf_counter()
        res = run(run_config(SMOLLM2, device, dtype, slice_tokens, bs), write=False, progress=False)
        rows.append({"run": label, "device": res["device"], "dtype": res["model"]["dtype"], "scored_tokens": res.scored_tokens,
                     "perplexity": res.perplexity, "sum_nll": res["sum_nll"], "tokens_per_second": res["tokens_per_second"],
                     "peak_device_memory_bytes": res["peak_device_memory_bytes"], "seconds": time.perf_counter() - t})
        log(f"A {label}: device {res['device']}, PPL {res.perplexity:.6f} over {res.scored_tokens} tokens, "
            f"{res['tokens_per_second']:,.0f} tok/s, device peaks {res['peak_device_memory_bytes']}")
    cpu, g32, g16 = rows
    rel32 = abs(g32["perplexity"] / cpu["perplexity"] - 1)
    rel16 = g16["perplexity"] / cpu["perplexity"] - 1
    ok32 = rel32 <= 1e-4 and g32["scored_tokens"] == cpu["scored_tokens"]
    report["part_a"] = {"rows": rows, "fp32_rel_diff": rel32, "fp32_within_1e-4": ok32, "bf16_rel_diff": rel16,
                        "bf16_delta_ppl": g16["perplexity"] - cpu["perplexity"]}

    # the bfloat16 matmul peak of this device
    n, iters = (512, 3) if DRY else (8192, 10)
    peak = matmul_peak(gpu if gpu == "cpu" else "cuda:0", torch.bfloat16, n, iters)
    log(f"bfloat16 matmul {n}^3: {peak / 1e12:.1f} TFLOP/s")

    # Part B: the 8B shape (the SmolLM2 shape in the dry run) over the whole split, bfloat16
    shape = SMOLLM2 if DRY else LLAMA8B
    t = time.perf_counter()
    res = run(run_config(shape, gpu, "bfloat16", 2048 if DRY else None, 2 if DRY else 8), write=False, progress=False)
    wall = time.perf_counter() - t
    flops = model_flops(res, json.loads(Path(shape).read_text()))
    mfu = flops / res["scoring_seconds"] / peak
    b = {"shape": Path(shape).name, "parameters": res["model"]["parameters"], "scored_tokens": res.scored_tokens,
         "windows": res["windows"], "batch_size": res["batch_size"], "tokens_per_second": res["tokens_per_second"],
         "scoring_seconds": res["scoring_seconds"], "wall_seconds": wall, "model_tflop": flops / 1e12,
         "achieved_tflops": flops / res["scoring_seconds"] / 1e12, "matmul_peak_tflops": peak / 1e12, "mfu": mfu,
         "mfu_vs_datasheet": None if DRY else flops / res["scoring_seconds"] / H200_BF16_DENSE,
         "peak_device_memory_bytes": res["peak_device_memory_bytes"], "perplexity": res.perplexity, "device": res["device"]}
    report["part_b"] = b
    log(f"B {b['shape']}: {b['scored_tokens']} tokens in {b['scoring_seconds']:.1f} s scoring ({wall:.0f} s with loading)")

    (out / "gpu.json").write_text(json.dumps(report, indent=2))
    gib = lambda peaks: ", ".join(f"{d} {v / 2**30:.2f} GiB" for d, v in peaks.items()) if peaks else "null"  # noqa: E731
    print()
    print(f"torch {report['torch']}, CUDA {report['cuda']}, GPU {report['gpu']}{'  (GPU_DRY=cpu: the GPU rows ran on the CPU)' if DRY else ''}")
    print(f"\nA. SmolLM2-135M shape, random weights (seed 0), WikiText-2 test, first {slice_tokens} tokens, gptq{' L 256' if DRY else ''}\n")
    print("| run | device | PPL | vs CPU float32 | tokens/s | peak device memory |")
    print("|---|---|---|---|---|---|")
    for r in rows:
        d = r["perplexity"] / cpu["perplexity"] - 1
        print(f"| {r['run']} | {r['device']} | {r['perplexity']:.6f} | {d:+.2e} | {r['tokens_per_second']:,.0f} | {gib(r['peak_device_memory_bytes'])} |")
    print(f"\nGPU float32 within 1e-4 of CPU float32: {'yes' if ok32 else 'NO'} ({rel32:.1e}); "
          f"bfloat16: PPL {g16['perplexity'] - cpu['perplexity']:+.4f} ({rel16:+.2e})")
    print(f"\nB. {b['shape']} shape ({b['parameters'] / 1e9:.2f} B parameters), bfloat16, WikiText-2 test "
          f"{'(first 2048 tokens, L 256)' if DRY else '(whole split)'}, gptq, batch {b['batch_size']}\n")
    print("| scored tokens | windows | scoring s | tokens/s | model TFLOP/s | bf16 matmul peak | MFU | peak device memory |")
    print("|---|---|---|---|---|---|---|---|")
    print(f"| {b['scored_tokens']:,} | {b['windows']} | {b['scoring_seconds']:.1f} | {b['tokens_per_second']:,.0f} | "
          f"{b['achieved_tflops']:.1f} | {b['matmul_peak_tflops']:.1f} TFLOP/s | {mfu:.1%} | {gib(b['peak_device_memory_bytes'])} |")
    if not DRY:
        print(f"\nMFU target >= 50%: {'met' if mfu >= 0.5 else 'NOT met'} (against the datasheet's 989 TFLOP/s: {b['mfu_vs_datasheet']:.1%})")
    print(f"\nrecord: {out / 'gpu.json'}")
    return 0 if ok32 else 1


if __name__ == "__main__":
    sys.exit(main())
