"""Atomic publish, checksums and URI handling, on local disk and on a real S3 endpoint over HTTP."""

from __future__ import annotations

import hashlib
import json
import os
import uuid

import pytest

from visuray import storage
from visuray.storage import (
    _CHUNK,
    LATEST_NAME,
    ArtifactError,
    ArtifactWriter,
    StorageAccessError,
    StorageOptions,
    get_filesystem,
    join,
    resolve_artifact,
    verify_artifact,
)


def publish(root, files, options=None, kind="test"):
    with ArtifactWriter(root, kind, options) as writer:
        for name, data in files.items():
            writer.write_bytes(name, data)
        return writer.publish({"note": "hello"})


def roundtrip(root, options=None):
    art = publish(root, {"a.bin": b"alpha", "sub/b.bin": b"beta" * 1000}, options)
    got = resolve_artifact(root, options)
    assert got.manifest.version == art.manifest.version
    assert got.read("a.bin") == b"alpha"
    assert got.read("sub/b.bin") == b"beta" * 1000
    assert got.manifest.metadata == {"note": "hello"}
    verify_artifact(got)
    return got


@pytest.mark.unit
def test_local_roundtrip(tmp_path):
    roundtrip(str(tmp_path / "art"))
    roundtrip("file://" + str(tmp_path / "art2"))


@pytest.mark.unit
def test_new_version_replaces_latest_and_old_stays_readable(tmp_path):
    root = str(tmp_path / "art")
    first = publish(root, {"x": b"1"})
    second = publish(root, {"x": b"2"})
    assert resolve_artifact(root).read("x") == b"2"
    assert resolve_artifact(first.uri).read("x") == b"1"  # a version folder resolves on its own
    assert first.manifest.version != second.manifest.version


@pytest.mark.unit
def test_failed_publish_leaves_previous_version(tmp_path):
    root = str(tmp_path / "art")
    publish(root, {"x": b"good"})
    with pytest.raises(RuntimeError, match="boom"), ArtifactWriter(root, "test") as writer:
        writer.write_bytes("x", b"half")
        raise RuntimeError("boom")
    assert resolve_artifact(root).read("x") == b"good"
    # the aborted version folder was removed
    assert len(os.listdir(tmp_path / "art" / "versions")) == 1


@pytest.mark.unit
def test_nothing_visible_before_manifest(tmp_path):
    root = str(tmp_path / "art")
    writer = ArtifactWriter(root, "test")
    writer.write_bytes("x", b"data")  # written but not published: a crash here must leave no artifact
    with pytest.raises(ArtifactError, match="no published artifact"):
        resolve_artifact(root)
    writer.publish()
    assert resolve_artifact(root).read("x") == b"data"


@pytest.mark.unit
def test_corruption_is_detected(tmp_path):
    root = str(tmp_path / "art")
    art = publish(root, {"x": b"original"})
    path = tmp_path / "art" / "versions" / art.manifest.version / "x"
    path.write_bytes(b"tampered")
    with pytest.raises(ArtifactError, match="checksum mismatch"):
        resolve_artifact(root).read("x")
    with pytest.raises(ArtifactError, match="checksum mismatch"):
        verify_artifact(resolve_artifact(root))
    path.unlink()
    with pytest.raises(ArtifactError, match="missing"):
        verify_artifact(resolve_artifact(root))


@pytest.mark.unit
def test_latest_pointing_nowhere(tmp_path):
    root = tmp_path / "art"
    root.mkdir()
    (root / LATEST_NAME).write_text("nope")
    with pytest.raises(ArtifactError, match="has no manifest"):
        resolve_artifact(str(root))


@pytest.mark.unit
def test_refuses_bad_names_and_empty_publish(tmp_path):
    writer = ArtifactWriter(str(tmp_path / "a"), "test")
    for bad in ["MANIFEST.json", "../x", "/abs"]:
        with pytest.raises(ValueError):
            writer.write_bytes(bad, b"")
    with pytest.raises(ArtifactError, match="empty"):
        writer.publish()


@pytest.mark.unit
def test_join_and_filesystem(tmp_path):
    assert join("s3://b/p/", "x", "y") == "s3://b/p/x/y"
    assert join(str(tmp_path), "x") == str(tmp_path / "x")
    fs, path = get_filesystem("file://" + str(tmp_path))
    assert path == str(tmp_path) and fs.exists(path)


@pytest.mark.unit
def test_publish_on_a_remote_style_filesystem():
    # fsspec's in-memory filesystem takes the remote path (posix joins, one write for MANIFEST and LATEST)
    # without a server.
    root = f"memory://visuray-tests/{uuid.uuid4().hex}/art"
    got = roundtrip(root)
    fs, path = get_filesystem(root)
    assert fs.cat_file(path + "/" + LATEST_NAME).decode() == got.manifest.version
    listed = fs.ls(path + "/versions/" + got.manifest.version, detail=False)
    assert sorted(name.rsplit("/", 1)[-1] for name in listed) == ["MANIFEST.json", "a.bin", "sub"]


@pytest.mark.unit
def test_files_larger_than_a_read_chunk_are_hashed_whole(tmp_path):
    data = os.urandom(_CHUNK + 1000)  # two reads of the streaming hash, and of put_file's copy
    source = tmp_path / "big.bin"
    source.write_bytes(data)
    root = str(tmp_path / "art")
    with ArtifactWriter(root, "test") as writer:
        writer.put_file("big.bin", source)
        writer.put_file("nested/again.bin", source)
        writer.write_bytes("bytes.bin", data)
    art = resolve_artifact(root)
    assert {name: entry["size"] for name, entry in art.manifest.files.items()} == dict.fromkeys(
        ("big.bin", "bytes.bin", "nested/again.bin"), len(data)
    )
    assert art.manifest.files["big.bin"]["sha256"] == hashlib.sha256(data).hexdigest()
    verify_artifact(art)
    assert art.read("nested/again.bin") == data
    with pytest.raises(ValueError, match="invalid artifact file name"):
        ArtifactWriter(root, "test").put_file("../escape", source)


@pytest.mark.unit
def test_leaving_the_block_publishes_with_kind_options_and_text(tmp_path):
    root = str(tmp_path / "art")
    options = StorageOptions(region="eu-west-1")
    with ArtifactWriter(root, "catalog", options) as writer:
        writer.write_text("notes.txt", "café")  # no publish() call: leaving the block publishes
    assert writer.published is not None and writer.published.options is options
    art = resolve_artifact(root, options)
    assert art.manifest.kind == "catalog" and art.options is options
    assert art.read("notes.txt") == "café".encode()
    assert art.file_uris(".txt") == [join(art.uri, "notes.txt")] and art.file_uris(".bin") == []


@pytest.mark.unit
def test_abort_twice_and_unknown_names(tmp_path):
    writer = ArtifactWriter(str(tmp_path / "art"), "test")
    writer.abort()
    writer.abort()  # the folder is already gone: nothing to do, no error
    art = publish(str(tmp_path / "other"), {"x": b"1"})
    with pytest.raises(ArtifactError, match=r"^'nope' is not part of the artifact at .*other"):
        art.read("nope")
    with pytest.raises(ArtifactError, match=r"^'nope' is not part of the artifact at .*other"):
        art.file_uri("nope")


@pytest.mark.unit
def test_storage_options_reach_every_filesystem_of_the_artifact(tmp_path, monkeypatch):
    # The options (endpoint, credentials) of an artifact must reach every filesystem that writes or reads it.
    options = StorageOptions(region="eu-west-1")
    publish(str(tmp_path / "art"), {"x": b"1"}, options)
    seen = []
    real = storage.get_filesystem

    def spy(uri, opts=None):
        seen.append(opts)
        return real(uri, opts)

    monkeypatch.setattr(storage, "get_filesystem", spy)
    published = publish(str(tmp_path / "art"), {"x": b"2"}, options)  # the writer's folder and LATEST too
    resolved = resolve_artifact(str(tmp_path / "art"), options)
    resolved.read("x")
    verify_artifact(resolved)
    by_version = resolve_artifact(published.uri, options)  # a version folder resolves with them as well
    assert by_version.options is options and by_version.read("x") == b"2"
    assert len(seen) >= 6 and all(opts is options for opts in seen)


@pytest.mark.unit
def test_resolved_and_published_artifacts_know_their_root(tmp_path):
    root = str(tmp_path / "art")
    art = publish(root, {"x": b"1", "y.txt": b"2"})
    assert art.root == root and resolve_artifact(root).root == root
    assert resolve_artifact(art.uri).root == art.uri  # resolved from its version folder: that is its root
    assert art.file_uris() == [join(art.uri, "x"), join(art.uri, "y.txt")]  # no suffix: every file


@pytest.mark.unit
def test_publish_catches_a_same_size_change_after_writing(tmp_path):
    root = str(tmp_path / "art")
    writer = ArtifactWriter(root, "test")
    writer.write_bytes("x", b"original")
    (tmp_path / "art" / "versions" / writer.version / "x").write_bytes(b"tampered")  # same length
    with pytest.raises(ArtifactError, match=r"^verification failed for x in .*: written data differs$"):
        writer.publish()
    with pytest.raises(ArtifactError, match="no published artifact"):
        resolve_artifact(root)


@pytest.mark.s3
def test_s3_roundtrip_over_http(s3_bucket, s3_server):
    options = StorageOptions(endpoint_url=s3_server["endpoint_url"], key="testing", secret="testing")
    got = roundtrip(f"{s3_bucket}/artifacts/one", options)
    assert got.uri.startswith("s3://")
    # the objects are really on the server: list them with a fresh client
    fs, _ = get_filesystem(s3_bucket, options)
    keys = fs.find(s3_bucket.removeprefix("s3://"))
    assert any(k.endswith("MANIFEST.json") for k in keys) and any(k.endswith("LATEST") for k in keys)
    manifest = json.loads(fs.cat_file([k for k in keys if k.endswith("MANIFEST.json")][0]))
    assert set(manifest["files"]) == {"a.bin", "sub/b.bin"}


@pytest.mark.s3
def test_s3_credentials_from_environment(s3_bucket):
    """With no options at all, the standard AWS environment variables reach the endpoint."""
    roundtrip(f"{s3_bucket}/env-creds")


@pytest.mark.s3
def test_s3_failed_publish_keeps_previous(s3_bucket):
    root = f"{s3_bucket}/art"
    publish(root, {"x": b"v1"})
    with pytest.raises(RuntimeError), ArtifactWriter(root, "test") as writer:
        writer.write_bytes("x", b"v2-partial")
        raise RuntimeError("killed mid-upload")
    assert resolve_artifact(root).read("x") == b"v1"


@pytest.mark.s3
def test_s3_corruption_detected(s3_bucket):
    root = f"{s3_bucket}/corrupt"
    art = publish(root, {"x": b"original"})
    fs, _ = get_filesystem(root)
    fs.pipe_file(art.file_uri("x").removeprefix("s3://"), b"tampered!")
    with pytest.raises(ArtifactError, match="checksum mismatch"):
        resolve_artifact(root).read("x")


@pytest.mark.s3
def test_s3_wrong_credentials_fail_clearly(s3_bucket, s3_server_checking_credentials):
    """A store that refuses the key, and one that cannot be reached: each a one-line error naming the
    artifact and what to check."""
    root = f"{s3_bucket}/nothing-here"
    refusing = StorageOptions(endpoint_url=s3_server_checking_credentials, key="nobody", secret="wrong")
    with pytest.raises(StorageAccessError) as info:
        resolve_artifact(root, refusing)
    message = str(info.value)
    assert message.startswith(f"{root}: access denied (") and "\n" not in message
    assert message.endswith(
        "check the storage credentials (storage.key and storage.secret, or the AWS environment)"
    )
    unreachable = StorageOptions(endpoint_url="http://127.0.0.1:9", key="k", secret="s")
    with pytest.raises(StorageAccessError) as info:
        resolve_artifact(root, unreachable)
    message = str(info.value)
    assert message.startswith(f"{root}: cannot be reached (") and "\n" not in message
    assert message.endswith("check storage.endpoint_url and the network")
