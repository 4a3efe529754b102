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
    # training choices (streaming, hard negatives, stride 2, the 0.4 test split) differ on purpose:
    # the typed defaults stay those of ingested data alone
    chosen = {
        "train": {"crops_per_image", "hard_negative_fraction", "output_stride", "synthetic"},
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
