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


def test_storage_failures_become_one_line_with_the_fix():
    import errno

    from botocore.exceptions import EndpointConnectionError, NoCredentialsError

    from pipeline.store import storage_problem

    assert storage_problem(NoCredentialsError()).startswith("no credentials found: set AWS_ACCESS_KEY_ID")
    unreachable = storage_problem(EndpointConnectionError(endpoint_url="http://minio:9000/b"))
    assert "cannot be reached" in unreachable and "check AWS_ENDPOINT_URL" in unreachable
    assert "read-only" in storage_problem(OSError(errno.EROFS, "Read-only file system"))
    assert storage_problem(OSError(errno.ENOSPC, "No space left on device")).startswith("the disk is full")


def test_an_unusable_root_fails_in_seconds_before_any_work(tmp_path):
    import time

    from typer.testing import CliRunner

    from pipeline.cli import app
    from tests.pipeline.conftest import write_catalog

    not_a_folder = tmp_path / "store"
    not_a_folder.write_text("a file where the root folder should be")
    with pytest.raises(StoreError, match="is not writable: a file stands where a folder should be"):
        Store(str(not_a_folder)).check_writable()
    manifest = write_catalog(tmp_path / "shop", str(not_a_folder), names=("mug",))
    started = time.perf_counter()
    result = CliRunner().invoke(app, ["train", str(manifest)])
    assert result.exit_code == 2, result.output
    assert f"error: storage root {not_a_folder} is not writable" in result.output
    assert "preparing base model" not in result.output and "Traceback" not in result.output
    assert time.perf_counter() - started < 20  # no base model loaded, no covariance estimated


def test_a_storage_outage_is_waited_out_with_backoff(tmp_path, monkeypatch):
    import pipeline.store as store_module

    store = Store(str(tmp_path))
    store.write_once("concepts/a.safetensors", b"data")
    waits: list[float] = []
    monkeypatch.setattr(store_module.time, "sleep", waits.append)
    real_cat = store.fs.cat_file
    failures = iter([ConnectionRefusedError(111, "Connection refused")] * 4)

    def flaky_cat(path, *args, **kwargs):
        failure = next(failures, None)
        if failure is not None:
            raise failure
        return real_cat(path, *args, **kwargs)

    monkeypatch.setattr(store.fs, "cat_file", flaky_cat)
    assert store.read("concepts/a.safetensors") == b"data"
    assert waits == [0.5, 1.0, 2.0, 4.0]  # exponential backoff, then the read went through
    monkeypatch.setenv(store_module.STORAGE_RETRY_ENV, "2")  # an outage longer than the budget fails the call
    failures = iter([ConnectionRefusedError(111, "Connection refused")] * 10)
    with pytest.raises(ConnectionRefusedError):
        store.read("concepts/a.safetensors")
    assert waits[4:] == [0.5, 1.0]  # a 2 s budget: the next wait (2 s) would pass it
    failures = iter([])
    with pytest.raises(FileNotFoundError):  # never retried: a missing file stays missing
        store.read("concepts/missing.safetensors")
    assert len(waits) == 6
