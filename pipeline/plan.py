"""From a validated manifest to a training plan: images found and decoded, content hashes, concept keys.

Everything here runs before any training starts. A problem of the catalog as a whole (a token the base
model already knows) stops everything with every problem listed (pipeline.manifest.ManifestError). A problem
of one concept's files (an image missing or corrupt) is that concept's alone: it is planned as failed, with
its problems, so the run trains the others and records the failure (retrying cannot fix a corrupt image).

    concept_key = sha256(normalised concept spec, image and mask content hashes, merged training config,
                         base-model fingerprint, method version)[:32]

Same inputs -> same key -> nothing retrained; change one image, one setting or the base model and only
that concept's key changes. Tags are left out on purpose: relabelling a product retrains nothing.
"""

from __future__ import annotations

import dataclasses
import functools
import glob as globlib
import hashlib
import json
from dataclasses import dataclass
from typing import Any

import fsspec

from perfusion.config import SelectConfig, resolution_problem
from perfusion.decoding import UnusableImage, decode_picture  # Pillow and numpy: no torch on the driver
from pipeline.manifest import ConceptSpec, Manifest, ManifestError, Problem, selection_path
from pipeline.photo_facts import Facts, PhotoFacts, stamp
from pipeline.store import concept_file

IMAGE_SUFFIXES = (".png", ".jpg", ".jpeg", ".webp", ".bmp")
GLOB_CHARS = set("*?[")


@dataclass(frozen=True)
class ImageFile:
    """An image named by the manifest. The bytes are not kept: a training task reads them itself (on a
    cluster, straight from object storage) and checks them against this hash."""

    uri: str
    sha256: str


@dataclass(frozen=True)
class PlannedConcept:
    spec: ConceptSpec
    index: int  # position in the manifest, for error paths
    images: tuple[ImageFile, ...]
    masks: tuple[ImageFile, ...] | None
    training: dict[str, Any]  # merged TrainConfig overrides
    concept_key: str
    problems: tuple[Problem, ...] = ()  # non-empty: cannot train until the files are fixed
    selection: SelectConfig | None = None  # how its operating point is chosen (training.select); None: not
    notes: tuple[str, ...] = ()  # warnings that do not stop it (a superclass the tokenizer splits, a retrain)

    @property
    def ready(self) -> bool:
        return not self.problems

    @property
    def name(self) -> str:
        return self.spec.name

    @property
    def file(self) -> str:
        """Where the concept file lives, relative to the store root."""
        return concept_file(self.concept_key)


def expand(manifest: Manifest, pattern: str) -> list[str]:
    """A manifest image entry (path, URI or glob) -> the sorted URIs it names."""
    uri = manifest.resolve(pattern)
    if not GLOB_CHARS.intersection(uri):
        return [uri]
    if "://" not in uri:
        return sorted(p for p in globlib.glob(uri, recursive=True) if p.lower().endswith(IMAGE_SUFFIXES))
    fs, _ = fsspec.core.url_to_fs(uri)
    protocol = uri.split("://", 1)[0]
    return sorted(f"{protocol}://{p}" for p in fs.glob(uri) if str(p).lower().endswith(IMAGE_SUFFIXES))


def read_image(uri: str) -> bytes:
    with fsspec.open(uri, "rb") as handle:
        data: bytes = handle.read()
    return data


def check_image(data: bytes, mode: str = "RGB") -> tuple[int, int]:
    """Decode fully, by the rules training decodes with (perfusion/decoding.py), so a truncated, animated or
    bomb file fails here, not mid-training; returns (width, height). UnusableImage saying what is wrong."""
    return decode_picture(data, mode).size


def load_images(
    manifest: Manifest, spec: ConceptSpec, index: int, kind: str, known: PhotoFacts | None = None
) -> tuple[list[ImageFile], list[Problem]]:
    """Every photo (or mask) of a concept, hashed and checked to decode; a photo `known` has seen unchanged
    (same size and modification time) is taken from there instead of read again."""
    entries = spec.images if kind == "images" else (spec.masks or [])
    mode = "RGB" if kind == "images" else "L"
    files: list[ImageFile] = []
    problems: list[Problem] = []
    for position, entry in enumerate(entries):
        at = functools.partial(manifest.concept_path, index, f"{kind}[{position}]")  # made for problems only
        try:
            uris = expand(manifest, entry)
        except Exception as error:
            problems.append(Problem(at(), f"cannot list {entry!r}: {error}"))
            continue
        if not uris:
            problems.append(
                Problem(at(), f"no image file matches {entry!r} (relative paths start at the manifest's folder)")
            )
        for uri in uris:
            current = stamp(uri) if known is not None else None
            facts = known.get(uri, mode, current) if known is not None else None
            if facts is None:
                try:
                    facts = photo_facts(read_image(uri), mode)
                except FileNotFoundError:
                    problems.append(Problem(at(), f"file not found: {uri}"))
                    continue
                except Exception as error:
                    problems.append(Problem(at(), f"cannot read {uri}: {error}"))
                    continue
                if known is not None:
                    known.put(uri, mode, current, facts)
            # Hashed even when it does not decode: fixing the file changes the concept key.
            files.append(ImageFile(uri, facts.sha256))
            if facts.problem is not None:
                problems.append(Problem(at(), f"{uri} {facts.problem}"))
            elif facts.width is not None and facts.height is not None and min(facts.width, facts.height) < 8:
                problems.append(Problem(at(), f"{uri} is {facts.width}x{facts.height}: too small to learn from"))
    return files, problems


def photo_facts(data: bytes, mode: str) -> Facts:
    """A photo's content hash and decoded size, or why it does not decode (perfusion/decoding.py's rules)."""
    sha256 = hashlib.sha256(data).hexdigest()
    try:
        width, height = check_image(data, mode)
    except UnusableImage as error:
        return Facts(sha256, None, None, str(error))
    return Facts(sha256, width, height, None)


def concept_key(
    spec: ConceptSpec,
    images: list[ImageFile],
    masks: list[ImageFile] | None,
    training: dict[str, Any],
    fingerprint: str,
    method_version: str,
    selection: SelectConfig | None = None,
) -> str:
    payload: dict[str, Any] = {
        "name": spec.name,
        "token": spec.concept_token,
        "superclass": spec.superclass.strip(),
        "images": [f.sha256 for f in images],
        "masks": [f.sha256 for f in masks] if masks is not None else None,
        "training": dict(sorted(training.items())),
        "fingerprint": fingerprint,
        "method_version": method_version,
    }
    if selection is not None:  # absent rather than null: concepts without selection keep their keys
        payload["selection"] = dataclasses.asdict(selection)
    return hashlib.sha256(json.dumps(payload, sort_keys=True).encode()).hexdigest()[:32]


def build_plan(
    manifest: Manifest,
    fingerprint: str,
    vocabulary: set[str] | None = None,
    zero_shot_fingerprint: str = "",
    known: PhotoFacts | None = None,
) -> list[PlannedConcept]:
    """Every concept of the manifest, planned (file problems per concept); ManifestError for catalog problems.
    A zero-shot product's key takes the zero-shot base's fingerprint, and its token is never added to a
    tokenizer (its prompts say its superclass), so no vocabulary check applies to it. `known`: photos seen
    by earlier runs (pipeline/photo_facts.py), updated with the ones read now."""
    from perfusion.methods import method_for

    catalog_problems: list[Problem] = []
    planned: list[PlannedConcept] = []
    checked: dict[str, str | None] = {}  # CLIP folder -> its problem (each folder checked once)
    for index, spec in enumerate(manifest.concepts):
        token = spec.concept_token
        zero_shot = manifest.is_zero_shot(spec)
        if not zero_shot and vocabulary is not None and (token in vocabulary or token + "</w>" in vocabulary):
            catalog_problems.append(
                Problem(
                    manifest.concept_path(index, "token"),
                    f"{token!r} is already a word of the base model's vocabulary: pick a token it does not know, "
                    f"e.g. '<{spec.name}-1>'",
                )
            )
        images, problems = load_images(manifest, spec, index, "images", known)
        image_problems = list(problems)
        masks: list[ImageFile] | None = None
        if spec.masks is not None:
            masks, mask_problems = load_images(manifest, spec, index, "masks", known)
            problems += mask_problems
            if not mask_problems and not image_problems and len(masks) != len(images):
                problems.append(
                    Problem(
                        manifest.concept_path(index, "masks"),
                        f"{len(masks)} mask(s) for {len(images)} image(s): give one mask per image, in the same "
                        "(sorted) order, or no masks",
                    )
                )
        training = manifest.training_config(spec)
        selection = manifest.selection(spec)
        if selection is not None and selection.clip_folder is not None:
            found = _clip_folder_problems(manifest, selection.clip_folder, spec, index, checked)
            catalog_problems += [p for p in found if p not in catalog_problems]  # a catalog block's: once
        base = zero_shot_fingerprint if zero_shot else fingerprint
        key = concept_key(spec, images, masks, training, base, method_for(training).version, selection)
        planned.append(
            PlannedConcept(
                spec, index, tuple(images), tuple(masks) if masks else None, training, key, tuple(problems), selection
            )
        )
    if catalog_problems:
        raise ManifestError(manifest.source, catalog_problems)
    return planned


def _clip_folder_problems(
    manifest: Manifest, folder: str, spec: ConceptSpec, index: int, checked: dict[str, str | None]
) -> list[Problem]:
    """A clip:<folder> scorer that is not a usable CLIP folder, as a catalog problem (before any training)."""
    if folder not in checked:
        from perfusion.clip_scoring import ClipFolderError, check_clip_folder  # imports torch: only when used

        try:
            check_clip_folder(folder)
            checked[folder] = None
        except ClipFolderError as error:
            checked[folder] = f"{error} (a scorer is 'clip:<folder>', the folder relative to the manifest's)"
    problem = checked[folder]
    if problem is None:
        return []
    return [Problem(selection_path(spec, functools.partial(manifest.concept_path, index), "scorer"), problem)]


def check_against_base(manifest: Manifest, plan: list[PlannedConcept], base: Any) -> list[PlannedConcept]:
    """What the base model (a worker.BaseInfo) decides about the trained concepts: a training resolution off
    its latent grid (a catalog problem: ManifestError), and a superclass phrase its tokenizer splits into
    more pieces than words (a note: key locking reads the encoding of pieces the encoder may barely know)."""
    problems: list[Problem] = []
    checked = []
    for item in plan:
        if manifest.is_zero_shot(item.spec):
            checked.append(item)
            continue
        resolution = item.training.get("resolution")
        wrong = None if resolution is None else resolution_problem(resolution, base.resolution_step)
        if wrong is not None:
            own = "resolution" in item.spec.training.values()
            where = manifest.concept_path(item.index, "training.resolution") if own else "training.resolution"
            problem = Problem(where, wrong)
            if problem not in problems:
                problems.append(problem)
        pieces = base.superclass_pieces.get(item.spec.superclass)
        words = item.spec.superclass.split()
        if pieces is not None and len(pieces) > len(words):
            note = (
                f"superclass {item.spec.superclass!r} is {len(pieces)} tokens {list(pieces)} for {len(words)} "
                "word(s) on this base: key locking reads their encoding; a word the tokenizer knows whole locks better"
            )
            item = dataclasses.replace(item, notes=(*item.notes, note))
        checked.append(item)
    if problems:
        raise ManifestError(manifest.source, problems)
    return checked
