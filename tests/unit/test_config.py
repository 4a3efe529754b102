from pathlib import Path

import pytest
import yaml
from pydantic import ValidationError

from pipeline_steps.core.config import Params, load_params, parse_params
from pipeline_steps.core.errors import ConfigError

REPO = Path(__file__).resolve().parents[2]


def test_repository_params_load_into_typed_sections():
    params = load_params(REPO / "params.yaml")
    assert params.preprocess.input_size == 256
    assert params.register_.model_name == "radflow-detector"
    assert params.validate_.min_images >= 1
    # the file mirrors the typed defaults, so nothing in it is silently ignored; the default data's
    # training choices (streaming, hard negatives, stride 2, the 0.4 test split, 22 epochs with
    # mining every 4) differ on purpose: the typed defaults stay those of ingested data alone
    chosen = {
        "train": {
            "crops_per_image",
            "epochs",
            "hard_negative_every",
            "hard_negative_fraction",
            "output_stride",
            "synthetic",
        },
        "preprocess": {"split"},
    }
    file, typed = params.model_dump(), Params().model_dump()
    for section, fields in chosen.items():
        for name in fields:
            assert file[section].pop(name) != typed[section].pop(name)
    assert file == typed


def test_unknown_key_is_named(tmp_path):
    raw = yaml.safe_load((REPO / "params.yaml").read_text())
    raw["train"]["epoch"] = 3  # typo for epochs
    with pytest.raises(ConfigError, match=r"train\.epoch"):
        parse_params(raw)


def test_bad_value_names_the_dotted_key():
    with pytest.raises(ConfigError, match=r"preprocess\.split\.test_fraction"):
        parse_params({"preprocess": {"split": {"test_fraction": 1.5}}})


def test_bad_range_names_the_section():
    with pytest.raises(ConfigError, match=r"synth\.lesions"):
        parse_params({"synth": {"lesions": {"diameter_mm": [30, 6]}}})


def test_missing_file_and_bad_yaml(tmp_path):
    with pytest.raises(ConfigError, match="not found"):
        load_params(tmp_path / "params.yaml")
    bad = tmp_path / "params.yaml"
    bad.write_text("train: [unclosed")
    with pytest.raises(ConfigError, match="not valid YAML"):
        load_params(bad)


def test_params_are_frozen_and_hash_changes_with_values():
    params = Params()
    with pytest.raises(ValidationError):
        params.train.epochs = 3  # type: ignore[misc]
    changed = parse_params({"train": {"epochs": 3}})
    assert params.stage_hash("train") != changed.stage_hash("train")
    assert params.stage_hash("preprocess") == changed.stage_hash("preprocess")


def test_gate_has_its_own_section_named_as_the_stage():
    params = load_params(Path(__file__).resolve().parents[2] / "params.yaml")
    assert params.gate.thresholds == {"ap50": 0.5, "sens_at_1fp": 0.6}
    assert "gate" not in params.register_.model_dump()


def test_an_older_params_file_with_register_gate_still_loads_with_a_warning(caplog):
    old = {"register": {"model_name": "m", "gate": {"min_delta": 0.05}}}
    with caplog.at_level("WARNING"):
        params = parse_params(old)
    assert params.gate.min_delta == 0.05 and params.register_.model_name == "m"
    assert "register.gate" in caplog.text and "top-level `gate`" in caplog.text
    with pytest.raises(ConfigError, match="both `gate` and `register.gate`"):
        parse_params({**old, "gate": {"min_delta": 0.1}})


def test_the_gate_policy_does_not_change_the_model_params_hash():
    from pipeline_steps.register import params_hash

    base = parse_params({})
    stricter = parse_params({"gate": {"min_delta": 0.2}})
    assert params_hash(base) == params_hash(stricter)
    assert params_hash(base) != params_hash(parse_params({"train": {"seed": 8}}))


# ---- params.yaml read within limits: every input ends in Params or a ConfigError naming the file


def _load(tmp_path, content: str | bytes):
    path = tmp_path / "params.yaml"
    if isinstance(content, bytes):
        path.write_bytes(content)
    else:
        path.write_text(content)
    return load_params(path)


@pytest.mark.parametrize(
    "content",
    [
        "train: " + "[" * 5000 + "]" * 5000 + "\n",  # was a RecursionError traceback
        "train: " + "{a: " * 3000 + "1" + "}" * 3000 + "\n",
        "".join(f"{'  ' * i}k{i}:\n" for i in range(200)) + "  " * 200 + "x: 1\n",
    ],
    ids=["flow-sequences", "flow-mappings", "block-indentation"],
)
def test_deeply_nested_yaml_is_a_config_error_naming_the_file_and_the_depth_limit(
    tmp_path, content
):
    from pipeline_steps.core.config import MAX_PARAMS_DEPTH

    with pytest.raises(
        ConfigError, match=rf"params\.yaml: line \d+: .*deeper than {MAX_PARAMS_DEPTH}"
    ):
        _load(tmp_path, content)


def test_aliases_that_expand_exponentially_are_refused(tmp_path):
    # "billion laughs": 9 levels of 10 aliases each would be 10^9 values once expanded
    lines = ["a0: &a0 [1, 1, 1, 1, 1, 1, 1, 1, 1, 1]"]
    lines += [f"a{i}: &a{i} [{', '.join([f'*a{i - 1}'] * 10)}]" for i in range(1, 10)]
    with pytest.raises(ConfigError, match=r"more than 100000 values"):
        _load(tmp_path, "\n".join(lines) + "\n")


def test_aliases_that_nest_past_the_depth_limit_are_refused(tmp_path):
    # each line is shallow, but every alias adds a level to what it expands to
    lines = ["a0: &a0 [1]"] + [f"a{i}: &a{i} [*a{i - 1}]" for i in range(1, 40)]
    with pytest.raises(ConfigError, match=r"aliases expanded.*deeper than 32"):
        _load(tmp_path, "\n".join(lines) + "\n")


def test_an_alias_inside_its_own_anchor_is_a_cycle(tmp_path):
    with pytest.raises(ConfigError, match=r"line 2: .*cycle"):
        _load(tmp_path, "train:\n  hessian_sigmas: &a [1.0, *a]\n")


def test_a_file_over_the_size_limit_is_refused_before_parsing(tmp_path):
    from pipeline_steps.core.config import MAX_PARAMS_BYTES

    with pytest.raises(ConfigError, match=r"params\.yaml: larger than the 1024 KiB limit"):
        _load(tmp_path, "# padding\n" * (MAX_PARAMS_BYTES // 10 + 1))


@pytest.mark.parametrize(
    ("content", "message"),
    [
        (b"train:\n  seed: 7\n  # caf\xe9\n", r"line 3: not UTF-8 text \(byte 0xe9\)"),
        (b"\xff\xfet\x00r\x00a\x00i\x00n\x00", r"line 1: not UTF-8 text \(byte 0xff\)"),
        ("- train\n- test\n", r"top level must be a mapping .* not a list"),
        ("just words\n", r"top level must be a mapping .* not a str"),
        ("train:\n  seed: 2026-02-30\n", r"not valid YAML \(a value cannot be read"),
        (
            "train: {epochs: 1}\ntest: {}\ntrain: {epochs: 2}\n",
            r"line 3: key 'train' is given twice",
        ),
        ("train: !!python/object:os.system {}\n", r"not valid YAML"),
        ("---\ntrain: {}\n---\ntest: {}\n", r"not valid YAML"),
        ("train:\n\tseed: 1\n", r"not valid YAML"),
    ],
    ids=[
        "latin1",
        "utf16",
        "list",
        "scalar",
        "bad-date",
        "duplicate-key",
        "python-tag",
        "two-docs",
        "tab",
    ],
)
def test_garbage_yaml_is_a_config_error_naming_the_file(tmp_path, content, message):
    with pytest.raises(ConfigError, match=r"params\.yaml: .*" + message):
        _load(tmp_path, content)


def test_a_utf8_byte_order_mark_and_an_empty_file_are_fine(tmp_path):
    assert _load(tmp_path, "\ufefftrain:\n  epochs: 3\n").train.epochs == 3
    assert _load(tmp_path, "") == Params()
