"""Multi-node DINO pretraining for real: a `ray start` head and a second node on this machine, one Train
worker on each, one worker killed after the first checkpoint; the run must resume from that checkpoint
(not step 0) and finish. The driver runs in a subprocess connected to the head (never in this process,
which may hold the session's embedded cluster)."""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import time
from collections.abc import Iterator
from pathlib import Path

import pytest

from tests.ray_head import RayHead, start_worker_node
from tests.test_finetune import write_colour_catalog
from tests.tiny import tiny_vit_overrides

pytestmark = [pytest.mark.slow]
REPO = Path(__file__).resolve().parent.parent
STEPS, CHECKPOINT_EVERY = 12, 3


@pytest.fixture(scope="module")
def cluster(ray_head: RayHead) -> Iterator[RayHead]:
    # The session's head and a second node joined to it for this module. Each node offers one `train_slot`;
    # each worker asks for one, so the two workers land on two nodes.
    node = start_worker_node(ray_head, num_cpus=1, resources={"node_b": 1, "train_slot": 1})
    yield ray_head
    node.stop()


def read_heartbeats(directory: Path) -> dict[int, dict]:
    beats = {}
    for path in directory.glob("rank-*.json"):
        try:
            record = json.loads(path.read_text())
        except (OSError, json.JSONDecodeError):
            continue
        beats[record["rank"]] = record
    return beats


def checkpoint_steps(run_path: Path) -> list[int]:
    steps = []
    for path in run_path.glob("checkpoint_*/train_state.json"):
        try:
            steps.append(json.loads(path.read_text())["step"])
        except (OSError, json.JSONDecodeError):
            continue  # being written (or moved) by the worker right now: read it at the next poll
    return sorted(steps)


def test_two_node_pretraining_survives_a_killed_worker(cluster, tmp_path):
    write_colour_catalog(str(tmp_path / "catalog"), per_class=6)
    heartbeats = tmp_path / "heartbeats"
    overrides = [
        f"catalog={tmp_path / 'catalog'}",
        f"output={tmp_path / 'model'}",
        f"run_dir={tmp_path / 'runs'}",
        "name=multinode",
        f"train.steps={STEPS}",
        "train.warmup_steps=2",
        "train.batch_size_per_worker=4",
        f"train.checkpoint_every={CHECKPOINT_EVERY}",
        f"train.log_every={CHECKPOINT_EVERY}",
        f"train.heartbeat_dir={heartbeats}",
        "train.shuffle_buffer=8",
        *tiny_vit_overrides(),  # the shipped spec's pretrained Lite0 would make a slow test; the job is the point
        "crops.local_size=16",
        "model.out_dim=64",
        "model.hidden_dim=32",
        "model.bottleneck_dim=16",
        "scaling.num_workers=2",
        "scaling.resources_per_worker={train_slot: 1}",
        "scaling.max_failures=2",
        "deepspeed.zero_stage=2",
    ]
    env = cluster.client_env()
    env["RAY_ADDRESS"] = cluster.gcs_address
    log = open(tmp_path / "driver.log", "w")  # noqa: SIM115 - closed below
    driver = subprocess.Popen(
        [sys.executable, "-m", "visuray.cli", "run", "jobs/configs/pretrain_lite0.yaml", *overrides],
        cwd=REPO, env=env, stdout=subprocess.PIPE, stderr=log, text=True,
    )  # fmt: skip
    try:
        # Wait for the first checkpoint to be registered and both workers to be past it, then kill one.
        deadline = time.monotonic() + 300
        victim = None
        while time.monotonic() < deadline and driver.poll() is None:
            beats = read_heartbeats(heartbeats)
            ckpts = checkpoint_steps(tmp_path / "runs" / "multinode")
            if ckpts and len(beats) == 2 and min(b["step"] for b in beats.values()) > ckpts[0]:
                victim = beats[1]
                assert beats[0]["node_id"] != beats[1]["node_id"], "both workers ran on one node"
                os.kill(victim["pid"], signal.SIGKILL)
                break
            time.sleep(0.05)
        assert victim is not None, (
            f"never reached a checkpoint: {(tmp_path / 'driver.log').read_text()[-3000:]}"
        )
        assert victim["step"] < STEPS, "the run finished before a worker could be killed"

        stdout, _ = driver.communicate(timeout=400)
    finally:
        if driver.poll() is None:
            driver.kill()
        log.close()
    driver_log = (tmp_path / "driver.log").read_text()
    assert driver.returncode == 0, driver_log[-4000:]
    summary = json.loads(stdout[stdout.index("\n{") + 1 :] if not stdout.startswith("{") else stdout)
    # resumed from a checkpoint taken before the kill, not from step 0, and finished
    assert summary["steps"] == STEPS
    assert 0 < summary["start_step"] <= victim["step"] and summary["start_step"] % CHECKPOINT_EVERY == 0
    after = read_heartbeats(heartbeats)
    assert {b["start_step"] for b in after.values()} == {summary["start_step"]}
    assert after[1]["pid"] != victim["pid"]  # a new worker process took over
    assert (tmp_path / "model" / "LATEST").exists()
