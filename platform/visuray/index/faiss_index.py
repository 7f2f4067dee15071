"""FAISS indexes: build from vectors, publish as an artifact with a manifest, load and search.

An index artifact (kind ``"index"``) holds ``index.faiss`` (``faiss.serialize_index`` bytes) -- or, for a
large catalog, shards ``index-00000.faiss``, ``index-00001.faiss``... of consecutive rows --, ``ids.parquet``
(row ``i`` is the catalog ``item_id`` of FAISS id ``i``) and a manifest whose metadata names the model
version that produced the vectors, their dimension, the metric, the row count and the factory string.
Serving refuses to pair an index with a model of another version, so the metadata is the contract.

Index types come from FAISS's index-factory strings (``Flat``, ``IVF256,Flat``, ``IVF1024,PQ16``,
``HNSW32``...). Build parameters that FAISS cannot honour on a small catalog (more IVF lists than
training points support, more PQ centroids than points) are scaled down with a logged note rather than
left to fail deep inside FAISS; the manifest records the requested factory string and, as
``index_params``, what was actually built (IVF lists, nprobe, HNSW efSearch).
"""

from __future__ import annotations

import io
import logging
import math
import re
from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from typing import TYPE_CHECKING, Any, Literal

import numpy as np

from visuray.storage import Artifact, ArtifactError, ArtifactWriter, StorageOptions, resolve_artifact

if TYPE_CHECKING:
    import faiss

log = logging.getLogger(__name__)

INDEX_KIND = "index"
INDEX_FILE = "index.faiss"
IDS_FILE = "ids.parquet"
Metric = Literal["ip", "l2"]

# FAISS's k-means warns below 39 training points per centroid; below that the centroids are noise.
MIN_POINTS_PER_CENTROID = 39
# Enough to train k-means for any nlist used in practice (FAISS samples 256 points per centroid at most).
DEFAULT_MAX_TRAIN = 262_144
_ADD_CHUNK = 65_536


def faiss_metric(metric: str) -> int:
    import faiss

    if metric == "ip":
        return faiss.METRIC_INNER_PRODUCT
    if metric == "l2":
        return faiss.METRIC_L2
    raise ValueError(f"unknown metric {metric!r}; use 'ip' (inner product, cosine on unit vectors) or 'l2'")


def fit_factory_to_data(factory: str, num_vectors: int, dim: int) -> str:
    """Scale an index-factory string down to what ``num_vectors`` training points can support.

    ``IVF{n}`` gets at most ``num_vectors // 39`` lists; ``PQ{m}`` (8 bits per code by default) gets fewer
    bits per code when there are fewer than 39 points per code centroid. A ``PQ{m}`` whose ``m`` does not divide
    the dimension is an error that says so, rather than FAISS's assertion.
    """
    fitted = factory

    def cap_ivf(match: re.Match[str]) -> str:
        nlist = int(match.group(1))
        cap = max(1, num_vectors // MIN_POINTS_PER_CENTROID)
        if nlist > cap:
            log.warning(
                "IVF%d needs at least %d training vectors, have %d: using IVF%d (a larger catalog gets the "
                "requested number of lists)",
                nlist,
                nlist * MIN_POINTS_PER_CENTROID,
                num_vectors,
                cap,
            )
            nlist = cap
        return f"IVF{nlist}"

    fitted = re.sub(r"IVF(\d+)", cap_ivf, fitted)

    def fit_pq(match: re.Match[str]) -> str:
        prefix, m, nbits = match.group(1), int(match.group(2)), int(match.group(3) or 8)
        if dim % m:
            raise ValueError(
                f"index factory {factory!r}: PQ{m} needs a dimension divisible by {m}, got {dim}"
            )
        # 2**nbits centroids per sub-quantizer, each wanting MIN_POINTS_PER_CENTROID training points.
        supported = int(math.log2(max(2, num_vectors // MIN_POINTS_PER_CENTROID)))
        fitting = max(1, min(nbits, supported))
        if fitting < nbits:
            log.warning(
                "PQ%dx%d needs at least %d training vectors, have %d: using %d bits per code",
                m,
                nbits,
                MIN_POINTS_PER_CENTROID * 2**nbits,
                num_vectors,
                fitting,
            )
        return f"{prefix}PQ{m}x{fitting}" if fitting != 8 else f"{prefix}PQ{m}"

    # Only product quantisers that come after a comma or at the start (not "OPQ16_64" rotations).
    fitted = re.sub(r"(^|,)PQ(\d+)(?:x(\d+))?", fit_pq, fitted)
    return fitted


def _default_nprobe(nlist: int) -> int:
    # About 1/8 of the lists, at least 8: recall@10 above 0.9 on clustered embeddings in our tests, while
    # a large index still only scans a small fraction. Tune per catalog with SearchIndex.set_nprobe.
    return max(1, min(nlist, max(8, nlist // 8)))


def _move_to_gpu(index: faiss.Index) -> tuple[faiss.Index, Any] | None:
    """(GPU copy of ``index``, its GPU resources) when FAISS has a GPU that supports this index type.

    The caller keeps the resources object alive for as long as it uses the GPU index.
    """
    import faiss

    if not hasattr(faiss, "StandardGpuResources") or faiss.get_num_gpus() <= 0:
        return None
    try:
        resources = faiss.StandardGpuResources()
        return faiss.index_cpu_to_gpu(resources, 0, index), resources
    except RuntimeError as exc:  # e.g. HNSW has no GPU implementation
        log.info("building on CPU: %s", exc)
        return None


def build_faiss_index(
    vectors: np.ndarray,
    factory: str = "Flat",
    metric: Metric = "ip",
    train_size: int | None = None,
    use_gpu: bool | None = None,
    nprobe: int | None = None,
    ef_search: int = 128,
    seed: int = 0,
) -> faiss.Index:
    """Train (when the index type needs it) and fill a FAISS index; always returns a CPU index.

    ``train_size`` caps the vectors sampled (seeded) for training; ``use_gpu`` None means "when FAISS
    sees a GPU". ``nprobe`` (IVF lists scanned per query) and ``ef_search`` (HNSW) are stored inside the
    serialized index, so the published index searches the way it was validated.
    """
    return build_sharded_faiss_index(
        vectors, factory, metric, None, train_size, use_gpu, nprobe, ef_search, seed
    )[0]


def build_sharded_faiss_index(
    vectors: np.ndarray,
    factory: str = "Flat",
    metric: Metric = "ip",
    shard_size: int | None = None,
    train_size: int | None = None,
    use_gpu: bool | None = None,
    nprobe: int | None = None,
    ef_search: int = 128,
    seed: int = 0,
) -> list[faiss.Index]:
    """One FAISS index per ``shard_size`` consecutive rows (one shard when None or not exceeded).

    The index type is trained once (on a seeded sample of all rows) and every shard is a copy of that
    trained, empty index filled with its rows: the shards share IVF centroids and PQ codebooks, so their
    scores are comparable and searching them all (:class:`SearchIndex`) ranks like one big index.
    """
    import faiss

    vectors = np.ascontiguousarray(vectors, dtype=np.float32)
    if vectors.ndim != 2 or vectors.shape[0] == 0:
        raise ValueError(f"need a non-empty (N, D) array of vectors, got shape {vectors.shape}")
    if shard_size is not None and shard_size <= 0:
        raise ValueError(f"shard_size must be positive, got {shard_size}")
    num, dim = vectors.shape
    train_count = min(num, train_size or DEFAULT_MAX_TRAIN)
    fitted = fit_factory_to_data(factory, train_count, dim)
    empty = faiss.index_factory(dim, fitted, faiss_metric(metric))
    if use_gpu and not _gpu_available():
        log.warning("use_gpu was requested but FAISS sees no GPU: building %s on CPU", fitted)
    gpu = use_gpu is not False and _gpu_available()

    if not empty.is_trained:
        sample = vectors
        if train_count < num:
            rng = np.random.default_rng(seed)
            sample = vectors[np.sort(rng.choice(num, size=train_count, replace=False))]
        log.info("training %s on %d vectors (dim %d)", fitted, len(sample), dim)
        empty = _on_device(empty, gpu, lambda index: index.train(sample))

    step = shard_size or num
    shards = []
    for start in range(0, num, step):
        rows = vectors[start : start + step]
        shard = _on_device(
            faiss.clone_index(empty), gpu, lambda index, rows=rows: _add_in_chunks(index, rows)
        )
        ivf = _ivf_of(shard)
        if ivf is not None:
            ivf.nprobe = nprobe if nprobe is not None else _default_nprobe(ivf.nlist)
        if hasattr(shard, "hnsw"):
            shard.hnsw.efSearch = ef_search
        shards.append(shard)
    log.info(
        "built %s index: %d vectors in %d shard(s), dim %d, metric %s", fitted, num, len(shards), dim, metric
    )
    return shards


def _add_in_chunks(index: faiss.Index, rows: np.ndarray) -> None:
    for start in range(0, len(rows), _ADD_CHUNK):
        index.add(rows[start : start + _ADD_CHUNK])


def _gpu_available() -> bool:
    import faiss

    return hasattr(faiss, "StandardGpuResources") and faiss.get_num_gpus() > 0


def _on_device(index: faiss.Index, gpu: bool, work: Any) -> faiss.Index:
    """Run ``work(index)`` (train or add) on the GPU when asked and supported; return the CPU index."""
    import faiss

    moved = _move_to_gpu(index) if gpu else None
    if moved is None:
        work(index)
        return index
    work(moved[0])
    return faiss.index_gpu_to_cpu(moved[0])


def describe_index(index: faiss.Index) -> dict[str, Any]:
    """The parameters an index was actually built and tuned with (recorded in the manifest)."""
    params: dict[str, Any] = {"type": type(index).__name__}
    ivf = _ivf_of(index)
    if ivf is not None:
        params.update(nlist=int(ivf.nlist), nprobe=int(ivf.nprobe))
    if hasattr(index, "hnsw"):
        params.update(ef_search=int(index.hnsw.efSearch))
    return params


def _ivf_of(index: faiss.Index) -> Any:
    import faiss

    try:
        return faiss.extract_index_ivf(index)
    except RuntimeError:  # not an IVF index
        return None


def _ids_parquet(ids: Sequence[str]) -> bytes:
    import pyarrow as pa
    import pyarrow.parquet as pq

    buf = io.BytesIO()
    pq.write_table(pa.table({"item_id": pa.array(list(ids), pa.string())}), buf, compression="zstd")
    return buf.getvalue()


def shard_file_name(shard: int, num_shards: int) -> str:
    """``index.faiss`` for an unsharded index (the historical name), ``index-00003.faiss`` otherwise."""
    return INDEX_FILE if num_shards == 1 else f"index-{shard:05d}.faiss"


def publish_index(
    uri: str,
    index: faiss.Index | Sequence[faiss.Index],
    ids: Sequence[str],
    model_version: str,
    metric: Metric,
    factory: str,
    options: StorageOptions | None = None,
    extra_metadata: Mapping[str, Any] | None = None,
    extra_files: Mapping[str, bytes] | None = None,
) -> Artifact:
    """Publish ``index`` (one index or its shards, in id order) with its id mapping: files written,
    verified, manifest, then LATEST -- a reader sees the whole index or none of it.

    ``factory`` is the requested factory string; what was actually built (e.g. IVF lists capped for a
    small catalog) is recorded beside it as ``index_params``. The manifest metadata also lists the shard
    files with their row counts and a ``checksum`` over every index and id file (each file's own sha256
    is in the manifest's file table). ``extra_files`` (e.g. the resolved job config) become checksummed
    files of the same artifact.
    """
    import faiss

    from visuray.storage import sha256_bytes

    shards = [index] if hasattr(index, "ntotal") else list(index)
    total = sum(int(s.ntotal) for s in shards)
    if not shards or total != len(ids):
        raise ValueError(f"index holds {total} vectors but {len(ids)} ids were given")
    if len(set(ids)) != len(ids):
        raise ValueError("item ids of an index must be unique")
    if len({int(s.d) for s in shards}) != 1:
        raise ValueError("all shards of an index must have one dimension")
    files = {
        shard_file_name(i, len(shards)): faiss.serialize_index(s).tobytes() for i, s in enumerate(shards)
    }
    files[IDS_FILE] = _ids_parquet(ids)
    checksum = sha256_bytes("".join(f"{n}:{sha256_bytes(d)}\n" for n, d in sorted(files.items())).encode())
    metadata = {
        "model_version": model_version,
        "dim": int(shards[0].d),
        "metric": metric,
        "count": total,
        "factory": factory,
        "index_params": describe_index(shards[0]),
        "shards": [
            {"file": shard_file_name(i, len(shards)), "count": int(s.ntotal)} for i, s in enumerate(shards)
        ],
        "checksum": checksum,
        **dict(extra_metadata or {}),
    }
    with ArtifactWriter(uri, INDEX_KIND, options) as writer:
        for name, data in {**files, **dict(extra_files or {})}.items():
            writer.write_bytes(name, data)
        artifact = writer.publish(metadata)
    log.info(
        "published index %s (%d vectors in %d shard(s), model %s)",
        artifact.uri,
        total,
        len(shards),
        model_version,
    )
    return artifact


@dataclass
class SearchIndex:
    """A loaded, verified index artifact: FAISS search that answers in catalog item ids.

    A sharded artifact is searched through ``faiss.IndexShards`` (every shard searched, results merged by
    score); ``shards`` keeps the shard objects alive, since IndexShards does not own them.
    """

    index: Any  # faiss.Index; typed loosely so that this module imports without faiss
    ids: list[str]
    artifact: Artifact
    shards: list[Any]

    @classmethod
    def load(cls, uri: str, options: StorageOptions | None = None) -> SearchIndex:
        """Resolve and read an index artifact; every file is checked against the manifest's checksum."""
        import faiss
        import pyarrow.parquet as pq

        artifact = resolve_artifact(uri, options)
        if artifact.manifest.kind != INDEX_KIND:
            raise ArtifactError(f"{uri} is a {artifact.manifest.kind!r} artifact, not an index")
        meta = artifact.manifest.metadata
        shard_files = [s["file"] for s in meta.get("shards", [{"file": INDEX_FILE}])]
        shards = [
            faiss.deserialize_index(np.frombuffer(artifact.read(name), dtype=np.uint8))
            for name in shard_files
        ]
        if len(shards) == 1:
            index = shards[0]
        else:
            # successive_ids: shard j's local ids are offset by the rows of shards 0..j-1 (id order).
            index = faiss.IndexShards(shards[0].d, False, True)
            for shard in shards:
                index.add_shard(shard)
        ids = pq.read_table(io.BytesIO(artifact.read(IDS_FILE))).column("item_id").to_pylist()
        if index.ntotal != len(ids) or meta.get("count") != len(ids) or meta.get("dim") != index.d:
            raise ArtifactError(
                f"index artifact {artifact.uri} is inconsistent: {index.ntotal} vectors, {len(ids)} ids, "
                f"manifest count {meta.get('count')} dim {meta.get('dim')} vs index dim {index.d}"
            )
        return cls(index=index, ids=ids, artifact=artifact, shards=shards)

    @property
    def num_shards(self) -> int:
        return len(self.shards)

    @property
    def model_version(self) -> str:
        return self.artifact.manifest.metadata["model_version"]

    @property
    def dim(self) -> int:
        return int(self.index.d)

    @property
    def metric(self) -> str:
        return self.artifact.manifest.metadata["metric"]

    @property
    def factory(self) -> str:
        return self.artifact.manifest.metadata["factory"]

    @property
    def version(self) -> str:
        return self.artifact.manifest.version

    def __len__(self) -> int:
        return len(self.ids)

    def set_nprobe(self, nprobe: int) -> None:
        """IVF lists scanned per query: higher is slower and closer to exact search."""
        ivfs = [_ivf_of(shard) for shard in self.shards]
        if any(ivf is None for ivf in ivfs):
            raise ValueError(f"{self.factory} is not an IVF index; nprobe does not apply")
        for ivf in ivfs:
            ivf.nprobe = nprobe

    def search(self, vectors: np.ndarray, k: int) -> tuple[list[list[str]], np.ndarray]:
        """The ``k`` nearest catalog items of each query vector.

        Returns per-query item-id lists and an (N, min(k, len)) float32 array of FAISS scores (inner
        products for metric "ip", squared distances for "l2"). An approximate index may find fewer
        than ``k`` results for a query: its id list is shorter and the missing scores are NaN.
        """
        queries = np.ascontiguousarray(vectors, dtype=np.float32)
        if queries.ndim == 1:
            queries = queries[None, :]
        if queries.ndim != 2 or queries.shape[1] != self.dim:
            raise ValueError(
                f"query vectors have shape {tuple(np.shape(vectors))} but index {self.version} holds "
                f"dimension {self.dim} (model {self.model_version}): embed queries with the same model"
            )
        if k <= 0:
            raise ValueError(f"k must be positive, got {k}")
        k = min(k, len(self.ids))
        scores, labels = self.index.search(queries, k)
        found = labels >= 0
        scores = np.where(found, scores, np.nan).astype(np.float32)
        ids = [[self.ids[j] for j in row if j >= 0] for row in labels]
        return ids, scores
