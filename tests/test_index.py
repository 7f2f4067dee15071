"""The index: FAISS numerics against brute force, publish/load round trip, and Ray Data batch embedding."""

from __future__ import annotations

import math
from pathlib import Path

import numpy as np
import pytest
import torch
from PIL import Image

from tests.tiny import TINY_VIT
from visuray.catalog.schema import CatalogRecord, write_catalog
from visuray.images import InputSpec, decode_image, encode_jpeg, to_model_input
from visuray.index.faiss_index import (
    INDEX_FILE,
    SearchIndex,
    build_faiss_index,
    build_sharded_faiss_index,
    fit_factory_to_data,
    publish_index,
)
from visuray.models.config import BackboneConfig, EmbeddingModelConfig
from visuray.models.embedding import build_embedding_model, load_embedding_model, save_model
from visuray.storage import ArtifactError, resolve_artifact

# What every reference embedding in these tests feeds the tiny model: its recorded size, mean and std, written
# out (not read back from the model), so a stage that drops them is caught.
TINY_INPUT = InputSpec(32, (0.5, 0.5, 0.5), (0.5, 0.5, 0.5))
TINY_MODEL = EmbeddingModelConfig(
    # mean/std other than ImageNet's: what every stage reads from the model, Serve included
    backbone=BackboneConfig(**TINY_VIT, mean=TINY_INPUT.mean, std=TINY_INPUT.std),
    embedding_dim=16,
)


# ----------------------------------------------------------------------------- shared test data
def unit_rows(x: np.ndarray) -> np.ndarray:
    return (x / np.linalg.norm(x, axis=1, keepdims=True)).astype(np.float32)


def clustered_vectors(n: int, dim: int, clusters: int = 20, seed: int = 0) -> np.ndarray:
    """Unit vectors around ``clusters`` centres: the shape catalog embeddings have."""
    rng = np.random.default_rng(seed)
    centres = rng.standard_normal((clusters, dim))
    return unit_rows(centres[rng.integers(0, clusters, n)] + 0.35 * rng.standard_normal((n, dim)))


def save_tiny_model(uri: str, seed: int = 0) -> str:
    """A randomly initialised tiny ViT embedding model, published; returns its model_version."""
    torch.manual_seed(seed)
    artifact = save_model(uri, build_embedding_model(TINY_MODEL).eval(), TINY_MODEL)
    return artifact.manifest.metadata["model_version"]


def textured_jpeg(seed: int, size: int = 40) -> bytes:
    """A distinct image per seed (colour blocks plus noise), so a random model still tells them apart."""
    rng = np.random.default_rng(seed)
    blocks = rng.integers(0, 256, (4, 4, 3)).repeat(size // 4, 0).repeat(size // 4, 1)
    noisy = np.clip(blocks + rng.normal(0, 20, blocks.shape), 0, 255).astype(np.uint8)
    return encode_jpeg(Image.fromarray(noisy))


def write_test_catalog(uri: str, n: int = 24, bad_ids: tuple[str, ...] = ()) -> list[CatalogRecord]:
    """``n`` items in 4 labels over 2 shards; items named in ``bad_ids`` get bytes that do not decode."""
    records = [
        CatalogRecord(
            item_id=f"item-{i:03d}",
            image=b"not an image" if f"item-{i:03d}" in bad_ids else textured_jpeg(i),
            label=f"label{i % 4}",
            category=f"cat{i % 2}",
            title=f"Product {i}",
            attributes={"colour": f"c{i % 3}"},
        )
        for i in range(n)
    ]
    write_catalog(records, uri, shard_rows=max(1, n // 2 + 1))
    return records


def brute_force_top_k(base: np.ndarray, queries: np.ndarray, k: int) -> tuple[np.ndarray, np.ndarray]:
    """Slow reference: every inner product, then a full sort per query."""
    scores = np.array([[float(np.dot(q, b)) for b in base] for q in queries])
    order = np.argsort(-scores, axis=1, kind="stable")[:, :k]
    return order, np.take_along_axis(scores, order, axis=1)


# ------------------------------------------------------------------------------------ unit tests
@pytest.mark.unit
def test_flat_search_equals_brute_force() -> None:
    base = clustered_vectors(300, 24, seed=1)
    queries = clustered_vectors(15, 24, seed=2)
    index = build_faiss_index(base, "Flat", "ip")
    scores, labels = index.search(queries, 10)
    ref_labels, ref_scores = brute_force_top_k(base, queries, 10)
    np.testing.assert_allclose(scores, ref_scores, rtol=1e-5, atol=1e-5)
    # Ties are the only way the order may differ; with random floats there are none.
    np.testing.assert_array_equal(labels, ref_labels)


@pytest.mark.unit
def test_flat_l2_search_equals_brute_force() -> None:
    rng = np.random.default_rng(3)
    base, queries = (
        rng.standard_normal((200, 8)).astype(np.float32),
        rng.standard_normal((5, 8)).astype(np.float32),
    )
    distances, labels = build_faiss_index(base, "Flat", "l2").search(queries, 5)
    ref = np.array([[float(np.sum((q - b) ** 2)) for b in base] for q in queries])
    np.testing.assert_array_equal(labels, np.argsort(ref, axis=1)[:, :5])
    np.testing.assert_allclose(distances, np.sort(ref, axis=1)[:, :5], rtol=1e-4, atol=1e-4)


@pytest.mark.unit
@pytest.mark.parametrize("factory", ["IVF64,Flat", "IVF32,SQ8", "HNSW32"])
def test_approximate_indexes_recall_against_flat(factory: str) -> None:
    points = clustered_vectors(4100, 32, clusters=40, seed=4)
    base, queries = points[:4000], points[4000:]
    _, exact = build_faiss_index(base, "Flat", "ip").search(queries, 10)
    _, approx = build_faiss_index(base, factory, "ip").search(queries, 10)
    recall = np.mean([len(set(a) & set(e)) / 10 for a, e in zip(approx, exact, strict=True)])
    assert recall >= 0.9, f"{factory}: recall@10 {recall:.2f}"


@pytest.mark.unit
def test_product_quantised_index_finds_neighbours_far_above_chance() -> None:
    # 16 floats squeezed into 8 codes of 4 bits: ranking inside a tight cluster is coarse, so the bar is
    # "clearly better than chance" (10/1000 = 0.01), not exactness.
    points = clustered_vectors(1050, 16, clusters=10, seed=6)
    base, queries = points[:1000], points[1000:]
    _, exact = build_faiss_index(base, "Flat", "ip").search(queries, 10)
    _, approx = build_faiss_index(base, "IVF8,PQ8x4", "ip").search(queries, 10)
    recall = np.mean([len(set(a) & set(e)) / 10 for a, e in zip(approx, exact, strict=True)])
    assert recall >= 0.25, f"recall@10 {recall:.2f}"


@pytest.mark.unit
def test_small_data_caps_ivf_lists_and_pq_bits(caplog: pytest.LogCaptureFixture) -> None:
    assert fit_factory_to_data("IVF1024,Flat", 390, 16) == "IVF10,Flat"
    assert fit_factory_to_data("IVF4,PQ4", 100, 16) == "IVF2,PQ4x1"
    assert fit_factory_to_data("HNSW32", 10, 16) == "HNSW32"
    assert fit_factory_to_data("OPQ4_16,IVF8,PQ4", 100_000, 16) == "OPQ4_16,IVF8,PQ4"
    with pytest.raises(ValueError, match="divisible"):
        fit_factory_to_data("IVF4,PQ5", 1000, 16)
    with caplog.at_level("WARNING"):
        index = build_faiss_index(clustered_vectors(200, 16), "IVF256,Flat")
    assert "using IVF5" in caplog.text
    assert index.ntotal == 200


@pytest.mark.unit
def test_publish_load_round_trip(tmp_path: Path) -> None:
    base = clustered_vectors(120, 16, seed=5)
    ids = [f"sku-{i}" for i in range(120)]
    artifact = publish_index(
        str(tmp_path / "index"),
        build_faiss_index(base, "IVF2,Flat"),
        ids,
        model_version="model-v1",
        metric="ip",
        factory="IVF2,Flat",
        extra_metadata={"catalog_version": "cat-v1"},
    )
    meta = artifact.manifest.metadata
    assert artifact.manifest.kind == "index"
    assert meta["model_version"] == "model-v1" and meta["dim"] == 16 and meta["count"] == 120
    assert meta["metric"] == "ip" and meta["factory"] == "IVF2,Flat" and meta["catalog_version"] == "cat-v1"
    assert meta["index_params"]["nlist"] == 2 and meta["index_params"]["nprobe"] == 2

    loaded = SearchIndex.load(str(tmp_path / "index"))
    assert (loaded.model_version, loaded.dim, loaded.version, len(loaded)) == (
        "model-v1",
        16,
        artifact.manifest.version,
        120,
    )
    found, scores = loaded.search(base[[7, 42]], 3)
    assert [row[0] for row in found] == ["sku-7", "sku-42"]
    np.testing.assert_allclose(scores[:, 0], 1.0, atol=1e-5)
    assert scores.shape == (2, 3) and scores.dtype == np.float32
    # k above the index size returns everything, once.
    all_ids, _ = loaded.search(base[0], 500)
    assert sorted(all_ids[0]) == sorted(ids)


@pytest.mark.unit
def test_corrupted_index_file_is_refused(tmp_path: Path) -> None:
    publish_index(
        str(tmp_path / "index"),
        build_faiss_index(clustered_vectors(50, 8)),
        [str(i) for i in range(50)],
        "m",
        "ip",
        "Flat",
    )
    path = Path(resolve_artifact(str(tmp_path / "index")).file_uri(INDEX_FILE))
    data = bytearray(path.read_bytes())
    data[len(data) // 2] ^= 0xFF
    path.write_bytes(bytes(data))
    with pytest.raises(ArtifactError, match="checksum mismatch"):
        SearchIndex.load(str(tmp_path / "index"))


@pytest.mark.unit
def test_query_dimension_mismatch_and_bad_k_are_refused(tmp_path: Path) -> None:
    publish_index(
        str(tmp_path / "index"),
        build_faiss_index(clustered_vectors(30, 8)),
        [str(i) for i in range(30)],
        "m-7",
        "ip",
        "Flat",
    )
    index = SearchIndex.load(str(tmp_path / "index"))
    with pytest.raises(ValueError, match="dimension 8 .*m-7"):
        index.search(np.ones((2, 12), dtype=np.float32), 5)
    with pytest.raises(ValueError, match="k must be positive"):
        index.search(np.ones(8, dtype=np.float32), 0)


@pytest.mark.unit
def test_publish_refuses_mismatched_or_duplicate_ids(tmp_path: Path) -> None:
    index = build_faiss_index(clustered_vectors(4, 8))
    with pytest.raises(ValueError, match="4 vectors but 3 ids"):
        publish_index(str(tmp_path / "a"), index, ["a", "b", "c"], "m", "ip", "Flat")
    with pytest.raises(ValueError, match="unique"):
        publish_index(str(tmp_path / "b"), index, ["a", "b", "c", "a"], "m", "ip", "Flat")


# ------------------------------------------------------------------------------------- Ray tests
@pytest.mark.ray
def test_embed_catalog_matches_the_model_in_process(ray_cluster: object, tmp_path: Path) -> None:
    from visuray.index.embed import embed_catalog_with_report

    records = write_test_catalog(str(tmp_path / "catalog"), n=20, bad_ids=("item-005",))
    save_tiny_model(str(tmp_path / "model"))

    result = embed_catalog_with_report(
        str(tmp_path / "catalog"), str(tmp_path / "model"), batch_size=6, concurrency=2
    )
    good = [r for r in records if r.item_id != "item-005"]
    assert result.ids == sorted(r.item_id for r in good)
    assert set(result.skipped) == {"item-005"} and "not a decodable image" in result.skipped["item-005"]

    model, _ = load_embedding_model(str(tmp_path / "model"))
    by_id = {r.item_id: r for r in good}
    with torch.inference_mode():
        expected = model(
            to_model_input([decode_image(by_id[i].image) for i in result.ids], TINY_INPUT)
        ).numpy()
    assert result.vectors.dtype == np.float32 and result.vectors.shape == (19, 16)
    np.testing.assert_allclose(result.vectors, expected, rtol=1e-4, atol=1e-5)


@pytest.mark.ray
def test_build_index_job_publishes_a_searchable_index(ray_cluster: object, tmp_path: Path) -> None:
    from visuray.config import validate_config
    from visuray.index.build import BuildIndexConfig, run_build_index

    write_test_catalog(str(tmp_path / "catalog"), n=16)
    version = save_tiny_model(str(tmp_path / "model"))
    cfg = validate_config(
        BuildIndexConfig,
        {
            "catalog": str(tmp_path / "catalog"),
            "model": str(tmp_path / "model"),
            "output": str(tmp_path / "index"),
        },
        overrides=["factory=HNSW32", "batch_size=8", "storage.secret=do-not-store"],
    )
    summary = run_build_index(cfg)
    assert summary["count"] == 16 and summary["dim"] == 16 and summary["model_version"] == version
    index = SearchIndex.load(str(tmp_path / "index"))
    assert index.version == summary["version"] and index.factory == "HNSW32"
    saved = index.artifact.read("config.yaml").decode()
    assert "factory: HNSW32" in saved and "do-not-store" not in saved
    assert index.artifact.manifest.metadata["catalog_uri"] == str(
        resolve_artifact(str(tmp_path / "catalog")).uri
    )


# ------------------------------------------------------------------------------ sharded indexes
@pytest.mark.unit
@pytest.mark.parametrize("metric", ["ip", "l2"])
def test_sharded_flat_search_equals_unsharded(tmp_path: Path, metric: str) -> None:
    base = clustered_vectors(250, 16, seed=8)
    queries = clustered_vectors(12, 16, seed=9)
    ids = [f"sku-{i:03d}" for i in range(250)]
    for name, shard_size in (("one", None), ("sharded", 64)):
        shards = build_sharded_faiss_index(base, "Flat", metric, shard_size=shard_size)
        publish_index(str(tmp_path / name), shards, ids, "m-1", metric, "Flat")
    one, sharded = SearchIndex.load(str(tmp_path / "one")), SearchIndex.load(str(tmp_path / "sharded"))
    meta = sharded.artifact.manifest.metadata
    assert sharded.num_shards == 4 and [s["count"] for s in meta["shards"]] == [64, 64, 64, 58]
    assert set(sharded.artifact.manifest.files) == {f"index-{i:05d}.faiss" for i in range(4)} | {
        "ids.parquet"
    }
    assert meta["count"] == 250 and meta["dim"] == 16 and len(meta["checksum"]) == 64
    expected_ids, expected_scores = one.search(queries, 10)
    found_ids, found_scores = sharded.search(queries, 10)
    assert found_ids == expected_ids
    np.testing.assert_allclose(found_scores, expected_scores, rtol=1e-6, atol=1e-6)
    # ...and both equal the slow reference (inner product only: the reference computes dot products).
    if metric == "ip":
        ref_rows, ref_scores = brute_force_top_k(base, queries, 10)
        assert found_ids == [[ids[j] for j in row] for row in ref_rows]
        np.testing.assert_allclose(found_scores, ref_scores, rtol=1e-5, atol=1e-5)


@pytest.mark.unit
def test_sharded_ivf_shares_one_trained_quantizer() -> None:
    import faiss

    base = clustered_vectors(2000, 16, clusters=20, seed=10)
    shards = build_sharded_faiss_index(base, "IVF16,Flat", "ip", shard_size=700)
    assert [s.ntotal for s in shards] == [700, 700, 600]
    centroids = [faiss.extract_index_ivf(s).quantizer.reconstruct_n(0, 16) for s in shards]
    for other in centroids[1:]:
        np.testing.assert_array_equal(other, centroids[0])


@pytest.mark.unit
def test_publish_checksum_changes_with_content(tmp_path: Path) -> None:
    base = clustered_vectors(40, 8)
    first = publish_index(
        str(tmp_path / "a"), build_faiss_index(base), [str(i) for i in range(40)], "m", "ip", "Flat"
    )
    same = publish_index(
        str(tmp_path / "b"), build_faiss_index(base), [str(i) for i in range(40)], "m", "ip", "Flat"
    )
    other = publish_index(
        str(tmp_path / "c"),
        build_faiss_index(base[::-1].copy()),
        [str(i) for i in range(40)],
        "m",
        "ip",
        "Flat",
    )
    checksum = [a.manifest.metadata["checksum"] for a in (first, same, other)]
    assert checksum[0] == checksum[1] != checksum[2]


# ------------------------------------------------------------------------------------ ensembles
def slow_combine(outputs: list[np.ndarray], weights: list[float], combine: str) -> np.ndarray:
    """Row by row, member by member, with Python floats: the reference for combine_embeddings."""
    total = sum(weights)
    rows = []
    for r in range(len(outputs[0])):
        units = [
            [float(v) / math.sqrt(sum(float(x) ** 2 for x in out[r])) for v in out[r]] for out in outputs
        ]
        if combine == "concat":
            row = [v * math.sqrt(w / total) for u, w in zip(units, weights, strict=True) for v in u]
        else:
            row = [
                sum(u[d] * w / total for u, w in zip(units, weights, strict=True))
                for d in range(len(units[0]))
            ]
            norm = math.sqrt(sum(v * v for v in row))
            row = [v / norm for v in row]
        rows.append(row)
    return np.array(rows)


@pytest.mark.unit
@pytest.mark.parametrize("combine", ["concat", "mean"])
def test_combine_embeddings_matches_slow_reference(combine: str) -> None:
    from visuray.index.ensemble import combine_embeddings

    rng = np.random.default_rng(11)
    outputs = [rng.standard_normal((5, 6)) * 3, rng.standard_normal((5, 6))]
    combined = combine_embeddings(outputs, [1.0, 3.0], combine)
    np.testing.assert_allclose(combined, slow_combine(outputs, [1.0, 3.0], combine), rtol=1e-5, atol=1e-6)
    np.testing.assert_allclose(np.linalg.norm(combined, axis=1), 1.0, atol=1e-6)
    if combine == "concat":  # inner product of ensemble vectors = weighted mean of member cosines
        units = [o / np.linalg.norm(o, axis=1, keepdims=True) for o in outputs]
        cosines = [u[0] @ u[1] for u in units]
        assert combined[0] @ combined[1] == pytest.approx(0.25 * cosines[0] + 0.75 * cosines[1], abs=1e-5)


@pytest.mark.unit
def test_ensemble_version_identifies_members_weights_and_mode() -> None:
    from visuray.index.ensemble import ensemble_version

    base = ensemble_version(["a", "b"], [1, 2], "concat")
    assert base.startswith("ensemble-") and base == ensemble_version(["a", "b"], [0.5, 1.0], "concat")
    others = {
        ensemble_version(["a", "b"], [1, 1], "concat"),
        ensemble_version(["a", "b"], [1, 2], "mean"),
        ensemble_version(["a", "c"], [1, 2], "concat"),
        ensemble_version(["b", "a"], [2, 1], "concat"),
    }
    assert base not in others and len(others) == 4
    # One member emits exactly its model's unit vectors: the ensemble is that model.
    assert ensemble_version(["model-v7"], [0.3], "mean") == "model-v7"


@pytest.mark.unit
def test_embedding_ensemble_of_real_models(tmp_path: Path) -> None:
    from visuray.index.ensemble import EmbeddingEnsemble, EnsembleMember, EnsembleSpec

    versions = [save_tiny_model(str(tmp_path / f"m{i}"), seed=i) for i in range(2)]
    spec = EnsembleSpec(
        members=[
            EnsembleMember(uri=str(tmp_path / "m0"), weight=1),
            EnsembleMember(uri=str(tmp_path / "m1"), weight=2),
        ]
    )
    ensemble = EmbeddingEnsemble.load(spec)
    assert ensemble.dim == 32 and ensemble.version not in versions
    images = [decode_image(textured_jpeg(s)) for s in range(3)]
    outputs = []
    for i in range(2):
        model, _ = load_embedding_model(str(tmp_path / f"m{i}"))
        with torch.inference_mode():
            outputs.append(model(to_model_input(images, TINY_INPUT)).numpy())
    np.testing.assert_allclose(ensemble.embed(images), slow_combine(outputs, [1, 2], "concat"), atol=1e-5)
    single = EmbeddingEnsemble.load(EnsembleSpec(members=[EnsembleMember(uri=str(tmp_path / "m0"))]))
    assert single.version == versions[0]
    np.testing.assert_allclose(single.embed(images), outputs[0], atol=1e-5)
    with pytest.raises(ValueError, match="one embedding dimension"):
        other = EmbeddingModelConfig(backbone=TINY_MODEL.backbone, embedding_dim=8)
        save_model(str(tmp_path / "m8"), build_embedding_model(other), other)
        EmbeddingEnsemble.load(
            EnsembleSpec(members=[spec.members[0], EnsembleMember(uri=str(tmp_path / "m8"))], combine="mean")
        )


@pytest.mark.ray
@pytest.mark.slow  # two Ray Data jobs (~40 s on an idle 2-core machine)
def test_build_index_job_with_an_ensemble_shards_and_a_fusion_encoder(
    ray_cluster: object, tmp_path: Path
) -> None:
    """The job embeds with the same ensemble as Serve (version recorded), shards the index, and builds
    the composed-retrieval index with a fusion model's target encoder."""
    from tests.test_serve import save_tiny_fusion_model
    from visuray.config import validate_config
    from visuray.fusion.predict import FusionPredictor
    from visuray.index.build import BuildIndexConfig, run_build_index
    from visuray.index.ensemble import EmbeddingEnsemble, EnsembleSpec

    records = write_test_catalog(str(tmp_path / "catalog"), n=14)
    for i in range(2):
        save_tiny_model(str(tmp_path / f"m{i}"), seed=i)
    ensemble = {
        "combine": "mean",
        "members": [{"uri": str(tmp_path / "m0")}, {"uri": str(tmp_path / "m1"), "weight": 3}],
    }
    common = {"catalog": str(tmp_path / "catalog"), "batch_size": 4}
    cfg = validate_config(
        BuildIndexConfig, {**common, "ensemble": ensemble, "output": str(tmp_path / "index"), "shard_size": 5}
    )
    summary = run_build_index(cfg)
    reference = EmbeddingEnsemble.load(EnsembleSpec.model_validate(ensemble))
    assert (
        summary["model_version"] == reference.version and summary["num_shards"] == 3 and summary["dim"] == 16
    )
    index = SearchIndex.load(str(tmp_path / "index"))
    assert index.artifact.manifest.metadata["ensemble"]["combine"] == "mean"
    by_id = {r.item_id: r for r in records}
    expected = reference.embed([decode_image(by_id[i].image) for i in index.ids])
    found, scores = index.search(expected[:3], 1)
    assert [row[0] for row in found] == index.ids[:3]
    np.testing.assert_allclose(scores[:, 0], 1.0, atol=1e-5)

    fusion_version = save_tiny_fusion_model(str(tmp_path / "fusion"))
    fusion_cfg = validate_config(
        BuildIndexConfig, {**common, "fusion": str(tmp_path / "fusion"), "output": str(tmp_path / "fidx")}
    )
    assert run_build_index(fusion_cfg)["model_version"] == fusion_version
    fusion_index = SearchIndex.load(str(tmp_path / "fidx"))
    targets = FusionPredictor.load(str(tmp_path / "fusion")).encode_images(
        [by_id[i].image for i in fusion_index.ids]
    )
    found, scores = fusion_index.search(targets[:2], 1)
    assert [row[0] for row in found] == fusion_index.ids[:2]

    with pytest.raises(Exception, match="one of 'model', 'ensemble' or 'fusion'"):
        validate_config(BuildIndexConfig, {**common, "fusion": "f", "model": "m", "output": "o"})
    with pytest.raises(Exception, match="exactly one of 'model'"):
        validate_config(BuildIndexConfig, {**common, "output": "o"})


@pytest.mark.unit
def test_a_gpu_index_asked_for_without_a_gpu_is_built_on_cpu_and_says_so(
    caplog: pytest.LogCaptureFixture,
) -> None:
    """The faiss-gpu path, checked where there is no GPU: ``use_gpu=True`` warns in one line and builds the
    same index on the CPU (the documented fallback), with the same answers as exact search."""
    import faiss

    if faiss.get_num_gpus() > 0:
        pytest.skip("this machine has a GPU: the fallback is not taken")
    rng = np.random.default_rng(0)
    vectors = rng.normal(size=(400, 16)).astype(np.float32)
    vectors /= np.linalg.norm(vectors, axis=1, keepdims=True)
    with caplog.at_level("WARNING", logger="visuray.index.faiss_index"):
        index = build_faiss_index(vectors, "Flat", "ip", use_gpu=True)
    warnings = [r.getMessage() for r in caplog.records if r.levelname == "WARNING"]
    assert warnings == ["use_gpu was requested but FAISS sees no GPU: building Flat on CPU"]
    assert not hasattr(index, "getDevice") and index.ntotal == 400
    _, found = index.search(vectors[:20], 1)
    np.testing.assert_array_equal(found[:, 0], np.arange(20))


@pytest.mark.unit
def test_the_served_embedder_keeps_a_pretrained_cnn_channels_last_and_embeds_as_the_plain_layout(
    tmp_path: Path,
) -> None:
    """The embedder of Serve and the index job runs the bundled Lite0 in the channels-last layout (1.9x
    the images/s on CPU, benchmarks/embed_forward.py); the vectors are those of PyTorch's default layout."""
    from visuray.index.ensemble import EmbeddingEnsemble, EnsembleMember, EnsembleSpec
    from visuray.models.weights import check_pretrained, import_weights

    backbone = BackboneConfig(name="tf_efficientnet_lite0", weights="efficientnet_lite0", img_size=96)
    import_weights(str(tmp_path / "lite0"), check_pretrained(backbone))
    spec = EnsembleSpec(members=[EnsembleMember(uri=str(tmp_path / "lite0"))])
    served, plain = EmbeddingEnsemble.load(spec), EmbeddingEnsemble.load(spec, memory_format="contiguous")
    convolutions = [p for p in served.models[0].parameters() if p.dim() == 4 and p.shape[-1] > 1]
    assert convolutions and all(p.is_contiguous(memory_format=torch.channels_last) for p in convolutions)
    assert not all(
        p.is_contiguous(memory_format=torch.channels_last)
        for p in plain.models[0].parameters()
        if p.dim() == 4 and p.shape[-1] > 1
    )
    images = [decode_image(textured_jpeg(s)) for s in range(4)]
    np.testing.assert_allclose(served.embed(images), plain.embed(images), atol=1e-5)
