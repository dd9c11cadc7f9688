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

import errno
import hashlib
import logging
import mimetypes
import os
import posixpath
import time
import uuid
from collections.abc import Callable
from dataclasses import dataclass
from typing import Any, TypeVar

import fsspec
from fsspec.implementations.local import LocalFileSystem

ROOT_ENV = "PERFUSION_BATCH_ROOT"
T = TypeVar("T")
logger = logging.getLogger(__name__)
SUPPORTED_PROTOCOLS = ("file", "local", "s3", "s3a", "gs", "gcs", "memory")


CONCEPTS_TABLE = "index/concepts"
CONCEPTS_LATEST = "index/concepts-latest.parquet"  # derived by `concepts compact` (pipeline/index.py)
PHOTO_FACTS = "plan/photos.parquet"  # what planning learned about each photo (pipeline/photo_facts.py)
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
    path: str = ""  # relative to the store root, e.g. concepts/<key>.safetensors: what index rows record


def sha256_hex(data: bytes) -> str:
    return hashlib.sha256(data).hexdigest()


def redact(uri: str) -> str:
    """A URI safe to print: any user:password@ part removed."""
    scheme, sep, rest = uri.partition("://")
    if sep and "@" in rest.split("/", 1)[0]:
        return f"{scheme}://{rest.split('@', 1)[1]}"
    return uri


STORAGE_RETRY_ENV = "PERFUSION_BATCH_STORAGE_RETRY_SECONDS"
STORAGE_RETRY_SECONDS = 90.0  # how long a storage outage is ridden out before an operation fails
_PERMANENT_OS_ERRORS = (FileNotFoundError, FileExistsError, PermissionError, IsADirectoryError, NotADirectoryError)
_TRANSIENT_NAMES = {
    "EndpointConnectionError", "ConnectTimeoutError", "ReadTimeoutError", "ConnectionClosedError",
    "ClientConnectorError", "ServerDisconnectedError", "ClientOSError", "ConnectionError", "TimeoutError",
}  # fmt: skip


def is_transient_storage_error(error: BaseException) -> bool:
    """A failure of the storage service or the way to it (connection refused or reset, a timeout, a 5xx),
    which the same call may pass later; never a missing file, a lost race, a permission, or bad input."""
    if isinstance(error, (*_PERMANENT_OS_ERRORS, StoreError)):
        return False
    if type(error).__name__ in _TRANSIENT_NAMES:
        return True
    if isinstance(error, OSError):
        return error.errno not in (errno.EACCES, errno.EPERM, errno.EROFS, errno.ENOSPC, errno.EEXIST, errno.ENOTDIR)
    text = str(error).lower()  # deltalake's object-store errors say it in words only
    return any(mark in text for mark in ("connection refused", "connection reset", "timed out", " 503", " 502"))


def with_storage_retries(call: Callable[[], T], what: str) -> T:
    """call(), retried with exponential backoff (0.5 s doubling to 8 s) while it fails transiently, for up
    to STORAGE_RETRY_SECONDS ($PERFUSION_BATCH_STORAGE_RETRY_SECONDS): a storage outage of a minute costs
    a pause, not the run. The last error is raised when the time is up."""
    budget = float(os.environ.get(STORAGE_RETRY_ENV, STORAGE_RETRY_SECONDS))
    deadline, delay = time.monotonic() + budget, 0.5
    while True:
        try:
            return call()
        except Exception as error:
            if not is_transient_storage_error(error) or time.monotonic() + delay > deadline:
                raise
            logger.warning("storage: %s failed (%s: %s); retrying in %.1f s", what, type(error).__name__, error, delay)
            time.sleep(delay)
            delay = min(delay * 2, 8.0)


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

    def leftovers(self, prefix: str, older_than_seconds: float) -> list[str]:
        """Relative names under `prefix` that a killed write left: hidden `.partial` files (local writes),
        untouched for `older_than_seconds` (a younger one may be a live write of a concurrent run)."""
        cutoff = time.time() - older_than_seconds
        return [
            name
            for name in self.list(prefix)
            if name.endswith(".partial") and self.fs.modified(self.path(name)).timestamp() < cutoff
        ]

    def age_seconds(self, relative: str) -> float:
        return time.time() - self.fs.modified(self.path(relative)).timestamp()

    def locate(self, recorded: str) -> str:
        """A file an index row records -> its path relative to this root. Rows record relative paths, so a
        store that is copied, restored or synced elsewhere keeps working; rows written before that recorded
        absolute URIs, which are read under this root by their layout part (concepts/..., renders/...) when
        they name another root."""
        if "://" not in recorded and not recorded.startswith("/"):
            self.path(recorded)  # refuses a path that would leave the root
            return recorded
        try:
            return self.relative(recorded)
        except StoreError:
            for top in ("concepts/", "renders/", "covariance/"):
                at = recorded.rfind("/" + top)
                if at >= 0:
                    moved = recorded[at + 1 :]
                    self.path(moved)
                    return moved
            raise

    # -- reads -----------------------------------------------------------------------------------------

    def exists(self, relative: str) -> bool:
        path = self.path(relative)
        return bool(with_storage_retries(lambda: self.fs.exists(path), f"checking {redact(self.uri(relative))}"))

    def read(self, relative: str, sha256: str | None = None) -> bytes:
        path = self.path(relative)
        data: bytes = with_storage_retries(lambda: self.fs.cat_file(path), f"reading {redact(self.uri(relative))}")
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
        names = sorted(self.relative(str(p)) for p in self.fs.find(base))
        # Object-store filesystems cache listings per process; other processes (Ray workers) write here,
        # and a stale listing would later say a file they wrote does not exist.
        self.fs.invalidate_cache(base)
        return names

    # -- writes ----------------------------------------------------------------------------------------

    def write_once(self, relative: str, data: bytes) -> Artifact:
        """Create `relative` with `data`; FileExistsError if it exists (never overwrites)."""
        path = self.path(relative)
        if self.local:
            self._write_local_once(path, data)
        else:
            with_storage_retries(lambda: self._put_once(path, relative, data), f"writing {redact(self.uri(relative))}")
        return Artifact(self.uri(relative), sha256_hex(data), len(data), relative)

    def _put_once(self, path: str, relative: str, data: bytes) -> None:
        if self.fs.exists(path):
            raise FileExistsError(self.uri(relative))
        # One PUT: the object appears whole or not at all. mode "xb" asks stores that support conditional
        # writes (If-None-Match) to refuse an object created since the check above.
        with self.fs.open(path, "xb", **self._content_type(relative)) as handle:
            handle.write(data)

    def _content_type(self, relative: str) -> dict[str, str]:
        """The object's Content-Type for object stores, so a browser shows a PNG or an HTML page rather than
        downloading `binary/octet-stream`; {} for local folders and unknown suffixes."""
        kind = mimetypes.guess_type(relative)[0] or (
            "application/octet-stream" if relative.endswith(".safetensors") else None
        )
        if kind is None or self.local:
            return {}
        return {"ContentType": kind} if self.protocol in ("s3", "s3a") else {"content_type": kind}

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
            kind = self._content_type(relative)
            with_storage_retries(lambda: self.fs.pipe_file(path, data, **kind), f"writing {redact(self.uri(relative))}")
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
        """Write and remove a probe object, in seconds and before any work (no retries: an outage now is the
        environment's problem); StoreError naming the root, the cause and the fix if that fails (a read-only
        folder, missing credentials, an unreachable endpoint)."""
        probe = self.path(f".probe-{uuid.uuid4().hex}")
        try:
            if self.local:
                self._write_local_once(probe, b"ok")
            else:
                self.fs.pipe_file(probe, b"ok")
            self.fs.rm_file(probe)
        except Exception as error:
            raise StoreError(f"storage root {redact(self.root)} is not writable: {storage_problem(error)}") from None

    def check_readable(self) -> None:
        """List the root (planning writes nothing, but reads the index): StoreError naming the root and the fix."""
        try:
            self.fs.exists(self.path("index"))
        except Exception as error:
            raise StoreError(f"storage root {redact(self.root)} cannot be read: {storage_problem(error)}") from None


def storage_problem(error: BaseException) -> str:
    """One line for a storage failure, with what to set or check: the one place that knows the messages of
    the filesystems' errors (botocore's, gcsfs', the OS's)."""
    kind = type(error).__name__
    text = str(error).strip().splitlines()[0] if str(error).strip() else kind
    if kind in {"NoCredentialsError", "PartialCredentialsError"} or "Unable to locate credentials" in text:
        return (
            "no credentials found: set AWS_ACCESS_KEY_ID and AWS_SECRET_ACCESS_KEY (or AWS_PROFILE) in the "
            "environment of this process and of the Ray workers"
        )
    if kind in {"EndpointConnectionError", "ConnectTimeoutError", "ConnectionError", "ClientConnectorError"} or (
        "Could not connect to the endpoint" in text or "Cannot connect to host" in text
    ):
        return f"the storage endpoint cannot be reached ({text}): check AWS_ENDPOINT_URL and the network"
    if kind in {"InvalidAccessKeyId", "SignatureDoesNotMatch"} or "AccessDenied" in text or "Forbidden" in text:
        return f"access denied ({text}): check the credentials and that they may write under this root"
    if "NoSuchBucket" in text or "bucket does not exist" in text.lower():
        return f"the bucket does not exist ({text}): create it or fix the root URI"
    if isinstance(error, OSError) and error.errno in (errno.EACCES, errno.EPERM, errno.EROFS):
        return f"permission denied or read-only ({error.strerror or text}): pick a root you may write, or fix it"
    if isinstance(error, OSError) and error.errno in (errno.EEXIST, errno.ENOTDIR):
        return f"a file stands where a folder should be ({error.filename or text}): move it, or pick another root"
    if isinstance(error, OSError) and error.errno == errno.ENOSPC:
        return "the disk is full: free space under the root or pick another"
    return f"{kind}: {text}"
