"""``nagkit batch``: rows and sweeps, up-front checks (a bad row is reported, the rest runs), batched calls equal to
``nagkit generate``, the resumable manifest (a stopped run finishes without redoing rows), and two data-parallel
processes under ``accelerate launch``."""

import json
import os
import shutil
import socket
import subprocess
import sys
import time
from pathlib import Path

import numpy as np
import pytest
from PIL import Image

from nagkit.cli.batch import expand_rows, parse_sweep, read_manifest, read_rows
from nagkit.cli.common import CLIError
from nagkit.cli.main import main

TINY = ["--model", "tiny-flux", "--steps", "2", "--quiet"]


def free_port():
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def records(path):
    return [json.loads(line) for line in Path(path).read_text().splitlines()]


# ------------------------------------------------------------------------------------------------ rows and sweeps
def test_sweeps_and_row_files(tmp_path):
    assert parse_sweep("--seeds", "0-3", int) == [0, 1, 2, 3]
    assert parse_sweep("--seeds", "0,5,7-8", int) == [0, 5, 7, 8]
    assert parse_sweep("--nag-scale", "3,5,8", float) == [3.0, 5.0, 8.0]
    for bad in ("3-1", "a", "1,,2"):
        with pytest.raises(CLIError):
            parse_sweep("--seeds", bad, int)

    text = tmp_path / "p.txt"
    text.write_text("a red cat\n\n# a comment\na blue dog\n")
    read = read_rows(text)
    assert [fields for _, fields, _ in read] == [{"prompt": "a red cat"}, {"prompt": "a blue dog"}]
    rows = expand_rows(read, "tiny-flux", {"negative": "blurry"}, {"nag_scale": [3.0, 5.0, 8.0], "seed": [0, 1]})
    assert len(rows) == 12 and len({r.key for r in rows}) == 12
    assert {(r.spec["nag_scale"], r.spec["seed"]) for r in rows if r.spec["prompt"] == "a red cat"} == {
        (s, n) for s in (3.0, 5.0, 8.0) for n in (0, 1)}
    assert all(r.spec["negative"] == "blurry" for r in rows)
    again = expand_rows(read_rows(text), "tiny-flux", {"negative": "blurry"}, {"nag_scale": [3.0, 5.0, 8.0],
                                                                                 "seed": [0, 1]})
    assert [r.key for r in again] == [r.key for r in rows]  # stable keys: what resuming relies on

    jsonl = tmp_path / "p.jsonl"
    jsonl.write_text('{"prompt": "x", "seed": 7, "nag-scale": 4, "size": "48x32"}\n{not json\n'
                     '{"prompt": "y", "colour": "red"}\n{"prompt": "z", "steps": 1.5}\n"just a prompt"\n'
                     '{"prompt": "x", "seed": 7, "nag-scale": 4, "size": "48x32"}\n')
    read = read_rows(jsonl)
    assert read[0][1] == {"prompt": "x", "seed": 7, "nag_scale": 4.0, "width": 48, "height": 32}
    assert read[1][1] is None and "p.jsonl:2" in read[1][2]
    assert "unknown field 'colour'" in read[2][2] and "1.5 is not an integer" in read[3][2]
    assert read[4][1] == {"prompt": "just a prompt"}
    rows = expand_rows(read, "tiny-flux", {}, {"seed": [0, 1]})
    assert [r.spec.get("seed") for r in rows if r.error is None] == [7, 0, 1, 7]  # a row's own seed is not swept
    assert rows[-1].key == rows[0].key + "-2"  # identical rows: two rows, two keys

    table = tmp_path / "p.csv"
    table.write_text("prompt,negative,nag_scale,seed\na cat,blurry,5,3\na dog,,,\n")
    read = read_rows(table)
    assert read[0][1] == {"prompt": "a cat", "negative": "blurry", "nag_scale": 5.0, "seed": 3}
    assert read[1][1] == {"prompt": "a dog", "negative": ""}
    (tmp_path / "bad.csv").write_text("text\nx\n")
    with pytest.raises(CLIError, match="'prompt' column"):
        read_rows(tmp_path / "bad.csv")


# ------------------------------------------------------------------------------------------------ one process
def test_batch_runs_checks_and_batches_like_generate(tmp_path, capsys):
    rows = tmp_path / "rows.jsonl"
    rows.write_text("\n".join([
        json.dumps({"prompt": "a red cat", "negative": "blurry", "seed": 3}),
        json.dumps({"prompt": "a blue dog", "negative": "green", "seed": 4}),
        json.dumps({"prompt": "a tree", "seed": 5, "nag_tau": 0}),       # invalid setting
        json.dumps({"prompt": "a house", "seed": 6, "width": 40}),       # FLUX needs multiples of 16
        "{broken",                                                        # unparseable
        json.dumps({"prompt": "a boat", "negative": "red", "seed": 7, "nag_scale": 3}),
    ]) + "\n")
    out = tmp_path / "out"
    rc = main(["batch", str(rows), *TINY, "--out", str(out), "--nag-scale", "5"])
    assert rc == 1  # some rows failed
    recs = records(out / "manifest.jsonl")
    assert len(recs) == 6 and len({r["key"] for r in recs}) == 6
    done = {r["settings"]["prompt"]: r for r in recs if r["status"] == "done"}
    failed = sorted(r["error"] for r in recs if r["status"] == "failed")
    assert set(done) == {"a red cat", "a blue dog", "a boat"}
    assert len(failed) == 3 and any("--nag-tau must be > 0, got 0" in e for e in failed)
    assert any("--width 40: FluxPipeline needs a multiple of 16" in e for e in failed)
    assert any("rows.jsonl:5" in e for e in failed)
    # the two rows with the same settings shared one call, with per-row NAG negatives and seeds
    assert done["a red cat"]["call_rows"] == done["a blue dog"]["call_rows"] == 2 and done["a boat"]["call_rows"] == 1
    cat = done["a red cat"]
    assert cat["settings"]["negative"] == "blurry" and cat["settings"]["seed"] == 3
    assert cat["settings"]["nag"]["scale"] == 5.0 and done["a boat"]["settings"]["nag"]["scale"] == 3.0
    assert set(cat["versions"]) >= {"nagkit", "diffusers", "torch"} and cat["seconds"] > 0
    for prompt, negative, seed in (("a blue dog", "green", 4),):  # the second row of the call: its own negative
        single = tmp_path / f"{seed}.png"
        assert main(["generate", "tiny-flux", prompt, "--negative", negative, "--seed", str(seed), "--steps", "2",
                     "--nag-scale", "5", "--out", str(single), "--quiet"]) == 0
        batched = np.asarray(Image.open(done[prompt]["file"]), dtype=np.int16)
        assert np.abs(batched - np.asarray(Image.open(single), dtype=np.int16)).max() <= 2, prompt
    capsys.readouterr()
    # a rerun skips every row in the manifest
    assert main(["batch", str(rows), "--model", "tiny-flux", "--steps", "2", "--out", str(out), "--nag-scale",
                 "5"]) == 0
    assert len(records(out / "manifest.jsonl")) == 6
    assert "0 done, 0 failed, 6 skipped" in capsys.readouterr().err


def test_stopped_run_finishes_without_redoing_rows(tmp_path, capsys):
    prompts = tmp_path / "p.txt"
    prompts.write_text("".join(f"prompt {i}\n" for i in range(3)))
    out = tmp_path / "out"
    argv = ["batch", str(prompts), *TINY, "--out", str(out), "--seeds", "0-1"]
    assert main([*argv, "--batch-size", "2", "--stop-after", "2"]) == 3  # as if killed after the first call
    first = records(out / "manifest.jsonl")
    assert len(first) == 2 and all(r["status"] == "done" for r in first)
    stamps = {r["file"]: os.stat(r["file"]).st_mtime_ns for r in first}
    with open(out / "manifest.jsonl", "a") as f:
        f.write('{"key": "torn')  # a crash in the middle of a line
    capsys.readouterr()
    assert main([a for a in argv if a != "--quiet"] + ["--batch-size", "3"]) == 0
    recs = read_manifest(out / "manifest.jsonl")
    assert len(recs) == 6 and all(r["status"] == "done" for r in recs.values())
    lines = (out / "manifest.jsonl").read_text().splitlines()
    assert lines[2] == '{"key": "torn'  # kept, ignored, and the next record starts on its own line
    keys = [json.loads(x)["key"] for x in lines[:2] + lines[3:]]
    assert len(keys) == len(set(keys)) == 6  # no row twice
    assert {os.stat(f).st_mtime_ns for f in stamps} == set(stamps.values())  # the first rows were not redone
    assert len(list(out.glob("*.png"))) == 6
    assert "4 done, 0 failed, 2 skipped" in capsys.readouterr().err


# ------------------------------------------------------------------------------------------------ two processes
def test_accelerate_two_processes_split_without_duplicates_or_losses(tmp_path):
    pytest.importorskip("accelerate", reason="data-parallel batch needs accelerate")
    launcher = shutil.which("accelerate")
    if launcher is None:
        pytest.skip("no accelerate command on PATH")
    rows = tmp_path / "rows.jsonl"
    lines = [json.dumps({"prompt": f"prompt {i}", "seed": i, "negative": f"neg {i % 3}"}) for i in range(20)]
    lines.insert(7, json.dumps({"prompt": "bad", "nag_alpha": 2}))
    rows.write_text("\n".join(lines) + "\n")
    out = tmp_path / "out"
    env = {**os.environ, "HF_HUB_OFFLINE": "1", "ACCELERATE_USE_CPU": "1", "OMP_NUM_THREADS": "1",
           "PYTHONPATH": os.pathsep.join([str(Path(__file__).resolve().parents[1] / "src"),
                                          os.environ.get("PYTHONPATH", "")])}
    command = [launcher, "launch", "--multi_gpu", "--num_processes", "2", "--num_machines", "1",
               "--mixed_precision", "no", "--dynamo_backend", "no", "--main_process_port", str(free_port()),
               "-m", "nagkit", "batch", str(rows), *TINY, "--out", str(out), "--batch-size", "4"]
    # first run: each process stops after 4 rows, as if killed (its manifest part left unmerged)
    proc = subprocess.run([*command, "--stop-after", "4"], capture_output=True, text=True, env=env, timeout=240)
    assert proc.returncode != 0, proc.stderr[-3000:]
    parts = sorted(out.glob("manifest.jsonl.part*"))
    assert len(parts) == 2, proc.stderr[-3000:]
    early = [json.loads(x) for p in parts for x in p.read_text().splitlines()]
    early_done = {r["key"]: r["file"] for r in early if r["status"] == "done"}
    assert len(early_done) >= 8
    stamps = {f: os.stat(f).st_mtime_ns for f in early_done.values()}
    # second run: finishes the rest
    proc = subprocess.run([a for a in command if a != "--quiet"], capture_output=True, text=True, env=env,
                          timeout=240)
    assert proc.returncode == 0, proc.stderr[-3000:]
    assert not list(out.glob("manifest.jsonl.part*"))
    recs = records(out / "manifest.jsonl")
    keys = [r["key"] for r in recs]
    assert len(keys) == len(set(keys)) == 21  # no duplicates, no losses
    done = [r for r in recs if r["status"] == "done"]
    failed = [r for r in recs if r["status"] == "failed"]
    assert len(done) == 20 and len(failed) == 1 and "--nag-alpha must be in [0, 1], got 2" in failed[0]["error"]
    assert {r["settings"]["prompt"] for r in done} == {f"prompt {i}" for i in range(20)}
    assert {r["rank"] for r in done} == {0, 1}  # both processes worked
    assert len({r["file"] for r in done}) == 20 and len(list(out.glob("*.png"))) == 20
    assert {f: os.stat(f).st_mtime_ns for f in stamps} == stamps  # nothing redone
    assert f"{20 - len(early_done)} done, 0 failed, {len(early)} skipped" in proc.stderr, proc.stderr[-3000:]


def test_help_imports_neither_torch_nor_diffusers():
    code = ("import sys\nfrom nagkit.cli.main import main\ntry:\n    main(['batch', '--help'])\nexcept SystemExit:\n"
            "    pass\nprint(sorted(m for m in ('torch', 'diffusers', 'accelerate') if m in sys.modules))")
    proc = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=False)
    assert "--nag-scale" in proc.stdout and proc.stdout.strip().splitlines()[-1] == "[]", proc.stdout + proc.stderr


def test_ray_actors_split_without_duplicates_or_losses(tmp_path, capsys):
    ray = pytest.importorskip("ray", reason="the --ray path needs Ray (pip install 'ray>=2.9')")
    rows = tmp_path / "rows.txt"
    rows.write_text("".join(f"prompt {i}\n" for i in range(5)))
    out = tmp_path / "out"
    ray.init(num_cpus=2, include_dashboard=False, log_to_driver=False)  # a local Ray cluster, 2 CPU workers
    try:
        argv = ["batch", str(rows), "--model", "tiny-flux", "--steps", "2", "--out", str(out), "--seeds", "0-1",
                "--batch-size", "2", "--ray", "--ray-workers", "2", "--nag-tau", "1,0"]  # tau 0: 10 bad rows
        assert main(argv) == 1
        recs = records(out / "manifest.jsonl")
        keys = [r["key"] for r in recs]
        assert len(keys) == len(set(keys)) == 20  # no duplicates, no losses
        done = [r for r in recs if r["status"] == "done"]
        assert len(done) == 10 and {r["rank"] for r in done} == {0, 1}  # both actors worked
        assert {(r["settings"]["prompt"], r["settings"]["seed"]) for r in done} == {
            (f"prompt {i}", s) for i in range(5) for s in (0, 1)}
        assert all("--nag-tau must be > 0" in r["error"] for r in recs if r["status"] == "failed")
        assert len(list(out.glob("*.png"))) == 10
        capsys.readouterr()
        assert main([a for a in argv if a != "--quiet"]) == 0  # a rerun: every row already in the manifest
        assert len(records(out / "manifest.jsonl")) == 20 and "0 done, 0 failed, 20 skipped" in capsys.readouterr().err
    finally:
        ray.shutdown()


def test_killed_run_loses_at_most_the_call_in_flight(tmp_path):
    """SIGKILL mid-run (no clean exit), then a rerun: every row done once, the first run's files untouched."""
    rows = tmp_path / "rows.txt"
    rows.write_text("".join(f"a shape number {i}\n" for i in range(12)))
    out = tmp_path / "out"
    command = [sys.executable, "-m", "nagkit", "batch", str(rows), "--model", "embedded-teacher", "--steps", "30",
               "--batch-size", "1", "--out", str(out), "--quiet"]
    env = {**os.environ, "HF_HUB_OFFLINE": "1", "OMP_NUM_THREADS": "1"}
    proc = subprocess.Popen(command, env=env, stdout=subprocess.DEVNULL, stderr=subprocess.PIPE)
    manifest = out / "manifest.jsonl"
    try:
        deadline = 240.0
        started = time.monotonic()
        while time.monotonic() - started < deadline:
            if manifest.is_file() and len(manifest.read_text().splitlines()) >= 2:
                break
            if proc.poll() is not None:
                break
            time.sleep(0.05)
        proc.kill()  # SIGKILL: no cleanup runs
        proc.wait(timeout=60)
    finally:
        if proc.poll() is None:
            proc.kill()
    first = {r["key"]: r for r in records(manifest)}
    assert 2 <= len(first) < 12, f"the run was not killed mid-way ({len(first)} rows done)"
    stamps = {key: (out / Path(r["file"]).name).stat().st_mtime_ns for key, r in first.items()}
    subprocess.run(command, env=env, check=True, stdout=subprocess.DEVNULL, stderr=subprocess.PIPE, timeout=300)
    final = records(manifest)
    assert len(final) == 12 and len({r["key"] for r in final}) == 12
    assert all(r["status"] == "done" for r in final)
    assert {key: (out / Path(first[key]["file"]).name).stat().st_mtime_ns for key in first} == stamps
