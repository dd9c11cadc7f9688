"""What planning learned about each photo, kept in the store between runs, so a rerun over a big catalog does
not read, hash and decode every photo again: a photo whose size and modification time (an object store's
ETag) are what they were is taken from here. `PhotoFacts.load(store)` before planning, `save` after a run's
plan (never by `validate` or `--dry-run`, which write nothing).

Why this is safe: a concept's key hashes its photos' contents, so a stale entry (a file rewritten to the
same size within the same modification time) could keep an old key. Planning trusts the stat as make and
rsync do; a training task still reads every photo it trains on and refuses bytes whose sha256 is not the
planned one ("changed since the run was planned"), so a stale entry can never train on the wrong photo.
"""

from __future__ import annotations

import io
import logging
import os
from dataclasses import dataclass
from typing import Any

import fsspec
import pyarrow as pa
import pyarrow.parquet as pq

from pipeline.store import PHOTO_FACTS, Store

logger = logging.getLogger(__name__)
SCHEMA = pa.schema(
    [
        ("uri", pa.string()),
        ("mode", pa.string()),  # how it was decoded: RGB (an image) or L (a mask)
        ("stamp", pa.string()),  # size and modification time / ETag when it was read
        ("sha256", pa.string()),
        ("width", pa.int64()),
        ("height", pa.int64()),
        ("problem", pa.string()),  # why it cannot be decoded (perfusion/decoding.py's words), or null
    ]
)


@dataclass(frozen=True)
class Facts:
    """One photo as planning saw it: its content hash and its decoded size, or why it did not decode."""

    sha256: str
    width: int | None
    height: int | None
    problem: str | None


def stamp(uri: str) -> str | None:
    """Size and modification time (local: ns; an object store: its ETag or last-modified) of a file, or None
    when the filesystem gives neither: then the photo is always read."""
    if "://" not in uri or uri.startswith("file://"):
        try:
            info = os.stat(uri.removeprefix("file://"))
        except OSError:
            return None
        return f"{info.st_size}:{info.st_mtime_ns}"
    try:
        fs, path = fsspec.core.url_to_fs(uri)
        info = fs.info(path)
    except (OSError, ValueError):
        return None
    version = info.get("ETag") or info.get("etag") or info.get("LastModified") or info.get("mtime")
    return None if version is None or info.get("size") is None else f"{info['size']}:{version}"


class PhotoFacts:
    """(uri, mode) -> (stamp, Facts), loaded from and saved to the store's PHOTO_FACTS file."""

    def __init__(self, entries: dict[tuple[str, str], tuple[str, Facts]] | None = None) -> None:
        self.entries = entries or {}
        self.changed = False

    @classmethod
    def load(cls, store: Store) -> PhotoFacts:
        """The store's facts; none (every photo read) when there is no file yet or it cannot be read."""
        try:
            if not store.exists(PHOTO_FACTS):
                return cls()
            table = pq.read_table(io.BytesIO(store.read(PHOTO_FACTS)), schema=SCHEMA)
        except Exception as error:  # a damaged derived file costs a full read of the photos, nothing else
            logger.warning("plan: %s unusable (%s); reading every photo", PHOTO_FACTS, error)
            return cls()
        entries = {}
        for row in table.to_pylist():
            facts = Facts(row["sha256"], row["width"], row["height"], row["problem"])
            entries[(row["uri"], row["mode"])] = (row["stamp"], facts)
        return cls(entries)

    def get(self, uri: str, mode: str, current: str | None) -> Facts | None:
        """The photo's facts if it is unchanged since they were taken (same stamp), else None."""
        if current is None:
            return None
        known = self.entries.get((uri, mode))
        return known[1] if known is not None and known[0] == current else None

    def put(self, uri: str, mode: str, current: str | None, facts: Facts) -> None:
        if current is not None:
            self.entries[(uri, mode)] = (current, facts)
            self.changed = True

    def save(self, store: Store) -> None:
        """Write the facts back (one file, replaced whole) when this plan learned anything new."""
        if not self.changed:
            return
        rows: list[dict[str, Any]] = [
            {"uri": uri, "mode": mode, "stamp": stamped, **facts.__dict__}
            for (uri, mode), (stamped, facts) in sorted(self.entries.items())
        ]
        buffer = pa.BufferOutputStream()
        pq.write_table(pa.Table.from_pylist(rows, schema=SCHEMA), buffer)
        store.put(PHOTO_FACTS, buffer.getvalue().to_pybytes())
        self.changed = False
