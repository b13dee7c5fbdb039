"""The command line as a user meets it: outputs and sidecars, replay, one-line errors before any weights load,
what CFG flags do, progress and quiet start-up."""

import json
import os
import re
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
from PIL import Image

from nagkit.cli import generate as generate_module
from nagkit.cli import models
from nagkit.cli.main import main
from nagkit.tiny.pipelines import TINY_PIPELINES

README = Path(__file__).resolve().parents[1] / "README.md"


def run(argv, capsys):
    rc = main(argv)
    out, err = capsys.readouterr()
    return rc, out, err


def sidecar_of(path):
    return json.loads(Path(path).with_suffix(".json").read_text())


# ------------------------------------------------------------------------------------------------ outputs, sidecars
def test_generate_images_with_sidecar(tmp_path, capsys):
    out = tmp_path / "cat.png"
    rc, stdout, _ = run(["generate", "tiny-sdxl", "a red cat", "--negative", "blurry", "--steps", "2", "--batch", "2",
                         "--nag-scale", "4", "--end", "0.5", "--seed", "3", "--out", str(out), "--quiet"], capsys)
    assert rc == 0
    files = [tmp_path / "cat_0.png", tmp_path / "cat_1.png"]
    assert all(Image.open(f).size == (64, 64) for f in files)
    meta = json.loads((tmp_path / "cat.json").read_text())
    assert meta["nag"] == {"preset": "sdxl", "scale": 4.0, "tau": 2.5, "alpha": 0.5, "start": 0.0, "end": 0.5,
                           "norm": "l1", "mode": "fast", "negative": "blurry", "negative_from": "--negative"}
    assert meta["seed"] == 3 and meta["batch"] == 2 and (meta["width"], meta["height"]) == (64, 64)
    assert meta["cfg"] == {"argument": "guidance_scale", "scale": 5.0, "negative": None}  # SDXL's default CFG
    assert meta["pipeline"] == "StableDiffusionXLPipeline" and set(meta["versions"]) >= {"nagkit", "diffusers"}
    assert meta["files"] == [str(f) for f in files]
    assert str(files[0]) in stdout


def test_sidecar_records_the_result_and_replays_it_exactly(tmp_path, capsys):
    first = tmp_path / "a.png"
    rc, _, _ = run(["generate", "tiny-flux", "a red cat", "--negative", "blurry", "--steps", "2", "--seed", "5",
                    "--height", "48", "--width", "32", "--cfg-scale", "3", "--cfg-negative", "green",
                    "--nag-tau", "3", "--out", str(first), "--quiet"], capsys)
    assert rc == 0
    meta = sidecar_of(first)
    assert (meta["width"], meta["height"]) == (32, 48) and Image.open(first).size == (32, 48)
    assert meta["cfg"] == {"argument": "true_cfg_scale", "scale": 3.0, "negative": "green"}
    assert meta["guidance"] is None  # tiny-flux has no guidance embedding: nothing recorded as if it acted
    assert meta["nag"]["preset"] == "flux" and meta["nag"]["tau"] == 3.0
    second = tmp_path / "b.png"
    assert run(["generate", "--from", str(tmp_path / "a.json"), "--out", str(second), "--quiet"], capsys)[0] == 0
    assert np.array_equal(np.asarray(Image.open(first)), np.asarray(Image.open(second)))
    replayed = sidecar_of(second)
    for key in ("model", "prompt", "nag", "cfg", "guidance", "steps", "seed", "width", "height"):
        assert replayed[key] == meta[key], key
    # an option given with --from overrides the sidecar's
    third = tmp_path / "c.png"
    assert run(["generate", "--from", str(tmp_path / "a.json"), "--nag-scale", "1", "--out", str(third), "--quiet"],
               capsys)[0] == 0
    assert sidecar_of(third)["nag"]["scale"] == 1.0 and sidecar_of(third)["seed"] == 5
    assert not np.array_equal(np.asarray(Image.open(first)), np.asarray(Image.open(third)))


def test_extensions_are_honoured_and_files_never_overwritten(tmp_path, capsys):
    jpg = tmp_path / "my.jpg"
    args = ["generate", "tiny-sd15", "a red cat", "--steps", "1", "--quiet"]
    assert run([*args, "--out", str(jpg)], capsys)[0] == 0
    assert Image.open(jpg).format == "JPEG" and not (tmp_path / "my.png").exists()
    rc, _, err = run([*args, "--out", str(jpg)], capsys)
    assert rc == 2 and f"{jpg} exists (pass --overwrite" in err
    assert run([*args, "--out", str(jpg), "--overwrite"], capsys)[0] == 0
    webp = tmp_path / "w.webp"
    assert run([*args, "--out", str(webp)], capsys)[0] == 0 and Image.open(webp).format == "WEBP"
    folder = tmp_path / "outs"
    for _ in range(2):
        assert run([*args, "--out", str(folder)], capsys)[0] == 0
    assert sorted(p.name for p in folder.iterdir()) == ["nagkit-2.json", "nagkit-2.png", "nagkit.json", "nagkit.png"]


def test_video_formats(tmp_path, capsys):
    gif = tmp_path / "clip.gif"
    assert run(["generate", "tiny-wan", "a red cat", "--negative", "blurry", "--steps", "1", "--frames", "5",
                "--fps", "8", "--out", str(gif), "--quiet"], capsys)[0] == 0
    image = Image.open(gif)
    assert image.n_frames == 5
    meta = sidecar_of(gif)
    assert (meta["frames"], meta["fps"], meta["width"], meta["height"]) == (5, 8, 32, 32)
    assert meta["replay"]["frames"] == 5
    pytest.importorskip("imageio_ffmpeg")
    import imageio.v3 as iio

    mp4 = tmp_path / "movie.mp4"
    assert run(["generate", "tiny-wan", "a red cat", "--steps", "1", "--frames", "5", "--cfg-scale", "3",
                "--out", str(mp4), "--quiet"], capsys)[0] == 0
    assert iio.imread(mp4).shape[0] == 5 and sidecar_of(mp4)["cfg"]["argument"] == "guidance_scale"


def test_generate_from_local_folder(tmp_path, capsys):
    folder = tmp_path / "sd15"
    TINY_PIPELINES["tiny-sd15"](seed=0).save_pretrained(folder)
    assert main(["info", str(folder)]) == 0
    rc = main(["generate", str(folder), "a red cat", "--negative", "blurry", "--steps", "2", "--height", "64",
               "--width", "64", "--out", str(tmp_path / "img"), "--quiet"])
    assert rc == 0 and (tmp_path / "img" / "nagkit.png").exists()


# ------------------------------------------------------------------------------------------------ CFG flags
def test_cfg_off_without_a_negative_on_true_cfg_pipelines(tmp_path, capsys):
    """Qwen-Image's default true_cfg_scale is 4, but the pipeline runs CFG only with a negative: none given, the
    sidecar records no CFG (and FLUX.2-dev's guidance_scale is its distilled guidance, not CFG)."""
    assert run(["generate", "tiny-qwen-image", "x", "--steps", "2", "--out", str(tmp_path / "q.png"), "--quiet"],
               capsys)[0] == 0
    assert sidecar_of(tmp_path / "q.png")["cfg"] is None
    assert run(["generate", "tiny-flux2-dev", "x", "--steps", "1", "--guidance", "3", "--out",
                str(tmp_path / "f.png"), "--quiet"], capsys)[0] == 0
    meta = sidecar_of(tmp_path / "f.png")
    assert meta["cfg"] is None and meta["guidance"]["value"] == 3.0


def test_cfg_flags_act_on_true_cfg_pipelines(tmp_path, capsys):
    """On FLUX-style pipelines --cfg-scale/--cfg-negative drive true_cfg_scale; the embedded model included."""
    base = ["generate", "a circle", "--negative", "red", "--steps", "2", "--quiet"]
    assert run([*base, "--out", str(tmp_path / "plain.png")], capsys)[0] == 0
    assert run([*base, "--cfg-scale", "4", "--cfg-negative", "blue", "--out", str(tmp_path / "cfg.png")],
               capsys)[0] == 0
    plain, cfg = (np.asarray(Image.open(tmp_path / f"{n}.png")) for n in ("plain", "cfg"))
    assert not np.array_equal(plain, cfg)
    assert sidecar_of(tmp_path / "cfg.png")["cfg"] == {"argument": "true_cfg_scale", "scale": 4.0, "negative": "blue"}
    assert sidecar_of(tmp_path / "plain.png")["cfg"] is None


@pytest.mark.parametrize("argv,message", [
    (["x", "--cfg-negative", "red", "--guidance", "4"], "--guidance has no effect on embedded"),
    (["x", "--cfg-negative", "red"], "--cfg-negative has no effect without CFG: FluxPipeline runs it with "
                                     "true_cfg_scale > 1"),
    (["tiny-flux", "x", "--guidance", "4"], "its transformer has no guidance embedding"),
    (["tiny-sd15", "x", "--guidance", "4", "--cfg-scale", "5"], "--guidance and --cfg-scale are the same argument"),
    (["tiny-sd15", "x", "--cfg-negative", "red", "--cfg-scale", "1"], "--cfg-negative has no effect without CFG"),
    (["tiny-flux2-dev", "x", "--cfg-scale", "4"], "runs no CFG: --cfg-scale/--cfg-negative do not apply"),
    (["tiny-krea2", "x", "--cfg-negative", "red", "--cfg-scale", "0"], "Krea2Pipeline runs it with guidance_scale > 0"),
    (["tiny-qwen-image-edit", "x"], "QwenImageEditPipeline needs a conditioning image: --image PATH"),
])
def test_cfg_flags_that_would_do_nothing_are_refused(argv, message, capsys):
    rc, _, err = run(["generate", *argv], capsys)
    assert rc == 2 and message in err


# ------------------------------------------------------------------------------------------------ errors
def _one_line(err):
    lines = [line for line in err.splitlines() if line.strip()]
    return lines[-1] if lines else ""


@pytest.mark.parametrize("argv,message", [
    (["generate", "tiny-sdxl", "x", "--height", "63"], "--height 63: StableDiffusionXLPipeline needs a multiple of "
                                                       "8 (try 64)"),
    (["generate", "tiny-wan", "x", "--height", "20"], "--height 20: WanPipeline needs a multiple of 16"),
    (["generate", "tiny-flux", "x", "--width", "40"], "--width 40: FluxPipeline needs a multiple of 16"),
    (["generate", "tiny-wan", "x", "--frames", "10"], "--frames 10: WanPipeline makes 4k+1 frames (try 9)"),
    (["generate", "tiny-flux", "x", "--image", "README.md"], "--image is not an option of FluxPipeline"),
    (["generate", "tiny-flux", "x", "--image", "/no/such.png"], "--image /no/such.png: no such file"),
    (["generate", "tiny-sd15", "x", "--frames", "3"], "--frames is not an option of StableDiffusionPipeline"),
    (["generate", "tiny-flux", "x", "--device", "cuda"], "--device cuda: this torch sees no CUDA GPU"),
    (["generate", "tiny-flux", "x", "--device", "mps"], "--device mps: MPS is not available"),
    (["generate", "tiny-flux", "x", "--device", "gpu0"], "--device gpu0: not a device"),
    (["generate", "tiny-flux", "x", "--offload"], "--offload moves models between the CPU and an accelerator"),
    (["generate", "tiny-chroma", "x", "--mode", "official"], "--mode official is not available for ChromaPipeline"),
    (["generate", "/no/such/model", "x"], "no such folder: /no/such/model"),
    (["generate", "tiny-nope", "x"], "built-in models: embedded, tiny-sd15"),
    (["info", "/no/such/model"], "no such folder: /no/such/model"),
    (["generate", "tiny-sd15", "x", "--nag-tau", "0"], "--nag-tau must be > 0, got 0"),
    (["generate", "tiny-sd15", "x", "--nag-alpha", "1.5"], "--nag-alpha must be in [0, 1], got 1.5"),
    (["generate", "tiny-sd15", "x", "--start", "0.6", "--end", "0.2"], "--start must be below --end"),
    (["generate", "tiny-sd15", "x", "--steps", "0"], "--steps must be >= 1, got 0"),
    (["generate", "tiny-sd15", "x", "--preset", "nope"], "unknown preset 'nope'"),
    (["generate", "tiny-sd15", "x", "--out", "a.bmp"], "--out a.bmp: unknown format '.bmp'"),
    (["generate", "tiny-sd15", "x", "--out", "a.mp4"], "this model makes images; .mp4 is for videos"),
    (["generate", "tiny-wan", "x", "--out", "a.png"], "this model makes videos; .png is for images"),
    (["generate", "--from", "/no/such.json"], "--from /no/such.json: cannot read it"),
    (["generate", "a", "b", "c"], "expected [MODEL] PROMPT, got 3 positional arguments"),
    (["generate"], "expected [MODEL] PROMPT"),
])
def test_errors_are_one_clear_line(argv, message, capsys):
    rc, _, err = run(argv, capsys)
    assert rc == 2 and "Traceback" not in err
    assert message in _one_line(err) and _one_line(err).startswith("nagkit: error: ")


def test_output_path_errors(tmp_path, capsys):
    (tmp_path / "file").write_text("")
    rc, _, err = run(["generate", "tiny-sd15", "x", "--out", str(tmp_path / "file" / "x.png")], capsys)
    assert rc == 2 and "is a file, not a folder" in err
    locked = tmp_path / "locked"
    locked.mkdir()
    os.chmod(locked, 0o500)
    try:
        if not os.access(locked, os.W_OK):  # (root writes anyway)
            rc, _, err = run(["generate", "tiny-sd15", "x", "--out", str(locked / "x.png")], capsys)
            assert rc == 2 and "cannot write in" in err
    finally:
        os.chmod(locked, 0o700)
    rc, _, err = run(["demo", "--out", str(tmp_path / "file" / "d.png")], capsys)
    assert rc == 2 and "--out" in err and "Traceback" not in err
    rc, _, err = run(["demo", "--json", str(tmp_path / "file" / "d.json"), "--out", str(tmp_path / "d.png")], capsys)
    assert rc == 2 and "--json" in err and not (tmp_path / "d.png").exists()  # refused before the run


def test_errors_come_before_any_weights_load(tmp_path, monkeypatch, capsys):
    """A local pipeline folder holding only its configuration files (no weights): every model-dependent mistake is
    still found, so a typo costs a second and not the loading of a 12B model."""
    pipe = TINY_PIPELINES["tiny-flux"](seed=0)
    folder = tmp_path / "flux"
    pipe.save_pretrained(folder)
    for weights in folder.rglob("*.safetensors"):
        weights.unlink()
    loaded = []
    monkeypatch.setattr(generate_module, "load_pipeline", lambda *a, **k: loaded.append(a) or pytest.fail("loaded"))
    for argv, message in [
        (["--height", "40"], "needs a multiple of 16"),
        (["--cfg-negative", "red"], "--cfg-negative has no effect without CFG"),
        (["--guidance", "3"], "no guidance embedding"),
        (["--image", "README.md"], "--image is not an option"),
        (["--nag-scale", "-1"], "--nag-scale must be >= 0"),
        (["--preset", "nope"], "unknown preset"),
        (["--out", str(tmp_path / "x.mp4")], "this model makes images"),
        (["--device", "cuda"], "no CUDA GPU"),
    ]:
        rc, _, err = run(["generate", str(folder), "x", *argv], capsys)
        assert rc == 2 and message in err, (argv, err)
    assert not loaded


def test_unreachable_hub_is_said_fast(monkeypatch, capsys):
    monkeypatch.delenv("HF_HUB_OFFLINE", raising=False)
    monkeypatch.setattr(models, "hub_reachable", lambda timeout=models.HUB_PROBE_TIMEOUT: False)
    rc, _, err = run(["info", "black-forest-labs/FLUX.1-schnell"], capsys)
    assert rc == 2 and "cannot reach the model hub" in err and "HF_HUB_OFFLINE=1" in err
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    monkeypatch.setattr(models, "hub_reachable", lambda timeout=0: pytest.fail("probed the hub while offline"))
    rc, _, err = run(["generate", "someone/uncached-model", "x"], capsys)
    assert rc == 2 and "not in the local Hugging Face cache" in err or "no model_index.json" in err


def test_hub_probe_is_quick_on_a_closed_port(monkeypatch):
    monkeypatch.setenv("HF_ENDPOINT", "http://127.0.0.1:9")  # discard port: nothing listens
    assert models.hub_reachable(timeout=1.0) is False


# ------------------------------------------------------------------------------------------------ info
def test_info(tmp_path, capsys):
    assert main(["info", "tiny-wan-i2v"]) == 0
    assert "supported (WanImageToVideoPipeline" in capsys.readouterr().out
    assert main(["info", "tiny-pixart-sigma", "--json"]) == 0
    report = json.loads(capsys.readouterr().out)
    assert report["supported"] and report["preset"]["name"] == "pixart"
    assert main(["info", "embedded", "--json"]) == 0
    assert json.loads(capsys.readouterr().out)["preset"]["name"] == "embedded"  # what generate/demo use
    assert main(["info", "tiny-chroma"]) == 0
    assert "--mode official: not available" in capsys.readouterr().out
    folder = tmp_path / "auraflow"
    folder.mkdir()
    (folder / "model_index.json").write_text(json.dumps({
        "_class_name": "AuraFlowPipeline", "transformer": ["diffusers", "AuraFlowTransformer2DModel"]}))
    assert main(["info", str(folder)]) == 1
    out = capsys.readouterr().out
    assert "not supported: AuraFlowPipeline is not a supported pipeline" in out and "StableDiffusionXLPipeline" in out


# ------------------------------------------------------------------------------------------------ noise and speed
def test_progress_and_quiet(tmp_path, capsys):
    rc, _, err = run(["generate", "tiny-sd15", "x", "--steps", "2", "--out", str(tmp_path / "a.png")], capsys)
    assert rc == 0 and "2/2" in err and "loading tiny-sd15" in err
    rc, _, err = run(["generate", "tiny-sd15", "x", "--steps", "2", "--out", str(tmp_path / "b.png"), "--quiet"],
                     capsys)
    assert rc == 0 and err == ""


def test_truncation_is_one_short_line(tmp_path):
    prompt = "a red cat " + "word " * 80
    proc = subprocess.run([sys.executable, "-m", "nagkit", "generate", "tiny-sdxl", prompt, "--steps", "1",
                           "--out", str(tmp_path / "t.png"), "--quiet"], capture_output=True, text=True, check=False,
                          env={**os.environ, "HF_HUB_OFFLINE": "1"})
    assert proc.returncode == 0, proc.stderr
    lines = proc.stderr.strip().splitlines()
    assert len(lines) == 1 and re.fullmatch(
        r"nagkit: the prompt is longer than CLIP's 77 tokens: \d+ tokens dropped", lines[0]), proc.stderr


@pytest.mark.parametrize("argv", [["--help"], ["generate", "--help"], ["generate", "x", "--nag-tau", "0"],
                                  ["generate", "x", "--steps", "nope"], ["generate", "x", "--out", "a.bmp"],
                                  ["bench", "--mode", "nope"]])
def test_help_and_argument_errors_import_neither_torch_nor_diffusers(argv):
    code = ("import sys\nfrom nagkit.cli.main import main\ntry:\n    main(sys.argv[1:])\nexcept SystemExit:\n    pass\n"
            "print(sorted(m for m in ('torch', 'diffusers', 'transformers') if m in sys.modules))")
    proc = subprocess.run([sys.executable, "-c", code, *argv], capture_output=True, text=True, check=False)
    assert proc.stdout.strip().splitlines()[-1] == "[]", proc.stdout + proc.stderr


def test_readme_install_commands_work_from_this_repository():
    """No command in the README installs from the package index (nagkit is not published yet)."""
    text = README.read_text()
    blocks = re.findall(r"```bash\n(.*?)```", text, re.DOTALL)
    commands = [line for block in blocks for line in block.splitlines() if "pip install" in line]
    assert commands
    for line in commands:
        assert not re.search(r"pip install\s+[\"']?nagkit\b", line), line
