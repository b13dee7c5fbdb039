"""HunyuanVideo 1.5 tiny pipelines (``tiny-hunyuanvideo15``, ``tiny-hunyuanvideo15-i2v``) as registered tiny models:
build, determinism, pipeline-level identities, CFG through the guider, removal; the command line (``nagkit info``,
``nagkit generate`` with an MP4 and its sidecar) and ``--cfg-scale`` mapped to the pipeline's guider for the call."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
import torch

import nagkit
from nagkit.cli import models
from nagkit.cli.main import main
from nagkit.tiny.pipelines import TINY_CALL_KWARGS, TINY_PIPELINES, tiny_condition_image

NAMES = ["tiny-hunyuanvideo15", "tiny-hunyuanvideo15-i2v"]
EXPECTED = {"tiny-hunyuanvideo15": "HunyuanVideo15Pipeline",
            "tiny-hunyuanvideo15-i2v": "HunyuanVideo15ImageToVideoPipeline"}
PROMPT, NEGATIVE = "a red cat sitting on a table", "blurry low quality"


@pytest.fixture(scope="module", params=NAMES)
def tiny(request):
    return request.param, TINY_PIPELINES[request.param](seed=0)


def generate(name, pipe, output_type="latent", steps=2, seed=0, **kwargs):
    call = dict(TINY_CALL_KWARGS[name], num_inference_steps=steps, output_type=output_type, negative_prompt="",
                generator=torch.Generator().manual_seed(seed))
    if name.endswith("-i2v"):
        call["image"] = tiny_condition_image()
    call.update(kwargs)
    return pipe(prompt=PROMPT, **call).frames


def record(pipe):
    outputs = []
    handle = pipe.transformer.register_forward_hook(lambda m, a, out: outputs.append(out[0].detach().clone()))
    return outputs, handle


def test_build_call_shape_and_determinism(tiny):
    name, pipe = tiny
    assert type(pipe).__name__ == EXPECTED[name]
    params = [p for m in pipe.components.values() if isinstance(m, torch.nn.Module) for p in m.parameters()]
    assert all(p.device.type == "cpu" and p.dtype == torch.float32 for p in params)
    video = generate(name, pipe, output_type="pt")
    assert tuple(video.shape) == (1, 5, 3, 32, 32) and torch.isfinite(video).all()
    latents = generate(name, pipe)
    assert tuple(latents.shape) == (1, 4, 2, 2, 2)  # 4 channels, (5 - 1) / 4 + 1 frames, 32 / 16 pixels
    assert torch.equal(latents, generate(name, pipe))
    other = TINY_PIPELINES[name](seed=1).transformer.state_dict()
    mine = pipe.transformer.state_dict()
    assert any(not torch.equal(mine[k], other[k]) for k in mine)


def test_identities_cfg_and_removal(tiny):
    """Scale 1 bit-identical; negative == prompt close; a guided run differs and is finite; with the guider's CFG
    (scale 4) the ``pred_uncond`` call is untouched; removal restores the plain pipeline exactly."""
    name, pipe = tiny
    plain, handle = record(pipe)
    try:
        base = generate(name, pipe)
    finally:
        handle.remove()
    with nagkit.apply(pipe, negative_prompt=NEGATIVE, scale=1.0) as guide:
        assert torch.equal(generate(name, pipe), base)
        guide.update(negative_prompt=PROMPT, scale=5.0)
        torch.testing.assert_close(generate(name, pipe), base, atol=1e-5, rtol=1e-5)
        guide.update(negative_prompt=NEGATIVE)
        guide.state.calls.update(guided=0, unguided=0)
        calls, handle = record(pipe)
        try:
            guided = generate(name, pipe)
        finally:
            handle.remove()
        assert guide.state.calls == {"guided": 2, "unguided": 2}
    assert torch.isfinite(guided).all() and (guided - base).abs().max() > 1e-4
    assert torch.equal(calls[1], plain[1]) and not torch.equal(calls[0], plain[0])  # first step: uncond, cond
    assert "encode_prompt" not in pipe.__dict__ and torch.equal(generate(name, pipe), base)


def test_i2v_image_tokens_reach_the_denoiser_unchanged():
    """Image-to-video: the SigLIP tokens (and the image latents) are the same in the guided and the plain call: the
    conditioning image is never negated, only the context stream differs."""
    name = "tiny-hunyuanvideo15-i2v"
    pipe = TINY_PIPELINES[name](seed=0)
    seen = []
    handle = pipe.transformer.register_forward_pre_hook(lambda m, a, kw: seen.append(dict(kw)) and None,
                                                        with_kwargs=True)
    try:
        generate(name, pipe, steps=1)
        with nagkit.apply(pipe, negative_prompt=NEGATIVE, scale=5.0):
            generate(name, pipe, steps=1)
    finally:
        handle.remove()
    plain, guided = seen[0], seen[2]  # the first (pred_cond) call of each run
    assert plain["image_embeds"].abs().sum() > 0 and plain["image_embeds"].shape[1] == 4
    for key in ("hidden_states", "image_embeds", "encoder_hidden_states", "encoder_attention_mask"):
        assert torch.equal(plain[key], guided[key]), key


# ------------------------------------------------------------------------------------------------ command line
def sidecar(path):
    return json.loads(Path(path).with_suffix(".json").read_text())


def test_info_and_generate_mp4_with_sidecar(tmp_path, capsys):
    pytest.importorskip("imageio_ffmpeg")
    import imageio.v3 as iio

    for name in NAMES:
        assert main(["info", name]) == 0
        assert f"supported ({EXPECTED[name]}" in capsys.readouterr().out
    out = tmp_path / "clip.mp4"
    assert main(["generate", "tiny-hunyuanvideo15", "a red cat", "--negative", "blurry", "--steps", "1",
                 "--frames", "5", "--out", str(out), "--quiet"]) == 0
    assert iio.imread(out).shape[:3] == (5, 32, 32)
    meta = sidecar(out)
    assert meta["pipeline"] == "HunyuanVideo15Pipeline" and meta["family"] == "hunyuanvideo15"
    assert meta["cfg"] == {"argument": "guider.guidance_scale", "scale": 4.0, "negative": None}  # the guider's own
    assert meta["nag"]["negative"] == "blurry" and meta["frames"] == 5
    image = tmp_path / "cat.png"
    tiny_condition_image().save(image)
    out = tmp_path / "i2v.mp4"
    assert main(["generate", "tiny-hunyuanvideo15-i2v", "a red cat", "--image", str(image), "--steps", "1",
                 "--frames", "5", "--out", str(out), "--quiet"]) == 0
    assert iio.imread(out).shape[:3] == (5, 32, 32) and sidecar(out)["image"] == str(image)


def test_cfg_scale_sets_the_guider_for_the_call_and_restores_it(tmp_path, monkeypatch, capsys):
    pipe = TINY_PIPELINES["tiny-hunyuanvideo15"](seed=0)
    own = pipe.guider
    monkeypatch.setattr(models, "build_builtin", lambda model: pipe)
    seen = []
    pipe.transformer.register_forward_pre_hook(lambda m, a: seen.append(pipe.guider.guidance_scale) and None)
    out = tmp_path / "cfg.gif"
    assert main(["generate", "tiny-hunyuanvideo15", "a red cat", "--cfg-scale", "2.5", "--cfg-negative", "ugly",
                 "--steps", "1", "--frames", "5", "--out", str(out), "--quiet"]) == 0
    assert seen == [2.5, 2.5]  # pred_cond and pred_uncond, with the CLI's scale
    assert pipe.guider is own and own.guidance_scale == 4.0  # the pipeline's own guider is back
    assert sidecar(out)["cfg"] == {"argument": "guider.guidance_scale", "scale": 2.5, "negative": "ugly"}
    assert sidecar(out)["nag"]["negative"] == "ugly"  # NAG's default negative: the CFG negative
    seen.clear()
    out = tmp_path / "off.gif"
    assert main(["generate", "tiny-hunyuanvideo15", "a red cat", "--cfg-scale", "1", "--steps", "1", "--frames",
                 "5", "--out", str(out), "--quiet"]) == 0
    assert seen == [1.0] and pipe.guider is own  # CFG off: one call per step
    assert sidecar(out)["cfg"] is None and sidecar(out)["replay"]["cfg_scale"] == 1.0
    capsys.readouterr()


def test_local_folder_records_the_loaded_guiders_scale(tmp_path, capsys):
    """A saved pipeline folder: its guider's scale is known only after loading; the sidecar records it."""
    folder = tmp_path / "hv15"
    TINY_PIPELINES["tiny-hunyuanvideo15"](seed=0).save_pretrained(folder)
    out = tmp_path / "local.gif"
    assert main(["generate", str(folder), "a red cat", "--steps", "1", "--frames", "5", "--height", "32", "--width",
                 "32", "--out", str(out), "--quiet"]) == 0
    meta = sidecar(out)
    assert meta["cfg"] == {"argument": "guider.guidance_scale", "scale": 4.0, "negative": None}
    assert meta["replay"]["cfg_scale"] == 4.0
    capsys.readouterr()


@pytest.mark.parametrize("argv,message", [
    (["--cfg-negative", "red", "--cfg-scale", "1"],
     "--cfg-negative has no effect without CFG: HunyuanVideo15Pipeline runs it with guider.guidance_scale > 1"),
    (["--guidance", "4"], "--guidance is not an option of HunyuanVideo15Pipeline"),
    (["--height", "40"], "--height 40: HunyuanVideo15Pipeline needs a multiple of 16"),
])
def test_command_line_errors_are_one_line(argv, message, capsys):
    assert main(["generate", "tiny-hunyuanvideo15", "x", *argv]) == 2
    last = [line for line in capsys.readouterr().err.splitlines() if line.strip()][-1]
    assert last.startswith("nagkit: error: ") and message in last
