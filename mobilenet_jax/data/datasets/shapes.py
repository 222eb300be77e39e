"""`mobilenet_shapes`: the embedded dataset, generated offline and deterministically.

Ten classes of geometric shapes on cluttered backgrounds. Colour, size, rotation
(within +-30 degrees of upright) and position of every shape are drawn independently
of its class, and the background carries random lines and dots in random colours, so
neither colour nor size separates the classes: a model has to see the outline.

Builder configs are named by resolution (``mobilenet_shapes/64``, ``mobilenet_shapes/32``,
``mobilenet_shapes/128``). Image ``i`` of a split depends only on (split, i), so every
machine generates the same pixels (PNG-encoded by TFDS).
"""

from __future__ import annotations

import math

import numpy as np
import tensorflow_datasets as tfds
from PIL import Image, ImageDraw

CLASSES = (
    "circle",
    "square",
    "triangle",
    "star",
    "plus",
    "ring",
    "crescent",
    "l_shape",
    "t_shape",
    "half_disc",
)
_SPLIT_SEEDS = {"train": 1, "validation": 2}
_SUPERSAMPLE = 4  # draw at 4x and downsample, for anti-aliased edges


# The hard variant's ten more classes: outlines that no rotation within +-30 degrees turns into another class.
HARD_CLASSES = CLASSES + (
    "hexagon",
    "pentagon",
    "arrow",
    "u_shape",
    "h_shape",
    "bar",
    "z_shape",
    "chevron",
    "square_ring",
    "triangle_ring",
)


class ShapesConfig(tfds.core.BuilderConfig):
    """A resolution, split sizes and difficulty of the shapes dataset (``hard``: ``HARD_CLASSES``, :func:`render`)."""

    def __init__(self, *, image_size: int, train_examples: int, validation_examples: int, hard: bool = False, **kwargs):
        name = f"hard{image_size}" if hard else str(image_size)
        super().__init__(name=name, version=tfds.core.Version("1.0.0"), **kwargs)
        self.image_size = image_size
        self.train_examples = train_examples
        self.validation_examples = validation_examples
        self.hard = hard
        self.classes = HARD_CLASSES if hard else CLASSES


def _polygon(center: np.ndarray, radius: float, angle: float, points: list[tuple[float, float]]) -> list[tuple]:
    """Unit-square outline points rotated by ``angle`` and placed at ``center``."""
    c, s = math.cos(angle), math.sin(angle)
    return [(center[0] + radius * (x * c - y * s), center[1] + radius * (x * s + y * c)) for x, y in points]


def _regular(n: int, inner: float | None = None) -> list[tuple[float, float]]:
    if inner is None:
        return [
            (math.cos(2 * math.pi * k / n - math.pi / 2), math.sin(2 * math.pi * k / n - math.pi / 2)) for k in range(n)
        ]
    points = []
    for k in range(2 * n):
        r = 1.0 if k % 2 == 0 else inner
        a = math.pi * k / n - math.pi / 2
        points.append((r * math.cos(a), r * math.sin(a)))
    return points


_OUTLINES = {
    "square": [(-0.75, -0.75), (0.75, -0.75), (0.75, 0.75), (-0.75, 0.75)],
    "triangle": _regular(3),
    "star": _regular(5, inner=0.42),
    "plus": [
        (-0.3, -1),
        (0.3, -1),
        (0.3, -0.3),
        (1, -0.3),
        (1, 0.3),
        (0.3, 0.3),
        (0.3, 1),
        (-0.3, 1),
        (-0.3, 0.3),
        (-1, 0.3),
        (-1, -0.3),
        (-0.3, -0.3),
    ],
    "l_shape": [(-0.7, -1), (-0.15, -1), (-0.15, 0.45), (0.7, 0.45), (0.7, 1), (-0.7, 1)],
    "t_shape": [(-1, -0.9), (1, -0.9), (1, -0.35), (0.28, -0.35), (0.28, 1), (-0.28, 1), (-0.28, -0.35), (-1, -0.35)],
    "hexagon": _regular(6),
    "pentagon": _regular(5),
    "arrow": [(-0.22, 1), (0.22, 1), (0.22, -0.1), (0.65, -0.1), (0, -1), (-0.65, -0.1), (-0.22, -0.1)],
    "u_shape": [(-0.8, -1), (-0.3, -1), (-0.3, 0.4), (0.3, 0.4), (0.3, -1), (0.8, -1), (0.8, 1), (-0.8, 1)],
    "h_shape": [
        (-0.8, -1),
        (-0.35, -1),
        (-0.35, -0.22),
        (0.35, -0.22),
        (0.35, -1),
        (0.8, -1),
        (0.8, 1),
        (0.35, 1),
        (0.35, 0.22),
        (-0.35, 0.22),
        (-0.35, 1),
        (-0.8, 1),
    ],
    "bar": [(-1, -0.25), (1, -0.25), (1, 0.25), (-1, 0.25)],
    "z_shape": [
        (-0.8, -1),
        (0.8, -1),
        (0.8, -0.55),
        (-0.15, 0.55),
        (0.8, 0.55),
        (0.8, 1),
        (-0.8, 1),
        (-0.8, 0.55),
        (0.15, -0.55),
        (-0.8, -0.55),
    ],
    "chevron": [(-0.9, -0.8), (-0.45, -0.8), (0, 0.2), (0.45, -0.8), (0.9, -0.8), (0, 1)],
}
_RINGS = {"square_ring": "square", "triangle_ring": "triangle"}


def _random_colour(rng: np.random.Generator, avoid: np.ndarray | None = None) -> np.ndarray:
    while True:
        colour = rng.integers(0, 256, size=3)
        if avoid is None or np.abs(colour - avoid).sum() > 250:
            return colour


def render(label: int, image_size: int, rng: np.random.Generator, hard: bool = False) -> np.ndarray:
    """Draws one ``image_size`` x ``image_size`` RGB image of class ``label`` (of ``HARD_CLASSES`` when ``hard``).

    ``hard``: twenty classes, smaller shapes, twice the clutter, a disc of bare background
    over the shape's edge (occlusion) and pixel noise (sigma 6).
    """
    size = image_size * _SUPERSAMPLE
    background = _random_colour(rng)
    canvas = np.empty((size, size, 3), np.float32)
    gradient = _random_colour(rng) - background
    ramp = np.linspace(0, 0.5, size, dtype=np.float32)
    canvas[:] = background + (ramp[:, None, None] if rng.random() < 0.5 else ramp[None, :, None]) * gradient
    image = Image.fromarray(np.clip(canvas, 0, 255).astype(np.uint8))
    draw = ImageDraw.Draw(image)
    # Clutter: thin lines and small dots in random colours, never shaped like a class.
    for _ in range(rng.integers(2, 6) * (2 if hard else 1)):
        x0, y0, x1, y1 = rng.uniform(0, size, 4)
        draw.line((x0, y0, x1, y1), fill=tuple(_random_colour(rng)), width=_SUPERSAMPLE)
    for _ in range(rng.integers(4, 12) * (2 if hard else 1)):
        x, y = rng.uniform(0, size, 2)
        r = rng.uniform(0.4, 1.0) * _SUPERSAMPLE
        draw.ellipse((x - r, y - r, x + r, y + r), fill=tuple(_random_colour(rng)))

    colour = tuple(_random_colour(rng, avoid=background))
    radius = rng.uniform(0.25, 0.42) * size if hard else rng.uniform(0.28, 0.44) * size
    center = rng.uniform(radius, size - radius, 2)
    # Upright within +-30 degrees: orientation varies, but a T stays a T and not a rotated L.
    angle = rng.uniform(-math.pi / 6, math.pi / 6)
    name = (HARD_CLASSES if hard else CLASSES)[label]
    box = (center[0] - radius, center[1] - radius, center[0] + radius, center[1] + radius)
    if name == "circle":
        draw.ellipse(box, fill=colour)
    elif name == "ring":
        draw.ellipse(box, outline=colour, width=int(radius * 0.35))
    elif name == "half_disc":
        start = math.degrees(angle) + 180
        draw.pieslice(box, start, start + 180, fill=colour)
    elif name == "crescent":
        draw.ellipse(box, fill=colour)
        shift = np.array([math.cos(angle), math.sin(angle)]) * radius * 0.6
        cx, cy = center + shift
        r = radius * 0.85
        # Cut the bite with the background colour sampled under it, keeping the clutter.
        mask = Image.new("L", image.size, 0)
        ImageDraw.Draw(mask).ellipse((cx - r, cy - r, cx + r, cy + r), fill=255)
        clean = Image.fromarray(np.clip(canvas, 0, 255).astype(np.uint8))
        image.paste(clean, mask=mask)
    elif name in _RINGS:
        outline = _polygon(center, radius, angle, _OUTLINES[_RINGS[name]])
        draw.polygon(outline, outline=colour, width=int(radius * 0.3))
    else:
        draw.polygon(_polygon(center, radius, angle, _OUTLINES[name]), fill=colour)
    if hard:
        _occlude(image, canvas, center, radius, rng)
    image = np.asarray(image.resize((image_size, image_size), Image.Resampling.BOX), dtype=np.uint8)
    if hard:
        image = np.clip(image + rng.normal(0, 6, image.shape), 0, 255).astype(np.uint8)
    return image


def _occlude(image: Image.Image, canvas: np.ndarray, center: np.ndarray, radius: float, rng) -> None:
    """A disc of the bare background (no clutter) over the shape's edge: part of the outline goes missing."""
    clean = Image.fromarray(np.clip(canvas, 0, 255).astype(np.uint8))
    r = rng.uniform(0.2, 0.33) * radius
    angle, distance = rng.uniform(0, 2 * math.pi), rng.uniform(0.5, 0.9) * radius
    cx, cy = center[0] + distance * math.cos(angle), center[1] + distance * math.sin(angle)
    mask = Image.new("L", image.size, 0)
    ImageDraw.Draw(mask).ellipse((cx - r, cy - r, cx + r, cy + r), fill=255)
    image.paste(clean, mask=mask)


class MobilenetShapes(tfds.core.GeneratorBasedBuilder):
    """Coloured geometric shapes on cluttered backgrounds (10 classes), generated locally."""

    BUILDER_CONFIGS = [
        ShapesConfig(image_size=64, train_examples=12_000, validation_examples=2_000, description="64x64 pixels"),
        ShapesConfig(image_size=32, train_examples=12_000, validation_examples=2_000, description="32x32 pixels"),
        ShapesConfig(image_size=128, train_examples=12_000, validation_examples=2_000, description="128x128 pixels"),
        ShapesConfig(
            image_size=32,
            train_examples=24_000,
            validation_examples=4_000,
            hard=True,
            description="32x32 pixels, 20 classes, occluded, noisy",
        ),  # fmt: skip
    ]

    def _info(self) -> tfds.core.DatasetInfo:
        size = self.builder_config.image_size
        return self.dataset_info_from_configs(
            features=tfds.features.FeaturesDict(
                {
                    "image": tfds.features.Image(shape=(size, size, 3)),
                    "label": tfds.features.ClassLabel(names=self.builder_config.classes),
                }
            ),
            supervised_keys=("image", "label"),
        )

    def _split_generators(self, dl_manager):
        del dl_manager  # nothing to download
        config = self.builder_config
        return {
            "train": self._generate_examples("train", config.train_examples),
            "validation": self._generate_examples("validation", config.validation_examples),
        }

    def _generate_examples(self, split: str, count: int):
        size = self.builder_config.image_size
        for index in range(count):
            hard = [1] if self.builder_config.hard else []  # the hard variant draws from streams of its own
            rng = np.random.default_rng([_SPLIT_SEEDS[split], size, index, *hard])
            label = index % len(self.builder_config.classes)
            yield index, {"image": render(label, size, rng, self.builder_config.hard), "label": label}
