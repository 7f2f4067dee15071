"""Artifact storage behind URIs: plain paths, ``file://`` and ``s3://`` (through s3fs).

Every artifact that a later stage consumes (catalog, checkpoint, index) is *published*:

1. its files are written into a fresh version folder ``<root>/versions/<version>/``,
2. each file is read back and its SHA-256 compared with what was written (verify),
3. ``MANIFEST.json`` (file names, sizes, checksums, metadata) is written into that folder,
4. ``<root>/LATEST`` is rewritten to name the new version.

A reader resolves ``LATEST`` and then the manifest, so it never sees half an artifact: a publish that
dies before step 4 leaves the previous version in place, and one that dies before step 3 leaves a folder
that no manifest points at. Reads through :func:`read_artifact_file` check the checksum.

S3 settings come from :class:`StorageOptions` (a section of every job config) and otherwise from the
standard AWS environment variables (``AWS_ACCESS_KEY_ID``, ``AWS_SECRET_ACCESS_KEY``, ``AWS_REGION``,
``AWS_ENDPOINT_URL``), which botocore reads itself.
"""

from __future__ import annotations

import contextlib
import hashlib
import json
import os
import posixpath
import shutil
import time
import uuid
from collections.abc import Iterable, Iterator, Mapping
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import fsspec

from visuray import __version__
from visuray.config import StrictModel
from visuray.errors import VisurayError

MANIFEST_NAME = "MANIFEST.json"
LATEST_NAME = "LATEST"
VERSIONS_DIR = "versions"
# The weights file of every model artifact (embedding, fusion, attribute models), in safetensors format.
WEIGHTS_NAME = "model.safetensors"
_CHUNK = 4 << 20


class StorageOptions(StrictModel):
    """How to reach ``s3://`` URIs. Leave everything unset on AWS: the standard chain applies."""

    endpoint_url: str | None = None  # e.g. http://127.0.0.1:9000 for MinIO or a loopback test server
    key: str | None = None  # prefer AWS_ACCESS_KEY_ID in the environment over a key in a file
    secret: str | None = None
    region: str | None = None
    anon: bool = False  # public buckets only

    def s3_kwargs(self) -> dict[str, Any]:
        kwargs: dict[str, Any] = {"anon": self.anon}
        if self.key is not None:
            kwargs["key"] = self.key
        if self.secret is not None:
            kwargs["secret"] = self.secret
        client_kwargs: dict[str, Any] = {}
        endpoint = self.endpoint_url or os.environ.get("AWS_ENDPOINT_URL")
        if endpoint:
            client_kwargs["endpoint_url"] = endpoint
        region = self.region or os.environ.get("AWS_REGION") or os.environ.get("AWS_DEFAULT_REGION")
        if region:
            client_kwargs["region_name"] = region
        if client_kwargs:
            kwargs["client_kwargs"] = client_kwargs
        return kwargs


class ArtifactError(VisurayError, RuntimeError):
    """An artifact is missing, unpublished, or does not match its manifest."""


class StorageAccessError(VisurayError, OSError):
    """The store refused a request (credentials) or could not be reached (endpoint, network)."""


@contextlib.contextmanager
def storage_access(uri: str) -> Iterator[None]:
    """Turn a store's refusal, or a remote store that cannot be reached, into a one-line
    :class:`StorageAccessError` naming ``uri`` and what to check. "Not found" passes through, as does any
    other error of a local path: those are the caller's to explain. Wrap the first request to a store only, so
    that nothing but storage access is translated."""
    try:
        yield
    except (FileNotFoundError, VisurayError):
        raise
    except PermissionError as exc:
        check = (
            "the storage credentials (storage.key and storage.secret, or the AWS environment)"
            if is_remote(uri)
            else "the file's permissions"
        )
        raise StorageAccessError(f"{uri}: access denied ({_first_line(exc)}); check {check}") from None
    except Exception as exc:  # botocore's and aiohttp's connection errors share no base class with OSError
        if not is_remote(uri):
            raise
        raise StorageAccessError(
            f"{uri}: cannot be reached ({_first_line(exc)}); check storage.endpoint_url and the network"
        ) from None


def _first_line(exc: BaseException) -> str:
    text = str(exc).strip()
    return text.splitlines()[0] if text else type(exc).__name__


def is_remote(uri: str) -> bool:
    return "://" in uri and not uri.startswith("file://")


def get_filesystem(uri: str, options: StorageOptions | None = None) -> tuple[fsspec.AbstractFileSystem, str]:
    """Return the filesystem for ``uri`` and the path inside it."""
    options = options or StorageOptions()
    if uri.startswith("s3://"):
        # Cached instances would keep an old endpoint between tests; each call builds its own client.
        fs = fsspec.filesystem("s3", skip_instance_cache=True, **options.s3_kwargs())
        return fs, uri[len("s3://") :].rstrip("/")
    if uri.startswith("file://"):
        uri = uri[len("file://") :]
    if "://" in uri:
        protocol, path = uri.split("://", 1)
        return fsspec.filesystem(protocol), path
    return fsspec.filesystem("file"), str(Path(uri).expanduser().absolute())


def join(uri: str, *parts: str) -> str:
    """Join path parts onto a URI with ``/`` (also for local paths)."""
    if "://" in uri:
        scheme, rest = uri.split("://", 1)
        return f"{scheme}://" + posixpath.join(rest.rstrip("/"), *parts)
    return str(Path(uri).joinpath(*parts))


def full_uri(uri: str, fs_path: str) -> str:
    """Turn a path inside the filesystem of ``uri`` back into a URI of the same kind."""
    if uri.startswith("s3://"):
        return "s3://" + fs_path
    return fs_path


def absolute_uri(uri: str) -> str:
    """``uri`` with a local path made absolute: Ray workers do not share the driver's working directory."""
    return uri if is_remote(uri) else get_filesystem(uri)[1]


def sha256_bytes(data: bytes) -> str:
    return hashlib.sha256(data).hexdigest()


def _sha256_file(fs: fsspec.AbstractFileSystem, path: str) -> tuple[str, int]:
    digest = hashlib.sha256()
    size = 0
    with fs.open(path, "rb") as fh:
        while chunk := fh.read(_CHUNK):
            digest.update(chunk)
            size += len(chunk)
    return digest.hexdigest(), size


@dataclass
class Manifest:
    """What a published artifact holds; written last, so its presence means the artifact is complete."""

    kind: str
    version: str
    files: dict[str, dict[str, Any]]
    metadata: dict[str, Any] = field(default_factory=dict)
    created: float = field(default_factory=time.time)
    visuray_version: str = __version__

    def to_json(self) -> str:
        return json.dumps(self.__dict__, indent=2, sort_keys=True)

    @classmethod
    def from_json(cls, text: str) -> Manifest:
        data = json.loads(text)
        return cls(**data)


@dataclass
class Artifact:
    """A resolved, published artifact: its version folder URI and its manifest."""

    root: str
    uri: str
    manifest: Manifest
    options: StorageOptions | None = None

    def file_uri(self, name: str) -> str:
        if name not in self.manifest.files:
            raise ArtifactError(f"{name!r} is not part of the artifact at {self.uri}")
        return join(self.uri, name)

    def file_uris(self, suffix: str = "") -> list[str]:
        return [join(self.uri, n) for n in sorted(self.manifest.files) if n.endswith(suffix)]

    def read(self, name: str) -> bytes:
        return read_artifact_file(self, name)


def new_version_id() -> str:
    """Sortable and unique: UTC timestamp plus a random suffix."""
    return time.strftime("%Y%m%dT%H%M%S", time.gmtime()) + "-" + uuid.uuid4().hex[:8]


class ArtifactWriter:
    """Writes the files of one artifact version, then publishes it (verify, manifest, LATEST).

    Use as a context manager: leaving the block with an exception publishes nothing and removes the
    partial version folder; leaving it normally calls :meth:`publish` if it has not been called.
    """

    def __init__(
        self,
        root: str,
        kind: str,
        options: StorageOptions | None = None,
        version: str | None = None,
    ) -> None:
        self.root = root
        self.kind = kind
        self.options = options
        self.version = version or new_version_id()
        self.uri = join(root, VERSIONS_DIR, self.version)
        self.fs, self._path = get_filesystem(self.uri, options)
        self._written: dict[str, tuple[str, int]] = {}
        self.published: Artifact | None = None
        self.fs.makedirs(self._path, exist_ok=True)

    def path_of(self, name: str) -> str:
        return posixpath.join(self._path, name) if is_remote(self.uri) else os.path.join(self._path, name)

    def write_bytes(self, name: str, data: bytes) -> None:
        self._check_name(name)
        path = self.path_of(name)
        parent = posixpath.dirname(path)
        if parent:
            self.fs.makedirs(parent, exist_ok=True)
        with self.fs.open(path, "wb") as fh:
            fh.write(data)
        self._written[name] = (sha256_bytes(data), len(data))

    def write_text(self, name: str, text: str) -> None:
        self.write_bytes(name, text.encode())

    def put_file(self, name: str, local_path: str | Path) -> None:
        """Copy a local file in, hashing it while it streams."""
        self._check_name(name)
        digest = hashlib.sha256()
        size = 0
        path = self.path_of(name)
        self.fs.makedirs(posixpath.dirname(path), exist_ok=True)
        with open(local_path, "rb") as src, self.fs.open(path, "wb") as dst:
            while chunk := src.read(_CHUNK):
                digest.update(chunk)
                size += len(chunk)
                dst.write(chunk)
        self._written[name] = (digest.hexdigest(), size)

    def _check_name(self, name: str) -> None:
        if name in (MANIFEST_NAME, LATEST_NAME) or name.startswith("/") or ".." in name.split("/"):
            raise ValueError(f"invalid artifact file name {name!r}")

    def publish(self, metadata: Mapping[str, Any] | None = None) -> Artifact:
        """Verify every written file against its checksum, write the manifest, then point LATEST here."""
        if self.published is not None:
            return self.published
        if not self._written:
            raise ArtifactError(f"refusing to publish an empty {self.kind} artifact at {self.root}")
        files: dict[str, dict[str, Any]] = {}
        for name, (expected, size) in sorted(self._written.items()):
            actual, actual_size = _sha256_file(self.fs, self.path_of(name))
            if actual != expected or actual_size != size:
                raise ArtifactError(f"verification failed for {name} in {self.uri}: written data differs")
            files[name] = {"sha256": expected, "size": size}
        manifest = Manifest(kind=self.kind, version=self.version, files=files, metadata=dict(metadata or {}))
        _write_atomic(self.fs, self.path_of(MANIFEST_NAME), manifest.to_json().encode())
        root_fs, root_path = get_filesystem(self.root, self.options)
        _write_atomic(root_fs, _child(self.root, root_path, LATEST_NAME), self.version.encode())
        self.published = Artifact(self.root, self.uri, manifest, self.options)
        return self.published

    def abort(self) -> None:
        with contextlib.suppress(FileNotFoundError):
            self.fs.rm(self._path, recursive=True)

    def __enter__(self) -> ArtifactWriter:
        return self

    def __exit__(self, exc_type: Any, exc: Any, tb: Any) -> None:
        if exc_type is not None:
            self.abort()
        elif self.published is None:
            self.publish()


def _child(uri: str, fs_path: str, name: str) -> str:
    return posixpath.join(fs_path, name) if is_remote(uri) else os.path.join(fs_path, name)


def _write_atomic(fs: fsspec.AbstractFileSystem, path: str, data: bytes) -> None:
    """Local files: write a temporary file and rename (atomic on POSIX). S3: one PUT is atomic."""
    if getattr(fs, "protocol", None) in ("file", ("file", "local")) or "file" in fs.protocol:
        tmp = f"{path}.tmp-{uuid.uuid4().hex[:8]}"
        with open(tmp, "wb") as fh:
            fh.write(data)
            fh.flush()
            os.fsync(fh.fileno())
        os.replace(tmp, path)
    else:
        fs.pipe_file(path, data)


def resolve_artifact(root: str, options: StorageOptions | None = None) -> Artifact:
    """Find the published version of the artifact at ``root``.

    ``root`` may be an artifact root (holding ``LATEST``) or one version folder (holding the manifest).
    """
    fs, path = get_filesystem(root, options)
    manifest_path = _child(root, path, MANIFEST_NAME)
    with storage_access(root):
        is_version = fs.exists(manifest_path)
    if is_version:
        return Artifact(root, root, Manifest.from_json(fs.cat_file(manifest_path).decode()), options)
    latest_path = _child(root, path, LATEST_NAME)
    if not fs.exists(latest_path):
        raise ArtifactError(f"no published artifact at {root} (neither {LATEST_NAME} nor {MANIFEST_NAME})")
    version = fs.cat_file(latest_path).decode().strip()
    uri = join(root, VERSIONS_DIR, version)
    vfs, vpath = get_filesystem(uri, options)
    try:
        text = vfs.cat_file(_child(uri, vpath, MANIFEST_NAME)).decode()
    except FileNotFoundError:
        raise ArtifactError(f"{root}: LATEST names version {version} but it has no manifest") from None
    return Artifact(root, uri, Manifest.from_json(text), options)


def read_artifact_file(artifact: Artifact, name: str) -> bytes:
    """Read one file of a published artifact and check it against the manifest's checksum."""
    entry = artifact.manifest.files.get(name)
    if entry is None:
        raise ArtifactError(f"{name!r} is not part of the artifact at {artifact.uri}")
    fs, path = get_filesystem(artifact.file_uri(name), artifact.options)
    data = fs.cat_file(path)
    if len(data) != entry["size"] or sha256_bytes(data) != entry["sha256"]:
        raise ArtifactError(f"checksum mismatch for {name} in {artifact.uri}: the file is corrupt")
    return data


def verify_artifact(artifact: Artifact) -> None:
    """Check every file of an artifact against its manifest (streaming, so large files are fine)."""
    for name, entry in artifact.manifest.files.items():
        fs, path = get_filesystem(artifact.file_uri(name), artifact.options)
        try:
            digest, size = _sha256_file(fs, path)
        except FileNotFoundError:
            raise ArtifactError(f"{name} listed in the manifest of {artifact.uri} is missing") from None
        if digest != entry["sha256"] or size != entry["size"]:
            raise ArtifactError(f"checksum mismatch for {name} in {artifact.uri}: the file is corrupt")


def download_artifact(artifact: Artifact, local_dir: str | Path, names: Iterable[str] | None = None) -> Path:
    """Copy (verified) files of an artifact into ``local_dir``; local artifacts are verified in place."""
    local_dir = Path(local_dir)
    local_dir.mkdir(parents=True, exist_ok=True)
    for name in names if names is not None else artifact.manifest.files:
        target = local_dir / name
        target.parent.mkdir(parents=True, exist_ok=True)
        target.write_bytes(read_artifact_file(artifact, name))
    return local_dir


def write_text(uri: str, text: str, options: StorageOptions | None = None) -> None:
    """Write a small standalone file (reports, resolved configs) atomically where the backend allows."""
    fs, path = get_filesystem(uri, options)
    parent = posixpath.dirname(path)
    if parent:
        fs.makedirs(parent, exist_ok=True)
    _write_atomic(fs, path, text.encode())


def read_text(uri: str, options: StorageOptions | None = None) -> str:
    fs, path = get_filesystem(uri, options)
    return fs.cat_file(path).decode()


def exists(uri: str, options: StorageOptions | None = None) -> bool:
    fs, path = get_filesystem(uri, options)
    return fs.exists(path)


def remove_local_tree(path: str | Path) -> None:
    shutil.rmtree(path, ignore_errors=True)
