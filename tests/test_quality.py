"""The quality benchmark (:mod:`nagkit.bench.quality`) without a model: Wilson intervals, counts, pooling, the
base-rate filter, findings, the Markdown page with its grid and Pareto plot, and the cell cache. Generation is replaced
by rendered scenes whose colours depend on the method, so every number is known in advance."""

from __future__ import annotations

import json

import numpy as np
import pytest
from PIL import Image

import nagkit.bench.quality as quality
from nagkit.toy.data import Scene, Shape, render
from nagkit.toy.evaluate import Method, score_counts, wilson

NONE, CFG, NAG, VSF = Method("none"), Method("cfg", 4.0), quality.NAG_EMBEDDED, quality.VSF_DEFAULT


def _image(colour: str, kind: str = "circle") -> Image.Image:
    scene = Scene("white", (Shape(kind, colour, "large", "center", 0.5, 0.5, 0.5),))
    return Image.fromarray(render(scene, 32))


def _fake_generate(pipe, prompt, negative, method, steps, seeds):
    """Red in 3 of 4 seeds without guidance, 1 of 4 with NAG, none with CFG (which draws squares: fidelity 0)."""
    out = []
    for s in seeds:
        if method.kind == "cfg":
            out.append(_image("blue", "square"))
        elif method.kind == "nag":
            out.append(_image("red" if s % 4 == 0 else "blue"))
        else:
            out.append(_image("blue" if s % 4 == 0 else "red"))
    return out


@pytest.fixture
def fake(monkeypatch):
    monkeypatch.setattr(quality, "generate", _fake_generate)
    return object()


def test_wilson_interval_known_values():
    lo, hi = wilson(0, 64)
    assert lo == 0.0 and 0.05 < hi < 0.06  # 0/64: [0, 5.7 %]
    lo, hi = wilson(32, 64)
    assert lo == pytest.approx(0.381, abs=2e-3) and hi == pytest.approx(0.619, abs=2e-3)
    assert wilson(0, 0) == (0.0, 1.0)
    for k in range(0, 11):
        lo, hi = wilson(k, 10)
        assert 0 <= lo <= k / 10 <= hi <= 1


def test_score_counts_reads_renders():
    c = score_counts([_image("red"), _image("red"), _image("blue", "square")], "a circle", "red")
    assert (c["n"], c["negative"], c["fidelity"], c["single_shape"]) == (3, 2, 2, 3)
    assert 0 <= c["off_palette"] < 0.05 and c["off_palette_sd"] >= 0


def test_run_quality_structure_intervals_and_findings(fake, tmp_path):
    pairs = [("a circle", "red"), ("a circle", "green")]  # the second: base rate 0 -> not summarised
    report = quality.run_quality(pairs=pairs, methods=[NONE, CFG, NAG, VSF], steps=(1, 2, 4), seeds=8, pipe=fake,
                                 models={1: "student", 2: "student", 4: "student"}, flops=False)
    assert report["models"] == {1: "student", 2: "student", 4: "student"}
    first, second = report["pairs"]
    assert first["measurable"] and not second["measurable"]
    assert report["summarised_pairs"] == ['"a circle" − "red"']
    assert first["base_rate"] == {1: 0.75, 2: 0.75, 4: 0.75}
    row = report["summary"][NAG.label][2]
    assert row["negative_rate"] == 0.25 and row["n"] == 8
    assert row["negative_rate_ci"] == list(wilson(2, 8))
    assert report["summary"]["CFG 4"][1]["fidelity"] == 0.0
    # legacy cells keep exactly the keys of nagkit.toy.evaluate.score
    assert set(first["methods"]["none"][1]) == {"n", "negative_rate", "fidelity", "off_palette", "confidence"}
    text = "\n".join(report["findings"])
    assert "separated from none" in text or "not separated from none" in text
    assert "Pareto front" in text and "student 2 steps" in text
    # CFG 4 (0 % red, 0 % fidelity) does not dominate NAG (25 % red, 75 % fidelity): no "NAG loses" line for it
    assert not any(line.startswith("* NAG loses") for line in report["findings"])
    page, grid = quality.write_quality_markdown(report, tmp_path / "quality.md")
    body = page.read_text()
    assert "[" in body and "95 % CI" in body and "## Base rates (no guidance)" in body
    assert "no (base rate too low)" in body
    assert grid is not None and (tmp_path / "quality_pareto.png").is_file()
    with Image.open(grid) as im:
        assert im.size[0] > 3 * 64 and im.size[1] > 4 * 64
    data = json.loads(quality.write_json(report, tmp_path / "q.json").read_text())
    assert "_grid" not in data and data["seeds"] == 8
    assert "student 1 step" in quality.render_quality(report)


def test_nag_loses_is_reported(fake, monkeypatch):
    def generate(pipe, prompt, negative, method, steps, seeds):  # CFG: never red, always a circle
        if method.kind == "cfg":
            return [_image("blue") for _ in seeds]
        return _fake_generate(pipe, prompt, negative, method, steps, seeds)

    monkeypatch.setattr(quality, "generate", generate)
    report = quality.run_quality(pairs=[("a circle", "red")], methods=[NONE, CFG, NAG], steps=(2,), seeds=8,
                                 pipe=fake, flops=False)
    assert any(line.startswith("* NAG loses") and "CFG 4" in line for line in report["findings"])
    assert quality.pareto_front(report["summary"], 2) == ["CFG 4"]


def test_cache_skips_finished_cells(fake, monkeypatch, tmp_path):
    cache = tmp_path / "cache.json"
    first = quality.run_quality(pairs=[("a circle", "red")], methods=[NONE, NAG], steps=(1,), seeds=4, pipe=fake,
                                cache=cache, flops=False)

    def boom(*args, **kwargs):
        raise AssertionError("a cached cell was generated again")

    monkeypatch.setattr(quality, "generate", boom)
    again = quality.run_quality(pairs=[("a circle", "red")], methods=[NONE, NAG], steps=(1,), seeds=4, pipe=fake,
                                cache=cache, flops=False)
    assert again["summary"] == first["summary"]


def test_pooled_off_palette_interval():
    cells = [{"n": 4, "negative": 1, "fidelity": 2, "single_shape": 4, "off_palette": 0.1, "off_palette_sd": 0.0,
              "confidence": 1.0},
             {"n": 4, "negative": 3, "fidelity": 2, "single_shape": 4, "off_palette": 0.3, "off_palette_sd": 0.0,
              "confidence": 1.0}]
    pooled = quality._pool(cells)
    assert pooled["negative_rate"] == 0.5 and pooled["n"] == 8
    assert pooled["off_palette"] == pytest.approx(0.2)
    sd = np.std([0.1] * 4 + [0.3] * 4, ddof=1)
    half = 1.959964 * sd / np.sqrt(8)
    assert pooled["off_palette_ci"] == pytest.approx([0.2 - half, 0.2 + half])


def test_vsf_and_nasa_methods_are_labelled():
    assert Method("vsf", 3.5).label == "VSF β3.5" and Method("nasa", 0.25).label == "NASA φ0.25"
    with pytest.raises(ValueError, match="Method.kind"):
        Method("pag")
