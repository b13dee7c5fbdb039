"""Generate with the embedded model under a guidance method and score the images with the judge.

A :class:`Method` is one way of using a negative prompt: ``none`` (the negative is ignored), ``cfg`` (true
classifier-free guidance, ``negative_prompt`` + ``true_cfg_scale``), ``nag`` (``nagkit.apply`` with the negative as
NAG negative), or the experimental attention-space competitors ``vsf`` (Value Sign Flip) and ``nasa`` (NASA), both
through ``nagkit.apply(..., method=...)``. :func:`generate` runs a batch of seeds (one ``torch.Generator`` per seed,
so an image depends only on its seed); :func:`score` reads each image with :func:`nagkit.toy.judge.judge` and reports:

* ``negative_rate``: fraction of images showing the negative attribute (:func:`negative_present`);
* ``fidelity``: fraction satisfying everything the prompt says (:func:`nagkit.toy.judge.satisfies`);
* ``off_palette``: mean fraction of pixels far from every palette colour (artifacts, smears);
* ``confidence``: mean judge confidence (low when shapes are malformed or colours ambiguous).
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass
from typing import Any

import numpy as np
import torch
from PIL import Image, ImageDraw

from nagkit.toy.data import ALL_KINDS, COLOURS, POSITIONS, SIZES
from nagkit.toy.judge import Verdict, judge, satisfies
from nagkit.toy.model import EMBEDDED_CALL_KWARGS, TRAIN_KINDS

__all__ = [
    "Method",
    "NegativeSpec",
    "attribute_accuracy",
    "generate",
    "image_grid",
    "negative_present",
    "parse_negative",
    "score",
    "score_counts",
    "wilson",
]

#: Method kinds. ``vsf`` / ``nasa`` go through ``nagkit.apply(..., method=kind)`` (``NAGConfig.method``).
METHOD_KINDS = ("none", "cfg", "nag", "vsf", "nasa")


@dataclass(frozen=True)
class Method:
    """A way of using the negative prompt.

    Attributes:
        kind: ``"none"``, ``"cfg"``, ``"nag"``, ``"vsf"`` or ``"nasa"``.
        scale: CFG ``true_cfg_scale``, NAG ``scale``, VSF β or NASA φ (ignored for ``none``).
        tau: NAG ``tau`` (``None``: the preset's).
        alpha: NAG ``alpha`` (``None``: the preset's).
        mode: NAG mode, ``"fast"`` or ``"official"``.
        offset: VSF only: the logit offset on the negative's keys (``None``: the method's default).
    """

    kind: str
    scale: float = 1.0
    tau: float | None = None
    alpha: float | None = None
    mode: str = "fast"
    offset: float | None = None

    def __post_init__(self) -> None:
        if self.kind not in METHOD_KINDS:
            raise ValueError(f"Method.kind must be one of {', '.join(METHOD_KINDS)}, got {self.kind!r}")

    @property
    def label(self) -> str:
        """Short name for tables, e.g. ``"NAG 5 (fast)"``."""
        if self.kind == "none":
            return "none"
        if self.kind == "cfg":
            return f"CFG {self.scale:g}"
        if self.kind == "vsf":
            return f"VSF β{self.scale:g}" + ("" if self.offset is None else f" o{self.offset:g}")
        if self.kind == "nasa":
            return f"NASA φ{self.scale:g}"
        extra = "" if self.tau is None and self.alpha is None else f" τ{self.tau:g} α{self.alpha:g}"
        return f"NAG {self.scale:g}{extra} ({self.mode})"


def generate(
    pipe: Any, prompt: str, negative: str, method: Method, steps: int, seeds: Sequence[int]
) -> list[Image.Image]:
    """Generate one image per seed with the embedded pipeline.

    Args:
        pipe: The embedded ``FluxPipeline`` (:func:`nagkit.toy.model.load_embedded_pipeline`), without a guide.
        prompt: Prompt.
        negative: Negative prompt (used by ``cfg`` and ``nag``).
        method: Guidance method.
        steps: Sampling steps (≥ 1).
        seeds: One seed per image.

    Returns:
        PIL images, in seed order.
    """
    from nagkit import apply

    kwargs = {**EMBEDDED_CALL_KWARGS, "num_inference_steps": steps, "num_images_per_prompt": len(seeds)}
    kwargs["generator"] = [torch.Generator().manual_seed(int(s)) for s in seeds]
    if method.kind == "cfg":
        return pipe(prompt, negative_prompt=negative, true_cfg_scale=method.scale, **kwargs).images
    if method.kind == "none":
        return pipe(prompt, **kwargs).images
    if method.kind in ("vsf", "nasa"):
        extra = {} if method.offset is None else {"offset": method.offset}
        with apply(pipe, negative_prompt=negative, method=method.kind, scale=method.scale, **extra):
            return pipe(prompt, **kwargs).images
    options = {"scale": method.scale, "mode": method.mode}
    options.update({k: v for k, v in (("tau", method.tau), ("alpha", method.alpha)) if v is not None})
    with apply(pipe, negative_prompt=negative, **options):
        return pipe(prompt, **kwargs).images


@dataclass(frozen=True)
class NegativeSpec:
    """What a negative prompt names, as the judge can check it (see :func:`parse_negative`).

    Attributes:
        colours, kinds, sizes: Words of each attribute in the negative.
        position: The grid cell named (the longest match, e.g. ``"top left"`` over ``"left"``), or ``None``.
        background: Whether the colours name the background (the word ``background`` is present).
    """

    colours: tuple[str, ...]
    kinds: tuple[str, ...]
    sizes: tuple[str, ...]
    position: str | None
    background: bool


def parse_negative(negative: str) -> NegativeSpec:
    """Read a negative prompt as one noun phrase of the toy grammar without article.

    Colour / size / kind / position words (e.g. ``"red"``, ``"circle"``, ``"large red square"``) name a shape that has
    *all* of them; with the word ``background`` the colours name the background (``"red background"``).

    Args:
        negative: The negative prompt.

    Returns:
        The parsed negative.

    Raises:
        ValueError: If the negative names no attribute the judge can read, or a background without a colour.
    """
    words = negative.lower().replace(",", " ").split()
    text = f" {' '.join(words)} "
    spec = NegativeSpec(
        colours=tuple(w for w in words if w in COLOURS),
        kinds=tuple(w for w in words if w in ALL_KINDS),
        sizes=tuple(w for w in words if w in SIZES),
        position=next((p for p in sorted(POSITIONS, key=len, reverse=True) if f" {p} " in text), None),
        background="background" in words,
    )
    if spec.background and not spec.colours:
        raise ValueError(f"negative {negative!r}: a background negative needs a colour")
    if not (spec.colours or spec.kinds or spec.sizes or spec.position):
        raise ValueError(f"negative {negative!r} names no colour, kind, size or position the judge can read")
    return spec


def negative_present(verdict: Verdict, negative: str | NegativeSpec) -> bool:
    """Whether an image shows what a negative prompt names (:func:`parse_negative`): a shape with all the named
    attributes, or the named background colour; a negative of colour words only is also present when the background
    has that colour.

    Args:
        verdict: Judge output.
        negative: The negative prompt, or its parsed form.

    Returns:
        ``True`` when the named attribute(s) appear.

    Raises:
        ValueError: If the negative names no attribute the judge can read.
    """
    spec = parse_negative(negative) if isinstance(negative, str) else negative
    if spec.background:
        return verdict.background in spec.colours

    def match(shape: Any) -> bool:
        return (
            (not spec.colours or shape.colour in spec.colours)
            and (not spec.kinds or shape.kind in spec.kinds)
            and (not spec.sizes or shape.size in spec.sizes)
            and (spec.position is None or shape.position == spec.position)
        )

    if any(match(shape) for shape in verdict.shapes):
        return True
    only_colours = not (spec.kinds or spec.sizes or spec.position)
    return bool(spec.colours) and only_colours and verdict.background in spec.colours


def score(images: Sequence[Image.Image], prompt: str, negative: str) -> dict[str, float]:
    """Judge images generated for ``prompt`` with ``negative``.

    Args:
        images: Generated images.
        prompt: The prompt (toy grammar).
        negative: The negative prompt.

    Returns:
        ``{"n", "negative_rate", "fidelity", "off_palette", "confidence"}`` (rates and means in [0, 1]).
    """
    spec = parse_negative(negative)
    verdicts = [judge(im, kinds=TRAIN_KINDS) for im in images]
    n = len(verdicts)
    return {
        "n": n,
        "negative_rate": sum(negative_present(v, spec) for v in verdicts) / n,
        "fidelity": sum(satisfies(v, prompt) for v in verdicts) / n,
        "off_palette": float(np.mean([v.off_palette for v in verdicts])),
        "confidence": float(np.mean([v.confidence for v in verdicts])),
    }


def wilson(k: float, n: int, z: float = 1.959964) -> tuple[float, float]:
    """Wilson score interval of a binomial proportion (95 % by default).

    Args:
        k: Successes.
        n: Trials (``0`` gives ``(0, 1)``).
        z: Normal quantile.

    Returns:
        ``(low, high)``.
    """
    if n <= 0:
        return 0.0, 1.0
    p = k / n
    centre = (p + z * z / (2 * n)) / (1 + z * z / n)
    half = z * np.sqrt(p * (1 - p) / n + z * z / (4 * n * n)) / (1 + z * z / n)
    low = 0.0 if k <= 0 else float(max(0.0, centre - half))
    high = 1.0 if k >= n else float(min(1.0, centre + half))
    return low, high


def score_counts(images: Sequence[Image.Image], prompt: str, negative: str) -> dict[str, Any]:
    """:func:`score` with counts and 95 % intervals: what the quality report needs.

    Args:
        images: Generated images.
        prompt: The prompt (toy grammar).
        negative: The negative prompt.

    Returns:
        ``{"n", "negative", "fidelity", "single_shape"}`` (counts of images showing the negative, satisfying the prompt,
        showing exactly one shape), ``"off_palette"`` (mean fraction of off-palette pixels), ``"off_palette_sd"``
        (its standard deviation over images) and ``"confidence"`` (mean).
    """
    spec = parse_negative(negative)
    verdicts = [judge(im, kinds=TRAIN_KINDS) for im in images]
    off = np.asarray([v.off_palette for v in verdicts], np.float64)
    return {
        "n": len(verdicts),
        "negative": int(sum(negative_present(v, spec) for v in verdicts)),
        "fidelity": int(sum(satisfies(v, prompt) for v in verdicts)),
        "single_shape": int(sum(len(v.shapes) == 1 for v in verdicts)),
        "off_palette": float(off.mean()),
        "off_palette_sd": float(off.std(ddof=1)) if len(off) > 1 else 0.0,
        "confidence": float(np.mean([v.confidence for v in verdicts])),
    }


#: Positions :func:`attribute_accuracy` asks for (two corners and the centre).
PROBE_POSITIONS: tuple[str, ...] = ("top left", "bottom right", "center")


def attribute_accuracy(pipe: Any, steps: int = 8, seeds: Sequence[int] = range(1000, 1004),
                       palette_seed: int = 5) -> dict[str, float]:
    """What the model follows: fully specified one-shape prompts (every training kind × :data:`PROBE_POSITIONS` ×
    both sizes; shape and background colour drawn per prompt from ``palette_seed``), no guidance, read by the judge.

    Args:
        pipe: The embedded pipeline.
        steps: Sampling steps.
        seeds: Seeds per prompt.
        palette_seed: Seed of the colour draw.

    Returns:
        Fractions of all images: ``background`` (prompted background found), ``one_shape`` (exactly one shape), and,
        counting only one-shape images as hits, ``colour``, ``kind``, ``size``, ``position`` and ``all`` (every
        attribute and the background right); ``n`` the number of images.
    """
    import itertools

    rng = np.random.default_rng(palette_seed)
    counts = dict.fromkeys(("background", "one_shape", "colour", "kind", "size", "position", "all"), 0)
    n = 0
    for kind, position, size in itertools.product(TRAIN_KINDS, PROBE_POSITIONS, SIZES):
        colour, background = (str(c) for c in rng.choice(COLOURS, 2, replace=False))
        prompt = f"a {size} {colour} {kind} at the {position} on a {background} background"
        for image in generate(pipe, prompt, "", Method("none"), steps, seeds):
            v = judge(image, kinds=TRAIN_KINDS)
            n += 1
            counts["background"] += v.background == background
            if len(v.shapes) != 1:
                continue
            shape = v.shapes[0]
            hits = {"colour": shape.colour == colour, "kind": shape.kind == kind, "size": shape.size == size,
                    "position": shape.position == position}
            counts["one_shape"] += 1
            for key, hit in hits.items():
                counts[key] += hit
            counts["all"] += all(hits.values()) and v.background == background
    return {**{k: c / n for k, c in counts.items()}, "n": n}


def _label_font(size: float | None) -> Any:
    """PIL's built-in font at ``size`` pixels (Pillow >= 10.1 with FreeType); ``None``: the built-in default font."""
    if size is None:
        return None
    from PIL import ImageFont

    try:
        return ImageFont.load_default(size=size)
    except (TypeError, ImportError, OSError, AttributeError):  # old Pillow or no FreeType: the fixed-size font
        return ImageFont.load_default()


def _wrap(text: str, width: float, measure: ImageDraw.ImageDraw, font: Any) -> list[str]:
    """Greedy word wrap of each line of ``text`` to ``width`` pixels (a single longer word keeps its own line)."""
    lines: list[str] = []
    for paragraph in text.split("\n"):
        line = ""
        for word in paragraph.split(" "):
            candidate = f"{line} {word}" if line else word
            if line and measure.textlength(candidate, font=font) > width:
                lines.append(line)
                line = word
            else:
                line = candidate
        lines.append(line)
    return lines


def image_grid(
    cells: Sequence[Sequence[Sequence[Image.Image]]],
    row_labels: Sequence[str],
    col_labels: Sequence[str],
    zoom: int = 3,
    tiles: int = 2,
    title: str | None = None,
    font_size: float | None = None,
) -> Image.Image:
    """Compose a labelled grid: each cell shows ``tiles × tiles`` images (nearest-neighbour zoom).

    Args:
        cells: ``cells[row][col]`` = images of that cell (the first ``tiles²`` are shown).
        row_labels: One label per row.
        col_labels: One label per column.
        zoom: Integer upscaling of each image.
        tiles: Images per cell side.
        title: Text drawn in a band above the grid (``\n`` separates lines; long lines are word-wrapped to the grid's
            width). ``None``: no band.
        font_size: Pixel size of PIL's built-in font for the labels and the title (needs Pillow >= 10.1 with
            FreeType, else the fixed built-in font is used). ``None``: PIL's default font.

    Returns:
        The grid image (RGB).
    """
    side = cells[0][0][0].size[0] * zoom
    cell = tiles * side + (tiles - 1) * 2
    # PIL's built-in font has no Greek letters: spell τ and α out.
    row_labels = [label.replace("τ", "tau").replace("α", "alpha") for label in row_labels]
    font = _label_font(font_size)
    measure = ImageDraw.Draw(Image.new("RGB", (1, 1)))
    line_height = measure.textbbox((0, 0), "Ag", font=font)[3]
    pad, top = 8, 24 if font is None else max(24, line_height + 14)
    left = max(120, 12 + int(max(measure.textlength(label, font=font) for label in row_labels)))
    width = left + len(col_labels) * (cell + pad)
    title_lines = [] if title is None else _wrap(title, width - 2 * pad, measure, font)
    if title_lines:
        width = max(width, 2 * pad + int(max(measure.textlength(line, font=font) for line in title_lines)) + 1)
    band = len(title_lines) * (line_height + 4) + 2 * pad if title_lines else 0
    height = band + top + len(row_labels) * (cell + pad)
    grid = Image.new("RGB", (width, height), (245, 245, 245))
    draw = ImageDraw.Draw(grid)
    for i, line in enumerate(title_lines):
        draw.text((pad, pad + i * (line_height + 4)), line, fill=(0, 0, 0), font=font)
    if title_lines:
        draw.line([(0, band - 2), (width, band - 2)], fill=(200, 200, 200), width=1)
    for c, label in enumerate(col_labels):
        draw.text((left + c * (cell + pad) + 4, band + 6), label, fill=(0, 0, 0), font=font)
    for r, label in enumerate(row_labels):
        y0 = band + top + r * (cell + pad)
        draw.text((6, y0 + cell // 2 - (6 if font is None else line_height // 2)), label, fill=(0, 0, 0), font=font)
        for c in range(len(col_labels)):
            x0 = left + c * (cell + pad)
            for k, im in enumerate(cells[r][c][: tiles * tiles]):
                big = im.convert("RGB").resize((side, side), Image.NEAREST)
                grid.paste(big, (x0 + (k % tiles) * (side + 2), y0 + (k // tiles) * (side + 2)))
    return grid
