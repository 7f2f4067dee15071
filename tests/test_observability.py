"""Observability: the router's metrics reach Ray's Prometheus export, TensorBoard scalars are written and
readable, and ``visuray status`` without a job id gives an overview of artifacts, runs and deployments."""

from __future__ import annotations

import json
import time
from pathlib import Path

import httpx
import pytest

from visuray.serving.metrics import parse_prometheus, route_label
from visuray.status import format_overview, overview
from visuray.storage import ArtifactWriter
from visuray.train.scalars import ScalarLog

# Ray keeps a gauge sample for two metric export intervals (2 x 10 s by default) unless it is set again.
GAUGE_TTL_S = 20


# -------------------------------------------------------------------------------------- unit
@pytest.mark.unit
def test_route_labels_are_bounded() -> None:
    assert route_label("/v1/search") == "/v1/search"
    assert route_label("/v1/items/shirts/item-3") == "/v1/items/{id}"
    assert route_label("/v1/items/shirts/item-3/image") == "/v1/items/{id}/image"
    assert route_label("/healthz") == "/healthz"
    assert route_label("/../../etc/passwd") == "other"


@pytest.mark.unit
def test_prometheus_parsing() -> None:
    text = (
        "# HELP ray_x_total x\n"
        'ray_x_total{route="/v1/search",status="200"} 3.0\n'
        'ray_x_total{route="/v1/search",status="401"} 1.0\n'
        'ray_x_total_other{route="/v1/search"} 9.0\n'
    )
    samples = parse_prometheus(text, "ray_x_total")
    assert samples == [
        ({"route": "/v1/search", "status": "200"}, 3.0),
        ({"route": "/v1/search", "status": "401"}, 1.0),
    ]


@pytest.mark.unit
def test_scalar_log_writes_tensorboard_events(tmp_path: Path) -> None:
    from tensorboard.backend.event_processing.event_accumulator import EventAccumulator

    log = ScalarLog(str(tmp_path / "tb"))
    for step in (1, 2, 3):
        log.scalars({"step": step, "train/loss": 1.0 / step, "note": "text is skipped"}, step)
    log.close()
    events = EventAccumulator(str(tmp_path / "tb"))
    events.Reload()
    assert events.Tags()["scalars"] == ["train/loss"]
    assert [(e.step, round(e.value, 4)) for e in events.Scalars("train/loss")] == [
        (1, 1.0),
        (2, 0.5),
        (3, 0.3333),
    ]
    ScalarLog(None).scalars({"train/loss": 1.0}, 1)  # ranks other than 0: a no-op


def make_runs_root(root: Path) -> None:
    for kind, name, meta in (
        ("catalog", "catalogs/shop", {"num_items": 12}),
        ("model", "models/vit", {"model_version": "m-1", "embedding_dim": 16}),
        ("index", "indexes/vit", {"model_version": "m-1", "dim": 16, "count": 12}),
    ):
        for _ in range(2):  # two versions: the overview shows the one LATEST names
            with ArtifactWriter(str(root / name), kind) as writer:
                writer.write_text("data.txt", kind)
                last = writer.publish(meta).manifest.version
        (root / name / "expected").write_text(last)
    (root / "models" / "half-written" / "versions" / "x").mkdir(parents=True)  # no LATEST: not listed
    for step in (10, 20):
        ckpt = root / "train" / "pretrain-vit" / f"checkpoint_{step:06d}"
        ckpt.mkdir(parents=True)
        (ckpt / "train_state.json").write_text(json.dumps({"step": step}))
    (root / "train" / "pretrain-vit" / "tensorboard").mkdir()
    # Ray Train's own bookkeeping file beside the checkpoints is not a checkpoint
    (root / "train" / "pretrain-vit" / "checkpoint_manager_snapshot.json").write_text("{}")


@pytest.mark.unit
def test_status_overview_of_a_runs_root(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    root = tmp_path / "runs"
    make_runs_root(root)
    data = overview(str(root), include_cluster=False)
    kinds = {kind: [e["uri"] for e in entries] for kind, entries in data["artifacts"].items()}
    assert kinds == {
        "catalog": [str(root / "catalogs/shop")],
        "model": [str(root / "models/vit")],
        "index": [str(root / "indexes/vit")],
    }
    for entries in data["artifacts"].values():
        entry = entries[0]
        assert entry["version"] == Path(entry["uri"], "expected").read_text()
    assert (
        data["artifacts"]["index"][0]["model_version"] == "m-1"
        and data["artifacts"]["index"][0]["count"] == 12
    )
    assert data["runs"] == [
        {"uri": str(root / "train/pretrain-vit"), "checkpoints": 2, "latest_step": 20, "tensorboard": True}
    ]
    text = format_overview(data)
    assert "indexs" not in text and "index" in text and "step 20" in text

    from visuray.cli import main

    main(["status", "--root", str(root), "--no-cluster", "--json"])
    assert json.loads(capsys.readouterr().out)["runs"][0]["latest_step"] == 20
    main(["status", "--root", str(tmp_path / "nothing"), "--no-cluster"])
    assert "no published artifacts" in capsys.readouterr().out


@pytest.mark.unit
def test_status_lists_sweeps_before_and_after_their_results(tmp_path: Path) -> None:
    root = tmp_path / "sweeps" / "margins"
    root.mkdir(parents=True)
    (root / "sweep.yaml").write_text(
        "job: sweep\nname: margins\nspec: jobs/configs/finetune_lite0.yaml\nmetric: val/map@r\nmode: min\n"
        "num_samples: 3\nsearch_space: {loss.margin: {type: choice, values: [0.1, 0.2]}}\n"
    )
    data = overview(str(tmp_path), include_cluster=False)
    (sweep,) = data["sweeps"]
    assert sweep["job"] == "jobs/configs/finetune_lite0.yaml" and sweep["results"] is False
    assert "no results table yet" in format_overview(data)

    (root / "results.csv").write_text(
        "trial_id,status,loss.margin,last val/map@r\n"
        "a,completed,0.1,0.30\nb,completed,0.2,0.20\nc,stopped early,0.1,0.05\nd,error,0.2,\n"
    )
    data = overview(str(tmp_path), include_cluster=False)
    (sweep,) = data["sweeps"]
    assert sweep["trials"] == {"completed": 2, "stopped early": 1, "error": 1}
    # mode min: the lower completed metric wins; a stopped trial's lower value does not count
    assert sweep["best"] == {"trial_id": "b", "val/map@r": 0.2}
    assert "2 completed" in format_overview(data) and "best trial b" in format_overview(data)


# -------------------------------------------------------------------------------------- live
def scrape(port: int) -> str:
    return httpx.get(f"http://127.0.0.1:{port}/metrics", timeout=10).text


@pytest.mark.ray
def test_router_metrics_are_exported(ray_cluster, tmp_path_factory) -> None:
    """Requests of each kind (200, 401, 400) show up in Ray's Prometheus export with route and status,
    next to the latency histogram and the served-version gauge."""
    import ray

    from tests.test_security import OPS_APP, ops_app
    from tests.test_serve import multipart

    ops = ops_app(tmp_path_factory)
    image = ops.served.records["item-4"].image
    with httpx.Client(timeout=60) as http:
        for _ in range(3):
            assert (
                http.post(f"{ops.url}/v1/search", headers=ops.headers, **multipart(image, k="2")).status_code
                == 200
            )
        assert http.post(f"{ops.url}/v1/search", **multipart(image)).status_code == 401
        assert (
            http.post(f"{ops.url}/v1/search", headers=ops.headers, json={"image_url": "x"}).status_code == 400
        )
        index_version = http.get(f"{ops.url}/v1/models", headers=ops.headers).json()["index"]["version"]

    last_request = time.monotonic()
    port = ray._private.worker.global_worker.node.metrics_export_port
    deadline = time.monotonic() + 180  # Ray exports metrics every few seconds; slower on a loaded machine
    while True:
        text = scrape(port)
        requests = [
            (labels, value)
            for labels, value in parse_prometheus(text, "ray_visuray_requests_total")
            if labels.get("application") == OPS_APP
        ]
        by_status = {}
        for labels, value in requests:
            if labels["route"] == "/v1/search":
                by_status[labels["status"]] = by_status.get(labels["status"], 0) + value
        versions = {
            (lab["component"], lab["version"]): v
            for lab, v in parse_prometheus(text, "ray_visuray_served_version")
            if lab.get("application") == OPS_APP
        }
        # Ray drops a gauge not set again within two export intervals (20 s): the versions must still be
        # exported well after the last request, which only the router's refresher keeps true.
        settled = time.monotonic() - last_request > GAUGE_TTL_S + 5
        if ({"200", "401", "400"} <= set(by_status) and len(versions) >= 2 and settled) or (
            time.monotonic() > deadline
        ):
            break
        time.sleep(2)
    assert by_status.get("200", 0) >= 3 and by_status.get("401", 0) >= 1 and by_status.get("400", 0) >= 1, (
        by_status
    )
    errors = parse_prometheus(text, "ray_visuray_request_errors_total")
    assert {lab["status"] for lab, _ in errors if lab.get("application") == OPS_APP} >= {"400", "401"}
    counts = [
        v
        for lab, v in parse_prometheus(text, "ray_visuray_request_latency_s_count")
        if lab.get("route") == "/v1/search"
    ]
    assert sum(counts) >= 5
    assert versions.get(("index", index_version)) == 1.0, versions
    assert versions.get(("embedder", ops.served.model_version)) == 1.0, versions


@pytest.mark.ray
def test_status_overview_lists_serve_deployments(ray_cluster, tmp_path_factory) -> None:
    from tests.test_security import OPS_APP, ops_app

    ops = ops_app(tmp_path_factory)
    data = overview(str(ops.served.tmp))
    assert data["serve"]["reachable"], data["serve"]
    app = data["serve"]["applications"][OPS_APP]
    assert app["status"] == "RUNNING"
    assert set(app["deployments"]) == {"Router", "EmbeddingEnsemble", "Search"}
    assert {e["uri"] for e in data["artifacts"]["index"]} >= {str(ops.served.tmp / "index")}
    assert "visuray-ops: RUNNING" in format_overview(data)
