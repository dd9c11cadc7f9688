"""The artifact store: one root URI through fsspec (local folder, file://, s3://, gs://), create-only writes.

Layout under the root (ARCHITECTURE.md); the functions below are the only place that spells it:

    concepts/{concept_key}.safetensors            one file per trained concept, content-addressed by its inputs
    concepts/{concept_key}.{attempt}.safetensors  a forced retraining (--force): beside the old file, never over it
    covariance/{fingerprint}.safetensors          C and the Cholesky factor of C^-1, once per base model
    index/concepts/                               the Delta table of training attempts (pipeline/index.py)
    index/renders/                                the Delta table of rendered images
    renders/{render_id}.png                       rendered images
    renders/sheets/{job}.png, {job}.html          a contact sheet and a page per render job, rebuilt each run

Artifacts are immutable: written create-only, so two writers racing on one key cannot clobber each other,
and a reader never sees half a file (local: write a temporary file, then hard-link it into place, which
fails if the name exists; object stores: a single PUT is atomic). Every write returns the sha256 that the
index records and that readers verify.

Credentials come from the environment as usual for each filesystem (AWS_ACCESS_KEY_ID, AWS_ENDPOINT_URL,
GOOGLE_APPLICATION_CREDENTIALS, ...); they are never written into artifacts, the index or the logs.
"""

from __future__ import annotations

import hashlib
import os
import posixpath
import uuid
from dataclasses import dataclass
from typing import Any

import fsspec
from fsspec.implementations.local import LocalFileSystem

ROOT_ENV = "PERFUSION_BATCH_ROOT"
SUPPORTED_PROTOCOLS = ("file", "local", "s3", "s3a", "gs", "gcs", "memory")


CONCEPTS_TABLE = "index/concepts"
RENDERS_TABLE = "index/renders"


def concept_file(concept_key: str, attempt: str | None = None) -> str:
    return f"concepts/{concept_key}.{attempt[:8]}.safetensors" if attempt else f"concepts/{concept_key}.safetensors"


def covariance_file(fingerprint: str) -> str:
    return f"covariance/{fingerprint}.safetensors"


def render_file(render_id: str) -> str:
    return f"renders/{render_id}.png"


def sheet_files(job: str) -> tuple[str, str]:
    """(contact sheet PNG, HTML page) of a render job; the page links images as ../{render_id}.png."""
    return f"renders/sheets/{job}.png", f"renders/sheets/{job}.html"


class StoreError(Exception):
    """A storage problem: an unusable root URI, an artifact that fails its checksum, a write that lost a race."""


class ChecksumError(StoreError):
    pass


@dataclass(frozen=True)
class Artifact:
    uri: str  # full URI, e.g. s3://bucket/catalog/concepts/<key>.safetensors
    sha256: str
    bytes: int


def sha256_hex(data: bytes) -> str:
    return hashlib.sha256(data).hexdigest()


def redact(uri: str) -> str:
    """A URI safe to print: any user:password@ part removed."""
    scheme, sep, rest = uri.partition("://")
    if sep and "@" in rest.split("/", 1)[0]:
        return f"{scheme}://{rest.split('@', 1)[1]}"
    return uri


class Store:
    def __init__(self, root: str, storage_options: dict[str, Any] | None = None) -> None:
        root = root.rstrip("/") or "/"
        protocol = root.split("://", 1)[0] if "://" in root else "file"
        if protocol not in SUPPORTED_PROTOCOLS:
            raise StoreError(
                f"storage root {redact(root)!r}: unsupported scheme {protocol!r}; use a local folder, file://, "
                "s3:// or gs://"
            )
        if "://" in root and "@" in root.split("://", 1)[1].split("/", 1)[0]:
            raise StoreError(
                f"storage root {redact(root)!r}: credentials in the URI are not allowed (they would end up in "
                "logs and the index); set them in the environment, e.g. AWS_ACCESS_KEY_ID"
            )
        try:
            self.fs, path = fsspec.core.url_to_fs(root, **(storage_options or {}))
        except (ImportError, ValueError) as error:
            raise StoreError(f"storage root {redact(root)!r}: {error}") from None
        self.local = isinstance(self.fs, LocalFileSystem)
        self.root_path = os.path.abspath(path) if self.local else path.rstrip("/")
        self.root = self.root_path if self.local else self.fs.unstrip_protocol(self.root_path)
        self.protocol = "file" if self.local else protocol

    def __repr__(self) -> str:
        return f"Store({self.root!r})"

    # -- names -----------------------------------------------------------------------------------------

    def path(self, relative: str) -> str:
        """The filesystem path of `relative` under the root; refuses anything that would leave the root."""
        normal = posixpath.normpath(relative)
        if normal.startswith(("../", "/")) or normal in {"..", "."} or "\\" in relative:
            raise StoreError(f"{relative!r} would leave the storage root")
        return f"{self.root_path.rstrip('/')}/{normal}"

    def uri(self, relative: str) -> str:
        path = self.path(relative)
        return path if self.local else str(self.fs.unstrip_protocol(path))

    def relative(self, uri: str) -> str:
        """Inverse of uri(): the part under the root."""
        path = str(self.fs._strip_protocol(uri))
        prefix = self.root_path.rstrip("/") + "/"
        if not path.startswith(prefix):
            raise StoreError(f"{redact(uri)} is not under the storage root {self.root}")
        return path[len(prefix) :]

    # -- reads -----------------------------------------------------------------------------------------

    def exists(self, relative: str) -> bool:
        return bool(self.fs.exists(self.path(relative)))

    def read(self, relative: str, sha256: str | None = None) -> bytes:
        data: bytes = self.fs.cat_file(self.path(relative))
        if sha256 is not None and sha256_hex(data) != sha256:
            raise ChecksumError(
                f"{redact(self.uri(relative))}: checksum mismatch (expected sha256 {sha256[:12]}..., got "
                f"{sha256_hex(data)[:12]}...): the file was changed or damaged after it was written; retrain the "
                "concept (perfusion-batch train --force --only NAME)"
            )
        return data

    def list(self, prefix: str) -> list[str]:
        """Relative names of the files under `prefix` (recursive), sorted."""
        base = self.path(prefix)
        if not self.fs.exists(base):
            return []
        return sorted(self.relative(str(p)) for p in self.fs.find(base))

    # -- writes ----------------------------------------------------------------------------------------

    def write_once(self, relative: str, data: bytes) -> Artifact:
        """Create `relative` with `data`; FileExistsError if it exists (never overwrites)."""
        path = self.path(relative)
        if self.local:
            self._write_local_once(path, data)
        else:
            if self.fs.exists(path):
                raise FileExistsError(self.uri(relative))
            # One PUT: the object appears whole or not at all. mode "xb" asks stores that support conditional
            # writes (If-None-Match) to refuse an object created since the check above.
            with self.fs.open(path, "xb") as handle:
                handle.write(data)
        return Artifact(self.uri(relative), sha256_hex(data), len(data))

    def put(self, relative: str, data: bytes) -> str:
        """Write or replace a derived file that is not an artifact (a contact sheet: rebuilt from the index
        on every run, never referenced by a row); returns its URI. Artifacts use write_once."""
        path = self.path(relative)
        if self.local:
            os.makedirs(os.path.dirname(path), exist_ok=True)
            partial = f"{path}.{uuid.uuid4().hex}.partial"
            with open(partial, "wb") as handle:
                handle.write(data)
            os.replace(partial, path)  # readers see the old file or the new one, never half of one
        else:
            self.fs.pipe_file(path, data)
        return self.uri(relative)

    def remove(self, relative: str) -> None:
        """Delete one artifact (only for a damaged file that blocks a retry: see pipeline/train.py)."""
        self.fs.rm_file(self.path(relative))

    def _write_local_once(self, path: str, data: bytes) -> None:
        directory = os.path.dirname(path)
        os.makedirs(directory, exist_ok=True)
        partial = os.path.join(directory, f".{os.path.basename(path)}.{uuid.uuid4().hex}.partial")
        with open(partial, "xb") as handle:
            handle.write(data)
            handle.flush()
            os.fsync(handle.fileno())
        try:
            os.link(partial, path)  # atomic, and fails if `path` exists: create-only without a window
        finally:
            os.unlink(partial)

    def check_writable(self) -> None:
        """Write and remove a probe object; StoreError naming the root and the cause if that fails."""
        probe = f".probe-{uuid.uuid4().hex}"
        try:
            self.write_once(probe, b"ok")
            self.remove(probe)
        except Exception as error:
            raise StoreError(f"storage root {redact(self.root)} is not writable: {error}") from None
