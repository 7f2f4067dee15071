"""A Serve application that cannot be placed says so: what its first replicas reserve against what the
cluster has, and the setting that fixes it; ``visuray serve`` sizes its embedded cluster to fit."""

from __future__ import annotations

import subprocess
import sys
import time
from pathlib import Path

import pytest
import yaml

from visuray.cli import serve_cluster_cpus
from visuray.config import validate_config
from visuray.serving import ServeAppArgs

REPO = Path(__file__).resolve().parent.parent
CONFIG_FILE = REPO / "serve" / "config.yaml"


def full_app_args() -> ServeAppArgs:
    """The shipped serve/config.yaml's arguments: embedding, search, composed search and attributes."""
    args = yaml.safe_load(CONFIG_FILE.read_text())["applications"][0]["args"]
    return validate_config(ServeAppArgs, args, str(CONFIG_FILE))


@pytest.mark.unit
def test_the_full_application_reserves_its_deployments_cpus_and_names_them_when_it_does_not_fit() -> None:
    args = full_app_args()
    settings = args.deployment_settings()
    assert set(settings) == {
        "Router",
        "EmbeddingEnsemble",
        "Search",
        "Fusion",
        "ComposedSearch",
        "Attributes",
    }
    expected = sum(d.num_cpus * d.first_replicas for d in settings.values())
    assert args.reserved("CPU") == pytest.approx(expected) and expected > 2  # more than a 2-core machine
    assert args.fit_problem({"CPU": 8.0}) is None

    problem = args.fit_problem({"CPU": 2.0})
    assert problem is not None and "\n" not in problem
    assert problem.startswith(f"the Serve application's first replicas reserve {expected:g} CPUs (")
    assert all(f"{name} 1 x {d.num_cpus:g}" in problem for name, d in settings.items())
    assert (
        "but the cluster has 2:" in problem and "--num-cpus 3" in problem and "embedder.num_cpus" in problem
    )
    gpu = validate_config(ServeAppArgs, args.model_dump(mode="json"), "<test>", ["embedder.num_gpus=1"])
    assert "reserve 1 GPUs (EmbeddingEnsemble 1 x 1)" in (gpu.fit_problem({"CPU": 8.0}) or "")


@pytest.mark.unit
def test_the_embedded_cluster_of_visuray_serve_is_sized_to_fit_the_application(
    monkeypatch: pytest.MonkeyPatch, capsys: pytest.CaptureFixture[str]
) -> None:
    args = full_app_args()
    monkeypatch.delenv("RAY_ADDRESS", raising=False)
    monkeypatch.setattr("os.cpu_count", lambda: 2)
    assert serve_cluster_cpus(args, None) == 3  # 2.75 CPUs reserved: 3 logical CPUs on 2 cores
    assert "declares 3 logical CPUs on 2 cores" in capsys.readouterr().out
    assert serve_cluster_cpus(args, 1) == 1  # asked for: kept (and then refused, below)
    monkeypatch.setattr("os.cpu_count", lambda: 16)
    assert serve_cluster_cpus(args, None) is None  # the cores suffice: Ray's default
    monkeypatch.setenv("RAY_ADDRESS", "127.0.0.1:6379")
    assert serve_cluster_cpus(args, None) is None  # a cluster of its own: nothing to size


@pytest.mark.slow
def test_visuray_serve_on_a_cluster_too_small_says_so_and_exits(tmp_path: Path) -> None:
    """Before anything is deployed: one line naming what the replicas reserve and the fix, exit 1."""
    import os

    config = tmp_path / "app.yaml"
    config.write_text(yaml.safe_dump(full_app_args().model_dump(mode="json")))
    env = {k: v for k, v in os.environ.items() if k != "RAY_ADDRESS"}
    started = time.monotonic()
    proc = subprocess.run(
        [sys.executable, "-m", "visuray.cli", "serve", str(config), "--port", "0", "--num-cpus", "1"],
        cwd=REPO, env=env, capture_output=True, text=True, timeout=120,
    )  # fmt: skip
    took = time.monotonic() - started
    last = proc.stderr.strip().splitlines()[-1]
    assert proc.returncode == 1 and took < 60, (proc.returncode, took, proc.stderr[-2000:])
    assert last.startswith("error: the Serve application's first replicas reserve 2.75 CPUs"), last
    assert "but the cluster has 1: start with more logical CPUs (visuray serve --num-cpus 3)" in last
    assert "Traceback" not in proc.stderr
