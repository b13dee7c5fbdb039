"""Deterministic pixel-rule judge for toy scenes: reads background, shapes (kind, colour, size, position) off an image.

Pipeline (no learned parameters, any square-ish resolution):

1. every pixel is assigned its nearest palette colour (:data:`~nagkit.toy.data.PALETTE`, Euclidean RGB);
2. the background is the most frequent colour;
3. foreground = pixels farther than 40/255 from the background colour; 4-connected components smaller than 1 % of the
   image are dropped (speckle);
4. its colour is the palette colour ``c`` whose segment background→``c`` best explains its pixels (least summed
   distance to the segment), so blurred edges, which mix the two colours, vote correctly;
5. its soft coverage (each pixel's position along that segment, in [0, 1]) keeps its mass under blur; the box is where
   coverage ≥ ½, and binary, anti-aliased and blurred templates of every kind fitted to the box (box side ±½ px)
   are compared with it by soft IoU; the best kind wins;
6. the size class comes from the extent implied by the coverage mass and the kind's fill ratio (blur-invariant),
   the grid cell from the box centre.

:func:`evaluate` measures per-attribute accuracy on held-out renders, optionally degraded by :func:`degrade`
(Gaussian blur + Gaussian noise).
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass, field
from itertools import permutations, product
from typing import Any

import numpy as np
import torch
from PIL import Image

from nagkit.toy.data import (
    ALL_KINDS,
    COLOURS,
    KINDS,
    PALETTE,
    POSITIONS,
    SIZE_EXTENTS,
    Scene,
    parse_caption,
    render,
    sample_scene,
    shape_mask,
)

__all__ = [
    "DetectedShape",
    "Verdict",
    "compare",
    "degrade",
    "evaluate",
    "judge",
    "off_palette_fraction",
    "satisfies",
    "to_rgb",
]

_PAL = np.asarray([PALETTE[c] for c in COLOURS], np.float32)  # (K, 3)
_FG_THRESHOLD = 40.0
_MIN_AREA = 0.01
_SIZE_SPLIT = (SIZE_EXTENTS["small"] + SIZE_EXTENTS["large"]) / 2
_CELL_SPLITS = (0.35, 0.65)
_SHIFTS = (0.0,)
_SCALES = (-0.5, 0.0, 0.5)
_TEMPLATE_BLURS = (0.6, 1.0)
_WINDOW_PAD = 3


@dataclass(frozen=True)
class DetectedShape:
    """A shape read off an image.

    Attributes:
        kind: Best-matching kind.
        colour: Palette colour.
        size: ``"small"`` or ``"large"``.
        position: Grid cell (one of :data:`~nagkit.toy.data.POSITIONS`).
        box: ``(x0, y0, x1, y1)`` of the pixels with coverage ≥ ½, image fractions.
        area: Soft coverage mass, fraction of the image.
        kind_scores: Best soft IoU of the templates of every kind.
        colour_purity: ``1 - residual(colour) / residual(runner-up colour)`` of the colour fit, in [0, 1].
        confidence: ``min(best IoU, 10 × (1 - runner-up IoU / best IoU), colour purity)``, in [0, 1]: low when the
            shape matches no template well, two kinds almost equally, or its colour is ambiguous.
    """

    kind: str
    colour: str
    size: str
    position: str
    box: tuple[float, float, float, float]
    area: float
    kind_scores: dict[str, float]
    colour_purity: float
    confidence: float


@dataclass(frozen=True)
class Verdict:
    """What the judge read off an image.

    Attributes:
        background: Background colour.
        shapes: Detected shapes in reading order (top to bottom, then left to right).
        background_fraction: Fraction of pixels nearest to the background colour.
        off_palette: :func:`off_palette_fraction` of the image.
        confidence: Minimum of the shapes' confidences (0 when no shape was found).
    """

    background: str
    shapes: tuple[DetectedShape, ...] = field(default_factory=tuple)
    background_fraction: float = 1.0
    off_palette: float = 0.0
    confidence: float = 0.0

    @property
    def count(self) -> int:
        """Number of shapes found."""
        return len(self.shapes)


def to_rgb(image: Any) -> np.ndarray:
    """Convert an image to ``float32`` HxWx3 RGB in [0, 255].

    Args:
        image: ``PIL.Image``; ``uint8`` array HxWx3; or float array / tensor in **[-1, 1]** (diffusers convention),
            HxWx3 or 3xHxW, optionally with a leading batch dimension of 1.

    Returns:
        The image.
    """
    if isinstance(image, Image.Image):
        return np.asarray(image.convert("RGB"), np.float32)
    if isinstance(image, torch.Tensor):
        image = image.detach().cpu().float().numpy()
    arr = np.asarray(image)
    if arr.ndim == 4 and arr.shape[0] == 1:
        arr = arr[0]
    if arr.ndim != 3:
        raise ValueError(f"expected an RGB image, got shape {arr.shape}")
    if arr.shape[-1] != 3 and arr.shape[0] == 3:
        arr = arr.transpose(1, 2, 0)
    if arr.shape[-1] != 3:
        raise ValueError(f"expected 3 channels, got shape {arr.shape}")
    if arr.dtype == np.uint8:
        return arr.astype(np.float32)
    return np.clip((arr.astype(np.float32) + 1.0) * 127.5, 0.0, 255.0)


def _palette_distances(rgb: np.ndarray) -> np.ndarray:
    return np.linalg.norm(rgb[:, :, None, :] - _PAL[None, None], axis=-1)  # (H, W, K)


def off_palette_fraction(image: Any, threshold: float = 0.2) -> float:
    """Fraction of pixels farther than ``threshold`` from every palette colour: an artifact measure for generated
    images (exact renders score 0; anti-aliased edges, blur and colour drift raise it).

    Args:
        image: Image (see :func:`to_rgb`).
        threshold: Euclidean RGB distance in [0, 1] units (0.2 ≈ 51/255; noise of σ = 0.05 in [-1, 1] units stays
            well below it).

    Returns:
        The fraction in [0, 1].
    """
    d = _palette_distances(to_rgb(image)).min(axis=-1)
    return float((d > threshold * 255.0).mean())


def _components(mask: np.ndarray) -> list[np.ndarray]:
    """4-connected components of a boolean mask, as arrays of flat indices."""
    h, w = mask.shape
    flat = mask.reshape(-1)
    seen = np.zeros(h * w, bool)
    comps = []
    for start in np.flatnonzero(flat):
        if seen[start]:
            continue
        seen[start] = True
        stack, comp = [int(start)], []
        while stack:
            p = stack.pop()
            comp.append(p)
            y, x = divmod(p, w)
            for q, ok in ((p - w, y > 0), (p + w, y < h - 1), (p - 1, x > 0), (p + 1, x < w - 1)):
                if ok and flat[q] and not seen[q]:
                    seen[q] = True
                    stack.append(q)
        comps.append(np.asarray(comp))
    return comps


def _dilate(mask: np.ndarray) -> np.ndarray:
    out = mask.copy()
    out[1:] |= mask[:-1]
    out[:-1] |= mask[1:]
    out[:, 1:] |= mask[:, :-1]
    out[:, :-1] |= mask[:, 1:]
    return out


def _unmix_colour(pixels: np.ndarray, bg: int) -> tuple[int, float]:
    """Colour ``c`` whose segment background→``c`` best explains the pixels (blurred edges are mixtures of the two).

    Returns the colour index and a purity in [0, 1]: ``1 - residual(best) / residual(second best)``.
    """
    b = _PAL[bg]
    seg = _PAL - b  # (K, 3)
    rel = pixels - b  # (N, 3)
    t = np.clip((rel @ seg.T) / np.maximum((seg * seg).sum(-1), 1e-6), 0.0, 1.0)  # (N, K)
    resid = np.linalg.norm(rel[:, None, :] - t[..., None] * seg[None], axis=-1).sum(axis=0)  # (K,)
    resid[bg] = np.inf
    order = np.argsort(resid)
    best, second = resid[order[0]], resid[order[1]]
    return int(order[0]), float(1.0 - best / max(second, 1e-6))


def _fill_ratios() -> dict[str, float]:
    n = 256
    return {k: float(shape_mask(k, n / 2, n / 2, n, n, n, n).mean()) for k in ALL_KINDS}


#: Area of each kind as a fraction of its bounding box.
_FILL = _fill_ratios()


def _cell(cx: float, cy: float) -> str:
    col = int(cx > _CELL_SPLITS[0]) + int(cx > _CELL_SPLITS[1])
    row = int(cy > _CELL_SPLITS[0]) + int(cy > _CELL_SPLITS[1])
    return POSITIONS[3 * row + col]


def _soft_iou(a: np.ndarray, b: np.ndarray) -> float:
    return float(np.minimum(a, b).sum() / max(np.maximum(a, b).sum(), 1e-6))


def _blur_last2(x: np.ndarray, sigma: float) -> np.ndarray:
    """Gaussian blur over the last two axes (edge padding)."""
    r = max(1, int(np.ceil(3 * sigma)))
    k = np.exp(-0.5 * (np.arange(-r, r + 1) / sigma) ** 2)
    k /= k.sum()
    h, w = x.shape[-2:]
    pad = np.pad(x, [(0, 0)] * (x.ndim - 2) + [(r, r), (r, r)], mode="edge")
    tmp = sum(k[i] * pad[..., i : i + h, :] for i in range(2 * r + 1))
    return sum(k[i] * tmp[..., :, i : i + w] for i in range(2 * r + 1))


def _templates(kind: str, args: tuple[Any, ...]) -> np.ndarray:
    """Binary, anti-aliased and blurred anti-aliased templates of one kind for a batch of boxes."""
    aa = shape_mask(kind, *args, supersample=4)
    out = [shape_mask(kind, *args, supersample=1), aa]
    out += [_blur_last2(aa, s) for s in _TEMPLATE_BLURS]
    return np.concatenate(out)


def _classify_kind(soft: np.ndarray, box: tuple[int, int, int, int], kinds: Sequence[str]) -> dict[str, float]:
    """Best soft IoU of each kind's templates fitted to the box (over small shifts/scales), on a padded window."""
    y0, x0, y1, x1 = box
    h, w = soft.shape
    p = _WINDOW_PAD
    wy0, wx0, wy1, wx1 = max(y0 - p, 0), max(x0 - p, 0), min(y1 + 1 + p, h), min(x1 + 1 + p, w)
    win = soft[wy0:wy1, wx0:wx1]
    bw, bh = x1 - x0 + 1, y1 - y0 + 1
    cx, cy = (x0 + x1 + 1) / 2 - wx0, (y0 + y1 + 1) / 2 - wy0
    grid = np.asarray(list(product(_SHIFTS, _SHIFTS, _SCALES)))  # (n, 3)
    args = (cx + grid[:, 0], cy + grid[:, 1], bw + grid[:, 2], bh + grid[:, 2], win.shape[0], win.shape[1])
    scores = {}
    for kind in kinds:
        t = _templates(kind, args)  # (m, h, w)
        inter = np.minimum(win[None], t).sum(axis=(1, 2))
        union = np.maximum(win[None], t).sum(axis=(1, 2))
        scores[kind] = float((inter / np.maximum(union, 1e-6)).max())
    return scores


def judge(image: Any, kinds: Sequence[str] = ALL_KINDS, max_shapes: int = 4) -> Verdict:
    """Read a toy scene off an image. Deterministic.

    Args:
        image: Image (see :func:`to_rgb`); any resolution (geometry thresholds are relative to the image side).
        kinds: Kinds the classifier may answer (restrict to the kinds a model was trained on).
        max_shapes: Keep at most this many components (largest first).

    Returns:
        The verdict.
    """
    rgb = to_rgb(image)
    h, w, _ = rgb.shape
    dist = _palette_distances(rgb)
    label = dist.argmin(axis=-1)
    dmin = dist.min(axis=-1)
    counts = np.bincount(label.reshape(-1), minlength=len(COLOURS))
    bg = int(counts.argmax())
    bg_rgb = _PAL[bg]
    fg = dist[..., bg] > _FG_THRESHOLD
    comps = [c for c in _components(fg) if len(c) >= _MIN_AREA * h * w]
    comps.sort(key=len, reverse=True)
    comps = comps[:max_shapes]
    taken = np.zeros(h * w, bool)
    for c in comps:
        taken[c] = True
    taken = taken.reshape(h, w)
    shapes = []
    for comp in comps:
        mask = np.zeros(h * w, bool)
        mask[comp] = True
        mask = mask.reshape(h, w)
        col, purity = _unmix_colour(rgb[mask], bg)
        # soft coverage on the component and its 1-px rim (not on other components)
        region = _dilate(mask) & ~(taken & ~mask)
        seg = _PAL[col] - bg_rgb
        proj = ((rgb - bg_rgb) @ seg) / float(seg @ seg)
        soft = np.where(region, np.clip(proj, 0.0, 1.0), 0.0).astype(np.float32)
        core_box = soft >= 0.5  # the edge of a blurred shape sits where coverage crosses ½
        ys, xs = np.nonzero(core_box if core_box.any() else mask)
        box = (int(ys.min()), int(xs.min()), int(ys.max()), int(xs.max()))
        scores = _classify_kind(soft, box, kinds)
        ranked = sorted(scores.values(), reverse=True)
        kind = max(scores, key=lambda k: scores[k])
        margin = 1.0 - (ranked[1] / ranked[0] if len(ranked) > 1 and ranked[0] > 0 else 0.0)
        conf = min(ranked[0], min(1.0, 10.0 * margin), purity)
        x0, y0, x1, y1 = box[1] / w, box[0] / h, (box[3] + 1) / w, (box[2] + 1) / h
        extent = float(np.sqrt(soft.sum() / _FILL[kind])) / max(h, w)  # blur keeps the mass
        shapes.append(
            DetectedShape(
                kind=kind,
                colour=COLOURS[col],
                size="large" if extent > _SIZE_SPLIT else "small",
                position=_cell((x0 + x1) / 2, (y0 + y1) / 2),
                box=(x0, y0, x1, y1),
                area=float(soft.sum() / (h * w)),
                kind_scores=scores,
                colour_purity=purity,
                confidence=float(conf),
            )
        )
    shapes.sort(key=lambda s: (POSITIONS.index(s.position) // 3, (s.box[0] + s.box[2]) / 2))
    bg_frac = float(counts[bg] / (h * w))
    conf = min([s.confidence for s in shapes], default=0.0)
    return Verdict(
        background=COLOURS[bg],
        shapes=tuple(shapes),
        background_fraction=bg_frac,
        off_palette=float((dmin > 0.2 * 255.0).mean()),
        confidence=float(conf),
    )


# ---------------------------------------------------------------------------------------------------------------------
# scoring


_SHAPE_ATTRS = ("kind", "colour", "size", "position")


def compare(verdict: Verdict, scene: Scene) -> dict[str, list[bool]]:
    """Attribute-by-attribute agreement between a verdict and the true scene.

    Shapes are matched by position (the assignment with the most agreeing positions, then attributes); when the
    count differs every true shape without a match counts as wrong for every attribute.

    Args:
        verdict: Judge output.
        scene: Ground truth.

    Returns:
        ``{"background": [ok], "count": [ok], "kind": [ok per true shape], "colour": [...], "size": [...],
        "position": [...], "scene": [everything ok]}``.
    """
    out: dict[str, list[bool]] = {"background": [verdict.background == scene.background]}
    out["count"] = [verdict.count == len(scene.shapes)]
    truth, det = scene.shapes, verdict.shapes
    k = min(len(truth), len(det))

    def score(pairs: list[tuple[Any, DetectedShape]]) -> int:
        return sum(
            10 * (t.position == d.position) + sum(getattr(t, a) == getattr(d, a) for a in _SHAPE_ATTRS)
            for t, d in pairs
        )

    matchings = (
        [(truth[i], det[j]) for i, j in zip(ti, dj, strict=True)]
        for ti in permutations(range(len(truth)), k)
        for dj in permutations(range(len(det)), k)
    )
    best = max(matchings, key=score)
    for a in _SHAPE_ATTRS:
        out[a] = [getattr(t, a) == getattr(d, a) for t, d in best] + [False] * (len(truth) - len(best))
    out["scene"] = [all(all(v) for v in out.values())]
    return out


def _match(spec_shape: dict[str, str], det: Any) -> bool:
    return all(getattr(det, a) == v for a, v in spec_shape.items())


def satisfies(verdict: Verdict, text: str) -> bool:
    """Whether a verdict agrees with everything a caption says (count, background and, for some assignment of
    noun phrases to shapes, every attribute named).

    Args:
        verdict: Judge output.
        text: Caption in the grammar of :mod:`nagkit.toy.data`.

    Returns:
        ``True`` when the image satisfies the caption.
    """
    spec = parse_caption(text)
    if spec.count != verdict.count:
        return False
    if spec.background is not None and spec.background != verdict.background:
        return False
    return any(
        all(_match(s, verdict.shapes[i]) for s, i in zip(spec.shapes, perm, strict=True))
        for perm in permutations(range(verdict.count))
    )


def _gaussian_blur(x: np.ndarray, sigma: float) -> np.ndarray:
    r = max(1, int(np.ceil(3 * sigma)))
    k = np.exp(-0.5 * (np.arange(-r, r + 1) / sigma) ** 2)
    k /= k.sum()
    pad = np.pad(x, ((r, r), (r, r), (0, 0)), mode="edge")
    tmp = sum(k[i] * pad[i : i + x.shape[0], :, :] for i in range(2 * r + 1))
    return sum(k[i] * tmp[:, i : i + x.shape[1], :] for i in range(2 * r + 1))


def degrade(image: Any, rng: np.random.Generator, noise: float = 0.05, blur: float = 0.5) -> np.ndarray:
    """Blur then add Gaussian noise, as a stand-in for an imperfect generated image.

    Args:
        image: Image (see :func:`to_rgb`).
        rng: NumPy random generator for the noise.
        noise: Noise standard deviation in [-1, 1] units.
        blur: Gaussian blur standard deviation in pixels (0: none).

    Returns:
        ``float32`` HxWx3 image in [-1, 1].
    """
    x = to_rgb(image) / 127.5 - 1.0
    if blur > 0:
        x = _gaussian_blur(x, blur)
    if noise > 0:
        x = x + rng.normal(0.0, noise, size=x.shape)
    return np.clip(x, -1.0, 1.0).astype(np.float32)


def evaluate(
    n: int = 2000,
    seed: int = 12345,
    size: int = 32,
    noise: float = 0.0,
    blur: float = 0.0,
    antialias: bool = False,
    kinds: Sequence[str] = KINDS,
    colours: Sequence[str] = COLOURS,
) -> dict[str, float]:
    """Judge accuracy on freshly sampled renders.

    Args:
        n: Number of scenes.
        seed: Seed of the scenes and the noise.
        size: Render resolution.
        noise: :func:`degrade` noise (0: clean).
        blur: :func:`degrade` blur (0: none).
        antialias: Render anti-aliased.
        kinds: Kinds sampled (and allowed to the judge).
        colours: Colours sampled.

    Returns:
        Accuracy per attribute (``background``, ``count``, ``kind``, ``colour``, ``size``, ``position`` — per true
        shape — and ``scene`` — all correct), plus ``n`` and ``shapes`` (number of true shapes).
    """
    rng = np.random.default_rng(seed)
    acc: dict[str, list[bool]] = {}
    for _ in range(n):
        scene = sample_scene(rng, kinds, colours)
        img: Any = render(scene, size, antialias)
        if noise > 0 or blur > 0:
            img = degrade(img, rng, noise, blur)
        for key, oks in compare(judge(img, kinds), scene).items():
            acc.setdefault(key, []).extend(oks)
    out = {key: float(np.mean(v)) for key, v in acc.items()}
    out["n"] = float(n)
    out["shapes"] = float(len(acc["kind"]))
    return out
