"""Hyperparameter sweeps: search-space checks before any trial, then a real Ray Tune sweep of the
finetune job (one Ray Train run per trial, ASHA), its outputs, and resuming an interrupted sweep."""

from __future__ import annotations

import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import pandas as pd
import pytest
import yaml

from tests.conftest import REPO_ROOT
from tests.test_finetune import write_colour_catalog
from tests.tiny import tiny_vit
from visuray.config import ConfigError, validate_config
from visuray.jobspec import load_job_spec
from visuray.metric_learning.config import FinetuneConfig
from visuray.status import overview
from visuray.sweep.config import SweepConfig
from visuray.sweep.prepare import prepare_sweep, trial_job_data
from visuray.sweep.run import concurrent_trials
from visuray.sweep.space import ParamSpec, check_key

TINY_FINETUNE = {
    "job": "finetune",
    "name": "tiny",
    "model": {"backbone": tiny_vit(), "embedding_dim": 16},
    "train": {
        "steps": 6,
        "p": 4,
        "k": 3,
        "lr": 1e-3,
        "warmup_steps": 1,
        "log_every": 1,
        "checkpoint_every": 3,
        "data_workers": 0,
    },
    "loss": {"name": "triplet", "miner": "batch_all", "margin": 0.2},
    "validation": {"every": 2, "ks": [1, 3]},
    "scaling": {"max_failures": 0},
}


def write_spec(tmp_path: Path, with_validation: bool = True, filename: str = "finetune.yaml") -> Path:
    data = yaml.safe_load(yaml.safe_dump(TINY_FINETUNE))
    data |= {
        "catalog": str(tmp_path / "catalog"),
        "output": str(tmp_path / "model"),
        "run_dir": str(tmp_path / "runs"),
    }
    if with_validation:
        data["validation"]["catalog"] = str(tmp_path / "val-catalog")
    else:
        del data["validation"]
    spec = tmp_path / filename
    spec.write_text(yaml.safe_dump(data))
    return spec


def sweep_config(tmp_path: Path, spec: Path, **changes: object) -> SweepConfig:
    data = {
        "name": "margins",
        "spec": str(spec),
        "output": str(tmp_path / "sweeps"),
        "metric": "val/map@r",
        "mode": "max",
        "num_samples": 4,
        "search_space": {
            "loss.margin": {"type": "loguniform", "low": 0.05, "high": 0.5},
            "loss.miner": {"type": "choice", "values": ["batch_all", "batch_hard"]},
        },
        "scheduler": {"name": "asha", "grace_period": 2, "reduction_factor": 2},
        "max_concurrent_trials": 2,
    } | changes
    return validate_config(SweepConfig, data, "test sweep")


# ---------------- checks before any trial, without Ray ----------------


@pytest.mark.unit
@pytest.mark.parametrize(
    "spec, message",
    [
        ({"type": "uniform", "low": 0.5, "high": 0.5}, "empty range"),
        ({"type": "loguniform", "low": 0.0, "high": 1.0}, "low > 0"),
        ({"type": "randint", "low": 2, "high": 2.5}, "integer"),
        ({"type": "choice", "values": []}, "non-empty"),
        ({"type": "grid"}, "non-empty"),
        ({"type": "uniform", "low": 0.1}, "needs low and high"),
        ({"type": "choice", "values": [1], "low": 0}, "takes values"),
    ],
)
def test_unusable_ranges_are_refused(spec: dict, message: str) -> None:
    with pytest.raises(ValueError, match=message):
        ParamSpec.model_validate(spec)


@pytest.mark.unit
def test_keys_are_checked_against_the_job_config_model() -> None:
    check_key(FinetuneConfig, "loss.margin")
    check_key(FinetuneConfig, "train.p")
    with pytest.raises(ConfigError, match=r"'loss\.margn'.*did you mean margin"):
        check_key(FinetuneConfig, "loss.margn")
    with pytest.raises(ConfigError, match="is a value, not a section"):
        check_key(FinetuneConfig, "train.lr.value")
    with pytest.raises(ConfigError, match="not a key of the job config"):
        check_key(FinetuneConfig, "optimizer.lr")
    with pytest.raises(ConfigError, match="is a section"):
        check_key(FinetuneConfig, "loss")


@pytest.mark.unit
def test_list_entries_are_named_by_index() -> None:
    """Attribute head depths sit in a list of label groups: ``labels.groups.<i>.depth``."""
    from visuray.attributes.config import AttributeTrainConfig
    from visuray.config import apply_values
    from visuray.fusion.config import FusionTrainConfig

    check_key(FusionTrainConfig, "model.fusion_depth")
    check_key(AttributeTrainConfig, "labels.groups.2.depth")
    with pytest.raises(ConfigError, match="is a list; name an entry by its index"):
        check_key(AttributeTrainConfig, "labels.groups.depth")
    spec = REPO_ROOT / "jobs" / "configs" / "train_attributes_lite0.yaml"
    kind, cfg = load_job_spec(spec, ["labels.groups.2.depth=1"])
    assert [g.depth for g in cfg.labels.groups][:3] == [None, None, 1]
    with pytest.raises(ConfigError, match="is a list of 6; '9' is not an index"):
        apply_values({"labels": {"groups": [{}] * 6}}, {"x": (["labels", "groups", "9", "depth"], 1)})


@pytest.mark.unit
def test_bad_sweeps_fail_before_any_trial(tmp_path: Path) -> None:
    spec = write_spec(tmp_path)
    output = tmp_path / "sweeps"

    with pytest.raises(ConfigError, match="not a key of the job config"):
        prepare_sweep(
            sweep_config(tmp_path, spec, search_space={"loss.marginn": {"type": "choice", "values": [1]}})
        )
    # A value the job config itself refuses (P x K needs P >= 2) is caught at the range's end point.
    with pytest.raises(ConfigError, match=r"rejects train\.p=1"):
        prepare_sweep(
            sweep_config(tmp_path, spec, search_space={"train.p": {"type": "randint", "low": 1, "high": 5}})
        )
    with pytest.raises(ConfigError, match=r"never reports 'val/accuracy'"):
        prepare_sweep(sweep_config(tmp_path, spec, metric="val/accuracy"))
    without_validation = write_spec(tmp_path, with_validation=False, filename="plain.yaml")
    with pytest.raises(ConfigError, match=r"validation\.catalog"):
        prepare_sweep(sweep_config(tmp_path, without_validation))
    with pytest.raises(ConfigError, match="grace_period"):
        prepare_sweep(sweep_config(tmp_path, spec, scheduler={"name": "asha", "grace_period": 6}))
    with pytest.raises(ValueError, match="set by the sweep"):
        sweep_config(tmp_path, spec, search_space={"output": {"type": "choice", "values": ["x"]}})
    ingest = tmp_path / "ingest.yaml"
    ingest.write_text(
        yaml.safe_dump({"job": "ingest", "source": str(tmp_path), "output": str(tmp_path / "c")})
    )
    with pytest.raises(ConfigError, match="does not train"):
        prepare_sweep(sweep_config(tmp_path, ingest))
    assert not output.exists()  # nothing was started


@pytest.mark.unit
def test_trial_specs_and_concurrency(tmp_path: Path) -> None:
    prepared = prepare_sweep(sweep_config(tmp_path, write_spec(tmp_path)))
    data = trial_job_data(
        prepared, {"loss.margin": 0.3, "loss.miner": "batch_hard"}, "abc", "/sweeps/margins"
    )
    cfg = validate_config(FinetuneConfig, data)
    assert (cfg.loss.margin, cfg.loss.miner) == (0.3, "batch_hard")
    assert (cfg.name, cfg.run_dir, cfg.output) == (
        "margins-abc",
        "/sweeps/margins/train",
        "/sweeps/margins/models/abc",
    )
    best = validate_config(FinetuneConfig, trial_job_data(prepared, {"loss.margin": 0.3}, None, ""))
    assert (best.name, best.output) == ("tiny", str(tmp_path / "model"))

    derived = sweep_config(tmp_path, write_spec(tmp_path), max_concurrent_trials=None)
    assert concurrent_trials(derived, cfg, {"CPU": 8.0}) == 8
    two_workers = cfg.model_copy(update={"scaling": cfg.scaling.model_copy(update={"num_workers": 2})})
    assert concurrent_trials(derived, two_workers, {"CPU": 5.0}) == 2
    gpu = cfg.model_copy(update={"scaling": cfg.scaling.model_copy(update={"use_gpu": True})})
    assert concurrent_trials(derived, gpu, {"CPU": 16.0, "GPU": 2.0}) == 2
    assert concurrent_trials(derived, cfg, {"CPU": 0.5}) == 1


@pytest.mark.unit
def test_trial_status() -> None:
    from types import SimpleNamespace as Result

    from visuray.sweep.outputs import trial_status

    assert trial_status(Result(error=None, metrics={"step": 6, "done": True}), True, None, 6) == "completed"
    assert (
        trial_status(Result(error=None, metrics={"step": 2, "done": True}), False, None, 6) == "stopped early"
    )
    # restored from an earlier run of the sweep, which recorded the scheduler's stop
    assert trial_status(Result(error=None, metrics={"step": 2}), False, "stopped early", 6) == "stopped early"
    assert trial_status(Result(error=None, metrics={"step": 2}), False, None, 6) == "unfinished"
    assert trial_status(Result(error=None, metrics={}), False, None, 6) == "unfinished"
    assert trial_status(Result(error=RuntimeError("x"), metrics={"step": 6}), True, None, 6) == "error"


# ---------------- a real sweep ----------------


def read_results(root: Path) -> pd.DataFrame:
    table = pd.read_parquet(root / "results.parquet")
    csv = pd.read_csv(root / "results.csv")
    assert list(csv["trial_id"]) == list(table["trial_id"])
    return table


def check_results(root: Path, table: pd.DataFrame, steps: int) -> None:
    """A finished ASHA sweep's outputs: statuses, steps, values in range, the best spec, the plots, and
    what `visuray status` says of it."""
    assert set(table["status"]) <= {"completed", "stopped early"}
    finished = table[table["status"] == "completed"]
    assert len(finished) >= 1 and (finished["steps"] == steps).all()
    assert (table.loc[table["status"] == "stopped early", "steps"] < steps).all()
    assert table["loss.margin"].between(0.05, 0.5).all() and set(table["loss.miner"]) <= {
        "batch_all",
        "batch_hard",
    }
    assert table["last val/map@r"].between(0, 1).all()
    assert (table["best val/map@r"] >= table["last val/map@r"]).all()

    # The best spec is a job spec `visuray run` takes as it is, with the best trial's values.
    best = table.loc[finished["last val/map@r"].idxmax()]
    kind, best_cfg = load_job_spec(root / "best.yaml")
    assert kind.name == "finetune" and best_cfg.name == "tiny"
    assert best_cfg.loss.miner == best["loss.miner"]
    assert best_cfg.loss.margin == pytest.approx(best["loss.margin"])
    for model in finished["model"]:  # each completed trial published its model once
        assert len(os.listdir(Path(model) / "versions")) == 1
    for key in ("loss.margin", "loss.miner"):
        assert (root / "plots" / f"val_map_r_vs_{key}.png").read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"

    # `visuray status` lists the sweep with its trials by status and its best trial.
    (sweep,) = overview(str(root.parent), include_cluster=False)["sweeps"]
    assert sweep["uri"] == str(root) and sweep["metric"] == "val/map@r" and sweep["results"]
    assert sweep["trials"] == table["status"].value_counts().to_dict()
    assert sweep["best"] == {"trial_id": best["trial_id"], "val/map@r": pytest.approx(best["last val/map@r"])}


@pytest.mark.ray
@pytest.mark.slow
def test_an_interrupted_asha_sweep_resumes_and_writes_results(ray_cluster: object, tmp_path: Path) -> None:
    """Ctrl-C a sweep (its own Ray cluster, in a subprocess, as `visuray run` runs it) while its second
    trial trains; rerunning the same command finishes the sweep under ASHA, and the first trial, finished
    before, is not trained again. Then the outputs of the whole sweep are checked."""
    write_colour_catalog(str(tmp_path / "catalog"))
    write_colour_catalog(str(tmp_path / "val-catalog"), per_class=4, seed=1)
    # One trial at a time: ASHA continues the first trial at every rung (nothing to compare it with) and
    # may stop the second at step 2 or 4 against it.
    cfg = sweep_config(tmp_path, write_spec(tmp_path), num_samples=2, max_concurrent_trials=1)
    sweep_file = tmp_path / "sweep.yaml"
    sweep_file.write_text(yaml.safe_dump(cfg.model_dump(mode="json")))
    env = {k: v for k, v in os.environ.items() if k != "RAY_ADDRESS"} | {"PYTHONUNBUFFERED": "1"}
    command = [sys.executable, "-m", "visuray.cli", "run", str(sweep_file)]
    root = tmp_path / "sweeps" / "margins"

    first = subprocess.Popen(command, cwd=REPO_ROOT, env=env, start_new_session=True)
    try:
        deadline = time.monotonic() + 600
        # The second trial's training run exists only once Tune has recorded the first trial as finished.
        while len(list((root / "train").glob("margins-*"))) < 2:
            assert first.poll() is None, "the sweep ended before it was interrupted"
            assert time.monotonic() < deadline, "the first trial did not finish in time"
            time.sleep(1)
        os.killpg(first.pid, signal.SIGINT)  # what Ctrl-C sends
        first.wait(timeout=180)
    finally:
        if first.poll() is None:
            os.killpg(first.pid, signal.SIGKILL)
    assert first.returncode != 0  # an interrupted sweep is not a finished one
    finished_first = sorted(p.name.removeprefix("margins-") for p in (root / "train").glob("margins-*"))[0]
    assert (root / "models" / finished_first / "LATEST").exists()
    # the partial table an interrupted sweep leaves shows in `visuray status` too
    assert overview(str(tmp_path / "sweeps"), include_cluster=False)["sweeps"][0]["results"]

    second = subprocess.run(command, cwd=REPO_ROOT, env=env, capture_output=True, text=True, timeout=900)
    assert second.returncode == 0, second.stderr[-3000:]
    table = read_results(root)
    assert len(table) == 2
    first_row = table.set_index("trial_id").loc[finished_first]
    assert first_row["status"] == "completed"
    assert len(os.listdir(root / "models" / finished_first / "versions")) == 1  # not trained again
    check_results(root, table, steps=6)

    changed = cfg.model_copy(update={"num_samples": 5})
    sweep_file.write_text(yaml.safe_dump(changed.model_dump(mode="json")))
    third = subprocess.run(command, cwd=REPO_ROOT, env=env, capture_output=True, text=True, timeout=300)
    assert third.returncode != 0 and "started with a different config" in third.stderr


@pytest.mark.ray
def test_a_killed_trial_driver_frees_its_training_resources(ray_cluster: object, tmp_path: Path) -> None:
    """ASHA stops a trial by ending the process that runs its ``trainer.fit()``; the run's placement group
    (the CPUs its workers hold) must be freed then, or a sweep starves itself of resources. Ray Train's
    cleaner does that through the dashboard's state API, which the embedded cluster must expose."""
    import ray
    from ray.util import placement_group_table

    def created() -> set[str]:
        return {pg_id for pg_id, pg in placement_group_table().items() if pg["state"] == "CREATED"}

    @ray.remote(num_cpus=0)
    class Driver:
        def fit(self, storage: str) -> None:
            from ray.train import RunConfig, ScalingConfig
            from ray.train.torch import TorchTrainer

            def loop(config: dict) -> None:
                Path(storage, "started").touch()
                time.sleep(600)

            TorchTrainer(
                loop,
                scaling_config=ScalingConfig(num_workers=1),
                run_config=RunConfig(storage_path=storage, name="killed-driver"),
            ).fit()

    before = created()
    driver = Driver.remote()
    driver.fit.remote(str(tmp_path))
    deadline = time.monotonic() + 120
    while not (tmp_path / "started").exists():  # the run trains (ASHA stops trials once they report)
        assert time.monotonic() < deadline, "the training run never started"
        time.sleep(1)
    group = created() - before
    assert group
    ray.kill(driver)
    deadline = time.monotonic() + 120
    while group & created():
        assert time.monotonic() < deadline, "the killed run's placement group was never removed"
        time.sleep(1)


@pytest.mark.unit
def test_a_bad_sweep_fails_at_the_command_line_before_ray_starts(tmp_path: Path) -> None:
    spec = write_spec(tmp_path)
    bad = sweep_config(
        tmp_path, spec, search_space={"loss.margin": {"type": "uniform", "low": 0.5, "high": 0.9}}
    )
    data = bad.model_dump(mode="json") | {"search_space": {"loss.margn": {"type": "choice", "values": [0.1]}}}
    sweep_file = tmp_path / "bad-sweep.yaml"
    sweep_file.write_text(yaml.safe_dump(data))
    result = subprocess.run(
        [sys.executable, "-m", "visuray.cli", "run", str(sweep_file)],
        cwd=REPO_ROOT,
        capture_output=True,
        text=True,
        timeout=120,
    )
    assert result.returncode == 2  # a config error, as for any job spec
    assert "error: search space: 'loss.margn' is not a key of the job config" in result.stderr
    assert "did you mean margin" in result.stderr
    assert "Ray" not in result.stderr  # no cluster was started for it
    assert not (tmp_path / "sweeps").exists()
