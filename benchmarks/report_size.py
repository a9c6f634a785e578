"""Time and size of ``ppl report`` over many records: one real run folder copied N times.

    python benchmarks/report_size.py RUN_FOLDER [--records 50] [--repeat 3] [--keep DIR]

Each copy gets its own name, run id and a perplexity, interval and bits per byte nudged by a
few per cent, so the leaderboard has N distinct rows; its windows.parquet and positions.parquet
are copied as they are (so each run section draws the same curves as the real run). Prints the
best-of-``--repeat`` wall time of rendering and writing the page (after one warm-up), the HTML
size, and the size per record.
"""

from __future__ import annotations

import argparse
import json
import shutil
import sys
import tempfile
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))  # run as a script from anywhere

from benchmarks.timing import best  # noqa: E402
from harness.report import write_report  # noqa: E402


def make_folder(run: Path, root: Path, n: int) -> None:
    record = json.loads((run / "result.json").read_text())
    for i in range(n):
        d = root / f"run-{i:03d}"
        shutil.copytree(run, d, ignore=shutil.ignore_patterns("*.log", "*.tmp"))
        scale = 1 + 0.002 * (i - n / 2)
        r = {**record, "name": f"{record.get('name') or 'run'}-{i:03d}", "run_id": d.name,
             "perplexity": record["perplexity"] * scale, "ci95": [x * scale for x in record["ci95"]],
             "bits_per_byte": record["bits_per_byte"] * scale if record.get("bits_per_byte") is not None else None}
        (d / "result.json").write_text(json.dumps(r, indent=2))


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("run", type=Path, help="a run folder (result.json, windows.parquet, positions.parquet)")
    ap.add_argument("--records", type=int, default=50)
    ap.add_argument("--repeat", type=int, default=3)
    ap.add_argument("--keep", type=Path, help="write the folder and the report here instead of a temporary folder")
    args = ap.parse_args()
    root = args.keep or Path(tempfile.mkdtemp(prefix="ppl-report-bench-"))
    results = root / "results"
    make_folder(args.run, results, args.records)
    out = root / "report.html"
    seconds = best(lambda: write_report([results], out), args.repeat)
    size = out.stat().st_size
    windows = json.loads((args.run / "result.json").read_text()).get("windows")
    print(f"{args.records} records ({windows} windows each): report in {seconds:.2f} s (best of {args.repeat}), "
          f"{size / 2**20:.2f} MiB ({size / args.records / 1024:.1f} KiB per record) -> {out}")
    if not args.keep:
        shutil.rmtree(root)


if __name__ == "__main__":
    main()
