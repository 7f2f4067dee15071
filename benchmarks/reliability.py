"""Reliability under injected faults: load held, faults injected, requests failed, data lost.

Scenarios (each beside its no-fault baseline in the same run, on one embedded Ray cluster):

- ``serve``: a tiny application (2-model ensemble, 2 EmbeddingEnsemble replicas) under a closed loop of
  ``--concurrency`` clients for ``--seconds``; the faulted run SIGKILLs one embedder replica after a third of
  the time. Reported: requests/s held, requests failed (and how: 503 + Retry-After or otherwise).
- ``hotswap``: the same application (index reload polling every 0.5 s) under the same closed loop; a new
  index version (the same vectors in an HNSW index) is published after a third of the time. Reported:
  requests/s held, non-2xx answers (the target is none), and whether the app answers with the new version.
- ``train``: DINO pretraining of a tiny ViT (1 worker, ``--train-steps`` steps, checkpoint every
  ``--checkpoint-every``) with ``--train-kills`` worker SIGKILLs against an uninterrupted run. Reported:
  wall time, steps redone (work lost) per kill, final step.
- ``publish``: ``--publish-kills`` artifact publishes (8 x 4 MiB files, local disk) SIGKILLed halfway.
  Reported: whether the previous version still resolved and verified after each, manifests pointing at
  partial data (data lost = published versions failing verification).

    python benchmarks/reliability.py --seconds 20 --train-steps 30 --train-kills 3 --publish-kills 3

(``--scenarios serve hotswap train publish`` picks scenarios; all four run by default.)

The helpers (load loop, replica and worker killers, killed publisher) are those of
tests/test_fault_tolerance.py, so the benchmark measures exactly what the tests assert.
"""

from __future__ import annotations

import argparse
import json
import sys
import tempfile
import time
from collections import Counter
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))  # the tests package, for the helpers


def serve_scenario(tmp: Path, seconds: float, concurrency: int) -> dict:
    from tests.conftest import free_port
    from tests.test_fault_tolerance import kill_one_replica_under_load, replica_processes, run_load
    from tests.test_serve import build_served_artifacts, multipart, served_app_args
    from visuray.serving import ServeAppArgs, start_serve_app

    built = build_served_artifacts(tmp)
    base = served_app_args(tmp).model_dump()
    args = ServeAppArgs.model_validate(
        {
            **base,
            "fusion": None,
            "attributes": None,
            "index_reload_interval_s": None,
            "embedder": {**base["embedder"], "num_replicas": 2, "max_ongoing_requests": 8},
        }
    )
    url = start_serve_app(args, port=free_port(), name="reliability", access_log=False)
    image = next(iter(built["records"].values())).image
    body = multipart(image, k="5")
    endless = 10**9
    baseline = run_load(f"{url}/v1/search", body, {}, endless, concurrency, seconds)
    # wait until both replicas are up again (the baseline does not kill, but be explicit)
    assert len(replica_processes("reliability", "EmbeddingEnsemble")) == 2
    kill_after = max(1, int(baseline.requests_per_s * seconds / 3))
    faulted, _ = kill_one_replica_under_load(
        f"{url}/v1/search", "reliability", body, {}, requests=int(baseline.requests_per_s * seconds) + 1,
        kill_after=kill_after,
    )  # fmt: skip

    def summary(result) -> dict:
        failed = result.failed
        retryable = sum(
            1 for s, r in zip(result.statuses, result.retry_after, strict=True) if s == 503 and r is not None
        )
        return {
            "seconds": round(result.seconds, 1),
            "requests": len(result.statuses),
            "requests_per_s": round(result.requests_per_s, 1),
            "failed": len(failed),
            "failed_retryable_503": retryable,
            "statuses": dict(Counter(result.statuses)),
        }

    return {"baseline": summary(baseline), "one_replica_killed": summary(faulted), "faults_injected": 1}


def hotswap_scenario(tmp: Path, seconds: float, concurrency: int) -> dict:
    import threading

    import httpx

    from tests.conftest import free_port
    from tests.test_fault_tolerance import run_load
    from tests.test_serve import build_served_artifacts, multipart, publish_test_index, served_app_args
    from visuray.images import decode_image
    from visuray.index.ensemble import EmbeddingEnsemble
    from visuray.serving import start_serve_app

    built = build_served_artifacts(tmp)
    args = served_app_args(tmp)  # the test app: index reload polling every 0.5 s
    url = start_serve_app(args, port=free_port(), name="reliability-swap", access_log=False)
    records = list(built["records"].values())
    body = multipart(records[0].image, k="5")
    outcome: dict = {}
    load = threading.Thread(
        target=lambda: outcome.update(
            result=run_load(f"{url}/v1/search", body, {}, 10**9, concurrency, seconds)
        )
    )
    load.start()
    time.sleep(seconds / 3)
    embedder = EmbeddingEnsemble.load(built["ensemble"])
    new = publish_test_index(
        str(tmp / "index"),
        embedder.embed([decode_image(r.image) for r in records]),
        [r.item_id for r in records],
        built["model_version"],
        str(tmp / "catalog"),
        factory="HNSW32",
    )
    load.join()
    result = outcome["result"]
    served = httpx.get(f"{url}/v1/models", timeout=30).json()["index"]["version"]
    return {
        "seconds": round(result.seconds, 1),
        "requests": len(result.statuses),
        "requests_per_s": round(result.requests_per_s, 1),
        "faults_injected": 1,
        "non_2xx": sum(not 200 <= s < 300 for s in result.statuses),
        "statuses": dict(Counter(result.statuses)),
        "serves_new_version": served == new.manifest.version,
    }


def train_scenario(tmp: Path, steps: int, every: int, kills: int) -> dict:
    from tests.test_fault_tolerance import pretrain_with_kills

    started = time.monotonic()
    clean, _ = pretrain_with_kills(tmp / "clean", kills=0, steps=steps, every=every)
    clean_s = time.monotonic() - started
    started = time.monotonic()
    faulted, killer = pretrain_with_kills(tmp / "faulted", kills=kills, steps=steps, every=every)
    faulted_s = time.monotonic() - started
    restarts = list(killer.starts.values())[1:]
    redone = [k["step"] - r["start_step"] for k, r in zip(killer.killed, restarts, strict=False)]
    return {
        "steps": steps,
        "checkpoint_every": every,
        "baseline": {"wall_s": round(clean_s, 1), "final_step": clean["steps"]},
        "killed": {
            "faults_injected": len(killer.killed),
            "wall_s": round(faulted_s, 1),
            "final_step": faulted["steps"],
            "steps_redone_per_kill": redone,
            "max_steps_lost": max(redone, default=0),
        },
    }


def publish_scenario(tmp: Path, kills: int) -> dict:
    from tests.test_fault_tolerance import publish_and_kill, publish_small
    from visuray.storage import ArtifactError, resolve_artifact, verify_artifact

    root = str(tmp / "index")
    previous = publish_small(root)
    intact, manifests_on_partial = 0, 0
    for i in range(kills):
        partial = publish_and_kill(root, files=8, size=4 << 20, kill_after_file=i % 6)
        artifact = resolve_artifact(root)
        try:
            verify_artifact(artifact)
            intact += artifact.manifest.version == previous
        except ArtifactError:
            pass
        manifests_on_partial += (tmp / "index" / "versions" / partial / "MANIFEST.json").exists()
    return {
        "faults_injected": kills,
        "previous_version_intact_after_kill": intact,
        "manifests_pointing_at_partial_data": manifests_on_partial,
        "data_lost": kills - intact,
    }


def main() -> None:
    parser = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    parser.add_argument("--scenarios", nargs="+", default=["serve", "hotswap", "train", "publish"])
    parser.add_argument("--seconds", type=float, default=20, help="load duration of each serve run")
    parser.add_argument("--concurrency", type=int, default=6)
    parser.add_argument("--train-steps", type=int, default=30)
    parser.add_argument("--checkpoint-every", type=int, default=3)
    parser.add_argument("--train-kills", type=int, default=3)
    parser.add_argument("--publish-kills", type=int, default=3)
    parser.add_argument("--num-cpus", type=int, default=8, help="logical CPUs of the embedded cluster")
    args = parser.parse_args()

    import os

    os.environ.setdefault("RAY_TRAIN_V2_ENABLED", "1")
    os.environ.setdefault("RAY_DASHBOARD_STARTUP_TIMEOUT_S", "180")  # a busy machine starts it slowly
    results = {}
    with tempfile.TemporaryDirectory() as directory:
        tmp = Path(directory)
        if "publish" in args.scenarios:
            results["publish"] = publish_scenario(tmp / "publish", args.publish_kills)
            print(json.dumps({"publish": results["publish"]}), flush=True)
        if {"serve", "hotswap", "train"} & set(args.scenarios):
            from visuray.cluster import ensure_ray

            ensure_ray(num_cpus=args.num_cpus, log_to_driver=False)
        if "serve" in args.scenarios:
            (tmp / "serve").mkdir()
            results["serve"] = serve_scenario(tmp / "serve", args.seconds, args.concurrency)
            print(json.dumps({"serve": results["serve"]}), flush=True)
            from ray import serve

            serve.shutdown()
        if "hotswap" in args.scenarios:
            (tmp / "hotswap").mkdir()
            results["hotswap"] = hotswap_scenario(tmp / "hotswap", args.seconds, args.concurrency)
            print(json.dumps({"hotswap": results["hotswap"]}), flush=True)
            from ray import serve

            serve.shutdown()
        if "train" in args.scenarios:
            results["train"] = train_scenario(
                tmp / "train", args.train_steps, args.checkpoint_every, args.train_kills
            )
            print(json.dumps({"train": results["train"]}), flush=True)
    print(json.dumps(results, indent=2))


if __name__ == "__main__":
    main()
