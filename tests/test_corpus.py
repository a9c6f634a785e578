"""Corpora: the mirror, local files in three formats, joining, and the wikitext detokenizer."""

from __future__ import annotations

import hashlib
import json

import pyarrow as pa
import pyarrow.parquet as pq
import pytest

from harness.config import CorpusConfig
from harness.corpus import concatenate, load_documents, wikitext_detokenize
from harness.errors import HarnessError

from .conftest import MIRROR, WIKITEXT


def test_mirror_gives_the_documented_wikitext2_text():
    docs = load_documents(CorpusConfig(**WIKITEXT))
    assert len(docs) == 4358
    text = concatenate(docs, "\n\n").text
    # the mirror README's figures: 1,296,370 UTF-8 bytes and this sha256
    assert len(text.encode("utf-8")) == 1_296_370
    assert hashlib.sha256(text.encode("utf-8")).hexdigest() == "696cca6b65a171b0a358a4be6732cdfdf2dd6164a32e20fd70e3c13fc4dfae83"


def test_document_level_mirror_and_max_documents():
    cfg = CorpusConfig(dataset="EleutherAI/wikitext_document_level", config="wikitext-2-raw-v1", split="test", text_field="page")
    docs = load_documents(cfg)
    assert len(docs) == 62 and sum(len(d.text) for d in docs) == 1_288_493
    assert len(load_documents(cfg.model_copy(update={"max_documents": 5}))) == 5


def test_explicit_mirror_folder(tmp_path, monkeypatch):
    monkeypatch.delenv("PPL_CORPUS_MIRROR")
    monkeypatch.chdir(tmp_path)  # no ../shared/corpora from here
    with pytest.raises(HarnessError, match="not in the mirror"):
        load_documents(CorpusConfig(**WIKITEXT))
    docs = load_documents(CorpusConfig(**WIKITEXT, mirror=str(MIRROR)))
    assert len(docs) == 4358


def test_text_jsonl_and_parquet_files_agree(tmp_path):
    rows = ["first document .", "second one , with @-@ marks", "third"]
    (tmp_path / "c.jsonl").write_text("".join(json.dumps({"text": r, "src": "a"}) + "\n" for r in rows))
    pq.write_table(pa.table({"text": rows}), tmp_path / "c.parquet")
    (tmp_path / "c.txt").write_text("\n\n".join(rows))
    jsonl = load_documents(CorpusConfig(path=str(tmp_path / "c.jsonl")))
    parquet = load_documents(CorpusConfig(path=str(tmp_path / "c.parquet")))
    txt = load_documents(CorpusConfig(path=str(tmp_path / "c.txt")))
    assert [d.text for d in jsonl] == [d.text for d in parquet] == rows
    assert len(txt) == 1 and txt[0].text == concatenate(jsonl, "\n\n").text


def test_bad_jsonl_line_is_named(tmp_path):
    (tmp_path / "c.jsonl").write_text('{"text": "ok"}\n{"text": broken}\n')
    with pytest.raises(HarnessError, match="line 2 is not valid JSON"):
        load_documents(CorpusConfig(path=str(tmp_path / "c.jsonl")))


def test_wikitext_detokenizer_rules():
    # each rule of PROTOCOLS.md section 4, written out by hand
    cases = {
        "a @-@ b": "a-b",
        "1 @,@ 000": "1,000",
        "3 @.@ 5": "3.5",
        "end . Next": "end. Next",
        "x , y ; z : w ! v ? u": "x, y; z: w! v? u",
        "( inside )": "(inside)",
        "[ a ]": "[a]",
        '" quoted "': '"quoted"',
        "= = = Title = = =": "=== Title ===",
        "= = Sub = =": "== Sub ==",
        "20 \u00b0 C": "20\u00b0C",
        "line \n next": "line\nnext",
        "the N rule": "the 1 rule",
        "Teddy 's": "Teddy's",
        "the players ' union": "the players' union",
    }
    for raw, expected in cases.items():
        assert wikitext_detokenize(raw) == expected, raw
    detok = load_documents(CorpusConfig(path=None, dataset="EleutherAI/wikitext_document_level", config="wikitext-2-raw-v1",
                                        text_field="page", detokenizer="wikitext", max_documents=1))[0]
    assert " @-@ " in detok.original and " @-@ " not in detok.text


# ---------------------------------------------------------------------------------------------
# Bad corpus files: one line naming the file and what is wrong (files.py), streamed or not


@pytest.mark.parametrize("streaming", [False, True])
def test_bad_corpus_files_are_one_line(tmp_path, streaming):
    def fails(name: str, data: bytes | None, *needles: str) -> None:
        path = tmp_path / name
        if data is not None:
            path.write_bytes(data)
        with pytest.raises(HarnessError) as info:
            load_documents(CorpusConfig(path=str(path), streaming=streaming))
        msg = str(info.value)
        assert "\n" not in msg and str(path) in msg, msg
        for needle in needles:
            assert needle in msg, msg

    (tmp_path / "folder.jsonl").mkdir()
    fails("folder.jsonl", None, "is a folder, not a file")
    fails("missing.txt", None, "corpus.path: file not found")
    fails("fake.parquet", b"this is not parquet at all", "not a valid Parquet file")
    good = tmp_path / "good.parquet"
    pq.write_table(pa.table({"text": ["a b c"] * 5000}), good)
    fails("truncated.parquet", good.read_bytes()[: good.stat().st_size // 2], "not a valid Parquet file")
    fails("latin1.txt", "na\u00efve".encode("latin-1"), "not UTF-8")
    fails("latin1.jsonl", b'{"text": "ok"}\n' + '{"text": "na\u00efve"}\n'.encode("latin-1"), "not UTF-8")
    fails("bad.jsonl", b'{"text": "ok"}\n\n{"text": "cut', "line 3 is not valid JSON")
    fails("list.jsonl", b'["text"]\n', "line 1 is a JSON list, not an object")
    fails("c.csv", b"text\nx\n", "unsupported file type")
    pq.write_table(pa.table({"body": ["x"]}), tmp_path / "cols.parquet")
    with pytest.raises(HarnessError, match="corpus.text_field: column 'text' not found; available columns: body"):
        load_documents(CorpusConfig(path=str(tmp_path / "cols.parquet"), streaming=streaming))


def test_cli_bad_parquet_exits_2_with_one_line(tmp_path, tiny):
    from .test_errors import assert_nothing_written, assert_one_line_error, cli, write_config

    folder, _, _ = tiny
    fake = tmp_path / "fake.parquet"
    fake.write_text("not parquet")
    results = tmp_path / "results"
    cfg = write_config(tmp_path / "c.yaml", {"model": {"name_or_path": str(folder), "device": "cpu"}, "corpus": {"path": str(fake)}})
    proc = cli("run", str(cfg), "-o", str(results / "r"))
    assert proc.returncode == 2
    assert_one_line_error(proc, "corpus.path", str(fake), "not a valid Parquet file")
    folder_cfg = write_config(tmp_path / "d.yaml", {"model": {"name_or_path": str(folder), "device": "cpu"}, "corpus": {"path": str(tmp_path)}})
    proc = cli("run", str(folder_cfg), "-o", str(results / "r"))
    assert proc.returncode == 2
    assert_one_line_error(proc, "corpus.path", "is a folder")
    assert_nothing_written(results)


# ---------------------------------------------------------------------------------------------
# The mirror: an explicit corpus.mirror must exist; a damaged mirror file is one line


def test_explicit_mirror_must_be_a_folder(tmp_path, monkeypatch):
    """corpus.mirror naming a missing folder or a file is an error (never read from another
    mirror instead); $PPL_CORPUS_MIRROR naming a missing folder is skipped, and marked as such."""
    (tmp_path / "file").write_text("x")
    for mirror, what in [(str(tmp_path / "nope"), "names no folder (not found)"), (str(tmp_path / "file"), "is a file, not a folder"),
                         ("", "is empty"), ("a\nb", "names no folder")]:
        with pytest.raises(HarnessError) as err:
            load_documents(CorpusConfig(**WIKITEXT, mirror=mirror))
        msg = str(err.value)
        assert msg.startswith("corpus.mirror: ") and what in msg and "\n" not in msg, msg
    assert "'a\\nb'" in msg
    # a corpus.path config never looks at the mirror
    (tmp_path / "c.txt").write_text("some text")
    assert load_documents(CorpusConfig(path=str(tmp_path / "c.txt"), mirror=str(tmp_path / "nope")))[0].text == "some text"
    monkeypatch.setenv("PPL_CORPUS_MIRROR", str(tmp_path / "gone"))
    monkeypatch.chdir(tmp_path)  # no ../shared/corpora from here
    with pytest.raises(HarnessError, match=r"not in the mirror \(.*gone \(no such folder\), \.\./shared/corpora \(no such folder\)\)"):
        load_documents(CorpusConfig(**WIKITEXT))
    assert len(load_documents(CorpusConfig(**WIKITEXT, mirror=str(MIRROR), max_documents=3))) == 3


@pytest.mark.parametrize("content", [b"junk", b""])
def test_cli_damaged_mirror_parquet_is_one_line(tmp_path, tiny, content):
    """A damaged mirrored parquet ends in the one error line; the datasets library's own log line
    ('Failed to read schema from ...') is not printed."""
    from .test_errors import assert_nothing_written, assert_one_line_error, cli, write_config

    folder, _, _ = tiny
    split = tmp_path / "mirror" / WIKITEXT["dataset"] / WIKITEXT["config"] / "test.parquet"
    split.parent.mkdir(parents=True)
    split.write_bytes(content)
    results = tmp_path / "results"
    cfg = write_config(tmp_path / "c.yaml", {"model": {"name_or_path": str(folder), "device": "cpu"},
                                             "corpus": {**WIKITEXT, "mirror": str(tmp_path / "mirror")}})
    proc = cli("run", str(cfg), "-o", str(results / "r"), "--no-progress")
    assert proc.returncode == 2
    assert_one_line_error(proc, "corpus.dataset", str(split), "not a valid Parquet file", "copy it again")
    assert "Failed to read schema" not in proc.stderr + proc.stdout, proc.stderr
    assert_nothing_written(results)


@pytest.mark.parametrize("streaming", [False, True])
def test_every_row_names_its_domain(tmp_path, streaming):
    """corpus.domain_field: a row without it, or with a null, a number or a list, is named (a
    JSONL file had put such rows in domains called 'None', '3', "['a', 'b']"; a typo of the
    field, every row in 'None')."""
    def fails(rows: list[dict], field: str, needle: str) -> None:
        path = tmp_path / "d.jsonl"
        path.write_text("".join(json.dumps(r) + "\n" for r in rows))
        with pytest.raises(HarnessError) as err:
            load_documents(CorpusConfig(path=str(path), domain_field=field, streaming=streaming))
        assert str(err.value) == needle

    news = {"text": "a b", "domain": "news"}
    fails([news, {"text": "c"}], "domain", "corpus.domain_field: field 'domain' not found in row 1; available fields: text")
    fails([news], "domian", "corpus.domain_field: field 'domian' not found in row 0; available fields: text, domain")
    for value, kind in ((None, "NoneType"), (3, "int"), (["a", "b"], "list")):
        fails([news, {"text": "c", "domain": value}], "domain",
              f"corpus.domain_field: 'domain' in row 1 holds {kind}, not a domain name; give every row a domain name")
    fails([news, {"text": None}], "domain",
          "corpus.text_field: 'text' in row 1 holds NoneType, not text; fix that row, or name the text column")
    pq.write_table(pa.table({"text": ["a", "b"], "domain": ["news", None]}), tmp_path / "d.parquet")
    with pytest.raises(HarnessError, match="'domain' in row 1 holds NoneType"):
        load_documents(CorpusConfig(path=str(tmp_path / "d.parquet"), domain_field="domain", streaming=streaming))
    (tmp_path / "d.jsonl").write_text(json.dumps(news) + "\n")
    assert [d.domain for d in load_documents(CorpusConfig(path=str(tmp_path / "d.jsonl"), domain_field="domain"))] == ["news"]


def test_a_byte_order_mark_is_not_text(tmp_path):
    """A UTF-8 byte-order mark opening a .txt file was scored as text (and counted as 3 bytes);
    one opening a .jsonl file failed its first line. Both are dropped."""
    text = "The quick brown fox. " * 3
    (tmp_path / "bom.txt").write_bytes(b"\xef\xbb\xbf" + text.encode())
    (tmp_path / "bom.jsonl").write_bytes(b"\xef\xbb\xbf" + (json.dumps({"text": text}) + "\n").encode())
    for name in ("bom.txt", "bom.jsonl"):
        assert [d.text for d in load_documents(CorpusConfig(path=str(tmp_path / name)))] == [text], name
