"""Property-based fuzzing of configs and overrides (hypothesis): whatever a person types, the job
either accepts it or says what is wrong in one JobConfigError — never another exception. Through
the library (load_config, the method block on a real tiny model) and through the CLI (exit code 0
or 2, one `error:` line, no traceback). Bounded: a fixed number of examples, no deadline."""
from __future__ import annotations

import os
import string
import typing

import pytest
import yaml
from hypothesis import HealthCheck, event, given, settings
from hypothesis import strategies as st

from slimtune.train.config import JobConfig, JobConfigError, load_config

pytestmark = pytest.mark.filterwarnings("ignore")  # random method keys may warn about their values
# deterministic by default (CI must not flake on an example a change did not cause);
# SLIMTUNE_FUZZ_RANDOM=1 explores new examples each run
FUZZ = settings(max_examples=int(os.environ.get("SLIMTUNE_FUZZ_EXAMPLES", 150)), deadline=None, derandomize=not os.environ.get("SLIMTUNE_FUZZ_RANDOM"),
                suppress_health_check=[HealthCheck.too_slow, HealthCheck.function_scoped_fixture])


def _keys(model=JobConfig, prefix="") -> list[str]:
    out = []
    for name, f in model.model_fields.items():
        ann = f.annotation
        if isinstance(ann, type) and hasattr(ann, "model_fields"):
            out += _keys(ann, f"{prefix}{name}.")
        else:
            out.append(prefix + name)
    return out


KEYS = _keys() + ["method.r", "method.lora_alpha", "method.target_modules", "method.name", "method.lora_dropout",
                  "method.use_dora", "method.layers_to_transform", "method.bias", "train", "data", "eval"]
scalars = st.one_of(
    st.sampled_from(["1e3", "5e-4", "1.0e-2", "-1", "0", "1e400", "nan", ".inf", "off", "on", "yes", "no", "null",
                     "~", "true", "[]", "{}", "[q_proj, v_proj]", "{a: 1}", "'quoted'", '"x: y"', "!!python/none x",
                     "lora", "all-linear", "cosine", "bf16", "2024-01-01", "0x10", "1_000", "- a", ": x", "[1, [2]]",
                     "&a 1", "*a", "%", "{{", "]]"]),
    st.integers(-10**15, 10**15).map(str),
    st.floats(allow_nan=True, allow_infinity=True).map(repr),
    st.text(alphabet=string.printable + "äé中\u200b", max_size=30),
)
plausible = st.sampled_from(["1", "2", "4", "8", "64", "0.1", "0.5", "1e-3", "5e-4", "true", "false", "auto", "off",
                             "on", "null", "cosine", "linear", "fp32", "bf16", "lora", "ia3", "text", "chat", "sharegpt",
                             "alpaca", "classification", "causal_lm", "[q_proj, v_proj]", "runs/x", "accuracy",
                             "rotten_tomatoes", "my.csv", "'{question}'", "label"])
# mostly real keys with plausible values (to reach deep), some wild ones (to break the parser)
override = st.one_of(
    st.builds(lambda k, v: f"{k}={v}", st.sampled_from(KEYS), plausible),
    st.builds(lambda k, v: f"{k}={v}", st.sampled_from(KEYS), plausible),
    st.builds(lambda k, v: f"{k}={v}", st.one_of(st.sampled_from(KEYS), st.text(max_size=12)), scalars),
    st.text(max_size=20))


@FUZZ
@given(st.lists(override, max_size=6))
def test_overrides_give_a_config_or_one_message(overrides):
    try:
        cfg = load_config(None, overrides)
    except JobConfigError as e:
        assert str(e).strip()
        event("refused with a message")
        return
    event("accepted")
    assert isinstance(cfg, JobConfig)


yaml_values = st.recursive(
    st.one_of(st.none(), st.booleans(), st.integers(-10**6, 10**6), st.floats(allow_nan=False), st.text(max_size=15)),
    lambda inner: st.lists(inner, max_size=3) | st.dictionaries(st.text(max_size=8), inner, max_size=3), max_leaves=8)
section = st.dictionaries(st.sampled_from([k.split(".")[-1] for k in KEYS]),
                          st.one_of(yaml_values, plausible.map(lambda v: yaml.safe_load(v))), max_size=4)
documents = st.builds(
    lambda base, d: {**base, **d},
    st.sampled_from([{}, {"data": {"builtin": "rotten_tomatoes"}}, {"data": {"train": "x.jsonl"}}]),
    st.dictionaries(st.sampled_from(["model", "task", "method", "train", "eval", "output_dir", "resume", "num_labels",
                                     "x"]), st.one_of(yaml_values, section), max_size=5))


@FUZZ
@given(st.one_of(documents.map(lambda d: yaml.safe_dump(d, allow_unicode=True)), st.text(max_size=200),
                 st.binary(max_size=200)))
def test_yaml_files_give_a_config_or_one_message(tmp_path_factory, text):
    p = tmp_path_factory.mktemp("fuzz") / "c.yaml"
    if isinstance(text, bytes):
        p.write_bytes(text)
    else:
        p.write_text(text, encoding="utf-8")
    try:
        cfg = load_config(str(p))
    except JobConfigError as e:
        assert str(e).strip()
        event("refused with a message")
        return
    event("accepted")
    assert isinstance(cfg, JobConfig)


values = st.one_of(st.integers(-3, 70), st.floats(-1, 3, allow_nan=False), st.booleans(), st.none(),
                   st.sampled_from(["q_proj", "all-linear", "nope", ".*", "[", "gaussian", "pissa", "none", "all",
                                    "houlsby", "fisher", "magnitude", "zero", "random"]),
                   st.lists(st.sampled_from(["q_proj", "v_proj", "k_proj", "nope", "gate_proj", 0, 1, 5]), max_size=3),
                   st.dictionaries(st.sampled_from(["q_proj", "v_proj", "0"]), st.integers(-1, 8), max_size=2))
NAMES = st.sampled_from(["q_proj", "v_proj", "k_proj", "o_proj", "gate_proj", "up_proj", "down_proj", "nope"])


def _fitting(hint):
    """Values of the field's own type (so deep checks are reached, not only the type check)."""
    args = [a for a in typing.get_args(hint) if a is not type(None)]
    if hint is int:
        return st.integers(0, 16)
    if hint is float:
        return st.floats(0, 2, allow_nan=False)
    if hint is bool:
        return st.booleans()
    if hint is str:
        return st.sampled_from(["none", "all", "lora_only", "houlsby", "pfeiffer", "relu", "fisher", "magnitude",
                                "random", "zero", "TEXT", "RANDOM", "MLP", "LSTM", "x"])
    if hint is dict:
        return st.dictionaries(NAMES, st.integers(0, 8), max_size=2)
    if args:
        return st.one_of(st.none(), *[_fitting(a) for a in args])
    return st.one_of(NAMES, st.lists(NAMES, max_size=3), st.lists(st.integers(0, 2), max_size=2), st.just("all-linear"))


METHODS = ["lora", "dora", "ia3", "prefix", "prompt", "bitfit", "sparse", "heads", "layerwise", "full", "bottleneck",
           "singular", "p_tuning", "loha", "lokr", "vera", "oft", "lroa"]


@FUZZ
@given(st.data())
def test_method_blocks_on_a_real_model_give_an_adapter_or_one_message(data):
    import dataclasses

    from conftest import tiny_llama

    from slimtune import get_method
    from slimtune.train.job import apply_method, auto_method

    name = data.draw(st.sampled_from(METHODS))
    try:
        fields = sorted(f.name for f in dataclasses.fields(get_method(name).config_cls))
    except KeyError:
        fields = ["r"]
    keys = st.sampled_from([f for f in fields if f not in ("peft_type", "task_type", "base_model_name_or_path",
                                                           "revision", "inference_mode")] + ["rank", "zz"])
    hints = typing.get_type_hints(get_method(name).config_cls) if name != "lroa" else {}
    kw = {}
    for k in data.draw(st.lists(keys, max_size=3, unique=True)):
        kw[k] = data.draw(st.one_of(_fitting(hints.get(k)), values))  # half fitting the field, half anything
    try:
        cfg = load_config(None, [f"method={yaml.safe_dump({'name': name, **kw}, default_flow_style=True).strip()}"])
        adapter_cfg, _ = auto_method(cfg, tiny_llama(), "causal_lm")
        pm = apply_method(tiny_llama(), adapter_cfg)
    except JobConfigError as e:
        assert str(e).strip()
        event("refused with a message")
        return
    event("adapter built")
    assert pm.get_nb_trainable_parameters()[1] > 0


@FUZZ
@given(overrides=st.lists(override, max_size=4))
def test_the_cli_says_one_line_or_starts(monkeypatch, capsys, overrides):
    """`slimtune train ...` up to the start of training (run_train stubbed): exit 0, or 2 with one message."""
    import slimtune.train.run as run

    from slimtune.cli.main import main

    monkeypatch.setattr(run, "run_train", lambda cfg, **kw: {"cfg": cfg})
    capsys.readouterr()
    rc = main(["train", *[o for o in overrides if not o.startswith("-")], "--no-progress"])
    err = capsys.readouterr().err
    assert "Traceback" not in err
    event(f"exit {rc}")
    assert rc == 0 or (rc == 2 and sum(x.startswith("error:") for x in err.splitlines()) == 1), (rc, err)
