"""The oracle: reads a toy-world picture back into its description, to score renders.

    reading = read(image)                  # background + each object's color, shape, texture, mark
    has_concept(image, concept)            # is that personal concept (shape, color, texture, mark) there?

How, per picture (32x32 RGB, uint8):
1. background: the median of the 1-px border, snapped to the nearest palette color. The object mask is
   built from the OBSERVED border color (renders are muted; the palette color would mis-mask them);
2. objects: connected components of pixels far from that border color (area >= MIN_AREA);
3. color: each object pixel votes for the palette color whose plain or shaded version is nearest (the
   background's color excluded); the majority wins;
4. shape, texture, mark: a small CNN on three channels per object: its mask, its pixels that voted for the
   shaded color (the texture pattern), and its pixels that voted for neither (a mark). Trained on
   generator objects with pixel noise, half of them slightly blurred: renders have soft edges
   (`python -m perfusion.toyworld.oracle` retrains it; weights in perfusion/assets/toy/oracle.safetensors).
"""

from __future__ import annotations

import dataclasses
import random
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import torch
from PIL import Image, ImageFilter
from safetensors.torch import load_file, save_file
from torch import nn

from perfusion.toyworld.world import (
    MARKS,
    PALETTE,
    SHAPES,
    SIZE,
    TEXTURES,
    ObjectSpec,
    PersonalConcept,
    Scene,
    mark_visibility,
    render,
    shade,
)

ORACLE_WEIGHTS = Path(__file__).resolve().parent.parent / "assets" / "toy" / "oracle.safetensors"
MASK_DISTANCE = 60.0  # RGB distance from the border color that makes a pixel "object"
MIN_AREA = 12  # smaller components are noise, not objects
COLOR_NAMES = list(PALETTE)
# candidate colors each pixel can vote for: every palette color plain and shaded
_CANDIDATES = np.array([PALETTE[c] for c in COLOR_NAMES] + [shade(c) for c in COLOR_NAMES], dtype=np.float32)


@dataclass(frozen=True)
class ObjectReading:
    color: str
    shape: str
    texture: str
    mark: str
    area: int
    center: tuple[float, float]  # (x, y)


@dataclass(frozen=True)
class Reading:
    background: str
    objects: tuple[ObjectReading, ...]

    def describes(self, shape: str, color: str | None = None) -> bool:
        return any(o.shape == shape and (color is None or o.color == color) for o in self.objects)


class OracleNet(nn.Module):
    """3 x 32 x 32 (mask, pattern, other) -> shape, texture and mark logits."""

    def __init__(self) -> None:
        super().__init__()
        self.features = nn.Sequential(
            nn.Conv2d(3, 32, 3, padding=1),
            nn.ReLU(),
            nn.Conv2d(32, 32, 3, padding=1),
            nn.ReLU(),
            nn.MaxPool2d(2),  # 16x16
            nn.Conv2d(32, 64, 3, padding=1),
            nn.ReLU(),
            nn.MaxPool2d(2),  # 8x8
            nn.Conv2d(64, 64, 3, padding=1),
            nn.ReLU(),
            nn.AdaptiveAvgPool2d(2),  # 2x2
            nn.Flatten(),
        )
        self.shape = nn.Linear(256, len(SHAPES))
        self.texture = nn.Linear(256, len(TEXTURES))
        self.mark = nn.Linear(256, len(MARKS))

    def forward(self, x: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
        features = self.features(x)
        return self.shape(features), self.texture(features), self.mark(features)


_NET: OracleNet | None = None


def _net() -> OracleNet:
    global _NET
    if _NET is None:
        if not ORACLE_WEIGHTS.is_file():
            raise FileNotFoundError(
                f"oracle weights missing ({ORACLE_WEIGHTS}); run `python -m perfusion.toyworld.oracle`"
            )
        net = OracleNet()
        net.load_state_dict(load_file(str(ORACLE_WEIGHTS)))
        _NET = net.eval()
    return _NET


def read(image: np.ndarray) -> Reading:
    """Describe one picture: (SIZE, SIZE, 3) uint8 (or float in [0, 1])."""
    return read_batch([image])[0]


def read_batch(images: list[np.ndarray] | np.ndarray) -> list[Reading]:
    pixels = [_as_uint8(image).astype(np.float32) for image in images]
    found = [_segment(p) for p in pixels]
    channels = [c for _, objects in found for (_, c, _) in objects]
    predictions: list[tuple[int, int, int]] = []
    if channels:
        with torch.no_grad():
            shape, texture, mark = _net()(torch.from_numpy(np.stack(channels)))
        predictions = list(
            zip(shape.argmax(1).tolist(), texture.argmax(1).tolist(), mark.argmax(1).tolist(), strict=True)
        )
    readings, cursor = [], 0
    for background, objects in found:
        described = []
        for color, _, (area, center) in objects:
            s, t, m = predictions[cursor]
            cursor += 1
            described.append(ObjectReading(color, SHAPES[s], TEXTURES[t], MARKS[m], area, center))
        readings.append(Reading(background, tuple(described)))
    return readings


def has_concept(reading: Reading, concept: PersonalConcept) -> bool:
    """The concept is there: an object of its shape, color, texture and mark."""
    return any(
        o.shape == concept.superclass
        and o.color == concept.color
        and o.texture == concept.texture
        and o.mark == concept.mark
        for o in reading.objects
    )


def _as_uint8(image: np.ndarray) -> np.ndarray:
    array = np.asarray(image)
    if array.dtype != np.uint8:
        array = (np.clip(array, 0, 1) * 255).round().astype(np.uint8)
    return array


def _segment(pixels: np.ndarray) -> tuple[str, list[tuple[str, np.ndarray, tuple[int, tuple[float, float]]]]]:
    border = np.concatenate([pixels[0], pixels[-1], pixels[1:-1, 0], pixels[1:-1, -1]])
    observed = np.median(border, axis=0)
    background = COLOR_NAMES[int(np.argmin(((np.array(list(PALETTE.values())) - observed) ** 2).sum(1)))]
    foreground = np.linalg.norm(pixels - observed, axis=-1) > MASK_DISTANCE
    # each pixel votes for its nearest candidate (plain or shaded palette color), background excluded
    distances = ((pixels[..., None, :] - _CANDIDATES) ** 2).sum(-1)  # (h, w, 16)
    excluded = COLOR_NAMES.index(background)
    distances[..., [excluded, excluded + len(COLOR_NAMES)]] = np.inf
    votes = distances.argmin(-1)  # (h, w)
    objects = []
    for component in _components(foreground):
        if component.sum() < MIN_AREA:
            continue
        counts = np.bincount(votes[component] % len(COLOR_NAMES), minlength=len(COLOR_NAMES))
        color_index = int(counts.argmax())
        own = component & (votes == color_index)
        pattern = component & (votes == color_index + len(COLOR_NAMES))
        other = component & ~own & ~pattern
        channels = np.stack([component, pattern, other]).astype(np.float32)
        ys, xs = np.nonzero(component)
        objects.append(
            (COLOR_NAMES[color_index], channels, (int(component.sum()), (float(xs.mean()), float(ys.mean()))))
        )
    return background, objects


def _components(mask: np.ndarray) -> list[np.ndarray]:
    """4-connected components of a small boolean image, largest first."""
    labels = np.zeros(mask.shape, dtype=np.int32)
    found: list[np.ndarray] = []
    for y, x in zip(*np.nonzero(mask), strict=True):
        if labels[y, x]:
            continue
        label = len(found) + 1
        stack = [(y, x)]
        labels[y, x] = label
        while stack:
            cy, cx = stack.pop()
            for ny, nx in ((cy - 1, cx), (cy + 1, cx), (cy, cx - 1), (cy, cx + 1)):
                if 0 <= ny < mask.shape[0] and 0 <= nx < mask.shape[1] and mask[ny, nx] and not labels[ny, nx]:
                    labels[ny, nx] = label
                    stack.append((ny, nx))
        found.append(labels == label)
    return sorted(found, key=lambda c: -int(c.sum()))


def training_object(rng: random.Random) -> tuple[np.ndarray, ObjectSpec, str]:
    """One random object (any shape, color, texture, mark) alone on a random background, labelled by what
    is VISIBLE: a mark that falls outside the body (a dot in a ring's hole, a notch beside a star's arm)
    is not drawn, so it is labelled "none"; a mostly hidden one (< 30%) is redrawn (ambiguous either way)."""
    while True:
        shape, color = rng.choice(SHAPES), rng.choice(COLOR_NAMES)
        radius = rng.randint(5, 12)
        center = (rng.randint(radius + 1, SIZE - radius - 2), rng.randint(radius + 1, SIZE - radius - 2))
        obj = ObjectSpec(shape, color, rng.choice(TEXTURES), rng.choice(MARKS), center, radius)
        visible = mark_visibility(obj)
        if obj.mark == "none" or visible >= 0.3:
            break
        if visible == 0:
            obj = dataclasses.replace(obj, mark="none")
            break
    background = rng.choice([c for c in COLOR_NAMES if c != color])
    return render(Scene(background, (obj,))), obj, background


def soften(image: np.ndarray, sigma: float) -> np.ndarray:
    """(SIZE, SIZE, 3) uint8 picture with a Gaussian blur of `sigma` px: the soft edges of a model's render."""
    return np.asarray(Image.fromarray(image).filter(ImageFilter.GaussianBlur(sigma)))


def render_like(image: np.ndarray, rng: random.Random, noise: float = 12.0, blur: float = 0.7) -> np.ndarray:
    """A generator picture as a model might render it: half of them slightly blurred (Gaussian sigma up to
    `blur` px: soft edges, a ring's hole or a stripe partly filled in), all with pixel noise."""
    pixels = soften(image, rng.uniform(0.3, blur)) if blur and rng.random() < 0.5 else image
    noisy = pixels.astype(np.float32) + np.random.default_rng(rng.randrange(2**31)).normal(0, noise, image.shape)
    return np.clip(noisy, 0, 255)


def train_oracle(
    samples: int = 32000, epochs: int = 8, seed: int = 0, noise: float = 12.0, blur: float = 0.7
) -> OracleNet:
    """Fit the CNN on generator objects, noisy and some blurred, so it also reads (soft, noisy) model renders."""
    rng, generator = random.Random(seed), torch.Generator().manual_seed(seed)
    torch.manual_seed(seed)
    inputs, labels = [], []
    for _ in range(samples):
        image, obj, _ = training_object(rng)
        noisy = render_like(image, rng, noise, blur)
        _, objects = _segment(noisy)
        if not objects:
            continue
        inputs.append(objects[0][1])
        labels.append((SHAPES.index(obj.shape), TEXTURES.index(obj.texture), MARKS.index(obj.mark)))
    x, y = torch.from_numpy(np.stack(inputs)), torch.tensor(labels)
    net = OracleNet()
    optimizer = torch.optim.AdamW(net.parameters(), lr=2e-3)
    loss_fn = nn.CrossEntropyLoss()
    for epoch in range(epochs):
        order = torch.randperm(len(x), generator=generator)
        for start in range(0, len(x), 128):
            batch = order[start : start + 128]
            shape, texture, mark = net(x[batch])
            loss = loss_fn(shape, y[batch, 0]) + loss_fn(texture, y[batch, 1]) + loss_fn(mark, y[batch, 2])
            optimizer.zero_grad()
            loss.backward()
            optimizer.step()
        print(f"epoch {epoch + 1}/{epochs}: loss {loss.item():.4f}")
    return net.eval()


if __name__ == "__main__":
    import argparse

    parser = argparse.ArgumentParser(description="retrain the oracle's CNN")
    parser.add_argument("--out", type=Path, default=ORACLE_WEIGHTS)
    out: Path = parser.parse_args().out
    torch.set_num_threads(1)  # leave the other core to whatever else is running (e.g. pretraining)
    trained = train_oracle()
    out.parent.mkdir(parents=True, exist_ok=True)
    save_file({k: v.contiguous() for k, v in trained.state_dict().items()}, str(out))
    print(f"wrote {out}")
