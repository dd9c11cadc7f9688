"""The store: create-only writes, checksums, no escapes from the root, no credentials in URIs."""

from __future__ import annotations

import hashlib
import os

import pytest

from pipeline.store import ChecksumError, Store, StoreError, redact


def test_write_once_then_read_verified(tmp_path):
    store = Store(str(tmp_path / "root"))
    artifact = store.write_once("concepts/abc.safetensors", b"payload")
    assert artifact.sha256 == hashlib.sha256(b"payload").hexdigest()
    assert artifact.bytes == 7
    assert artifact.uri == str(tmp_path / "root" / "concepts" / "abc.safetensors")
    assert store.read("concepts/abc.safetensors", artifact.sha256) == b"payload"
    assert store.list("concepts") == ["concepts/abc.safetensors"]
    # no temporary files are left beside it
    assert os.listdir(tmp_path / "root" / "concepts") == ["abc.safetensors"]


def test_artifacts_are_never_overwritten(tmp_path):
    store = Store(str(tmp_path))
    store.write_once("a.bin", b"first")
    with pytest.raises(FileExistsError):
        store.write_once("a.bin", b"second")
    assert store.read("a.bin") == b"first"


def test_a_changed_file_fails_its_checksum_with_the_fix(tmp_path):
    store = Store(str(tmp_path))
    artifact = store.write_once("c.bin", b"original")
    (tmp_path / "c.bin").write_bytes(b"tampered")
    with pytest.raises(ChecksumError, match=r"checksum mismatch .* retrain the concept"):
        store.read("c.bin", artifact.sha256)


@pytest.mark.parametrize("name", ["../outside", "a/../../b", "/etc/passwd", "..", "a\\..\\b"])
def test_names_cannot_leave_the_root(tmp_path, name):
    store = Store(str(tmp_path / "root"))
    with pytest.raises(StoreError, match="would leave the storage root"):
        store.write_once(name, b"x")
    assert not (tmp_path / "outside").exists()


def test_bad_roots_are_refused_clearly():
    with pytest.raises(StoreError, match="unsupported scheme 'ftp'"):
        Store("ftp://host/path")
    with pytest.raises(StoreError, match="credentials in the URI are not allowed") as caught:
        Store("s3://AKIA:secret@bucket/path")
    assert "secret" not in str(caught.value)
    assert redact("s3://user:pw@bucket/x") == "s3://bucket/x"


def test_memory_filesystem_behaves_like_an_object_store():
    store = Store("memory://perfusion-test-root")
    artifact = store.write_once("concepts/k.safetensors", b"abc")
    assert artifact.uri.startswith("memory://") and artifact.uri.endswith("/perfusion-test-root/concepts/k.safetensors")
    assert store.relative(artifact.uri) == "concepts/k.safetensors"
    with pytest.raises(FileExistsError):
        store.write_once("concepts/k.safetensors", b"xyz")
    store.check_writable()
