"""Config loading: YAML plus dotted overrides; unknown keys and wrong types name the key and the file."""

from __future__ import annotations

import pytest

from visuray.config import (
    ConfigError,
    StrictModel,
    apply_overrides,
    config_to_yaml,
    load_config,
    parse_override,
)
from visuray.jobspec import JOBS, load_job_spec

pytestmark = pytest.mark.unit


class Train(StrictModel):
    lr: float = 1e-3
    steps: int = 10
    betas: list[float] = [0.9, 0.999]


class Job(StrictModel):
    name: str = "x"
    train: Train = Train()


def test_override_values_are_yaml():
    assert parse_override("train.lr=3e-4") == (["train", "lr"], 3e-4)
    assert parse_override("a=[1, 2]") == (["a"], [1, 2])
    assert parse_override("a=null") == (["a"], None)
    assert parse_override("name=hello world") == (["name"], "hello world")


def test_overrides_apply_without_mutating_input():
    data = {"train": {"lr": 1.0}}
    out = apply_overrides(data, ["train.steps=5", "name=y"])
    assert out == {"train": {"lr": 1.0, "steps": 5}, "name": "y"}
    assert data == {"train": {"lr": 1.0}}


def test_load_with_overrides(tmp_path):
    path = tmp_path / "job.yaml"
    path.write_text("name: a\ntrain:\n  lr: 0.1\n")
    cfg = load_config(Job, path, ["train.steps=7"])
    assert cfg.train.lr == 0.1 and cfg.train.steps == 7 and cfg.name == "a"
    # the saved resolved config loads back to the same object
    resolved = tmp_path / "resolved.yaml"
    resolved.write_text(config_to_yaml(cfg))
    assert load_config(Job, resolved) == cfg


def test_unknown_key_in_file_names_key_and_file(tmp_path):
    path = tmp_path / "bad.yaml"
    path.write_text("train:\n  lrr: 0.1\n")
    with pytest.raises(ConfigError) as err:
        load_config(Job, path)
    assert "train.lrr" in str(err.value) and str(path) in str(err.value) and "unknown key" in str(err.value)


def test_wrong_type_names_key(tmp_path):
    path = tmp_path / "bad.yaml"
    path.write_text("train:\n  steps: many\n")
    with pytest.raises(ConfigError, match=r"train\.steps.*many"):
        load_config(Job, path)


def test_unknown_override_is_marked_as_command_line(tmp_path):
    with pytest.raises(ConfigError, match=r"train\.nope \(command line\): unknown key"):
        load_config(Job, None, ["train.nope=1"])


def test_override_into_a_value_is_an_error():
    with pytest.raises(ConfigError, match="is a value"):
        apply_overrides({"name": "x"}, ["name.sub=1"])


def test_malformed_override():
    with pytest.raises(ConfigError, match="dotted.key=value"):
        parse_override("train.lr")


def test_invalid_yaml_and_non_mapping(tmp_path):
    bad = tmp_path / "bad.yaml"
    bad.write_text("a: [1, 2\n")
    with pytest.raises(ConfigError, match="not valid YAML"):
        load_config(Job, bad)
    bad.write_text("- 1\n- 2\n")
    with pytest.raises(ConfigError, match="mapping"):
        load_config(Job, bad)
    with pytest.raises(ConfigError, match="does not exist"):
        load_config(Job, tmp_path / "missing.yaml")


def test_job_spec_needs_known_job(tmp_path):
    spec = tmp_path / "spec.yaml"
    spec.write_text("job: teleport\n")
    with pytest.raises(ConfigError, match="unknown job 'teleport'"):
        load_job_spec(spec)
    spec.write_text("name: x\n")
    with pytest.raises(ConfigError, match="job: missing"):
        load_job_spec(spec)


@pytest.mark.parametrize("job", sorted(JOBS))
def test_every_shipped_spec_validates(job):
    """Every YAML in jobs/configs for a registered job is a valid spec of that job."""
    from pathlib import Path

    import yaml

    root = Path(__file__).resolve().parent.parent / "jobs" / "configs"
    specs = [
        p for p in sorted(root.glob("*.yaml")) if (yaml.safe_load(p.read_text()) or {}).get("job") == job
    ]
    assert specs, f"no shipped spec for job {job}"
    for spec in specs:
        kind, cfg = load_job_spec(spec)
        assert kind.name == job
        assert (Path(__file__).resolve().parent.parent / kind.script).exists()
