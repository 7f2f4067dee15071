"""Atomic publish, checksums and URI handling, on local disk and on a real S3 endpoint over HTTP."""

from __future__ import annotations

import json
import os

import pytest

from visuray.storage import (
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
