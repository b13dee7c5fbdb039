"""Toy text-to-image world: scene generator, captions, vocabulary, dataset and the pixel-rule judge."""

from __future__ import annotations

import numpy as np
import pytest
import torch
from PIL import Image

from nagkit.toy.data import (
    ALL_KINDS,
    COLOURS,
    PALETTE,
    POSITIONS,
    SIZES,
    VOCAB,
    Scene,
    Shape,
    ToyDataset,
    caption,
    captions,
    decode,
    describe,
    encode,
    parse_caption,
    render,
    sample_scene,
)
from nagkit.toy.judge import degrade, evaluate, judge, off_palette_fraction, satisfies

ATTRS = ("size", "colour", "kind", "position")


def _scenes(n: int, seed: int = 0) -> list[Scene]:
    rng = np.random.default_rng(seed)
    return [sample_scene(rng) for _ in range(n)]


def _as_set(shape_specs: list[dict[str, str]]) -> list[tuple[tuple[str, str], ...]]:
    return sorted(tuple(sorted(s.items())) for s in shape_specs)


# ---------------------------------------------------------------------------------------------------------------------
# generator


def test_generator_is_deterministic() -> None:
    a, b = np.random.default_rng(7), np.random.default_rng(7)
    for _ in range(50):
        sa, sb = sample_scene(a), sample_scene(b)
        assert sa == sb
        assert np.array_equal(render(sa), render(sb))
        assert captions(sa, a) == captions(sb, b)
    assert _scenes(20, seed=1) != _scenes(20, seed=2)


def test_scenes_are_valid() -> None:
    counts = {1: 0, 2: 0}
    for scene in _scenes(500):
        counts[len(scene.shapes)] += 1
        assert scene.background in COLOURS
        for sh in scene.shapes:
            assert sh.colour != scene.background
            assert sh.kind in ALL_KINDS and sh.size in SIZES and sh.position in POSITIONS
            x0, y0, x1, y1 = sh.box()
            assert 0.0 <= x0 < x1 <= 1.0 and 0.0 <= y0 < y1 <= 1.0
        if len(scene.shapes) == 2:
            (a0, b0, a1, b1), (c0, d0, c1, d1) = (s.box() for s in scene.shapes)
            assert c0 - a1 >= 0.08 or a0 - c1 >= 0.08 or d0 - b1 >= 0.08 or b0 - d1 >= 0.08
            assert scene.shapes[0].position != scene.shapes[1].position
    assert min(counts.values()) > 150


def test_render_is_exact_palette_and_resolution_free() -> None:
    palette = {tuple(v) for v in PALETTE.values()}
    for scene in _scenes(30):
        img = render(scene)
        assert img.shape == (32, 32, 3) and img.dtype == np.uint8
        assert {tuple(p) for p in img.reshape(-1, 3)} <= palette
        assert off_palette_fraction(img) == 0.0
        assert tuple(img[0, 0]) == PALETTE[scene.background] or len(scene.shapes) > 0
        big = render(scene, size=64)
        assert big.shape == (64, 64, 3)
        aa = render(scene, antialias=True)
        assert (aa != img).any(axis=-1).mean() < 0.2  # only edge pixels differ


def test_dataset_items() -> None:
    ds = ToyDataset(length=64, seed=3, max_length=24)
    x, text, ids = ds[5]
    assert x.shape == (3, 32, 32) and x.dtype == torch.float32
    assert x.min() >= -1.0 and x.max() <= 1.0
    assert ids.shape == (24,) and ids.dtype == torch.long
    assert decode(ids) == " ".join(text.split())
    # item i depends only on (seed, i): order-independent and reproducible across instances
    again = ToyDataset(length=64, seed=3, max_length=24)
    for i in (63, 0, 5):
        a, b = ds[i], again[i]
        assert torch.equal(a[0], b[0]) and a[1] == b[1] and torch.equal(a[2], b[2])
    assert ds[1][1] != ToyDataset(length=64, seed=4)[1][1] or not torch.equal(ds[1][0], ToyDataset(seed=4)[1][0])
    with pytest.raises(IndexError):
        ds[64]
    batch = next(iter(torch.utils.data.DataLoader(ds, batch_size=8)))
    assert batch[0].shape == (8, 3, 32, 32) and len(batch[1]) == 8 and batch[2].shape == (8, 24)
    empties = ToyDataset(length=200, empty_prob=0.5)
    assert 50 < sum(empties[i][1] == "" for i in range(200)) < 150
    only_full = ToyDataset(length=20, levels=("full",))
    for i in range(20):
        scene, _, text = only_full.item(i)
        assert len(parse_caption(text).shapes[0]) == 4


# ---------------------------------------------------------------------------------------------------------------------
# captions and vocabulary


def test_caption_examples() -> None:
    scene = Scene(
        "white",
        (
            Shape("circle", "red", "large", "top left", 0.2, 0.2, 0.38),
            Shape("square", "orange", "small", "right", 0.8, 0.5, 0.25),
        ),
    )
    full = describe(scene, [set(ATTRS)] * 2, True)
    assert full == "a large red circle at the top left and a small orange square at the right on a white background"
    assert describe(scene, [{"colour"}, set()], False) == "a red shape and a shape"
    assert describe(scene, [set(), set()], True, order=[1, 0]) == "two shapes on a white background"
    assert describe(scene, [{"colour", "kind"}, set()], False, order=[1, 0]) == "a shape and a red circle"
    one = Scene("orange", (Shape("ring", "blue", "small", "center", 0.5, 0.5, 0.25),))
    assert describe(one, [{"kind"}], True) == "a ring on an orange background"
    assert describe(one, [{"colour"}], False) == "a blue shape"
    with pytest.raises(ValueError):
        caption(one, np.random.default_rng(0), "verbose")


def test_caption_grammar() -> None:
    rng = np.random.default_rng(11)
    for scene in _scenes(300, seed=5):
        truth = [{a: getattr(s, a) for a in ATTRS} for s in scene.shapes]
        caps = captions(scene, rng)
        full, partial, minimal = (parse_caption(caps[k]) for k in ("full", "partial", "minimal"))
        # full names every attribute of every shape and the background
        assert full.count == len(scene.shapes) and full.background == scene.background
        assert _as_set(full.shapes) == _as_set(truth)
        # partial names some but not all
        named = sum(len(s) for s in partial.shapes) + (partial.background is not None)
        assert partial.count == len(scene.shapes)
        assert 1 <= named < 4 * len(scene.shapes) + 1
        # minimal: at most kind or colour per shape, no size/position/background: room for negatives
        assert minimal.count == len(scene.shapes) and minimal.background is None
        for spec in minimal.shapes:
            assert len(spec) <= 1 and set(spec) <= {"kind", "colour"}
        # every caption is consistent with the scene
        for spec in (partial, minimal):
            for s in spec.shapes:
                assert any(all(t[a] == v for a, v in s.items()) for t in truth)
            assert spec.background in (None, scene.background)


def test_captions_are_satisfied_by_their_render() -> None:
    rng = np.random.default_rng(2)
    for scene in _scenes(60, seed=9):
        verdict = judge(render(scene))
        caps = captions(scene, rng)
        for text in caps.values():
            assert satisfies(verdict, text), (text, scene)
        wrong_bg = next(c for c in COLOURS if c != scene.background and all(s.colour != c for s in scene.shapes))
        assert not satisfies(verdict, caps["full"].rsplit(" on ", 1)[0] + f" on a {wrong_bg} background")
        assert not satisfies(verdict, "two shapes" if len(scene.shapes) == 1 else "a shape")


def test_vocabulary() -> None:
    rng = np.random.default_rng(4)
    for scene in _scenes(200, seed=6):
        for text in captions(scene, rng).values():
            ids = encode(text)
            assert VOCAB.unk_id not in ids and VOCAB.pad_id not in ids
            assert decode(ids) == text
            assert len(ids) <= 21
    assert encode("A RED, circle!") == encode("a red circle")
    ids = encode("a purple unicorn")
    assert ids[2] == VOCAB.unk_id and decode(ids) == "a purple <unk>"
    assert encode("a red circle", max_length=5) == [*encode("a red circle"), 0, 0]
    assert encode("a b c d e f", max_length=3) == encode("a b c")
    assert decode(torch.tensor(encode("two shapes", 6))) == "two shapes"
    assert len(VOCAB) == len(set(VOCAB.itos)) == 32
    assert VOCAB.itos[:2] == ["<pad>", "<unk>"]


# ---------------------------------------------------------------------------------------------------------------------
# judge


def test_judge_accuracy_clean() -> None:
    acc = evaluate(300, seed=2024)
    for key in ("background", "count", "kind", "colour", "size", "position"):
        assert acc[key] >= 0.98, (key, acc)


def test_judge_accuracy_noisy() -> None:
    acc = evaluate(300, seed=2025, noise=0.05, blur=0.5)
    for key in ("background", "count", "kind", "colour", "size", "position"):
        assert acc[key] >= 0.95, (key, acc)


def test_judge_inputs_and_artifacts() -> None:
    scene = _scenes(1, seed=3)[0]
    img = render(scene)
    ref = judge(img)
    assert judge(Image.fromarray(img)) == ref
    assert judge(torch.from_numpy(img).permute(2, 0, 1).float() / 127.5 - 1.0) == ref
    assert judge(torch.from_numpy(img).float()[None] / 127.5 - 1.0) == ref
    assert ref.confidence > 0.5 and ref.off_palette == 0.0
    noisy = degrade(img, np.random.default_rng(0))
    assert noisy.dtype == np.float32 and noisy.shape == (32, 32, 3)
    assert off_palette_fraction(noisy) < 0.2
    garbage = np.random.default_rng(0).uniform(-1, 1, (32, 32, 3)).astype(np.float32)
    assert off_palette_fraction(garbage) > 0.5
    assert judge(garbage).confidence < 0.5
    blank = np.full((32, 32, 3), PALETTE["blue"], np.uint8)
    v = judge(blank)
    assert v.background == "blue" and v.count == 0 and v.confidence == 0.0
