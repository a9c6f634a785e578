"""`ppl report`: the page rendered by headless Chromium, read back from the DOM.

The results folder is made here from real runs (the tiny model, and SmolLM2 on short slices),
with a comparison, a sweep, a per-sample table and a run whose name is a script. Every number
the test expects is formatted here from the records on disk, not taken from the report code.
"""

from __future__ import annotations

import json
import shutil
import struct
import subprocess
import sys
import tempfile
from html.parser import HTMLParser
from pathlib import Path

import numpy as np
import pandas as pd
import pytest

from harness.compare import Run, check_comparable, compare, write_comparison
from harness.config import validate
from harness.errors import HarnessError
from harness.report import write_report
from harness.runner import run
from harness.sweep import plan, run_sweep

from .conftest import REPO, SMOLLM2, TINY_TEXT, WIKITEXT, build_tiny_model, tiny_config

PWN = "x<script>window.__pwned=1;document.title='PWNED'</script>"
EVIL_TEXT = "An evil <script>document.title='PWNED'</script> document & friends. "
BROWSER_FLAGS = [
    "--headless", "--no-sandbox", "--disable-gpu", "--disable-quic", "--no-first-run", "--disable-background-networking",
    "--disable-component-update", "--disable-sync", "--host-resolver-rules=MAP * ~NOTFOUND",
]


def chromium() -> str:
    found = shutil.which("chromium")
    if not found:
        pytest.fail("chromium is not installed: `make test` installs it (`make chromium`, Debian's chromium package)")
    return found


def browse(url: str, *flags: str) -> subprocess.CompletedProcess:
    profile = tempfile.mkdtemp(prefix="ppl-test-chromium-")
    try:
        return subprocess.run([chromium(), *BROWSER_FLAGS, f"--user-data-dir={profile}", *flags, url],
                              capture_output=True, text=True, timeout=180, check=True)
    finally:
        shutil.rmtree(profile, ignore_errors=True)


# ---------------------------------------------------------------------------------------------
# A small DOM from the dumped HTML (stdlib html.parser)

VOID = {"area", "base", "br", "col", "embed", "hr", "img", "input", "link", "meta", "source", "track", "wbr"}


class Node:
    def __init__(self, tag: str, attrs, parent):
        self.tag, self.attrs, self.parent, self.children = tag, dict(attrs), parent, []

    def text(self) -> str:
        return "".join(c if isinstance(c, str) else c.text() for c in self.children)

    def iter(self, tag: str | None = None, cls: str | None = None):
        for c in self.children:
            if isinstance(c, Node):
                if (tag is None or c.tag == tag) and (cls is None or cls in c.attrs.get("class", "").split()):
                    yield c
                yield from c.iter(tag, cls)

    def find(self, tag=None, cls=None):
        return next(self.iter(tag, cls), None)


class Dom(HTMLParser):
    def __init__(self, html: str):
        super().__init__(convert_charrefs=True)
        self.root = self.cur = Node("#document", [], None)
        self.feed(html)
        self.close()

    def handle_starttag(self, tag, attrs):
        node = Node(tag, attrs, self.cur)
        self.cur.children.append(node)
        if tag not in VOID:
            self.cur = node

    def handle_startendtag(self, tag, attrs):
        self.cur.children.append(Node(tag, attrs, self.cur))

    def handle_endtag(self, tag):
        node = self.cur
        while node is not None and node.tag != tag:
            node = node.parent
        if node is not None and node.parent is not None:
            self.cur = node.parent

    def handle_data(self, data):
        self.cur.children.append(data)


def dump(page: Path, query: str = "") -> Node:
    done = browse(page.resolve().as_uri() + query, "--dump-dom")
    return Dom(done.stdout).root


def board_rows(root: Node) -> list[list[Node]]:
    """The leaderboard tables, each as its body rows in the rendered order."""
    return [[tr for tr in t.find("tbody").iter("tr")] for t in root.iter("table", "board")]


# ---------------------------------------------------------------------------------------------
# The results folder


@pytest.fixture(scope="module")
def folder(tmp_path_factory, tiny, smollm2):
    """Real runs: tiny model (several settings, a KL run, a sweep, a comparison), SmolLM2 on a
    WikiText-2 slice and on the tiny corpus (a second tokenizer), a per-sample table, a script name."""
    folder_, model, tok = tiny
    base = tmp_path_factory.mktemp("report")
    corpus = base / "docs.jsonl"
    paragraphs = [p for p in TINY_TEXT.split(".") if p.strip()][:8]  # 9 documents: all in the worst-samples table
    docs = [(p.strip() + ". ") * (1 + i % 3) for i, p in enumerate(paragraphs)] + [EVIL_TEXT * 3]
    with corpus.open("w") as f:
        for i, d in enumerate(docs):
            f.write(json.dumps({"text": d, "domain": ["news", "wiki"][i % 2]}) + "\n")
    res = base / "results"

    def tiny_run(name, out=None, folder=folder_, m=model, **kw):
        cfg = tiny_config(folder, corpus, **kw.pop("eval", {}))
        cfg["corpus"].update(kw.pop("corpus", {}))
        cfg = validate({**cfg, "name": name, **kw})
        extra = {"baseline_model": model} if "baseline_model" in kw else {}
        return run(cfg, res / (out or name), model=m, tokenizer=tok, progress=False, **extra)

    tiny_run("tiny-s16")
    tiny_run("tiny-s8", eval={"stride": 8})
    tiny_run(PWN, "tiny-script-name")
    paloma = tiny_run("tiny-paloma", eval={"protocol": "paloma", "max_length": 32}, corpus={"domain_field": "domain"})
    # a second checkpoint with the same tokenizer, run in KL mode against the first
    other = base / "tiny-seed1"
    other.mkdir()
    tok.save_pretrained(other)
    model2 = build_tiny_model(other, len(tok), seed=1)
    tiny_run("tiny-seed1", folder=other, m=model2, baseline_model={"name_or_path": str(folder_), "device": "cpu"})
    write_comparison(compare([str(res / "tiny-s16"), str(res / "tiny-seed1")], samples=200), res / "compare-seed")
    import yaml

    cfg_path = base / "sweep.yaml"
    cfg_path.write_text(yaml.safe_dump({**tiny_config(folder_, corpus), "name": "tiny-sweep"}))
    run_sweep(plan(cfg_path, ["eval.stride=4,8"], res / "sweep-stride"), progress=False, model=model, tokenizer=tok)

    # a per-sample table beside the paloma run (documents mode): per-document sums from its windows
    win = pd.read_parquet(paloma.run_dir / "windows.parquet")
    per = win.groupby("doc").agg(target_nll=("sum_nll", "sum"), target_tokens=("tokens", "sum")).reset_index()
    samples = pd.DataFrame({"sample": per.doc, "prompt_tokens": 0, "target_tokens": per.target_tokens, "target_nll": per.target_nll,
                            "perplexity": np.exp(per.target_nll / per.target_tokens),
                            "text": [docs[d] for d in per.doc]})
    samples.to_parquet(paloma.run_dir / "samples.parquet", index=False)

    sm, stok = smollm2
    cfg = validate({"name": "smollm2-wikitext", "model": SMOLLM2, "corpus": {**WIKITEXT, "max_tokens": 1024},
                    "eval": {"max_length": 256, "stride": 128, "bootstrap": 100}})
    run(cfg, res / "smollm2-wikitext", model=sm, tokenizer=stok, progress=False)
    cfg = validate({**tiny_config(folder_, corpus), "name": "smollm2-tiny-corpus", "model": SMOLLM2})
    run(cfg, res / "smollm2-tiny-corpus", model=sm, tokenizer=stok, progress=False)
    page, _ = write_report([res], base / "out" / "report.html")
    return res, page


def records(res: Path) -> dict[str, dict]:
    found = {}
    for p in sorted(res.rglob("result.json")):
        r = json.loads(p.read_text())
        found[r["run_id"]] = r
    return found


# ---------------------------------------------------------------------------------------------


def test_every_run_number_as_in_the_records(folder):
    res, page = folder
    recs = records(res)
    assert len(recs) == 9
    root = dump(page)
    rows = {tr.attrs["data-run"]: tr for table in board_rows(root) for tr in table}
    assert set(rows) == set(recs)
    for run_id, r in recs.items():
        tr = rows[run_id]
        lo, hi = r["ci95"]
        assert tr.find("td", "ppl").text() == f"{r['perplexity']:.4f}"
        assert tr.find("td", "ci").text() == f"{lo:.4f} .. {hi:.4f}"
        assert tr.find("td", "bpb").text() == f"{r['bits_per_byte']:.4f}"
        assert tr.find("svg") is not None  # the interval bar
        # the run's own section: the summary `ppl run` prints, and its plots
        section = next(s for s in root.iter("section", "run") if s.attrs["id"] == tr.find("a").attrs["href"][1:])
        assert f"{r['perplexity']:.4f}  (95% CI {lo:.4f} .. {hi:.4f})" in section.text()
        assert f"{r['scored_tokens']:,} in {r['windows']:,} windows" in section.text()
        assert len(list(section.iter("polyline"))) == 2  # running perplexity, NLL by position
        assert f"torch{r['versions']['torch']}" in section.text().replace("\n", "")


def test_groups_follow_the_compare_rules(folder):
    res, page = folder
    recs = records(res)
    by_id = {r["run_id"]: Run(Path(r["run_id"]), r) for r in recs.values()}
    tables = board_rows(dump(page))
    assert len(tables) >= 4
    firsts = []
    for rows in tables:
        runs = [by_id[tr.attrs["data-run"]] for tr in rows]
        for other in runs[1:]:
            check_comparable(runs[0], other)  # same tokens: no error
        firsts.append(runs[0])
    for i, a in enumerate(firsts):
        for b in firsts[i + 1:]:
            with pytest.raises(HarnessError):
                check_comparable(a, b)
    # SmolLM2 and the tiny model on the same corpus and settings: one bits-per-byte table
    root = dump(page)
    bpb = next(s for s in root.iter("section") if s.attrs.get("id") == "bits-per-byte")
    ids = [tr.attrs["data-run"] for tr in bpb.find("tbody").iter("tr")]
    names = {recs[i]["name"] for i in ids}
    assert {"smollm2-tiny-corpus", "tiny-s16"} <= names and "tiny-s8" not in names
    for tr in bpb.find("tbody").iter("tr"):
        assert f"{recs[tr.attrs['data-run']]['bits_per_byte']:.4f}" in tr.text()


def test_comparison_sweep_kl_and_samples_shown(folder):
    res, page = folder
    root = dump(page)
    comp = pd.read_csv(res / "compare-seed" / "compare.csv")
    section = next(s for s in root.iter("section") if s.attrs.get("id") == "comparisons")
    row = comp.iloc[1]
    text = section.text()
    assert f"{row.delta_ppl:+.4f}" in text and f"{row.delta_ci95_low:.4f} .. {row.delta_ci95_high:.4f}" in text
    assert f"{row.kl_mean:.4f}" in text and row.test in text
    sweep = pd.read_csv(res / "sweep-stride" / "sweep.csv")
    section = next(s for s in root.iter("section") if s.attrs.get("id") == "sweeps")
    assert section.find("polyline") is not None
    for _, r in sweep.iterrows():
        assert f"{r.perplexity:.4f}" in section.text()
    # KL statistics in the KL run's section; per-domain and worst samples in the paloma run's
    recs = {r["name"]: r for r in records(res).values()}
    runs = {s.find("h3").text(): s for s in root.iter("section", "run")}
    kl = recs["tiny-seed1"]["kl"]
    assert f"{kl['mean']:.4f}" in runs["tiny-seed1"].text()
    pal = runs["tiny-paloma"]
    for name, d in recs["tiny-paloma"]["domains"]["per_domain"].items():
        assert f"{d['perplexity']:.4f}" in pal.text()
    samples = pd.read_parquet(res / "tiny-paloma" / "samples.parquet")
    worst = samples.perplexity.sort_values(ascending=False).head(10)
    table = pal.find("table", "samples")
    header = [th.text() for th in table.find("thead").iter("th")]
    shown = [[td.text() for td in tr.iter("td")] for tr in table.find("tbody").iter("tr")]
    col = header.index("perplexity")
    assert len(shown) == len(samples) == 9
    assert [row[col] for row in shown] == [f"{p:.4f}" for p in worst]  # the worst first
    texts = [row[header.index("text")] for row in shown]
    assert any(EVIL_TEXT.strip() in t for t in texts)  # the corpus's <script> shows as text


def test_sorting_and_filtering_run_in_the_browser(folder):
    _, page = folder

    def ppl_orders(root):
        return [[float(tr.attrs["data-ppl"]) for tr in rows] for rows in board_rows(root)]

    plain = ppl_orders(dump(page))
    up = ppl_orders(dump(page, "?sort=ppl"))
    down = ppl_orders(dump(page, "?sort=-ppl"))
    assert [sorted(t) for t in plain] == [sorted(t) for t in up]
    assert all(t == sorted(t) for t in up) and all(t == sorted(t, reverse=True) for t in down)
    assert any(a != b for a, b in zip(plain, up)) or any(a != b for a, b in zip(plain, down))  # the script moved rows
    root = dump(page, "?protocol=paloma")
    visible = [tr for rows in board_rows(root) for tr in rows if "hidden" not in tr.attrs]
    assert [tr.attrs["data-protocol"] for tr in visible] == ["paloma"]
    assert next(s for s in root.iter("span") if s.attrs.get("id") == "shown").text() == "1 of 9 runs shown"


def test_injected_script_does_not_run(folder):
    _, page = folder
    html = page.read_text()
    assert "&lt;script&gt;window.__pwned=1" in html and "<script>window.__pwned" not in html
    root = dump(page)
    assert root.find("title").text() == "Perplexity report: 9 runs"
    assert len(list(root.iter("script"))) == 1  # the page's own
    links = [a.text() for a in root.iter("a")]
    assert PWN in links  # shown as text


def _page_requests(netlog: Path) -> list[str]:
    """URL requests a page made (the browser's own service requests have no origin)."""
    log = json.loads(netlog.read_text())
    start = log["constants"]["logEventTypes"]["URL_REQUEST_START_JOB"]
    urls = []
    for e in log["events"]:
        p = e.get("params") or {}
        if e["type"] == start and "url" in p and (p.get("initiator") != "not an origin" or "file://" in p.get("network_isolation_key", "")):
            urls.append(p.get("url"))
    return urls


def test_no_network_requests(folder, tmp_path):
    import re

    _, page = folder
    html = page.read_text()
    assert not re.search(r"""(src|href|xlink:href|action)\s*=\s*["']?\s*(https?:)?//""", html, re.I)
    assert not re.search(r"url\(\s*['\"]?(https?:)?//", html, re.I) and "@import" not in html
    csp = re.search(r'<meta http-equiv="Content-Security-Policy" content="([^"]+)"', html).group(1)
    assert csp.startswith("default-src 'none';") and "'unsafe-inline'" not in csp.split("script-src")[1].split(";")[0]
    # the net log sees page requests: a control page with a remote image and stylesheet shows them
    control = tmp_path / "control.html"
    control.write_text('<!doctype html><img src="http://example.invalid/x.png"><link rel="stylesheet" href="https://example.invalid/a.css">')
    browse(control.as_uri(), f"--log-net-log={tmp_path / 'control.json'}", "--dump-dom")
    assert set(_page_requests(tmp_path / "control.json")) == {"http://example.invalid/x.png", "https://example.invalid/a.css"}
    browse(page.resolve().as_uri() + "?sort=ppl", f"--log-net-log={tmp_path / 'net.json'}", "--dump-dom")
    assert _page_requests(tmp_path / "net.json") == []


def _png_size(path: Path) -> tuple[int, int]:
    data = path.read_bytes()[:24]
    assert data[:8] == b"\x89PNG\r\n\x1a\n" and data[12:16] == b"IHDR"
    return struct.unpack(">II", data[16:24])


def test_screenshot_written(folder, tmp_path):
    _, page = folder
    png = tmp_path / "shot.png"
    browse(page.resolve().as_uri(), f"--screenshot={png}", "--window-size=1400,2000")
    assert _png_size(png) == (1400, 2000)
    # the CLI's own screenshot (what `make run` writes under results/)
    res, _ = folder
    out = tmp_path / "cli" / "report.html"
    done = subprocess.run([sys.executable, "-m", "harness", "report", str(res), "-o", str(out), "--screenshot", str(tmp_path / "cli" / "report.png")],
                          capture_output=True, text=True, cwd=REPO, timeout=300)
    assert done.returncode == 0, done.stderr
    assert f"report: {out}" in done.stdout and "9 runs" in done.stdout
    assert _png_size(tmp_path / "cli" / "report.png") == (1400, 2000)


@pytest.mark.parametrize("case", ["empty", "broken", "not-a-folder", "folder-as-output"])
def test_bad_input_one_line_exit_2(folder, tmp_path, case):
    res, _ = folder
    out = tmp_path / "report.html"
    if case == "empty":
        (tmp_path / "empty").mkdir()
        args, expect = [str(tmp_path / "empty")], "no result records"
    elif case == "broken":
        broken = tmp_path / "broken"
        shutil.copytree(res / "tiny-s16", broken / "tiny-s16")
        (broken / "tiny-s16" / "result.json").write_text('{"perplexity": 3.0, ')
        args, expect = [str(broken)], "is not a valid result record (JSONDecodeError"
    elif case == "not-a-folder":
        (tmp_path / "file").write_text("x")
        out = tmp_path / "file" / "report.html"
        args, expect = [str(res / "tiny-s16")], "is a file, not a folder"
    else:
        out = tmp_path
        args, expect = [str(res / "tiny-s16")], "is a folder"
    before = sorted(p.name for p in tmp_path.rglob("*"))
    done = subprocess.run([sys.executable, "-m", "harness", "report", *args, "-o", str(out)], capture_output=True, text=True, cwd=REPO)
    assert done.returncode == 2
    lines = done.stderr.strip().splitlines()
    assert len(lines) == 1 and lines[0].startswith("error: ") and expect in lines[0], done.stderr
    assert sorted(p.name for p in tmp_path.rglob("*")) == before  # nothing written
