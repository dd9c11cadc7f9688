"""Claims on work, so two runs on one store never do the same work twice.

    leases/{name}.json    {"run": <run id>, "expires": <unix seconds>}

A run claims a piece of work (a concept key it trains, a render job it renders) by creating its lease
object create-only (Store.write_once: of two runs racing, exactly one succeeds); the other sees the lease
and skips that work. The holder renews its leases while it works (`renew`, every RENEW_SECONDS) and removes
them when its rows are committed (`release`). A run that dies stops renewing: its leases expire after
LEASE_SECONDS and the next run takes the work over. Nothing here is trusted for correctness beyond
"mostly once": a run that stalls past its lease can overlap the next one, and the index's skip-if-done keys
still keep the result right (an extra attempt row, never a lost or wrong one).
"""

from __future__ import annotations

import contextlib
import json
import threading
import time
import uuid
from collections.abc import Iterator
from dataclasses import dataclass, field

from pipeline.store import Store

LEASE_SECONDS = 300.0  # a lease not renewed for this long belongs to a run that died
RENEW_SECONDS = 60.0


def lease_file(name: str) -> str:
    return f"leases/{name}.json"


@dataclass
class Leases:
    """The leases one run holds on a store."""

    store: Store
    run: str = field(default_factory=lambda: uuid.uuid4().hex[:12])
    held: set[str] = field(default_factory=set)
    renewed: float = field(default_factory=time.monotonic)

    def claim(self, name: str) -> str | None:
        """Take the lease on `name`: None when this run holds it now, else who holds it ("run ab12, 4 min
        left") and the work should be left to them."""
        record = json.dumps({"run": self.run, "expires": time.time() + LEASE_SECONDS}).encode()
        try:
            self.store.write_once(lease_file(name), record)
        except FileExistsError:
            holder = self._holder(name)
            if holder is not None:
                return holder
            with contextlib.suppress(FileNotFoundError):  # expired: the run that held it is gone
                self.store.remove(lease_file(name))
            try:
                self.store.write_once(lease_file(name), record)
            except FileExistsError:  # another run took it over first
                return self._holder(name) or "another run"
        self.held.add(name)
        return None

    def _holder(self, name: str) -> str | None:
        """Who holds a live lease on `name`, or None when it has expired (or vanished, or is unreadable)."""
        try:
            lease = json.loads(self.store.read(lease_file(name)))
            left = float(lease["expires"]) - time.time()
            run = str(lease["run"])
        except (FileNotFoundError, ValueError, KeyError, TypeError):
            return None
        return f"run {run}, {left / 60:.0f} min left on its lease" if left > 0 else None

    def renew(self, force: bool = False) -> None:
        """Push the expiry of every held lease forward (at most every RENEW_SECONDS unless `force`)."""
        if not force and time.monotonic() - self.renewed < RENEW_SECONDS:
            return
        self.renewed = time.monotonic()
        record = json.dumps({"run": self.run, "expires": time.time() + LEASE_SECONDS}).encode()
        for name in self.held:
            self.store.put(lease_file(name), record)

    @contextlib.contextmanager
    def kept_alive(self) -> Iterator[None]:
        """Renew the held leases from a background thread while the body runs (a render whose driver waits
        on Ray Data, not in a loop of its own)."""
        stop = threading.Event()

        def renew_until_stopped() -> None:
            while not stop.wait(RENEW_SECONDS):
                with contextlib.suppress(Exception):  # a missed renewal is retried; the lease has slack
                    self.renew(force=True)

        thread = threading.Thread(target=renew_until_stopped, name="lease-renewal", daemon=True)
        thread.start()
        try:
            yield
        finally:
            stop.set()
            thread.join(timeout=5)

    def release(self, names: set[str] | None = None) -> None:
        """Give up `names` (default: all held) once their rows are committed."""
        for name in list(self.held if names is None else names & self.held):
            with contextlib.suppress(FileNotFoundError):
                self.store.remove(lease_file(name))
            self.held.discard(name)
