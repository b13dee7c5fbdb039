"""``nagkit demo`` (:mod:`nagkit.toy.demo`): grid title and labels, progress ticks, output-path checks, formats.

Most tests replace the generation with blank images (``_fake_generate``) so they take no model time; one runs the
embedded model at the smallest settings (1 seed, 1 step).
"""

from __future__ import annotations

import os

import pytest
from PIL import Image

import nagkit.toy.demo as demo
from nagkit.toy.demo import check_demo_outputs, run_demo
from nagkit.toy.evaluate import image_grid


def _fake_generate(pipe, prompt, negative, method, steps, seeds):
    return [Image.new("RGB", (32, 32), (255, 255, 255)) for _ in seeds]


@pytest.fixture
def fake(monkeypatch):
    monkeypatch.setattr(demo, "generate", _fake_generate)
    return object()  # stands in for the pipeline: run_demo loads none when one is given


def _bare_grid_size(result) -> tuple[int, int]:
    cells = [[[Image.new("RGB", (32, 32))] for _ in result["col_labels"]] for _ in result["row_labels"]]
    return image_grid(cells, result["row_labels"], result["col_labels"], font_size=demo._FONT_SIZE).size


def test_title_and_labels(tmp_path, fake):
    result = run_demo(tmp_path / "g.png", steps=(1, 2), seeds=6, nag_alpha=0.5, pipe=fake)
    title = result["title"]
    assert 'prompt "a circle"' in title and 'negative "red"' in title
    assert "true_cfg_scale 4" in title
    assert "scale 8, tau 5, alpha 0.5" in title and "alpha changed" in title
    assert "sampling steps 1, 2" in title and "seeds 0-3" in title and "seeds 0-5" in title
    assert result["row_labels"] == ["none", "CFG 4", "NAG 8 τ5 α0.5 (fast)"]
    assert result["col_labels"] == ["1 step", "2 steps"]
    assert result["seeds_shown"] == [0, 1, 2, 3] and result["format"] == "PNG"
    # the existing keys are kept
    assert {"grid", "prompt", "negative", "seeds", "seconds", "rows"} <= set(result)
    assert [list(r["steps"]) for r in result["rows"]] == [[1, 2]] * 3
    default = run_demo(tmp_path / "d.png", steps=(1,), seeds=1, pipe=fake)["title"]
    assert "('embedded' preset)" in default and "seed 0" in default


def test_png_has_title_band(tmp_path, fake):
    result = run_demo(tmp_path / "g.png", steps=(1, 2, 4, 8), seeds=1, pipe=fake)
    with Image.open(result["grid"]) as im:
        assert im.format == "PNG"
        width, height = im.size
    bare_width, bare_height = _bare_grid_size(result)
    assert height > bare_height + 40  # three title lines
    assert width >= bare_width


def test_formats_follow_suffix(tmp_path, fake):
    for name, fmt in (("g.JPG", "JPEG"), ("g.jpeg", "JPEG"), ("g.webp", "WEBP")):
        result = run_demo(tmp_path / name, steps=(1,), seeds=1, pipe=fake)
        assert result["format"] == fmt
        with Image.open(tmp_path / name) as im:
            assert im.format == fmt


def test_progress_callback(tmp_path, fake):
    calls = []
    run_demo(tmp_path / "g.png", steps=(1, 2), seeds=1, pipe=fake,
             progress=lambda done, total: calls.append((done, total)))
    assert calls == [(i, 6) for i in range(1, 7)]


def test_progress_bar(tmp_path, fake, capsys):
    run_demo(tmp_path / "g.png", steps=(1,), seeds=1, pipe=fake, progress=True)
    assert "3/3" in capsys.readouterr().err
    run_demo(tmp_path / "h.png", steps=(1,), seeds=1, pipe=fake)
    assert capsys.readouterr().err == ""


def test_check_outputs_accepts_writable_paths(tmp_path):
    check_demo_outputs(str(tmp_path / "a" / "b" / "g.png"), str(tmp_path / "n.json"))
    check_demo_outputs(str(tmp_path / "g.WEBP"), None)
    assert list(tmp_path.iterdir()) == []  # nothing created


@pytest.mark.parametrize("name", ["g.gif", "g", "g.png.txt"])
def test_check_outputs_unknown_suffix(tmp_path, name):
    with pytest.raises(ValueError, match=r"^--out .*suffix") as err:
        check_demo_outputs(str(tmp_path / name), None)
    assert "\n" not in str(err.value)


def test_check_outputs_parent_is_a_file(tmp_path):
    blocker = tmp_path / "file"
    blocker.write_text("x")
    with pytest.raises(ValueError, match=r"^--out .*not a directory"):
        check_demo_outputs(str(blocker / "g.png"), None)
    with pytest.raises(ValueError, match=r"^--json .*not a directory"):
        check_demo_outputs(str(tmp_path / "g.png"), str(blocker / "sub" / "n.json"))
    (tmp_path / "dir.png").mkdir()
    with pytest.raises(ValueError, match=r"^--out .*is a directory"):
        check_demo_outputs(str(tmp_path / "dir.png"), None)
    with pytest.raises(ValueError, match=r"^--json .*same file as --out"):
        check_demo_outputs(str(tmp_path / "g.png"), str(tmp_path / "g.png"))


@pytest.mark.skipif(not hasattr(os, "geteuid") or os.geteuid() == 0, reason="root writes into read-only directories")
def test_check_outputs_read_only_dir(tmp_path):
    locked = tmp_path / "locked"
    locked.mkdir()
    locked.chmod(0o500)
    try:
        with pytest.raises(ValueError, match=r"^--out .*not writable"):
            check_demo_outputs(str(locked / "g.png"), None)
        with pytest.raises(ValueError, match=r"^--json .*not writable"):
            check_demo_outputs(str(tmp_path / "g.png"), str(locked / "new" / "n.json"))
    finally:
        locked.chmod(0o700)


def test_check_outputs_unwritable_dir_simulated(tmp_path, monkeypatch):
    """The read-only case without relying on permissions (root can write anywhere): ``os.access`` says no."""
    locked = tmp_path / "locked"
    locked.mkdir()
    real_access = os.access

    def access(path, mode):
        return False if str(path) == str(locked) else real_access(path, mode)

    monkeypatch.setattr(demo.os, "access", access)
    with pytest.raises(ValueError, match=r"^--out .*cannot write in .*not writable"):
        check_demo_outputs(str(locked / "g.png"), None)
    with pytest.raises(ValueError, match=r"^--json .*cannot create .*new in .*not writable"):
        check_demo_outputs(str(tmp_path / "g.png"), str(locked / "new" / "n.json"))


def test_run_demo_checks_before_generating(tmp_path, monkeypatch):
    def boom(*args, **kwargs):
        raise AssertionError("generated before checking the output path")

    monkeypatch.setattr(demo, "generate", boom)
    monkeypatch.setattr("nagkit.toy.model.load_embedded_pipeline", boom)
    with pytest.raises(ValueError, match="--out"):
        run_demo(tmp_path / "g.bmp")
    (tmp_path / "file").write_text("x")
    with pytest.raises(ValueError, match="--out"):
        run_demo(tmp_path / "file" / "g.png")


def test_run_demo_embedded_model(tmp_path):
    """The real embedded model at the smallest settings: one seed, one step count."""
    calls = []
    result = run_demo(tmp_path / "out" / "g.png", steps=(1,), seeds=1, progress=lambda d, t: calls.append(d))
    assert calls == [1, 2, 3]
    assert [r["method"] for r in result["rows"]] == ["none", "CFG 4", "NAG 8 τ5 α1 (fast)"]
    with Image.open(result["grid"]) as im:
        assert im.size[1] > _bare_grid_size(result)[1]
