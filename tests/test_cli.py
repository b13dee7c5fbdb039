"""The command line: generate (PNG/MP4 + JSON sidecar), info, and clear errors."""

import json

import pytest
from PIL import Image

from nagkit.cli.main import main
from nagkit.tiny.pipelines import TINY_PIPELINES


def test_generate_images_with_sidecar(tmp_path, capsys):
    out = tmp_path / "cat.png"
    rc = main(["generate", "tiny-sdxl", "a red cat", "--negative", "blurry", "--steps", "2", "--batch", "2",
               "--nag-scale", "4", "--end", "0.5", "--seed", "3", "--out", str(out)])
    assert rc == 0
    files = [tmp_path / "cat_0.png", tmp_path / "cat_1.png"]
    assert all(Image.open(f).size == (64, 64) for f in files)
    meta = json.loads((tmp_path / "cat.json").read_text())
    assert meta["nag"] == {"scale": 4.0, "tau": 2.5, "alpha": 0.5, "start": 0.0, "end": 0.5, "norm": "l1",
                           "mode": "fast"}
    assert meta["negative"] == "blurry" and meta["seed"] == 3 and meta["batch"] == 2
    assert meta["pipeline"] == "StableDiffusionXLPipeline" and set(meta["versions"]) >= {"nagkit", "diffusers"}
    assert meta["files"] == [str(f) for f in files]
    assert str(files[0]) in capsys.readouterr().out


def test_generate_video_mp4(tmp_path):
    pytest.importorskip("imageio_ffmpeg")
    rc = main(["generate", "tiny-wan", "a red cat", "--negative", "blurry", "--steps", "2", "--guidance", "3",
               "--frames", "5", "--out", str(tmp_path / "clip.mp4")])
    assert rc == 0
    import imageio.v3 as iio

    frames = iio.imread(tmp_path / "clip.mp4")
    assert frames.shape[0] == 5
    assert json.loads((tmp_path / "clip.json").read_text())["frames"] == 5


def test_generate_from_local_folder(tmp_path):
    folder = tmp_path / "sd15"
    TINY_PIPELINES["tiny-sd15"](seed=0).save_pretrained(folder)
    assert main(["info", str(folder)]) == 0
    rc = main(["generate", str(folder), "a red cat", "--negative", "blurry", "--steps", "2", "--height", "64",
               "--width", "64", "--out", str(tmp_path / "img")])
    assert rc == 0 and (tmp_path / "img" / "nagkit.png").exists()


def test_info(tmp_path, capsys):
    assert main(["info", "tiny-wan-i2v"]) == 0
    assert "supported (WanImageToVideoPipeline" in capsys.readouterr().out
    assert main(["info", "tiny-pixart-sigma", "--json"]) == 0
    report = json.loads(capsys.readouterr().out)
    assert report["supported"] and report["preset"]["name"] == "pixart"
    folder = tmp_path / "flux"
    folder.mkdir()
    (folder / "model_index.json").write_text(json.dumps({
        "_class_name": "QwenImagePipeline", "transformer": ["diffusers", "QwenImageTransformer2DModel"]}))
    assert main(["info", str(folder)]) == 1
    out = capsys.readouterr().out
    assert "not supported: QwenImagePipeline is not a supported pipeline" in out and "StableDiffusionXLPipeline" in out


@pytest.mark.parametrize("argv,message", [
    (["generate", "/no/such/model", "x"], "cannot load '/no/such/model'"),
    (["info", "/no/such/model"], "cannot read the pipeline config of '/no/such/model'"),
    (["generate", "tiny-sd15", "x", "--nag-tau", "0"], "tau must be a finite number > 0"),
    (["generate", "tiny-sd15", "x", "--frames", "3"], "--frames is not an option of StableDiffusionPipeline"),
    (["generate", "tiny-sd15", "x", "--steps", "0"], "--steps and --batch must be >= 1"),
])
def test_errors_are_one_clear_line(argv, message, capsys):
    assert main(argv) == 2
    err = capsys.readouterr().err
    assert message in err and "Traceback" not in err
