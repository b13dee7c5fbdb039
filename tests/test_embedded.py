"""The embedded toy model: shipped weights load offline, its autoencoder reconstructs the toy scenes, NAG
install/remove on it, resumable two-stage training, the negative-attribute scorer, and a statistical check that NAG
removes the negative attribute."""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import pytest
import torch
from diffusers import FluxPipeline

import nagkit
from nagkit.toy.data import PALETTE, Scene, Shape, render
from nagkit.toy.evaluate import Method, generate, negative_present, score
from nagkit.toy.judge import DetectedShape, Verdict, judge
from nagkit.toy.model import (
    EMBEDDED_CALL_KWARGS,
    EMBEDDED_WEIGHTS,
    build_toy_pipeline,
    embedded_info,
    load_embedded_pipeline,
    pack_images,
)

WEIGHTS = Path(nagkit.__file__).parent / "toy" / "weights" / EMBEDDED_WEIGHTS


@pytest.fixture(scope="module")
def pipe() -> FluxPipeline:
    return load_embedded_pipeline()


def test_weights_are_shipped_small_and_load_offline(pipe):
    assert WEIGHTS.is_file(), "the embedded weights must ship inside the package"
    assert WEIGHTS.stat().st_size <= 20 * 2**20
    assert isinstance(pipe, FluxPipeline)
    assert type(pipe.transformer).__name__ == "FluxTransformer2DModel"
    record = embedded_info()
    assert record["steps"] > 0 and record["final_loss"] < 0.5
    # the trained weights differ from the seeded random initialisation
    random = build_toy_pipeline(seed=0)
    w = dict(pipe.transformer.named_parameters())
    r = dict(random.transformer.named_parameters())
    assert not torch.equal(w["proj_out.weight"], r["proj_out.weight"])


def test_generates_an_image_of_the_right_size(pipe):
    out = pipe("a red circle", generator=torch.Generator().manual_seed(0), **{**EMBEDDED_CALL_KWARGS,
                                                                            "num_inference_steps": 2})
    image = out.images[0]
    assert image.size == (32, 32)
    assert np.isfinite(np.asarray(image, np.float32)).all()


def test_autoencoder_reconstructs_scenes_and_matches_the_pipeline_layout(pipe):
    """The trained autoencoder keeps most of what the judge reads: on 32 held-out scenes the judge finds the same
    background, number of shapes, kinds and colours in the reconstruction as in the scene. Measured: 27 of 32 (102 of
    128 on another seed); the judge reads the renders themselves right in ≥ 98 % (tests/test_toy.py)."""
    from nagkit.toy.data import ToyDataset
    from nagkit.toy.model import TRAIN_KINDS

    data = ToyDataset(length=32, seed=4242, kinds=TRAIN_KINDS)
    x = torch.stack([data[i][0] for i in range(32)])
    with torch.no_grad():
        packed = pack_images(pipe.vae, x)
        assert packed.shape == (32, 16, 16)
        # the pipeline's own decoding path: unpack, undo the standardisation, decode
        z = FluxPipeline._unpack_latents(packed, 32, 32, pipe.vae_scale_factor)
        z = z / pipe.vae.config.scaling_factor + pipe.vae.config.shift_factor
        rec = pipe.vae.decode(z).sample.clamp(-1, 1)
    agree = 0
    for i in range(32):
        scene = data.scene(i)
        v = judge(rec[i].permute(1, 2, 0).numpy(), kinds=TRAIN_KINDS)
        agree += (v.background == scene.background and len(v.shapes) == len(scene.shapes)
                  and sorted((d.kind, d.colour) for d in v.shapes) == sorted((t.kind, t.colour) for t in scene.shapes))
    assert agree >= 24, agree


def test_trained_model_follows_the_background_colour(pipe):
    """The prompted background colour under an otherwise open prompt (chance: 1 in 8). Measured: 32 of 32 at 8 steps.
    Fidelity to fully specified prompts: `test_trained_model_follows_fully_specified_prompts`."""
    from nagkit.toy.data import COLOURS
    from nagkit.toy.model import TRAIN_KINDS

    hits = 0
    for colour in COLOURS:
        article = "an" if colour[0] in "aeiou" else "a"
        images = generate(pipe, f"a shape on {article} {colour} background", "red", Method("none"), 8, [0, 1, 2, 3])
        hits += sum(judge(im, kinds=TRAIN_KINDS).background == colour for im in images)
    assert hits >= 0.9 * 4 * len(COLOURS)


def test_nag_installs_and_removes_exactly(pipe):
    kwargs = {**EMBEDDED_CALL_KWARGS, "num_inference_steps": 2}
    base = pipe("a circle", generator=torch.Generator().manual_seed(1), output_type="pt", **kwargs).images
    with nagkit.apply(pipe, negative_prompt="a circle"):  # negative == prompt: identity
        same = pipe("a circle", generator=torch.Generator().manual_seed(1), output_type="pt", **kwargs).images
    with nagkit.apply(pipe, negative_prompt="red", scale=5.0):
        guided = pipe("a circle", generator=torch.Generator().manual_seed(1), output_type="pt", **kwargs).images
    after = pipe("a circle", generator=torch.Generator().manual_seed(1), output_type="pt", **kwargs).images
    assert torch.allclose(same, base, atol=1e-5)
    assert (guided - base).abs().max() > 1e-2
    assert torch.equal(after, base)


def test_nag_lowers_the_red_rate_of_a_circle(pipe):
    """Statistical, at 2 steps: "a circle" with NAG negative "red" at the ``embedded`` preset (scale 8, τ 5, α 1)
    shows red far less often than without guidance.

    `nagkit bench --quality` (docs/quality.md, seeds 0-31) measures the red rate of "a circle" at 2 steps: 75 % with no
    guidance, 31 % with the ``embedded`` preset (31 % with CFG 4; the Flux preset, NAG 5 τ 2.5 α 0.25, only 72 %).
    Here 96 other seeds (100-195), held out from the choice of the preset: measured 76 % -> 20 %. The test asks for
    a drop of at least 30 points and at most half of the baseline left.
    """
    preset = nagkit.get_preset("embedded")
    seeds = list(range(100, 196))
    none = score(generate(pipe, "a circle", "red", Method("none"), 2, seeds), "a circle", "red")
    method = Method("nag", preset.scale, preset.tau, preset.alpha)
    nag = score(generate(pipe, "a circle", "red", method, 2, seeds), "a circle", "red")
    assert none["negative_rate"] >= 0.5, none
    assert nag["negative_rate"] <= none["negative_rate"] - 0.3, (none, nag)
    assert nag["negative_rate"] <= 0.5 * none["negative_rate"], (none, nag)


def _shape(colour: str, kind: str = "circle", size: str = "small", position: str = "center") -> DetectedShape:
    return DetectedShape(kind, colour, size, position, (0, 0, 1, 1), 0.1, {}, 1.0, 1.0)


def test_negative_present_reads_colours_kinds_backgrounds():
    v = Verdict(background="white", shapes=(_shape("red", "circle"), _shape("blue", "square", "large", "left")))
    assert negative_present(v, "red")
    assert negative_present(v, "white")  # background colour counts for a bare colour
    assert not negative_present(v, "green")
    assert negative_present(v, "square") and not negative_present(v, "triangle")
    assert negative_present(v, "large blue square") and not negative_present(v, "large red square")
    assert negative_present(v, "a white background") and not negative_present(v, "red background")
    assert negative_present(v, "blue shape at the left") and not negative_present(v, "blue shape at the right")
    with pytest.raises(ValueError, match="names no colour"):
        negative_present(v, "blurry")
    with pytest.raises(ValueError, match="needs a colour"):
        negative_present(v, "background")


def test_score_of_clean_renders():
    scene = Scene("white", (Shape("circle", "red", "large", "center", 0.5, 0.5, 0.38),))
    images = [render(scene, 32)] * 4
    s = score(images, "a red circle", "red")
    assert s["negative_rate"] == 1.0 and s["fidelity"] == 1.0 and s["off_palette"] == 0.0
    assert judge(images[0]).shapes[0].colour == "red"
    assert PALETTE["red"] == tuple(images[0][16, 16])


def test_training_resumes_exactly(tmp_path):
    """Both stages resume bit-identically: interrupted in the autoencoder stage and again in the diffusion stage."""
    from nagkit.toy.train import train

    a, b = tmp_path / "a", tmp_path / "b"
    opts = dict(steps=3, ae_steps=2, batch_size=2, warmup=1, checkpoint_every=10, log_every=1)
    record = train(a, **opts)
    assert train(b, **opts, stop_at=1) == {"stopped_at": 1, "steps": 5}  # inside the autoencoder stage
    assert not (b / EMBEDDED_WEIGHTS).exists()
    assert torch.load(b / "checkpoint.pt", weights_only=False)["ae_step"] == 1
    assert train(b, **opts, stop_at=3) == {"stopped_at": 3, "steps": 5}  # one diffusion step done
    ckpt = torch.load(b / "checkpoint.pt", weights_only=False)
    assert (ckpt["ae_step"], ckpt["step"]) == (2, 1)
    resumed = train(b, **opts)
    assert resumed["final_loss"] == record["final_loss"]
    assert resumed["autoencoder"]["scaling_factor"] == record["autoencoder"]["scaling_factor"]
    ea = torch.load(a / "checkpoint.pt", weights_only=False)["ema"]
    eb = torch.load(b / "checkpoint.pt", weights_only=False)["ema"]
    assert any(k.startswith("vae.") for k in ea) and ea.keys() == eb.keys()
    for k, v in ea.items():
        assert torch.equal(v, eb[k]), k
    assert json.loads((a / "embedded.json").read_text())["steps"] == 3
    reloaded = build_toy_pipeline(b / EMBEDDED_WEIGHTS)
    assert torch.equal(reloaded.transformer.proj_out.weight, eb["transformer.proj_out.weight"])
    assert torch.equal(reloaded.vae.decoder.conv_out.weight, eb["vae.decoder.conv_out.weight"])
    assert reloaded.vae.config.scaling_factor == record["autoencoder"]["scaling_factor"]
    with pytest.raises(ValueError, match="ae_steps must be >= 1"):
        train(tmp_path / "c", steps=3, ae_steps=0)


def test_held_out_loss_ranks_trained_above_random_weights(pipe):
    from nagkit.toy.model import build_toy_pipeline
    from nagkit.toy.train import held_out_loss

    trained, bands = held_out_loss(pipe, n=32, bands=4)
    random_init, _ = held_out_loss(build_toy_pipeline(), n=32, bands=4)
    assert len(bands) == 4 and trained == pytest.approx(sum(bands) / 4, rel=1e-5)
    assert trained < 0.5 * random_init, (trained, random_init)
    assert held_out_loss(pipe, n=32, bands=4) == (trained, bands)  # fixed data and noise: deterministic
    with pytest.raises(ValueError, match="multiple of bands"):
        held_out_loss(pipe, n=30, bands=4)


def test_quality_benchmark_structure_and_findings(pipe, tmp_path):
    from nagkit.bench.quality import render_quality, run_quality, write_json, write_quality_markdown

    methods = [Method("none"), Method("cfg", 4.0), Method("nag", 5.0), Method("nag", 5.0, mode="official")]
    report = run_quality(pairs=[("a circle", "red")], methods=methods, steps=(1, 2), seeds=2, pipe=pipe)
    assert report["methods"] == ["none", "CFG 4", "NAG 5 (fast)", "NAG 5 (official)"]
    cell = report["pairs"][0]["methods"]["NAG 5 (fast)"][2]
    assert set(cell) == {"n", "negative_rate", "fidelity", "off_palette", "confidence"} and cell["n"] == 2
    gap = report["pairs"][0]["fast_vs_official"]["NAG 5"]
    assert set(gap) == {1, 2} and all(v >= 0 for v in gap.values())
    assert any("negative rate" in line for line in report["findings"])
    assert "NAG 5 (fast)" in render_quality(report)
    data = json.loads(write_json(report, tmp_path / "q.json").read_text())
    assert "_grid" not in data and data["seeds"] == 2
    page, grid = write_quality_markdown(report, tmp_path / "quality.md")
    text = page.read_text()
    assert '### "a circle", negative "red"' in text and "## The embedded model's training" in text
    assert grid is None  # the grid needs 1, 2, 4, 8 steps
    with pytest.raises(ValueError, match="seeds must be >= 1"):
        run_quality(seeds=0, pipe=pipe)


def test_cli_demo_and_generate_without_model(tmp_path, capsys):
    from PIL import Image

    from nagkit.cli.main import main

    rc = main(["demo", "--seeds", "2", "--out", str(tmp_path / "demo.png"), "--json", str(tmp_path / "demo.json")])
    out = capsys.readouterr().out
    assert rc == 0 and "NAG 8 τ5 α1 (fast)" in out and "CFG 4" in out  # NAG row: the "embedded" preset
    grid = Image.open(tmp_path / "demo.png")
    assert grid.size[0] > 4 * 32 and grid.size[1] > 3 * 32
    numbers = json.loads((tmp_path / "demo.json").read_text())
    assert [r["method"] for r in numbers["rows"]] == ["none", "CFG 4", "NAG 8 τ5 α1 (fast)"]
    assert set(numbers["rows"][2]["steps"]) == {"1", "2", "4", "8"}
    rc = main(["demo", "--seeds", "1", "--nag-scale", "3", "--nag-alpha", "0.5", "--out", str(tmp_path / "d2.png"),
               "--json", str(tmp_path / "d2.json")])
    assert rc == 0
    assert json.loads((tmp_path / "d2.json").read_text())["rows"][2]["method"] == "NAG 3 τ5 α0.5 (fast)"
    assert main(["demo", "--nag-alpha", "2"]) == 2
    assert "alpha" in capsys.readouterr().err
    rc = main(["generate", "a circle", "--negative", "red", "--steps", "2", "--out", str(tmp_path / "c.png")])
    assert rc == 0
    assert Image.open(tmp_path / "c.png").size == (32, 32)
    sidecar = json.loads((tmp_path / "c.json").read_text())
    assert sidecar["model"] == "embedded" and sidecar["pipeline"] == "FluxPipeline"
    assert sidecar["nag"]["negative"] == "red" and sidecar["nag"]["preset"] == "embedded"
    assert (sidecar["nag"]["scale"], sidecar["nag"]["alpha"]) == (8.0, 1.0)
    assert main(["demo", "--negative", "blurry"]) == 2
    assert "names no colour" in capsys.readouterr().err
    assert main(["demo", "--seeds", "0"]) == 2


def test_trained_model_follows_fully_specified_prompts(pipe):
    """`attribute_accuracy` (18 fully specified one-shape prompts × 4 seeds, 8 steps, no guidance), measured on the
    shipped weights: one shape 97 %, position 97 % (chance 1 in 9), colour 92 % (1 in 8), size 82 % (1 in 2), kind 42 %
    (1 in 3: the weakest attribute, asserted only to beat chance), background 100 %. Thresholds leave room for
    platform-level float differences, not for a model that ignores the text."""
    from nagkit.toy.evaluate import attribute_accuracy

    acc = attribute_accuracy(pipe, steps=8)
    assert acc["n"] == 72  # 3 kinds x 3 positions x 2 sizes x 4 seeds
    assert set(acc) == {"n", "background", "one_shape", "colour", "kind", "size", "position", "all"}
    assert max(acc["colour"], acc["kind"], acc["size"], acc["position"]) <= acc["one_shape"]
    assert acc["all"] <= min(acc["colour"], acc["kind"], acc["size"], acc["position"])
    assert acc["one_shape"] >= 0.85 and acc["background"] >= 0.9, acc
    assert acc["position"] >= 0.85 and acc["colour"] >= 0.75 and acc["size"] >= 0.65, acc
    assert acc["kind"] > 1 / 3, acc
