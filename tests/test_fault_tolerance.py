"""Faults injected for real, outcomes counted:

- a pretraining worker SIGKILLed three times in one run: each restart resumes from the last checkpoint
  (losing at most one checkpoint interval) and the run finishes;
- a Serve embedder replica SIGKILLed under a stream of requests: at most 1% fail, each failure a 503 with
  Retry-After;
- an artifact publish (local and S3) SIGKILLed halfway: the previous version still loads and verifies, no
  manifest points at partial data; a file torn by a killed writer is caught by its checksum.

The helpers here (load stream, replica kill, heartbeat watcher, publisher process) are also what
benchmarks/reliability.py runs.
"""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import threading
import time
from collections import Counter
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import httpx
import pytest

from visuray.storage import (
    ArtifactError,
    ArtifactWriter,
    StorageOptions,
    get_filesystem,
    join,
    resolve_artifact,
    verify_artifact,
)

REPO = Path(__file__).resolve().parent.parent


# ----------------------------------------------------------------------------- training worker kills
def registered_checkpoint_step(run_uri: str | Path) -> int:
    """The step of the latest checkpoint Ray Train has registered (0 if none yet), for a run folder that
    is a local path or an ``s3://`` URI.

    A checkpoint folder on disk is not enough: the controller registers a reported checkpoint when it next
    polls the workers, and a worker killed before that poll leaves an unregistered folder behind. The
    registered ones are in the run's checkpoint-manager snapshot.
    """
    fs, path = get_filesystem(str(run_uri))
    try:
        snapshot = json.loads(fs.cat_file(join(path, "checkpoint_manager_snapshot.json")))
    except (OSError, ValueError):
        return 0
    latest = snapshot.get("latest_checkpoint_result") or {}
    return int((latest.get("metrics") or {}).get("step", 0))


def read_heartbeat(path: Path) -> dict[str, Any] | None:
    try:
        return json.loads(path.read_text())
    except (OSError, ValueError):
        return None


@dataclass
class WorkerKiller:
    """Watches rank 0's heartbeat and SIGKILLs the worker ``kills`` times, each time after it has got past
    a checkpoint of its own; records every worker process's start step and the checkpoint it saw last."""

    heartbeat: Path
    run_path: str | Path  # where Ray Train keeps the run: a local folder or s3://
    kills: int
    steps: int
    every: int
    killed: list[dict[str, Any]] = field(default_factory=list)
    starts: dict[int, dict[str, int]] = field(default_factory=dict)  # pid -> start_step, last ckpt seen
    stop: threading.Event = field(default_factory=threading.Event)

    def run(self) -> None:
        latest = 0
        while not self.stop.is_set():
            beat = read_heartbeat(self.heartbeat)
            latest = max(latest, registered_checkpoint_step(self.run_path))
            if beat is None or any(k["pid"] == beat["pid"] for k in self.killed):
                time.sleep(0.01)
                continue
            self.starts.setdefault(beat["pid"], {"start_step": beat["start_step"], "checkpoint": latest})
            if (
                len(self.killed) < self.kills
                and latest > beat["start_step"]  # this worker checkpointed at least once
                and latest < beat["step"] <= latest + self.every  # the next checkpoint is not registered yet
                and beat["step"] < self.steps - 1
            ):
                os.kill(beat["pid"], signal.SIGKILL)
                self.killed.append({"pid": beat["pid"], "step": beat["step"], "checkpoint": latest})
            time.sleep(0.01)


KILLED_RUN = "killed-thrice"  # the run name pretrain_with_kills gives its runs


def pretrain_with_kills(
    tmp_path: Path, kills: int, steps: int, every: int, run_dir: str | None = None, *overrides: str
) -> tuple[dict, WorkerKiller]:
    """A pretraining run (its run folder under ``run_dir``, default ``tmp_path/runs``) whose worker is
    SIGKILLed ``kills`` times."""
    from tests.test_finetune import write_colour_catalog
    from tests.test_pretrain import pretrain_config
    from visuray.ssl.job import run_pretrain

    tmp_path.mkdir(parents=True, exist_ok=True)
    write_colour_catalog(str(tmp_path / "catalog"), per_class=6)
    run_dir = run_dir or str(tmp_path / "runs")
    cfg = pretrain_config(
        tmp_path,
        f"name={KILLED_RUN}",
        f"run_dir={run_dir}",
        f"train.steps={steps}",
        f"train.checkpoint_every={every}",
        f"train.log_every={every}",
        f"train.heartbeat_dir={tmp_path / 'heartbeats'}",
        f"scaling.max_failures={kills}",
        *overrides,
    )
    killer = WorkerKiller(
        tmp_path / "heartbeats" / "rank-0.json", join(run_dir, KILLED_RUN), kills, steps, every
    )
    watcher = threading.Thread(target=killer.run, daemon=True)
    watcher.start()
    try:
        result = run_pretrain(cfg)
    finally:
        killer.stop.set()
        watcher.join()
    return result, killer


@dataclass
class KilledRun:
    """A finished :func:`pretrain_with_kills` run: its folder (catalog, runs, model), summary and killer."""

    root: Path
    result: dict[str, Any]
    killer: WorkerKiller
    steps: int
    every: int


def run_killed_thrice(root: Path) -> KilledRun:
    """12 steps, a checkpoint every 2, the worker SIGKILLed three times (see the ``killed_pretraining``
    fixture in conftest.py, which runs it once for this module and tests/test_pretrain.py)."""
    steps, every = 12, 2
    result, killer = pretrain_with_kills(root, kills=3, steps=steps, every=every)
    return KilledRun(root, result, killer, steps, every)


@pytest.mark.ray
@pytest.mark.slow
def test_pretraining_survives_three_killed_workers(killed_pretraining: KilledRun) -> None:
    run = killed_pretraining
    result, killer, steps, every = run.result, run.killer, run.steps, run.every
    assert len(killer.killed) == 3, f"only {len(killer.killed)} kills happened: {killer.killed}"
    assert result["steps"] == steps
    starts = list(killer.starts.values())  # in order of appearance: first run, then one per restart
    assert len(starts) == 4 and starts[0]["start_step"] == 0, starts
    for kill, restart in zip(killer.killed, starts[1:], strict=True):
        # resumed exactly at the last checkpoint committed before the restart ...
        assert restart["start_step"] == restart["checkpoint"], (kill, restart)
        assert restart["start_step"] % every == 0 and restart["start_step"] >= kill["checkpoint"]
        # ... so at most one checkpoint interval of work was lost
        assert 0 <= kill["step"] - restart["start_step"] <= every, (kill, restart)
    assert result["start_step"] == starts[-1]["start_step"]
    assert (run.root / "model" / "LATEST").exists()

    # TensorBoard: rank 0 of every attempt appended scalars to the same run folder
    from tensorboard.backend.event_processing.event_accumulator import EventAccumulator

    events = EventAccumulator(result["tensorboard_dir"])
    events.Reload()
    logged = {e.step for e in events.Scalars("train/loss")}
    assert set(range(every, steps + 1, every)) <= logged


@pytest.mark.ray
@pytest.mark.s3
@pytest.mark.slow
def test_a_run_on_s3_resumes_there_after_a_killed_worker(
    ray_cluster: object, s3_bucket: str, tmp_path: Path
) -> None:
    """What a multi-node run on a real cluster meets: its run folder in object storage, a worker killed
    after a checkpoint. The restarted worker resumes from the checkpoint registered in S3 (nothing of the
    run is kept locally), loses at most one interval, and the run finishes and publishes."""
    steps, every = 12, 2
    run_dir = f"{s3_bucket}/train-runs"
    # Given explicitly: the Train controller started before the test put the loopback endpoint's
    # credentials into this process's environment (on a cluster the nodes have them).
    credentials = ("storage.key=testing", "storage.secret=testing")
    result, killer = pretrain_with_kills(tmp_path, 1, steps, every, run_dir, *credentials)
    assert len(killer.killed) == 1, killer.starts
    first, restart = list(killer.starts.values())
    kill = killer.killed[0]
    assert first["start_step"] == 0 and kill["checkpoint"] >= every
    # Resumed from a checkpoint registered in S3 by the time of the kill (the watcher's own read of the
    # snapshot, over HTTP, may lag one behind), losing at most one interval.
    assert restart["start_step"] >= kill["checkpoint"] and restart["start_step"] % every == 0, (kill, restart)
    assert 0 <= kill["step"] - restart["start_step"] <= every, (kill, restart)
    assert result["steps"] == steps and result["start_step"] == restart["start_step"]
    assert registered_checkpoint_step(join(run_dir, KILLED_RUN)) == steps
    assert not (tmp_path / "runs").exists()  # the run lives in S3 only
    assert (tmp_path / "model" / "LATEST").exists()


# ----------------------------------------------------------------------------- serve replica kills
def replica_processes(app: str, deployment: str) -> list[dict[str, Any]]:
    """Live replica actors of one deployment with their pids (the GCS actor table)."""
    from ray._private import state

    marker = f"SERVE_REPLICA::{app}#{deployment}#"
    return [
        {"name": a["Name"], "pid": a["Pid"]}
        for a in state.actors().values()
        if a.get("Name", "").startswith(marker) and a["State"] == "ALIVE"
    ]


@dataclass
class LoadResult:
    statuses: list[int]
    retry_after: list[str | None]
    seconds: float

    @property
    def failed(self) -> list[int]:
        return [s for s in self.statuses if s >= 300]

    @property
    def requests_per_s(self) -> float:
        return len(self.statuses) / self.seconds


def run_load(
    url: str,
    body: dict[str, Any],
    headers: dict[str, str],
    requests: int,
    concurrency: int,
    max_seconds: float,
    on_progress: Any = None,
) -> LoadResult:
    """``requests`` POSTs from ``concurrency`` threads (stopping at ``max_seconds``); ``on_progress(n)``
    is called with the number answered so far after each answer."""
    statuses: list[int] = []
    retry_after: list[str | None] = []
    lock = threading.Lock()
    started = time.monotonic()
    counter = iter(range(requests))

    def client() -> None:
        with httpx.Client(timeout=60, headers=headers) as http:
            while time.monotonic() - started < max_seconds:
                with lock:
                    if next(counter, None) is None:
                        return
                try:
                    response = http.post(url, **body)
                    status, retry = response.status_code, response.headers.get("retry-after")
                except httpx.HTTPError:
                    status, retry = 599, None  # a dropped connection counts as a failure
                with lock:
                    statuses.append(status)
                    retry_after.append(retry)
                    done = len(statuses)
                if on_progress is not None:
                    on_progress(done)

    with ThreadPoolExecutor(concurrency) as pool:
        for future in [pool.submit(client) for _ in range(concurrency)]:
            future.result()
    return LoadResult(statuses, retry_after, time.monotonic() - started)


def kill_one_replica_under_load(
    url: str, app: str, body: dict[str, Any], headers: dict[str, str], requests: int, kill_after: int
) -> tuple[LoadResult, dict[str, Any]]:
    replicas = replica_processes(app, "EmbeddingEnsemble")
    assert len(replicas) >= 2, replicas
    victim = replicas[0]
    killed = threading.Event()

    def maybe_kill(done: int) -> None:
        if done >= kill_after and not killed.is_set():
            killed.set()
            os.kill(victim["pid"], signal.SIGKILL)

    result = run_load(url, body, headers, requests, concurrency=6, max_seconds=120, on_progress=maybe_kill)
    assert killed.is_set(), "the stream ended before the replica was killed"
    return result, victim


@pytest.mark.ray
@pytest.mark.slow
def test_killed_serve_replica_fails_at_most_one_percent_as_retryable_503(
    ray_cluster, tmp_path_factory
) -> None:
    from tests.test_security import OPS_APP, ops_app
    from tests.test_serve import multipart

    ops = ops_app(tmp_path_factory)
    image = ops.served.records["item-2"].image
    # /v1/models (uncached in this app) is polled beside the stream: it asks every deployment's info(),
    # the killed replica's too, and must answer like the other routes (retried, or a retryable 503).
    stream_over = threading.Event()
    models_answers: list[tuple[int, str | None]] = []

    def poll_models() -> None:
        with httpx.Client(timeout=60, headers=ops.headers) as http:
            while not stream_over.is_set():
                response = http.get(f"{ops.url}/v1/models")
                models_answers.append((response.status_code, response.headers.get("retry-after")))
                time.sleep(0.05)

    poller = threading.Thread(target=poll_models, daemon=True)
    poller.start()
    try:
        result, victim = kill_one_replica_under_load(
            f"{ops.url}/v1/search", OPS_APP, multipart(image, k="3"), ops.headers, requests=300, kill_after=60
        )
    finally:
        stream_over.set()
        poller.join(timeout=60)
    counts = Counter(result.statuses)
    print(
        f"\nreplica kill: {len(result.statuses)} requests in {result.seconds:.1f}s, statuses {dict(counts)}; "
        f"/v1/models {dict(Counter(status for status, _ in models_answers))}"
    )
    assert len(models_answers) >= 10, models_answers
    assert all(status == 200 or (status == 503 and retry) for status, retry in models_answers), models_answers
    assert len(result.statuses) == 300
    assert len(result.failed) <= 0.01 * len(result.statuses), counts
    for status, retry in zip(result.statuses, result.retry_after, strict=True):
        if status >= 300:
            assert status == 503 and retry is not None, (status, retry)
    # Serve replaced the dead replica; the app answers normally again
    deadline = time.monotonic() + 90
    while time.monotonic() < deadline:
        alive = replica_processes(OPS_APP, "EmbeddingEnsemble")
        if len(alive) == 2 and victim["pid"] not in {r["pid"] for r in alive}:
            break
        time.sleep(1)
    else:
        pytest.fail(f"the killed replica was not replaced: {replica_processes(OPS_APP, 'EmbeddingEnsemble')}")
    response = httpx.post(f"{ops.url}/v1/search", headers=ops.headers, **multipart(image, k="3"), timeout=60)
    assert response.status_code == 200 and response.json()["results"][0]["item_id"] == "item-2"


# ----------------------------------------------------------------------------- killed publishes
PUBLISHER = """
import os, sys
from visuray.storage import ArtifactWriter
root, files, size = sys.argv[1], int(sys.argv[2]), int(sys.argv[3])
writer = ArtifactWriter(root, "index")
print("version", writer.version, flush=True)
for i in range(files):
    writer.write_bytes(f"shard-{i:03d}.bin", os.urandom(size))
    print("wrote", i, flush=True)
writer.publish({"files": files})
print("published", flush=True)
"""

TEARER = """
import sys, time
path, size = sys.argv[1], int(sys.argv[2])
with open(path, "r+b") as fh:  # rewrites a published file in place, slowly: a copy tool gone wrong
    for offset in range(0, size, 4096):
        fh.seek(offset)
        fh.write(b"\\0" * 4096)
        fh.flush()
        if offset == 8 * 4096:
            print("halfway", flush=True)
        time.sleep(0.01)
"""


def publish_and_kill(root: str, files: int, size: int, kill_after_file: int) -> str:
    """Start a publisher process, SIGKILL it once it has written ``kill_after_file + 1`` files; return
    the version folder it was writing."""
    proc = subprocess.Popen(
        [sys.executable, "-c", PUBLISHER, root, str(files), str(size)],
        stdout=subprocess.PIPE,
        text=True,
        cwd=REPO,
    )
    version = None
    try:
        for line in proc.stdout:
            if line.startswith("version"):
                version = line.split()[1]
            if line.strip() == f"wrote {kill_after_file}":
                proc.send_signal(signal.SIGKILL)
                break
            assert line.strip() != "published", "the publisher finished before it was killed"
    finally:
        proc.kill()
        proc.wait(timeout=30)
    assert proc.returncode == -signal.SIGKILL and version is not None
    return version


def publish_small(root: str, options: StorageOptions | None = None) -> str:
    with ArtifactWriter(root, "index", options) as writer:
        writer.write_bytes("shard-000.bin", b"previous version " * 1000)
        return writer.publish({"files": 1}).manifest.version


def assert_previous_version_intact(
    root: str, previous: str, partial: str, options: StorageOptions | None
) -> None:
    artifact = resolve_artifact(root, options)
    assert artifact.manifest.version == previous
    verify_artifact(artifact)
    assert artifact.read("shard-000.bin") == b"previous version " * 1000
    fs, _ = get_filesystem(root, options)
    partial_uri = join(root, "versions", partial)
    assert fs.exists(get_filesystem(join(partial_uri, "shard-000.bin"), options)[1]), (
        "the kill came too early"
    )
    # no manifest points at the partial data: neither LATEST nor a manifest in the partial folder
    assert not fs.exists(get_filesystem(join(partial_uri, "MANIFEST.json"), options)[1])
    with pytest.raises(ArtifactError, match="neither"):
        resolve_artifact(partial_uri, options)


@pytest.mark.unit
def test_publish_killed_halfway_leaves_the_previous_local_version(tmp_path: Path) -> None:
    root = str(tmp_path / "index")
    previous = publish_small(root)
    partial = publish_and_kill(root, files=8, size=4 << 20, kill_after_file=2)
    assert_previous_version_intact(root, previous, partial, None)
    # the next publish succeeds over the debris and becomes LATEST
    assert resolve_artifact(root).manifest.version == previous
    assert publish_small(root) != previous


@pytest.mark.s3
def test_publish_killed_halfway_leaves_the_previous_s3_version(s3_bucket: str) -> None:
    root = f"{s3_bucket}/index"
    previous = publish_small(root)
    partial = publish_and_kill(root, files=6, size=2 << 20, kill_after_file=1)
    assert_previous_version_intact(root, previous, partial, None)


@pytest.mark.unit
def test_file_torn_by_a_killed_writer_is_caught_by_its_checksum(tmp_path: Path) -> None:
    root = str(tmp_path / "model")
    size = 64 * 4096
    with ArtifactWriter(root, "model") as writer:
        writer.write_bytes("weights.safetensors", os.urandom(size))
    proc = subprocess.Popen(
        [sys.executable, "-c", TEARER, str(tmp_path / "model" / "versions" / writer.version / "weights.safetensors"),
         str(size)],
        stdout=subprocess.PIPE,
        text=True,
    )  # fmt: skip
    assert proc.stdout.readline().strip() == "halfway"
    proc.send_signal(signal.SIGKILL)
    proc.wait(timeout=30)
    artifact = resolve_artifact(root)  # still resolves: the manifest is intact ...
    with pytest.raises(ArtifactError, match="checksum mismatch"):  # ... but the torn data is refused
        artifact.read("weights.safetensors")
    with pytest.raises(ArtifactError, match="checksum mismatch"):
        verify_artifact(artifact)


# ----------------------------------------------------------------------------- router: dead replicas
class FlakyRemote:
    """A handle method whose first ``failures`` calls fail as if their replica had died; ``.info`` is the
    method itself, so ``handle.info.remote()`` works as on a ``DeploymentHandle``."""

    def __init__(self, failures: int, answer: Any) -> None:
        self.info = self
        self.failures, self.answer, self.calls = failures, answer, 0

    def remote(self, *args: Any) -> Any:
        from ray.exceptions import ActorDiedError

        self.calls += 1
        failing = self.calls <= self.failures

        async def reply() -> Any:
            if failing:
                raise ActorDiedError()
            return self.answer(*args)

        return reply()


@pytest.mark.unit
def test_router_retries_a_dead_replica_and_answers_503_when_none_is_left() -> None:
    import asyncio

    from ray.exceptions import ActorDiedError

    from visuray.serving.router import REPLICA_RETRIES, _replica_gone, call_with_retry

    flaky = FlakyRemote(REPLICA_RETRIES, lambda x: x * 2)
    assert asyncio.run(call_with_retry(flaky, 21)) == 42 and flaky.calls == REPLICA_RETRIES + 1
    dead = FlakyRemote(100, lambda x: x * 2)
    with pytest.raises(ActorDiedError):
        asyncio.run(call_with_retry(dead, 1))
    assert dead.calls == REPLICA_RETRIES + 1
    response = asyncio.run(_replica_gone(None, ActorDiedError()))
    assert response.status_code == 503 and response.headers["retry-after"] == "1"
    assert json.loads(response.body)["error"]


@pytest.mark.unit
def test_models_answer_asks_a_dead_replicas_deployment_again() -> None:
    """``/v1/models`` asks every deployment's ``info()`` the way the other routes call models. The
    replica-kill test above polls it, but its polls did not reach the dying replica even with the retry
    removed, so this pins the retry down without a cluster."""
    import asyncio
    from types import SimpleNamespace

    from visuray.serving.router import Router

    class Items:
        version = "c1"

        def __len__(self) -> int:
            return 3

    embedder = FlakyRemote(1, lambda: {"version": "m1", "dim": 8})  # its first replica died
    search = FlakyRemote(0, lambda: {"version": "i1", "count": 3})
    router = SimpleNamespace(
        embedder=embedder, search=search, fusion=None, composed_search=None, attributes=None, items=Items()
    )
    models = asyncio.run(Router.func_or_class._load_models(router))
    assert models.model["version"] == "m1" and models.index["version"] == "i1"
    assert models.catalog == {"version": "c1", "count": 3}
    assert (embedder.calls, search.calls) == (2, 1)
