"""Candidates for a bf16 output head with float32 logits: speed and error against float64.

    python benchmarks/head_precision.py [--rows 256 512 1024] [--repeat 5]

Heads of Gemma-3-270M (262,144 x 640) and SmolLM2-135M (49,152 x 576) shapes, bf16 weights of
the real heads' scale (random: the speed depends on the shape only; the error on the scale).
Hidden states are bf16. The reference is float64 arithmetic on the same bf16 values; "exact"
means that reference rounded once to float32. Candidates:

- ``bf16-module``: ``F.linear`` in bf16, then ``.float()`` (what the harness did: logits rounded
  to bf16 before the log-sum-exp; the speed to beat, not a candidate);
- ``a-upcast-chunk``: hidden and head weight upcast to float32 per chunk, float32 matmul;
- ``a-upcast-cached``: the same with the float32 weight made once, ``W @ h.T`` into a reused
  buffer (the harness's float32 workspace path);
- ``b-bf16-products``: as ``a-upcast-cached`` with oneDNN computing the float32 matmul from bf16
  operands (``torch.backends.mkldnn.matmul.fp32_precision = "bf16"``): exact on bf16 values,
  float32 accumulation and output (``torch.mm(..., out_dtype=float32)`` has no CPU kernel in
  torch 2.13; it is the GPU path);
- ``b-bf16-products-chunk``: the same, weight upcast per chunk (no float32 copy kept);
- ``c-split``: the weight split into bf16 hi + lo parts; with bf16 weights lo is zero, so it is
  ``b`` with one more matmul: timed as ``b`` plus a second product;
- ``e-mkl-bf16bf16f32``: MKL's ``cblas_gemm_bf16bf16f32`` (bf16 operands, float32 sums and
  output), which torch's CPU library exports though torch has no op for it; called through
  ``harness.precision.mkl_gemm`` (ctypes) into a reused [rows, vocab] buffer; left out where the
  symbol is missing. (On an AMD Zen 4 it was slower than ``b``: MKL takes a non-AVX-512 path
  there; on an AMX Xeon too, on whole chunks; by vocabulary blocks it wins there:
  ``benchmarks/head_blocks.py``.)
- ``d`` (a float32 head for the scored rows only) is what every candidate here does already:
  the harness projects only scored rows.

Timings alternate the candidates (A B C ... A B C ...) ``--repeat`` times after a warm-up, and
report medians. Errors (max abs, logits and NLLs vs
float64) are taken once per head on the first 256 rows, with random targets.
"""

from __future__ import annotations

import argparse
import statistics
import sys
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))  # run as a script from anywhere

HEADS = {"gemma3": (262_144, 640, 0.03), "smollm2": (49_152, 576, 0.08)}  # vocab, width, weight std


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--models", nargs="+", default=list(HEADS), choices=list(HEADS))
    ap.add_argument("--rows", nargs="+", type=int, default=[256, 512, 1024])
    ap.add_argument("--repeat", type=int, default=5)
    args = ap.parse_args()
    import pandas as pd
    import torch
    import torch.nn.functional as F

    from harness.precision import bf16_products, cpu_bf16_flags, mkl_gemm

    print(f"torch {torch.__version__}, {torch.get_num_threads()} threads, cpu bf16: {cpu_bf16_flags() or 'none'}")
    mkl = mkl_gemm()  # on any CPU: this is where MKL is measured against the others
    rows = []
    for name in args.models:
        vocab, width, std = HEADS[name]
        gen = torch.Generator().manual_seed(0)
        w = (torch.randn(vocab, width, generator=gen) * std).bfloat16()
        w32 = w.float()
        for m in args.rows:
            h = (torch.randn(m, width, generator=gen) * 3).bfloat16()  # final-norm scale
            targets = torch.randint(0, vocab, (m,), generator=gen)
            ld = -(-m // 16) * 16
            ws = torch.empty(vocab * ld)

            def into_ws(weight32, hidden32):
                if ld != m:
                    hidden32 = torch.cat([hidden32, hidden32.new_zeros(ld - m, width)])
                out = ws.view(vocab, ld)
                torch.mm(weight32, hidden32.T, out=out)
                return out[:, :m].T

            def b_products():
                with bf16_products():
                    return into_ws(w32, h.float())

            def b_products_chunk():
                with bf16_products():
                    return into_ws(w.float(), h.float())

            def c_split():
                with bf16_products():
                    y = into_ws(w32, h.float()).clone()
                    return y.add_(into_ws(w32, h.float()))  # the lo part's product (lo = 0 here)

            mkl_out = torch.empty(m, vocab) if mkl else None
            cands = {
                "bf16-module": lambda: F.linear(h, w).float(),
                "a-upcast-chunk": lambda: h.float() @ w.float().T,
                "a-upcast-cached": lambda: into_ws(w32, h.float()),
                "b-bf16-products": b_products,
                "b-bf16-products-chunk": b_products_chunk,
                "c-split": c_split,
            }
            if mkl:
                cands["e-mkl-bf16bf16f32"] = lambda: mkl(h, w, mkl_out)
            err = {}
            with torch.inference_mode():
                if m == args.rows[0]:  # errors on the first rows only (memory: float64 logits)
                    e = min(m, 256)
                    ref = h[:e].double() @ w.double().T
                    ref_nll = torch.logsumexp(ref, 1) - ref.gather(1, targets[:e, None])[:, 0]
                    for k, fn in cands.items():
                        y = fn()[:e]
                        if k == "c-split":
                            y = y / 2  # the timing twin adds the same product twice
                        nll = (torch.logsumexp(y.float(), 1) - y.gather(1, targets[:e, None])[:, 0]).double()
                        err[k] = ((y.double() - ref).abs().max().item(), (nll - ref_nll).abs().max().item())
                    del ref, y
                    first_err = err
                err = first_err
                times = {k: [] for k in cands}
                for _ in range(args.repeat):
                    for k, fn in cands.items():
                        t0 = time.perf_counter()
                        fn()
                        times[k].append(time.perf_counter() - t0)
            for k in cands:
                rows.append({"head": f"{name} {vocab}x{width}", "rows": m, "candidate": k,
                             "median_s": statistics.median(times[k]), "min_s": min(times[k]),
                             "max_abs_logit_err": err[k][0], "max_abs_nll_err": err[k][1]})
            print(pd.DataFrame(rows[-len(cands):]).to_markdown(index=False, floatfmt=".3g"), flush=True)
    df = pd.DataFrame(rows)
    print("\nall (median of alternating runs):")
    print(df.to_markdown(index=False, floatfmt=".3g"))


if __name__ == "__main__":
    main()
