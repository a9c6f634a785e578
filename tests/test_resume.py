"""Resume: a run killed mid-way (SIGKILL) or interrupted (Ctrl-C) continues where it stopped.

A real ``python -m harness run`` subprocess is stopped once its resume log holds some windows;
the same command run again must give the record of an uninterrupted run, with every window
counted once and ``resumed_windows`` saying how many were taken over.
"""

from __future__ import annotations

import base64
import json
import math
import os
import re
import signal
import subprocess
import sys
import time

import numpy as np
import pandas as pd
import pytest
import yaml

from harness.accumulate import WindowRecord
from harness.resume import PARTIAL, Finished, ResumeLog
from harness.config import validate
from harness.errors import HarnessError
from harness.runner import run

from .conftest import REPO, SMOLLM2, WIKITEXT, tiny_config
from .threads import one_thread  # noqa: F401 (a fixture)


def _config(folder, corpus, **eval_kwargs) -> dict:
    config = tiny_config(folder, corpus, max_length=32, stride=8, batch_size=2, **eval_kwargs)
    config["corpus"] = {**WIKITEXT, "max_tokens": 2000, "cache": False}
    return config


def _start(config: dict, out, tmp_path) -> tuple[subprocess.Popen, object]:
    path = tmp_path / "config.yaml"
    path.write_text(yaml.safe_dump(config))
    env = {**os.environ, "OMP_NUM_THREADS": "1", "PYTHONPATH": str(REPO)}
    cmd = [sys.executable, "-m", "harness", "run", str(path), "-o", str(out), "--no-progress"]
    return subprocess.Popen(cmd, cwd=REPO, env=env, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True), path


def _stop_after(proc: subprocess.Popen, out, windows: int, sig: int) -> int:
    """Send ``sig`` once the resume log holds at least ``windows`` windows; the lines it held then."""
    deadline = time.monotonic() + 300
    while time.monotonic() < deadline:
        logs = list((out / PARTIAL).glob("*.jsonl")) if (out / PARTIAL).is_dir() else []
        if logs:
            lines = logs[0].read_bytes().count(b"\n") - 1  # the first line is the header
            if lines >= windows:
                proc.send_signal(sig)
                return lines
        assert proc.poll() is None, f"the run ended before it was stopped: {proc.stderr.read()[-2000:]}"
        time.sleep(0.005)
    proc.kill()
    raise AssertionError("the resume log never filled")


def _cli(path, out) -> subprocess.CompletedProcess:
    env = {**os.environ, "OMP_NUM_THREADS": "1", "PYTHONPATH": str(REPO)}
    cmd = [sys.executable, "-m", "harness", "run", str(path), "-o", str(out), "--no-progress"]
    return subprocess.run(cmd, cwd=REPO, env=env, capture_output=True, text=True, timeout=600)


def test_sigkill_then_rerun_equals_uninterrupted(tiny, tmp_path, one_thread):
    folder, model, tok = tiny
    config = _config(folder, None)
    out = tmp_path / "results" / "run"
    proc, path = _start(config, out, tmp_path)
    kept = _stop_after(proc, out, 20, signal.SIGKILL)
    proc.wait(timeout=60)
    assert not (out / "result.json").exists()

    whole = run(validate(config), model=model, tokenizer=tok, write=False, progress=False)
    assert kept < whole["windows"]
    done = _cli(path, out)  # the same command again
    assert done.returncode == 0, done.stderr[-2000:]
    resumed = json.loads((out / "result.json").read_text())
    assert kept <= resumed["resumed_windows"] < whole["windows"]
    for key in ("scored_tokens", "windows", "bytes", "words"):
        assert resumed[key] == whole[key], key
    assert math.isclose(resumed["sum_nll"], whole["sum_nll"], rel_tol=1e-6)
    assert math.isclose(resumed["perplexity"], whole.perplexity, rel_tol=1e-6)
    # no window twice, none lost; the NLL-by-position table is whole too
    windows = pd.read_parquet(out / "windows.parquet")
    assert list(windows["index"]) == list(range(whole["windows"]))
    assert windows.sum_nll.values == pytest.approx(whole.windows.sum_nll.values, rel=1e-5)
    positions = pd.read_parquet(out / "positions.parquet")
    assert (positions["count"].values == whole.positions["count"].values).all()
    assert positions.sum_nll.values == pytest.approx(whole.positions.sum_nll.values, rel=1e-5)
    assert not (out / PARTIAL).exists()  # the log goes once the record is written


def test_ctrl_c_keeps_work_and_says_how_to_resume(tiny, tmp_path, one_thread):
    folder, model, tok = tiny
    config = _config(folder, None)
    out = tmp_path / "results" / "run"
    proc, path = _start(config, out, tmp_path)
    _stop_after(proc, out, 10, signal.SIGINT)
    _, stderr = proc.communicate(timeout=60)
    assert proc.returncode == 130
    last = stderr.strip().splitlines()[-1]
    assert last.startswith("interrupted:") and "resume" in last and str(out) in last
    kept = int(last.split()[1])
    assert kept >= 10
    assert not (out / "result.json").exists()

    # a changed config does not take over the old windows, and drops their log
    changed = validate({**config, "eval": {**config["eval"], "stride": 16}})
    res = run(changed, out, model=model, tokenizer=tok, progress=False)
    assert res["resumed_windows"] == 0
    assert not (out / PARTIAL).exists()


def test_log_drops_a_line_cut_short_by_a_kill(tmp_path):
    def finished(i: int) -> Finished:
        nlls = np.array([0.5, 1.25 + i], dtype=np.float32)
        rec = WindowRecord(i, 0, i, i + 3, i + 1, i + 3, False, False, float(nlls.sum()), float((nlls**2).sum()), 2, 7, 1)
        return Finished(rec, nlls)

    log = ResumeLog(tmp_path, "abc" * 10, 5, exclusive_folder=True)
    assert log.open() == []
    log.append([finished(0), finished(1)])
    log.close()
    with open(log.path, "ab") as f:
        f.write(b'{"index": 2, "doc": 0, "be')  # a kill in the middle of a write
    again = ResumeLog(tmp_path, "abc" * 10, 5, exclusive_folder=True)
    done = again.open()
    assert [f.record for f in done] == [finished(0).record, finished(1).record]
    assert np.array_equal(done[1].nlls, finished(1).nlls)
    again.append([finished(2)])  # appends after the last whole line
    again.close()
    third = ResumeLog(tmp_path, "abc" * 10, 5, exclusive_folder=True)
    assert [f.record.index for f in third.open()] == [0, 1, 2]
    third.close()
    # a different plan for the same hash (cannot happen unless the log is foreign): start over
    other = ResumeLog(tmp_path, "abc" * 10, 6, exclusive_folder=True)
    assert other.open() == []
    other.close(delete=True)
    assert not log.path.exists()


@pytest.mark.slow
def test_interrupted_smollm2_resumes_with_cached_tokens(smollm2, tmp_path, monkeypatch, one_thread):
    """SmolLM2, in-process: a run interrupted mid-scoring (a KeyboardInterrupt raised in the main
    thread by a signal, as Ctrl-C does) and run again takes over the logged windows and the
    cached tokens, and equals a fresh run without either."""
    import threading

    model, tok = smollm2
    monkeypatch.setenv("PPL_CACHE_DIR", str(tmp_path / "cache"))
    config = {
        "model": dict(SMOLLM2),
        "corpus": {**WIKITEXT, "max_tokens": 700},
        "eval": {"protocol": "sliding", "max_length": 128, "stride": 64, "bootstrap": 0},
    }
    cfg = validate(config)
    out = tmp_path / "results" / "smol"
    armed = threading.Event()
    armed.set()

    def interrupt(signum, frame):
        if armed.is_set():
            raise KeyboardInterrupt

    def watch():
        while armed.is_set():
            logs = list((out / PARTIAL).glob("*.jsonl")) if (out / PARTIAL).is_dir() else []
            if logs and logs[0].read_bytes().count(b"\n") - 1 >= 3:
                os.kill(os.getpid(), signal.SIGUSR1)
                return
            time.sleep(0.005)

    previous = signal.signal(signal.SIGUSR1, interrupt)
    watcher = threading.Thread(target=watch, daemon=True)
    watcher.start()
    try:
        with pytest.raises(KeyboardInterrupt, match="run the same command"):
            run(cfg, out, model=model, tokenizer=tok, progress=False)
    finally:
        armed.clear()
        watcher.join()
        signal.signal(signal.SIGUSR1, previous)
    assert not (out / "result.json").exists()

    resumed = run(cfg, out, model=model, tokenizer=tok, progress=False)
    fresh = run(validate({**config, "corpus": {**config["corpus"], "cache": False}}), model=model, tokenizer=tok, write=False, progress=False)
    assert 3 <= resumed["resumed_windows"] < fresh["windows"]
    assert resumed["corpus"]["token_cache"]["hit"] is True
    for key in ("scored_tokens", "windows", "bytes", "words"):
        assert resumed[key] == fresh[key], key
    assert math.isclose(resumed["sum_nll"], fresh["sum_nll"], rel_tol=1e-6)
    assert math.isclose(resumed.perplexity, fresh.perplexity, rel_tol=1e-6)
    assert list(resumed.windows["index"]) == list(range(fresh["windows"]))


def test_sigterm_keeps_work_prints_the_resume_command_and_resumes(tiny, tmp_path, one_thread):
    """SIGTERM (a scheduler's notice before it kills a job) is handled as Ctrl-C: the finished
    windows stay in the log, the command to resume is printed, the exit code is 143 (128 + 15, as a
    shell reports a process that SIGTERM ended; Ctrl-C gives 130), and the printed command resumes."""
    import shlex

    folder, model, tok = tiny
    config = _config(folder, None)
    config["eval"]["batch_size"] = 1  # one window per batch: ~250 batches, time to be stopped mid-way
    out = tmp_path / "results" / "run"
    proc, path = _start(config, out, tmp_path)
    _stop_after(proc, out, 10, signal.SIGTERM)
    _, stderr = proc.communicate(timeout=60)
    assert proc.returncode == 143, stderr[-2000:]
    assert "Traceback" not in stderr
    last = stderr.strip().splitlines()[-1]
    assert last.startswith("interrupted:") and str(out) in last, last
    kept = int(last.split()[1])
    assert kept >= 10
    assert not (out / "result.json").exists()
    message, command = last.split(" again to resume: ")
    assert shlex.split(command) == [sys.executable, "-m", "harness", "run", str(path), "-o", str(out), "--no-progress"]

    env = {**os.environ, "OMP_NUM_THREADS": "1", "PYTHONPATH": str(REPO)}
    again = subprocess.run(shlex.split(command), cwd=REPO, env=env, capture_output=True, text=True, timeout=600)
    assert again.returncode == 0, again.stderr[-2000:]
    resumed = json.loads((out / "result.json").read_text())
    whole = run(validate(config), model=model, tokenizer=tok, write=False, progress=False)
    assert kept <= resumed["resumed_windows"] < whole["windows"]
    for key in ("scored_tokens", "windows", "bytes", "words"):
        assert resumed[key] == whole[key], key
    # float32 NLLs of the same windows at batch size 1, summed in float64 in window order
    assert math.isclose(resumed["sum_nll"], whole["sum_nll"], rel_tol=1e-9)
    assert math.isclose(resumed["perplexity"], whole.perplexity, rel_tol=1e-9)
    assert not (out / PARTIAL).exists()


# ---------------------------------------------------------------------------------------------
# A damaged log: one line naming it when the run starts, before any window is scored


@pytest.fixture
def logged(tiny, tiny_corpus, tmp_path, monkeypatch):
    """A run stopped (Ctrl-C) after its first batch: (config, folder, log path, model, tokenizer);
    then the scorer is replaced by one that fails the test, so a rerun must stop before scoring."""
    import harness.runner

    folder, model, tok = tiny
    cfg = validate(tiny_config(folder, tiny_corpus, max_length=32, stride=16, batch_size=2, bootstrap=0))
    out = tmp_path / "run"
    append = ResumeLog.append

    def append_then_stop(self, finished):
        append(self, finished)
        if finished:
            raise KeyboardInterrupt

    with monkeypatch.context() as m:
        m.setattr(ResumeLog, "append", append_then_stop)
        with pytest.raises(KeyboardInterrupt, match="run the same command"):
            run(cfg, out, model=model, tokenizer=tok, progress=False)
    (path,) = (out / PARTIAL).glob("*.jsonl")
    assert path.read_bytes().count(b"\n") == 3  # the header and the first batch's two windows

    def scored(*args, **kwargs):
        raise AssertionError("a window was scored before the damaged log was refused")

    monkeypatch.setattr(harness.runner, "score_windows", scored)
    return cfg, out, path, model, tok


def _damage(path, **change) -> bytes:
    """Append a copy of the log's last window with ``change`` applied; the log's bytes after."""
    row = json.loads(path.read_bytes().splitlines()[-1])
    with open(path, "ab") as f:
        f.write(json.dumps({**row, **change}).encode() + b"\n")
    return path.read_bytes()


def _refused(logged, match: str, before: bytes | None) -> None:
    """The rerun ends in one HarnessError naming the log; the log is as it was, nothing is written."""
    cfg, out, path, model, tok = logged
    with pytest.raises(HarnessError) as err:
        run(cfg, out, model=model, tokenizer=tok, progress=False)
    message = str(err.value)
    assert "\n" not in message and message.startswith(f"resume log: {path} ")
    assert re.search(match, message), message
    assert (path.read_bytes() if before is not None else None) == before
    assert sorted(p.name for p in out.iterdir()) == [PARTIAL]  # no record, no tables


def test_damaged_log_bad_index_is_one_line_before_scoring(logged):
    before = _damage(logged[2], index=999)
    _refused(logged, r"not a valid resume log \(ValueError: line 4: window index 999 is not in this run's plan of \d+ windows\)"
             r"; delete .* to start the run over$", before)


def test_damaged_log_wrong_type_is_one_line_before_scoring(logged):
    before = _damage(logged[2], tokens="abc")
    _refused(logged, r"line 4: window \d+: tokens is \"abc\", not a whole number >= 0\); delete", before)


def test_damaged_log_wrong_nll_count_is_one_line_before_scoring(logged):
    three = base64.b64encode(np.zeros(3, "<f4").tobytes()).decode()
    before = _damage(logged[2], nll=three)
    _refused(logged, r"line 4: window \d+ scores \d+ tokens but says \d+ and holds 3 NLLs\); delete", before)


def test_log_path_that_is_a_folder_is_one_line(logged):
    path = logged[2]
    path.unlink()
    path.mkdir()
    _refused(logged, r"is a folder, not a resume log; delete it to start the run over$", None)
    assert path.is_dir() and not any(path.iterdir())


def test_log_window_not_the_planned_one_is_refused(tmp_path):
    """Given the plan, a logged window whose spans are not its planned window's is damage too."""
    from harness.windows import Window

    plan = [Window(i, 0, i, i + 3, i + 1, i + 3) for i in range(4)]
    nlls = np.array([0.5, 1.5], dtype=np.float32)
    log = ResumeLog(tmp_path, "abc" * 10, 4, exclusive_folder=True, plan=plan)
    assert log.open() == []
    log.append([Finished(WindowRecord(1, 0, 1, 4, 2, 4, False, False, 2.0, 2.5, 2, 7, 1), nlls)])
    log.append([Finished(WindowRecord(2, 0, 0, 3, 1, 3, False, False, 2.0, 2.5, 2, 7, 1), nlls)])  # window 0's spans
    log.close()
    again = ResumeLog(tmp_path, "abc" * 10, 4, exclusive_folder=True, plan=plan)
    with pytest.raises(HarnessError, match=r"line 3: window 2: its spans are not the planned window's"):
        again.open()
    assert again._file is None  # closed, the lock let go
