"""What every Ray worker shares, training task or renderer actor: its base model, the store's C^-1 for it,
the check that it is the base the run planned, and the retry decision.

- `worker_base(spec)`: the base model, loaded once per worker process (one at a time: a GPU has room for
  one UNet), so a GPU that trains 500 concepts or renders 10,000 images loads the UNet once.
- `prepare_base(spec, root)`: the base's fingerprint, vocabulary and C^-1 file (estimated once per base and
  stored under covariance/{fingerprint}); planning passes write=False and stores nothing.
  `prepare_zero_shot(spec)`: the same for the zero-shot base (no C^-1), refused unless it can serve.
- `planned_base(spec, fingerprint)`: the worker's base, refused if its weights are not the ones planned.
- `is_transient(error)`: the one retry decision. Bad input (a PerfusionError, a ValueError, a file that
  fails its checksum) fails the same way every time: terminal, recorded with its message. Anything else
  (storage or network trouble, a device error) may pass on another try: transient, retried. Training
  raises a transient error as TransientError, which Ray retries (retry_exceptions); rendering retries a
  transient row once in its actor.
"""

from __future__ import annotations

import contextlib
import platform
from dataclasses import dataclass, field
from typing import Any

from pipeline.store import ChecksumError, Store, covariance_file, sha256_hex


class TransientError(Exception):
    """A failure another try may fix. Raised with one message argument, so it pickles across Ray processes."""


def is_transient(error: BaseException) -> bool:
    """True when retrying may help (see the module notes); False for bad input."""
    import perfusion

    if isinstance(error, TransientError):
        return True
    return not isinstance(error, perfusion.PerfusionError | ValueError | ChecksumError | FileNotFoundError)


def describe(error: BaseException) -> str:
    """An error as a row's message: a domain error's own words, anything else with its type."""
    import perfusion

    if isinstance(error, perfusion.PerfusionError | TransientError):
        return str(error)
    return f"{type(error).__name__}: {error}"


@dataclass(frozen=True)
class BaseInfo:
    """What planning learns from a worker about the base model (small and picklable)."""

    fingerprint: str
    vocabulary: frozenset[str]  # the base tokenizer's words (concept tokens must not collide)
    covariance: str  # its file under the store root
    covariance_sha256: str  # '' when planning found none stored yet (prepare_base(write=False))
    device: str
    resolution_step: int = 8  # sizes it trains and samples at are multiples of this (BaseModel.resolution_step)
    superclass_pieces: dict[str, tuple[str, ...]] = field(default_factory=dict)  # phrase -> its tokenizer pieces


_BASES: dict[str, Any] = {}  # spec -> perfusion.BaseModel; one per worker process


def device_name() -> str:
    import torch

    return "cuda" if torch.cuda.is_available() else "cpu"


def worker_label() -> str:
    """Where a row was made, for the index's device column: cuda@host or cpu@host."""
    return f"{device_name()}@{platform.node()}"


def worker_base(spec: str) -> Any:
    """The base model for `spec`, loaded once per worker process (fp16 on a GPU, fp32 on CPU)."""
    if spec not in _BASES:
        import torch

        import perfusion

        _BASES.clear()  # one base per process: a GPU has room for one UNet, not every base ever used
        cuda = torch.cuda.is_available()
        _BASES[spec] = perfusion.load_base(
            spec, device="cuda" if cuda else "cpu", dtype=torch.float16 if cuda else None
        )
    return _BASES[spec]


def planned_base(spec: str, fingerprint: str) -> Any:
    """The worker's base model, refused (BaseModelError, terminal) unless it is the one the run planned."""
    import perfusion

    base = worker_base(spec)
    if base.fingerprint != fingerprint:
        raise perfusion.BaseModelError(
            f"base model {spec!r} on this worker has fingerprint {base.fingerprint[:12]}, the run planned "
            f"{fingerprint[:12]}: every worker must see the same weights"
        )
    return base


def tokenizer_pieces(tokenizer: Any, phrases: tuple[str, ...]) -> dict[str, tuple[str, ...]]:
    """How the tokenizer splits each phrase (no BOS/EOS): key locking reads the phrase's encoding, which is
    meaningful when each word is one token the encoder learned."""
    return {p: tuple(tokenizer.tokenize(p.strip())) for p in phrases}


def prepare_base(spec: str, root: str, write: bool = True, superclasses: tuple[str, ...] = ()) -> BaseInfo:
    """Load the base model, and find its covariance in the store or estimate it once and store it.
    write=False (planning: validate, --dry-run) stores nothing: a covariance not stored yet has sha256 ''.
    `superclasses`: phrases whose tokenizer pieces the plan checks (BaseInfo.superclass_pieces)."""
    import dataclasses

    info = _prepare_base(spec, root, write)
    return dataclasses.replace(info, superclass_pieces=tokenizer_pieces(worker_base(spec).tokenizer, superclasses))


def _prepare_base(spec: str, root: str, write: bool) -> BaseInfo:
    import perfusion

    base = worker_base(spec)
    store = Store(root)
    relative = covariance_file(base.fingerprint)
    tokenizer = base.tokenizer
    base_words = frozenset(w for w, i in tokenizer.get_vocab().items() if i < tokenizer.vocab_size)
    if not store.exists(relative):
        if not write:
            return BaseInfo(base.fingerprint, base_words, relative, "", device_name(), base.resolution_step)
        data = perfusion.covariance_to_bytes(perfusion.estimate_covariance(base))
        # Another run may have stored it first: then use theirs (same base, same C up to float rounding).
        with contextlib.suppress(FileExistsError):
            store.write_once(relative, data)
    data = store.read(relative)
    perfusion.covariance_from_bytes(data, base.fingerprint, label=store.uri(relative))  # validate it
    return BaseInfo(base.fingerprint, base_words, relative, sha256_hex(data), device_name(), base.resolution_step)


def prepare_zero_shot(spec: str) -> BaseInfo:
    """The zero-shot base's identity (no C^-1: nothing is trained on it); BaseModelError, before any work,
    when it cannot onboard or render zero-shot products (a UNet base, or an MM-DiT without an adapter)."""
    import perfusion
    from perfusion.zero_shot import kit_of

    base = worker_base(spec)
    try:
        kit_of(base, "(every zero-shot product)")
    except perfusion.BaseModelError as error:
        raise perfusion.BaseModelError(f"zero_shot.base_model {spec!r}: {error}") from None
    tokenizer = base.tokenizer
    words = frozenset(w for w, i in tokenizer.get_vocab().items() if i < tokenizer.vocab_size)
    return BaseInfo(base.fingerprint, words, "", "", device_name(), base.resolution_step)


def stored_covariance(store: Store, base: Any, relative: str, sha256: str) -> Any:
    """The base's C^-1 from the store, checked against the checksum the run planned with."""
    import perfusion

    data = store.read(relative, sha256)
    return perfusion.covariance_from_bytes(data, base.fingerprint, label=store.uri(relative))
