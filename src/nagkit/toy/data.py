"""Procedural image–caption data for the toy text-to-image model: scenes, renderer, captions, vocabulary, dataset.

A *scene* is a solid background colour with one or two non-overlapping flat-coloured shapes. Every attribute is
discrete (kind, colour, size class, 3×3 grid position, background colour) and rendered with a little continuous
jitter (±1 px position, ±5 % size at 32 px) so that an attribute names a small family of images, never a single one.
Geometry is stored in image fractions, so a scene renders at any resolution.

Caption grammar (one caption per call; ``art`` is ``a`` or ``an`` by the next word's first letter)::

    caption  := objects [ "on" art COLOUR "background" ]
    objects  := np [ "and" np ]  |  "two shapes"
    np       := art [SIZE] [COLOUR] ( KIND | "shape" ) [ "at the" POSITION ]
    SIZE     := small | large
    COLOUR   := red | green | blue | yellow | purple | orange | white | black
    KIND     := circle | square | triangle | ring | cross
    POSITION := top left | top | top right | left | center | right | bottom left | bottom | bottom right

The number of shapes is always determined by a caption (one ``np`` per shape, or ``two shapes``); everything else may
be left unsaid. Levels of detail (:func:`captions`):

* ``full``: every attribute of every shape and the background,
  e.g. ``"a large red circle at the top left and a small blue square at the right on a white background"``.
* ``partial``: each attribute kept independently with probability ½, at least one kept and at least one dropped,
  e.g. ``"a red circle on a white background"``, ``"a small shape at the left and a blue square"``.
* ``minimal``: at most the kind *or* the colour of each shape, nothing else,
  e.g. ``"a circle"``, ``"a red shape and a triangle"``, ``"two shapes"``.

Shapes are listed in random order. :func:`parse_caption` inverts the grammar (used by the judge to check that an
image satisfies a caption).
"""

from __future__ import annotations

import re
from collections.abc import Sequence
from dataclasses import dataclass, field

import numpy as np
import torch
from torch.utils.data import Dataset

__all__ = [
    "ALL_KINDS",
    "CAPTION_LEVELS",
    "COLOURS",
    "KINDS",
    "PALETTE",
    "POSITIONS",
    "POSITION_CENTRES",
    "SIZES",
    "SIZE_EXTENTS",
    "CaptionSpec",
    "Scene",
    "Shape",
    "ToyDataset",
    "VOCAB",
    "Vocabulary",
    "caption",
    "captions",
    "decode",
    "describe",
    "encode",
    "parse_caption",
    "render",
    "sample_scene",
    "shape_mask",
]

#: Colour name -> RGB (uint8). Pairwise Euclidean distance ≥ 80 (of 255), so nearest-palette segmentation survives
#: noise and blur.
PALETTE: dict[str, tuple[int, int, int]] = {
    "red": (230, 25, 25),
    "green": (30, 170, 40),
    "blue": (30, 60, 230),
    "yellow": (245, 225, 20),
    "purple": (140, 40, 190),
    "orange": (250, 135, 0),
    "white": (255, 255, 255),
    "black": (0, 0, 0),
}
COLOURS: tuple[str, ...] = tuple(PALETTE)
#: Every shape kind the renderer and the judge know.
ALL_KINDS: tuple[str, ...] = ("circle", "square", "triangle", "ring", "cross")
#: Kinds sampled by default.
KINDS: tuple[str, ...] = ALL_KINDS
SIZES: tuple[str, ...] = ("small", "large")
#: Nominal bounding-box side of each size class, as a fraction of the image side (8 px and 12.2 px at 32 px).
SIZE_EXTENTS: dict[str, float] = {"small": 0.25, "large": 0.38}
#: 3×3 grid cells, row-major.
POSITIONS: tuple[str, ...] = (
    "top left",
    "top",
    "top right",
    "left",
    "center",
    "right",
    "bottom left",
    "bottom",
    "bottom right",
)
_GRID = (0.2, 0.5, 0.8)
#: Grid cell -> nominal bounding-box centre (x, y) in image fractions.
POSITION_CENTRES: dict[str, tuple[float, float]] = {
    name: (_GRID[i % 3], _GRID[i // 3]) for i, name in enumerate(POSITIONS)
}
CAPTION_LEVELS: tuple[str, ...] = ("full", "partial", "minimal")
_ATTRS: tuple[str, ...] = ("size", "colour", "kind", "position")
_POS_JITTER = 0.03  # ± image fraction (≈ 1 px at 32 px)
_SIZE_JITTER = 0.05  # ± relative
_MARGIN = 0.02  # boxes stay this far inside the image (image fraction)
_GAP = 0.08  # minimum gap between two shapes' boxes, image fraction (2.6 px at 32 px)
#: Cell pairs two shapes may occupy: two rows or two columns apart (never the centre cell).
_PAIRS: tuple[tuple[str, str], ...] = tuple(
    (a, b)
    for i, a in enumerate(POSITIONS)
    for j, b in enumerate(POSITIONS)
    if i < j and max(abs(i // 3 - j // 3), abs(i % 3 - j % 3)) == 2
)


@dataclass(frozen=True)
class Shape:
    """One flat-coloured shape.

    Attributes:
        kind: One of :data:`ALL_KINDS`.
        colour: One of :data:`COLOURS`.
        size: Size class, ``"small"`` or ``"large"``.
        position: Grid cell, one of :data:`POSITIONS`.
        cx: Bounding-box centre x, image fraction (jittered around the cell centre).
        cy: Bounding-box centre y, image fraction.
        extent: Bounding-box side, image fraction (jittered around :data:`SIZE_EXTENTS`).
    """

    kind: str
    colour: str
    size: str
    position: str
    cx: float
    cy: float
    extent: float

    def box(self) -> tuple[float, float, float, float]:
        """Bounding box.

        Returns:
            ``(x0, y0, x1, y1)`` in image fractions.
        """
        h = self.extent / 2
        return self.cx - h, self.cy - h, self.cx + h, self.cy + h


@dataclass(frozen=True)
class Scene:
    """A background colour and one or two non-overlapping shapes.

    Attributes:
        background: Background colour, one of :data:`COLOURS`; never the colour of a shape.
        shapes: The shapes (1 or 2).
    """

    background: str
    shapes: tuple[Shape, ...] = field(default_factory=tuple)


def _boxes_apart(a: Shape, b: Shape, gap: float = _GAP) -> bool:
    ax0, ay0, ax1, ay1 = a.box()
    bx0, by0, bx1, by1 = b.box()
    return bx0 - ax1 >= gap or ax0 - bx1 >= gap or by0 - ay1 >= gap or ay0 - by1 >= gap


def _choice(rng: np.random.Generator, items: Sequence[str]) -> str:
    return items[int(rng.integers(len(items)))]


def _sample_shape(rng: np.random.Generator, kinds: Sequence[str], colours: Sequence[str], position: str) -> Shape:
    kind = _choice(rng, kinds)
    colour = _choice(rng, colours)
    size = _choice(rng, SIZES)
    extent = SIZE_EXTENTS[size] * (1.0 + float(rng.uniform(-_SIZE_JITTER, _SIZE_JITTER)))
    lo, hi = _MARGIN + extent / 2, 1.0 - _MARGIN - extent / 2
    x, y = (float(np.clip(c + rng.uniform(-_POS_JITTER, _POS_JITTER), lo, hi)) for c in POSITION_CENTRES[position])
    return Shape(kind, colour, size, position, x, y, float(extent))


def sample_scene(
    rng: np.random.Generator,
    kinds: Sequence[str] = KINDS,
    colours: Sequence[str] = COLOURS,
    max_shapes: int = 2,
) -> Scene:
    """Draw a random scene.

    The background is uniform over ``colours``; the number of shapes uniform over ``1..max_shapes``; each shape's kind,
    colour (≠ background; two shapes may share colour and kind) and size class uniform. One shape sits in a uniform grid
    cell; two shapes in a uniform pair of cells two rows or two columns apart (e.g. ``left``/``right``,
    ``top left``/``bottom``), so their boxes are ≥ 8 % of the image side apart and never touch; the ``center`` cell
    therefore only occurs in one-shape scenes. Boxes stay inside the image.

    Args:
        rng: NumPy random generator (the only source of randomness).
        kinds: Shape kinds to draw from (subset of :data:`ALL_KINDS`).
        colours: Colours to draw from (subset of :data:`COLOURS`, at least 2).
        max_shapes: 1 or 2.

    Returns:
        The scene.
    """
    if max_shapes not in (1, 2):
        raise ValueError(f"max_shapes must be 1 or 2, got {max_shapes}")
    if len(colours) < 2:
        raise ValueError("need at least two colours (background and shape)")
    unknown = (set(kinds) - set(ALL_KINDS)) | (set(colours) - set(COLOURS))
    if unknown or not kinds:
        raise ValueError(f"unknown kinds/colours: {sorted(unknown)}")
    background = _choice(rng, colours)
    fg = [c for c in colours if c != background]
    n = 1 + int(rng.integers(max_shapes))
    if n == 1:
        cells: Sequence[str] = (_choice(rng, POSITIONS),)
    else:
        cells = _PAIRS[int(rng.integers(len(_PAIRS)))]
        if rng.random() < 0.5:
            cells = cells[::-1]
    shapes = tuple(_sample_shape(rng, kinds, fg, c) for c in cells)
    assert n == 1 or _boxes_apart(*shapes)
    return Scene(background, shapes)


# ---------------------------------------------------------------------------------------------------------------------
# rendering


def shape_mask(
    kind: str,
    cx: float | np.ndarray,
    cy: float | np.ndarray,
    w: float | np.ndarray,
    h: float | np.ndarray,
    height: int,
    width: int,
    supersample: int = 1,
) -> np.ndarray:
    """Coverage of one shape on a pixel grid.

    The shape fills the axis-aligned box of size ``w``×``h`` (pixels) centred at ``(cx, cy)`` (pixels, continuous
    coordinates: pixel ``(i, j)`` spans ``[j, j+1)×[i, i+1)``). Kinds: ``circle`` (ellipse inscribed in the box),
    ``square``, ``triangle`` (apex at top centre, base on the bottom edge), ``ring`` (inner radius 0.55), ``cross``
    (plus sign, arm thickness 0.36 of the box).

    Args:
        kind: Shape kind.
        cx: Box centre x, pixels; a 1-D array (with ``cy``, ``w``, ``h`` of the same length or scalars) renders a
            batch of boxes.
        cy: Box centre y, pixels.
        w: Box width, pixels.
        h: Box height, pixels.
        height: Grid height.
        width: Grid width.
        supersample: Samples per pixel side; 1 samples pixel centres (binary mask).

    Returns:
        ``float32`` array ``(height, width)`` of coverage in [0, 1], or ``(n, height, width)`` for a batch.
    """
    batch = max(np.ndim(a) for a in (cx, cy, w, h)) > 0
    cx, cy, w, h = (np.reshape(np.asarray(a, np.float64), (-1, 1, 1)) for a in (cx, cy, w, h))
    s = supersample
    offs = (np.arange(s, dtype=np.float64) + 0.5) / s
    ys = (np.arange(height)[:, None] + offs[None, :]).reshape(-1)
    xs = (np.arange(width)[:, None] + offs[None, :]).reshape(-1)
    u = (xs[None, None, :] - cx) / (w / 2)  # [-1, 1] inside the box; (n, 1, W·s)
    v = (ys[None, :, None] - cy) / (h / 2)  # (n, H·s, 1)
    if kind == "circle":
        m = u * u + v * v <= 1.0
    elif kind == "square":
        m = (np.abs(u) <= 1.0) & (np.abs(v) <= 1.0)
    elif kind == "triangle":
        m = (v <= 1.0) & (np.abs(u) <= (v + 1.0) / 2.0)
    elif kind == "ring":
        r2 = u * u + v * v
        m = (r2 <= 1.0) & (r2 >= 0.55**2)
    elif kind == "cross":
        au, av = np.abs(u), np.abs(v)
        m = ((au <= 0.36) & (av <= 1.0)) | ((av <= 0.36) & (au <= 1.0))
    else:
        raise ValueError(f"unknown shape kind {kind!r}")
    m = m.astype(np.float32)
    m = m.reshape(m.shape[0], height, s, width, s).mean(axis=(2, 4))
    return m if batch else m[0]


def render(scene: Scene, size: int = 32, antialias: bool = False) -> np.ndarray:
    """Render a scene.

    Deterministic (pure function of the scene). Without anti-aliasing every pixel is exactly a palette colour.

    Args:
        scene: The scene.
        size: Image side in pixels.
        antialias: Blend edge pixels by 4×4 supersampled coverage.

    Returns:
        ``uint8`` array ``(size, size, 3)``.
    """
    img = np.empty((size, size, 3), np.float32)
    img[:] = PALETTE[scene.background]
    for sh in scene.shapes:
        ext = sh.extent * size
        cov = shape_mask(sh.kind, sh.cx * size, sh.cy * size, ext, ext, size, size, 4 if antialias else 1)
        img += cov[..., None] * (np.asarray(PALETTE[sh.colour], np.float32) - img)
    return np.clip(np.rint(img), 0, 255).astype(np.uint8)


# ---------------------------------------------------------------------------------------------------------------------
# captions


def _article(next_word: str) -> str:
    return "an" if next_word[0] in "aeiou" else "a"


def _noun_phrase(shape: Shape, keep: set[str]) -> str:
    words = [getattr(shape, a) for a in ("size", "colour") if a in keep]
    words.append(shape.kind if "kind" in keep else "shape")
    np_ = " ".join(words)
    if "position" in keep:
        np_ += f" at the {shape.position}"
    return f"{_article(np_)} {np_}"


def describe(scene: Scene, keep: Sequence[set[str]], background: bool, order: Sequence[int] | None = None) -> str:
    """Caption a scene mentioning only the chosen attributes.

    Args:
        scene: The scene.
        keep: For each shape (scene order), the attributes to name: subset of ``{"size", "colour", "kind",
            "position"}``.
        background: Whether to name the background colour.
        order: Order in which shapes are listed (default: scene order).

    Returns:
        The caption. Two shapes with no attribute named are written ``"two shapes"``.
    """
    if len(keep) != len(scene.shapes):
        raise ValueError("need one attribute set per shape")
    order = list(range(len(scene.shapes))) if order is None else list(order)
    if len(scene.shapes) == 2 and not keep[0] and not keep[1]:
        text = "two shapes"
    else:
        text = " and ".join(_noun_phrase(scene.shapes[i], set(keep[i])) for i in order)
    if background:
        text += f" on {_article(scene.background)} {scene.background} background"
    return text


def caption(scene: Scene, rng: np.random.Generator, level: str = "full") -> str:
    """Draw one caption of a scene at a level of detail (see the module docstring for the grammar).

    Args:
        scene: The scene.
        rng: NumPy random generator.
        level: ``"full"``, ``"partial"`` or ``"minimal"``.

    Returns:
        The caption.
    """
    n = len(scene.shapes)
    order = [int(i) for i in rng.permutation(n)]
    if level == "full":
        return describe(scene, [set(_ATTRS)] * n, True, order)
    if level == "partial":
        slots = [(i, a) for i in range(n) for a in _ATTRS] + [(-1, "background")]
        while True:
            kept = rng.random(len(slots)) < 0.5
            if kept.any() and not kept.all():
                break
        keep: list[set[str]] = [set() for _ in range(n)]
        for (i, a), k in zip(slots, kept, strict=True):
            if k and i >= 0:
                keep[i].add(a)
        return describe(scene, keep, bool(kept[-1]), order)
    if level == "minimal":
        keep = []
        for _ in range(n):
            r = rng.random()
            keep.append({"kind"} if r < 0.5 else {"colour"} if r < 0.8 else set())
        return describe(scene, keep, False, order)
    raise ValueError(f"unknown caption level {level!r}; expected one of {CAPTION_LEVELS}")


def captions(scene: Scene, rng: np.random.Generator) -> dict[str, str]:
    """Draw one caption of a scene at every level of detail.

    Args:
        scene: The scene.
        rng: NumPy random generator.

    Returns:
        ``{"full": ..., "partial": ..., "minimal": ...}``.
    """
    return {level: caption(scene, rng, level) for level in CAPTION_LEVELS}


@dataclass
class CaptionSpec:
    """What a caption says about a scene (the inverse of :func:`describe`).

    Attributes:
        count: Number of shapes the caption states.
        shapes: One dict per shape mentioned, attribute name -> value, only for attributes named.
        background: Background colour, or ``None`` when unsaid.
    """

    count: int
    shapes: list[dict[str, str]]
    background: str | None


def _tokenize(text: str) -> list[str]:
    return re.findall(r"[a-z]+", text.lower())


def parse_caption(text: str) -> CaptionSpec:
    """Parse a caption written in the grammar of this module.

    Args:
        text: Caption.

    Returns:
        The specification.

    Raises:
        ValueError: When the text does not follow the grammar.
    """
    words = _tokenize(text)
    background = None
    if len(words) >= 4 and words[-1] == "background" and words[-4] == "on":
        background = words[-2]
        if background not in PALETTE:
            raise ValueError(f"unknown background colour in {text!r}")
        words = words[:-4]
    if words == ["two", "shapes"]:
        return CaptionSpec(2, [{}, {}], background)
    phrases: list[list[str]] = [[]]
    for w in words:
        if w == "and":
            phrases.append([])
        else:
            phrases[-1].append(w)
    shapes = []
    for ph in phrases:
        if not ph or ph[0] not in ("a", "an"):
            raise ValueError(f"noun phrase must start with an article in {text!r}")
        ph = ph[1:]
        spec: dict[str, str] = {}
        if "at" in ph:
            i = ph.index("at")
            pos = " ".join(ph[i + 2 :])
            if ph[i + 1 : i + 2] != ["the"] or pos not in POSITIONS:
                raise ValueError(f"bad position in {text!r}")
            spec["position"] = pos
            ph = ph[:i]
        for w in ph:
            if w in SIZES:
                spec["size"] = w
            elif w in PALETTE:
                spec["colour"] = w
            elif w in ALL_KINDS:
                spec["kind"] = w
            elif w != "shape":
                raise ValueError(f"unexpected word {w!r} in {text!r}")
        shapes.append(spec)
    return CaptionSpec(len(shapes), shapes, background)


# ---------------------------------------------------------------------------------------------------------------------
# vocabulary

PAD, UNK = "<pad>", "<unk>"
_WORDS: tuple[str, ...] = (
    ("a", "an", "and", "at", "the", "on", "background", "shape", "shapes", "two")
    + SIZES
    + COLOURS
    + ALL_KINDS
    + ("top", "bottom", "left", "right", "center")
)


class Vocabulary:
    """Word-level vocabulary: ``<pad>`` (id 0), ``<unk>`` (id 1), then every word of the grammar in a fixed order.

    Args:
        words: The words after the two special tokens.
    """

    def __init__(self, words: Sequence[str] = _WORDS) -> None:
        self.itos: list[str] = [PAD, UNK, *words]
        self.stoi: dict[str, int] = {w: i for i, w in enumerate(self.itos)}
        if len(self.stoi) != len(self.itos):
            raise ValueError("duplicate words")
        self.pad_id = 0
        self.unk_id = 1

    def __len__(self) -> int:
        return len(self.itos)

    def encode(self, text: str, max_length: int | None = None) -> list[int]:
        """Token ids of a text: lower-cased, split into letter runs (punctuation and digits dropped).

        Args:
            text: Any text; words outside the vocabulary map to ``unk_id``.
            max_length: When given, truncate or right-pad with ``pad_id`` to this length.

        Returns:
            The ids.
        """
        ids = [self.stoi.get(w, self.unk_id) for w in _tokenize(text)]
        if max_length is not None:
            ids = ids[:max_length] + [self.pad_id] * max(0, max_length - len(ids))
        return ids

    def decode(self, ids: Sequence[int] | torch.Tensor) -> str:
        """Text of token ids, padding dropped.

        Args:
            ids: Token ids.

        Returns:
            Space-joined words (unknown words as ``<unk>``).
        """
        if isinstance(ids, torch.Tensor):
            ids = ids.tolist()
        return " ".join(self.itos[i] for i in ids if i != self.pad_id)


#: The vocabulary of the grammar (32 entries).
VOCAB = Vocabulary()


def encode(text: str, max_length: int | None = None) -> list[int]:
    """:meth:`Vocabulary.encode` with :data:`VOCAB`.

    Args:
        text: Text.
        max_length: Optional fixed length (truncate / pad).

    Returns:
        Token ids.
    """
    return VOCAB.encode(text, max_length)


def decode(ids: Sequence[int] | torch.Tensor) -> str:
    """:meth:`Vocabulary.decode` with :data:`VOCAB`.

    Args:
        ids: Token ids.

    Returns:
        Text.
    """
    return VOCAB.decode(ids)


# ---------------------------------------------------------------------------------------------------------------------
# dataset


class ToyDataset(Dataset):
    """Seeded image–caption dataset. Item ``i`` depends only on ``(seed, i)``, so the dataset is reproducible,
    order-independent and effectively infinite (choose a large ``length``).

    Args:
        length: Number of items.
        seed: Base seed.
        size: Image side in pixels.
        levels: Caption levels to draw from.
        level_probs: Probability of each level (default uniform).
        empty_prob: Probability of an empty caption (for unconditional / CFG-dropout training).
        max_length: Token sequence length (captions have at most 21 words).
        kinds: Shape kinds.
        colours: Colours.
        max_shapes: 1 or 2.
        antialias: Render with anti-aliasing.
    """

    def __init__(
        self,
        length: int = 100_000,
        seed: int = 0,
        size: int = 32,
        levels: Sequence[str] = CAPTION_LEVELS,
        level_probs: Sequence[float] | None = None,
        empty_prob: float = 0.0,
        max_length: int = 24,
        kinds: Sequence[str] = KINDS,
        colours: Sequence[str] = COLOURS,
        max_shapes: int = 2,
        antialias: bool = False,
    ) -> None:
        self.length = length
        self.seed = seed
        self.size = size
        self.levels = tuple(levels)
        p = np.full(len(self.levels), 1.0 / len(self.levels)) if level_probs is None else np.asarray(level_probs)
        if len(p) != len(self.levels) or not np.isclose(p.sum(), 1.0):
            raise ValueError("level_probs must have one probability per level and sum to 1")
        self.level_probs = p / p.sum()
        self.empty_prob = empty_prob
        self.max_length = max_length
        self.kinds = tuple(kinds)
        self.colours = tuple(colours)
        self.max_shapes = max_shapes
        self.antialias = antialias

    def __len__(self) -> int:
        return self.length

    def _rng(self, index: int) -> np.random.Generator:
        if not 0 <= index < self.length:
            raise IndexError(index)
        return np.random.default_rng([self.seed, index])

    def scene(self, index: int) -> Scene:
        """The scene of item ``index``.

        Args:
            index: Item index.

        Returns:
            The scene.
        """
        return sample_scene(self._rng(index), self.kinds, self.colours, self.max_shapes)

    def item(self, index: int) -> tuple[Scene, np.ndarray, str]:
        """Scene, rendered image and caption of item ``index``.

        Args:
            index: Item index.

        Returns:
            ``(scene, uint8 HxWx3 image, caption)``.
        """
        rng = self._rng(index)
        scene = sample_scene(rng, self.kinds, self.colours, self.max_shapes)
        if rng.random() < self.empty_prob:
            text = ""
        else:
            level = self.levels[int(rng.choice(len(self.levels), p=self.level_probs))]
            text = caption(scene, rng, level)
        return scene, render(scene, self.size, self.antialias), text

    def __getitem__(self, index: int) -> tuple[torch.Tensor, str, torch.Tensor]:
        """Item ``index``.

        Args:
            index: Item index.

        Returns:
            ``(image, caption, ids)``: ``float32`` image ``(3, size, size)`` in [-1, 1], the caption, and ``int64``
            token ids ``(max_length,)`` right-padded with 0.
        """
        _, img, text = self.item(index)
        x = torch.from_numpy(img).permute(2, 0, 1).float().div(127.5).sub(1.0)
        ids = torch.tensor(encode(text, self.max_length), dtype=torch.long)
        return x, text, ids
