"""``nagkit batch``: many prompts and settings, batched pipeline calls, one resumable JSONL manifest, data-parallel.

Rows come from a prompt file: plain text (one prompt per line; blank lines and ``#`` comments skipped), JSONL (one
object per line) or CSV (a header row) with the fields of :data:`FIELDS` (``prompt`` required; ``negative`` is the
NAG negative, ``cfg_negative`` the pipeline's CFG negative; ``size`` ``"WxH"`` is ``width``/``height``). Options on
the command line are the defaults of every row; numeric options take comma lists (``--nag-scale 3,5,8``) and
``--seeds 0-3`` ranges: a sweep expands each row over the fields the row does not set itself.

Every row is checked up front with ``nagkit generate``'s own checks (:func:`nagkit.cli.generate.check_arguments`,
:func:`nagkit.cli.generate.plan_call`): a bad row is written to the manifest with its one-line error and the rest
runs. Rows whose pipeline arguments and NAG settings agree share one pipeline call (``--batch-size`` rows at most):
prompts, NAG negatives (a per-sample list), CFG negatives and seeds (one generator per row) may differ.

The manifest (``OUT/manifest.jsonl`` unless ``--manifest``) gets one line per row, appended and flushed after each
call: the row's resolved settings, output file, seconds, versions, or its error. A rerun skips every row whose key
(a hash of the row's settings, stable while the file is unchanged) is already in it, so a crash loses at most the
call in flight (``--retry-failed`` runs failed rows again).

Data-parallel: under ``accelerate launch -m nagkit batch ...`` (or any launcher setting ``WORLD_SIZE``/``RANK``) the
rows are split with ``accelerate.PartialState().split_between_processes``; each process appends to its own part
``MANIFEST.partN`` and the main process merges the parts into the manifest at the end (leftover parts of a crashed
run are merged at the start of the next).

Ray (``--ray``, the ``ray`` extra): the driver checks the rows, starts one actor (one pipeline) per GPU of the
cluster (``--ray-workers N`` on CPUs), hands the calls out with ``ray.util.ActorPool`` and appends every record to the
one manifest as calls finish (resumable the same way).
"""

from __future__ import annotations

import argparse
import csv
import hashlib
import json
import math
import os
import sys
import time
from dataclasses import dataclass, field
from pathlib import Path
from types import SimpleNamespace
from typing import Any

from .common import EMBEDDED_TEACHER, CLIError, TruncationNotice, quiet_libraries, say

#: per-row fields and their types (JSONL/CSV keys; ``-`` may be written for ``_``)
FIELDS: dict[str, type] = {
    "prompt": str, "negative": str, "cfg_negative": str, "cfg_scale": float, "guidance": float, "seed": int,
    "steps": int, "nag_scale": float, "nag_tau": float, "nag_alpha": float, "preset": str, "mode": str,
    "nag_norm": str, "start": float, "end": float, "height": int, "width": int, "frames": int,
}
#: command-line options that take comma-separated sweeps (argparse ``dest`` -> row field)
SWEEPS = {"seeds": "seed", "steps": "steps", "nag_scale": "nag_scale", "nag_tau": "nag_tau",
          "nag_alpha": "nag_alpha", "start": "start", "end": "end", "cfg_scale": "cfg_scale", "guidance": "guidance",
          "height": "height", "width": "width", "frames": "frames"}
_CHOICES = {"mode": ("fast", "official"), "nag_norm": ("l1", "l2")}


# ------------------------------------------------------------------------------------------------ reading rows
@dataclass
class Row:
    """One expanded row: its settings (``spec``), stable ``key``, position, and once checked its plan or error."""

    index: int
    key: str
    spec: dict[str, Any]
    source: str
    error: str | None = None
    plan: Any = None
    args: Any = None
    group: str = ""
    extra: dict[str, Any] = field(default_factory=dict)


def _number(kind: type, text: str, what: str) -> Any:
    try:
        value = kind(text) if kind is float else int(str(text), 10)
    except (TypeError, ValueError):
        raise ValueError(f"{what}: {text!r} is not {'a number' if kind is float else 'an integer'}") from None
    return value


def parse_sweep(option: str, text: str | None, kind: type) -> list[Any] | None:
    """``"3,5,8"`` -> ``[3.0, 5.0, 8.0]``; integers also take ranges ``"0-3"`` (inclusive). None stays None."""
    if text is None:
        return None
    values: list[Any] = []
    for part in str(text).split(","):
        part = part.strip()
        if not part:
            raise CLIError(f"{option} {text}: empty item in the list")
        if kind is int and "-" in part[1:]:
            low, high = part.split("-", 1) if not part.startswith("-") else ("-" + part[1:].split("-", 1)[0],
                                                                             part[1:].split("-", 1)[1])
            try:
                a, b = int(low), int(high)
            except ValueError:
                raise CLIError(f"{option} {text}: {part!r} is not a range like 0-3") from None
            if b < a:
                raise CLIError(f"{option} {text}: range {part} runs backwards")
            values.extend(range(a, b + 1))
            continue
        try:
            values.append(_number(kind, part, option))
        except ValueError as err:
            raise CLIError(str(err)) from None
    return values


def _coerce(name: str, value: Any) -> Any:
    """A row field's value in its type (CSV cells are strings; an empty cell is unset)."""
    if value is None or (isinstance(value, str) and value.strip() == "" and name != "negative"
                         and name != "cfg_negative"):
        return None
    kind = FIELDS[name]
    if kind is str:
        if not isinstance(value, str):
            raise ValueError(f"{name}: expected text, got {value!r}")
        if name in _CHOICES and value not in _CHOICES[name]:
            raise ValueError(f"{name}: {value!r} is not one of {', '.join(_CHOICES[name])}")
        return value
    if isinstance(value, bool) or not isinstance(value, (int, float, str)):
        raise ValueError(f"{name}: expected a number, got {value!r}")
    if kind is int and isinstance(value, float):
        if not value.is_integer():
            raise ValueError(f"{name}: {value!r} is not an integer")
        return int(value)
    return _number(kind, value, name) if isinstance(value, str) else kind(value)


def normalize_row(raw: dict[str, Any]) -> dict[str, Any]:
    """A JSONL/CSV record as row fields: keys ``nag-scale`` -> ``nag_scale``, ``size`` "WxH", typed values.

    Raises:
        ValueError: an unknown field, a missing prompt, a value of the wrong type.
    """
    row: dict[str, Any] = {}
    for key, value in raw.items():
        name = str(key).strip().replace("-", "_")
        if name == "size":
            if value in (None, ""):
                continue
            try:
                w, h = (int(v) for v in str(value).lower().split("x"))
            except ValueError:
                raise ValueError(f"size: {value!r} is not WIDTHxHEIGHT") from None
            row.setdefault("width", w)
            row.setdefault("height", h)
            continue
        if name not in FIELDS:
            raise ValueError(f"unknown field {key!r} (fields: {', '.join(FIELDS)}, size)")
        coerced = _coerce(name, value)
        if coerced is not None:
            row[name] = coerced
    if not row.get("prompt"):
        raise ValueError("no prompt")
    return row


def read_rows(path: Path) -> list[tuple[str, dict[str, Any] | None, str | None]]:
    """The file's rows as ``(source, fields, error)``: ``source`` says where (``file:line``), ``error`` why a row could
    not be read (then ``fields`` is None)."""
    try:
        text = path.read_text(encoding="utf-8")
    except (OSError, UnicodeDecodeError) as err:
        raise CLIError(f"{path}: cannot read it: {err}") from None
    suffix = path.suffix.lower()
    rows: list[tuple[str, dict[str, Any] | None, str | None]] = []
    if suffix in (".jsonl", ".ndjson"):
        for n, line in enumerate(text.splitlines(), 1):
            if not line.strip():
                continue
            where = f"{path.name}:{n}"
            try:
                raw = json.loads(line)
                if isinstance(raw, str):
                    raw = {"prompt": raw}
                if not isinstance(raw, dict):
                    raise ValueError(f"expected an object, got {type(raw).__name__}")
                rows.append((where, normalize_row(raw), None))
            except ValueError as err:
                rows.append((where + " " + line.strip()[:200], None, f"{where}: {str(err).splitlines()[0]}"))
    elif suffix == ".csv":
        reader = csv.DictReader(text.splitlines())
        if not reader.fieldnames or "prompt" not in [f.strip().replace("-", "_") for f in reader.fieldnames]:
            raise CLIError(f"{path}: a CSV prompt file needs a header row with a 'prompt' column")
        for n, raw in enumerate(reader, 2):
            where = f"{path.name}:{n}"
            try:
                if None in raw:
                    raise ValueError("more cells than header columns")
                rows.append((where, normalize_row(raw), None))
            except ValueError as err:
                rows.append((where + " " + json.dumps(raw, sort_keys=True)[:200], None, f"{where}: {err}"))
    else:
        for n, line in enumerate(text.splitlines(), 1):
            if line.strip() and not line.lstrip().startswith("#"):
                rows.append((f"{path.name}:{n}", {"prompt": line.strip()}, None))
    return rows


def _key(payload: Any, seen: dict[str, int]) -> str:
    digest = hashlib.sha256(json.dumps(payload, sort_keys=True).encode()).hexdigest()[:16]
    seen[digest] = seen.get(digest, 0) + 1
    return digest if seen[digest] == 1 else f"{digest}-{seen[digest]}"


def expand_rows(read: list[tuple[str, dict[str, Any] | None, str | None]], model: str,
                defaults: dict[str, Any], sweeps: dict[str, list[Any]]) -> list[Row]:
    """Each read row with the command line's defaults, expanded over the sweeps the row does not set itself.

    Args:
        read: from :func:`read_rows`.
        model: the model every row runs on.
        defaults: row field -> value from the command line (single values).
        sweeps: row field -> values (lists of two or more expand; of one, a default).

    Returns:
        The rows in order, keyed by a hash of their settings (the n-th identical row gets ``-n``).
    """
    seen: dict[str, int] = {}
    rows: list[Row] = []
    for source, fields, error in read:
        if fields is None:
            rows.append(Row(len(rows), _key({"unreadable": source}, seen), {"source": source}, source, error=error))
            continue
        combos: list[dict[str, Any]] = [{}]
        for name, values in sweeps.items():
            if name in fields:
                continue
            combos = [{**c, name: v} for c in combos for v in values]
        for combo in combos:
            spec = {name: None for name in FIELDS}
            spec.update({k: v for k, v in defaults.items() if v is not None})
            spec.update(combo)
            spec.update(fields)
            spec["model"] = model
            rows.append(Row(len(rows), _key(spec, seen), spec, source))
    return rows


# ------------------------------------------------------------------------------------------------ checking rows
def plan_row(row: Row, info: Any) -> None:
    """``nagkit generate``'s checks on one row; sets ``row.plan`` and ``row.group`` or ``row.error``."""
    from .generate import check_arguments, plan_call

    s = row.spec
    args = argparse.Namespace(
        model=s["model"], prompt=s["prompt"], negative=s["negative"], cfg_negative=s["cfg_negative"],
        cfg_scale=s["cfg_scale"], guidance=s["guidance"], nag_scale=s["nag_scale"], nag_tau=s["nag_tau"],
        nag_alpha=s["nag_alpha"], preset=s["preset"], mode=s["mode"], nag_norm=s["nag_norm"], start=s["start"],
        end=s["end"], steps=s["steps"], seed=s["seed"] if s["seed"] is not None else 0, height=s["height"],
        width=s["width"], frames=s["frames"], fps=16, image=None, batch=1, out=".", words=None, from_=None)
    if args.steps is None:
        args.steps = 8 if args.model == EMBEDDED_TEACHER else 4
    try:
        check_arguments(args)
        plan = plan_call(info, args)
    except CLIError as err:
        row.error = str(err)
        return
    except (ValueError, TypeError, KeyError) as err:
        row.error = str(err).strip("'\"") or type(err).__name__
        return
    row.plan, row.args = plan, args
    shared = {k: v for k, v in plan.kwargs.items() if k not in ("prompt", "negative_prompt")}
    solo = plan.builtin_image or "image" in plan.kwargs
    row.group = json.dumps({"kwargs": shared, "cfg_negative": "negative_prompt" in plan.kwargs,
                            "nag": plan.nag.to_dict(), "preset": plan.preset, "cfg_scale": args.cfg_scale,
                            "solo": row.key if solo else None}, sort_keys=True, default=repr)


def resolved(row: Row) -> dict[str, Any]:
    """The settings a done row ran with (what ``nagkit generate --from`` calls ``replay``)."""
    plan, args = row.plan, row.args
    c = plan.nag
    kw = plan.kwargs
    return {"model": args.model, "pipeline": plan.info.pipeline, "prompt": args.prompt, "negative": plan.negative,
            "negative_from": plan.negative_source, "cfg_negative": (plan.cfg or {}).get("negative"),
            "cfg": plan.cfg, "guidance": plan.guidance, "preset": plan.preset, "nag": c.to_dict(),
            "steps": args.steps, "seed": args.seed, "height": kw.get("height"), "width": kw.get("width"),
            "frames": kw.get("num_frames", kw.get("frames"))}


# ------------------------------------------------------------------------------------------------ the manifest
def read_manifest(path: Path) -> dict[str, dict[str, Any]]:
    """key -> the last record of that key (a torn last line of a crashed run is ignored)."""
    records: dict[str, dict[str, Any]] = {}
    if not path.is_file():
        return records
    for line in path.read_text(encoding="utf-8").splitlines():
        try:
            record = json.loads(line)
        except ValueError:
            continue
        if isinstance(record, dict) and "key" in record:
            records[record["key"]] = record
    return records


class Appender:
    """Appends JSON lines to a file, each flushed and synced to disk before the next call runs."""

    def __init__(self, path: Path) -> None:
        self.path = path
        path.parent.mkdir(parents=True, exist_ok=True)
        torn = path.is_file() and path.stat().st_size > 0 and not path.read_bytes().endswith(b"\n")
        self.file = open(path, "a", encoding="utf-8")  # noqa: SIM115 - closed by close()
        if torn:
            self.file.write("\n")

    def write(self, records: list[dict[str, Any]]) -> None:
        for record in records:
            self.file.write(json.dumps(record, default=str) + "\n")
        self.file.flush()
        os.fsync(self.file.fileno())

    def close(self) -> None:
        self.file.close()


def merge_parts(manifest: Path) -> list[dict[str, Any]]:
    """Append every process's part (``MANIFEST.partN``) to the manifest and delete the parts; returns the records
    merged."""
    parts = sorted(manifest.parent.glob(manifest.name + ".part*"))
    merged: list[dict[str, Any]] = []
    if not parts:
        return merged
    for part in parts:
        for line in part.read_text(encoding="utf-8").splitlines():
            try:
                record = json.loads(line)
            except ValueError:
                continue
            if isinstance(record, dict) and "key" in record:
                merged.append(record)
    out = Appender(manifest)
    out.write(merged)
    out.close()
    for part in parts:
        part.unlink()
    return merged


# ------------------------------------------------------------------------------------------------ the command
def _state() -> Any:
    """``accelerate.PartialState`` when launched as several processes, else a one-process stand-in."""
    world = int(os.environ.get("WORLD_SIZE", "1"))
    if world > 1:
        try:
            from accelerate import PartialState
        except ImportError:
            raise CLIError("several processes (WORLD_SIZE > 1) need accelerate: pip install accelerate") from None
        import torch

        # without a GPU accelerate sees the processes only when told they are CPU processes (gloo)
        forced = os.environ.get("ACCELERATE_USE_CPU", "").strip().lower() in ("1", "true", "yes")
        state = PartialState(cpu=forced or not torch.cuda.is_available())
        if state.num_processes != world:
            raise CLIError(f"accelerate sees {state.num_processes} process(es) but WORLD_SIZE is {world}: every "
                           "process would run every row")
        return state
    from contextlib import contextmanager

    @contextmanager
    def split(items: list[Any], apply_padding: bool = False) -> Any:
        yield items

    return SimpleNamespace(num_processes=1, process_index=0, is_main_process=True, device=None,
                           split_between_processes=split, wait_for_everyone=lambda: None)


def _chunks(rows: list[Row], size: int) -> list[list[Row]]:
    chunks: list[list[Row]] = []
    for row in rows:
        if chunks and chunks[-1][0].group == row.group and len(chunks[-1]) < size:
            chunks[-1].append(row)
        else:
            chunks.append([row])
    return chunks


def cmd_batch(args: argparse.Namespace) -> int:
    """Run ``nagkit batch`` (see the module docstring).

    Returns:
        The exit status: 0 when every row is done, 1 when some row failed, 3 when stopped by ``--stop-after``.
    """
    started = time.perf_counter()
    source = Path(args.rows).expanduser()
    if not source.is_file():
        raise CLIError(f"{args.rows}: no such file")
    if args.batch_size < 1:
        raise CLIError(f"--batch-size must be >= 1, got {args.batch_size}")
    out = Path(args.out).expanduser()
    if out.exists() and not out.is_dir():
        raise CLIError(f"--out {args.out}: is a file, not a folder")
    manifest = Path(args.manifest).expanduser() if args.manifest else out / "manifest.jsonl"
    from .outputs import _writable_folder

    _writable_folder(out, "--out")
    _writable_folder(manifest.parent, "--manifest")
    if manifest.is_dir():
        raise CLIError(f"--manifest {manifest}: is a folder")
    sweeps: dict[str, list[Any]] = {}
    for dest, name in SWEEPS.items():
        values = parse_sweep("--" + dest.replace("_", "-"), getattr(args, dest), FIELDS[name])
        if values is not None:
            sweeps[name] = values
    defaults = {"negative": args.negative, "cfg_negative": args.cfg_negative, "preset": args.preset,
                "mode": args.mode, "nag_norm": args.nag_norm}
    read = read_rows(source)
    rows = expand_rows(read, args.model, defaults, sweeps)

    quiet_libraries()
    state = _state()
    rank, world = state.process_index, state.num_processes
    if state.is_main_process:
        merge_parts(manifest)  # a crashed data-parallel run's parts
    state.wait_for_everyone()
    done = read_manifest(manifest)
    skip = {k for k, r in done.items() if r.get("status") == "done" or not args.retry_failed}
    pending = [r for r in rows if r.key not in skip]
    skipped = len(rows) - len(pending)

    quiet = args.quiet or not state.is_main_process
    info = None
    if any(r.error is None for r in pending):
        from .models import describe

        say(f"reading {args.model} ...", quiet)
        info = describe(args.model)
        for row in pending:
            if row.error is None:
                plan_row(row, info)
    kinds = {r.plan.kind for r in pending if r.plan is not None}
    fmt = args.format or ("mp4" if kinds == {"video"} else "png")
    image_fmt, video_fmt = (fmt if fmt in ("png", "jpg", "webp") else "png"), (fmt if fmt in ("mp4", "webm", "gif")
                                                                               else "mp4")
    if "video" in kinds:
        from .outputs import check_video_writer

        check_video_writer("." + video_fmt)
    # rows of a group next to each other (then each process gets whole groups), bad rows first
    pending.sort(key=lambda r: (r.error is None, r.group, r.index))
    if args.ray:
        if world > 1:
            raise CLIError("--ray runs from one driver process: not under accelerate launch")
        return _run_ray(args, rows, pending, skipped, manifest, out, image_fmt, video_fmt, started)
    with state.split_between_processes(pending) as mine:
        mine = list(mine)

    good = [r for r in mine if r.error is None]
    failed = [r for r in mine if r.error is not None]
    pipe = device = None
    if good:
        from .generate import resolve_device
        from .models import load_pipeline

        device = resolve_device(args.device or (str(state.device) if state.device is not None else None), False)
        say(f"loading {args.model} ...", quiet)
        pipe = load_pipeline(info, args.dtype, device, False)
        pipe.set_progress_bar_config(disable=True)
    part = manifest if world == 1 else manifest.with_name(f"{manifest.name}.part{rank}")
    writer = Appender(part)
    counts = {"done": 0, "failed": 0}
    images = 0
    run_started = time.perf_counter()
    versions = _versions()
    from tqdm.auto import tqdm

    if world == 1:  # every row: those of earlier runs count as done
        bar = tqdm(total=len(rows), initial=skipped, unit="row", disable=quiet, desc="nagkit batch")
    else:  # the main process's share
        bar = tqdm(total=len(mine), unit="row", disable=quiet, desc=f"nagkit batch (process 0 of {world})")
    stopped = False
    try:
        writer.write([{"key": r.key, "index": r.index, "status": "failed", "source": r.source, "row": r.spec,
                       "error": r.error, "rank": rank, "versions": versions} for r in failed])
        counts["failed"] += len(failed)
        bar.update(len(failed))
        for chunk in _chunks(good, args.batch_size):
            records = _run_chunk(pipe, chunk, out, image_fmt, video_fmt, device, rank, versions)
            writer.write(records)
            for record in records:
                counts[record["status"]] += 1
                images += record["status"] == "done"
            bar.update(len(chunk))
            if args.stop_after is not None and counts["done"] >= args.stop_after:
                stopped = True
                break
    finally:
        bar.close()
        writer.close()
    if args.stop_after is not None:  # debug: end as a crash would (no barrier, the parts left unmerged)
        say(f"nagkit batch: {'stopped' if stopped else 'finished'} after {counts['done']} rows (--stop-after)",
            args.quiet)
        return 3 if stopped else 0
    state.wait_for_everyone()
    if world > 1:
        if not state.is_main_process:
            return 0
        merged = merge_parts(manifest)
        counts = {"done": sum(r.get("status") == "done" for r in merged),
                  "failed": sum(r.get("status") == "failed" for r in merged)}
        images = counts["done"]
    seconds = time.perf_counter() - run_started
    rate = images / seconds if seconds > 0 else math.inf
    say(f"nagkit batch: {counts['done']} done, {counts['failed']} failed, {skipped} skipped (already in "
        f"{manifest}); {images} images in {seconds:.1f} s ({rate:.2f} images/s) on {world} process(es); "
        f"total {time.perf_counter() - started:.1f} s", args.quiet)
    print(manifest)
    return 1 if counts["failed"] else 0


def _run_chunk(pipe: Any, chunk: list[Row], out: Path, image_fmt: str, video_fmt: str, device: str, rank: int,
               versions: dict[str, Any]) -> list[dict[str, Any]]:
    """One pipeline call for rows of one group; their files and manifest records (failed records if it raises)."""
    import diffusers
    import torch

    from .. import apply
    from .outputs import OutputPlan, write_outputs

    first = chunk[0].plan
    kwargs = dict(first.kwargs)
    kwargs["prompt"] = [r.plan.kwargs["prompt"] for r in chunk]
    if "negative_prompt" in kwargs:
        kwargs["negative_prompt"] = [r.plan.kwargs["negative_prompt"] for r in chunk]
    kwargs["generator"] = [torch.Generator(device=device).manual_seed(r.args.seed) for r in chunk]
    if first.builtin_image:
        from ..tiny.pipelines import tiny_condition_image

        kwargs["image"] = tiny_condition_image()
    c = first.nag
    started = time.perf_counter()
    guide = restore_cfg = None
    handlers = diffusers.utils.logging.get_logger("diffusers").handlers or []
    notice = TruncationNotice({f"row {r.index} prompt": r.args.prompt for r in chunk})
    try:
        guide = apply(pipe, negative_prompt=[r.plan.negative for r in chunk], scale=c.scale, tau=c.tau, alpha=c.alpha,
                      start=c.start, end=c.end, norm=c.norm, mode=c.mode, preset=first.preset)
        if first.cfg_setter is not None:
            _, restore_cfg = first.cfg_setter(pipe, chunk[0].args.cfg_scale)
        for handler in handlers:
            handler.addFilter(notice)
        result = pipe(**kwargs)
        results = result.frames if first.kind == "video" else result.images
        if len(results) != len(chunk):
            raise RuntimeError(f"the pipeline returned {len(results)} outputs for {len(chunk)} prompts")
        seconds = time.perf_counter() - started
        records = []
        for row, item in zip(chunk, results, strict=True):
            ext = video_fmt if first.kind == "video" else image_fmt
            path = out / f"{row.index:05d}-{row.key}.{ext}"
            one = SimpleNamespace(frames=[item]) if first.kind == "video" else SimpleNamespace(images=[item])
            written = write_outputs(one, OutputPlan([path], path.with_suffix(".json"), first.kind), 16)[0]
            records.append({"key": row.key, "index": row.index, "status": "done", "source": row.source,
                            "file": written["file"], "settings": {**resolved(row), "width": written["width"],
                                                                  "height": written["height"]},
                            "seconds": round(seconds / len(chunk), 4), "call_seconds": round(seconds, 4),
                            "call_rows": len(chunk), "rank": rank, "versions": versions})
        return records
    except Exception as err:  # noqa: BLE001 - the rows of a failed call are reported, the run goes on
        line = (str(err).strip().splitlines() or [type(err).__name__])[0]
        return [{"key": r.key, "index": r.index, "status": "failed", "source": r.source, "row": r.spec,
                 "error": f"{type(err).__name__}: {line}", "rank": rank, "versions": versions} for r in chunk]
    finally:
        for handler in handlers:
            handler.removeFilter(notice)
        if guide is not None:
            guide.remove()
        if restore_cfg is not None:
            restore_cfg()


# ------------------------------------------------------------------------------------------------ Ray
class _Worker:
    """One pipeline in one Ray actor: checks its rows again (plans hold the pipeline, they do not travel) and runs
    them as :func:`_run_chunk` does."""

    def __init__(self, model: str, dtype: str, device: str | None, out: str, image_fmt: str, video_fmt: str,
                 rank: int) -> None:
        from .generate import resolve_device
        from .models import describe, load_pipeline

        quiet_libraries()
        self.info = describe(model)
        self.device = resolve_device(device, False)
        self.pipe = load_pipeline(self.info, dtype, self.device, False)
        self.pipe.set_progress_bar_config(disable=True)
        self.out, self.image_fmt, self.video_fmt, self.rank = Path(out), image_fmt, video_fmt, rank
        self.versions = _versions()

    def run(self, items: list[tuple[int, str, dict[str, Any], str]]) -> list[dict[str, Any]]:
        chunk = [Row(index, key, spec, source) for index, key, spec, source in items]
        for row in chunk:
            plan_row(row, self.info)
        bad = [r for r in chunk if r.error is not None]
        records = [{"key": r.key, "index": r.index, "status": "failed", "source": r.source, "row": r.spec,
                    "error": r.error, "rank": self.rank, "versions": self.versions} for r in bad]
        good = [r for r in chunk if r.error is None]
        for part in _chunks(good, len(good) or 1):
            records += _run_chunk(self.pipe, part, self.out, self.image_fmt, self.video_fmt, self.device, self.rank,
                                  self.versions)
        return records


def _run_ray(args: argparse.Namespace, rows: list[Row], pending: list[Row], skipped: int, manifest: Path, out: Path,
             image_fmt: str, video_fmt: str, started: float) -> int:
    """``--ray``: one actor (one pipeline) per GPU of the cluster (``--ray-workers`` on CPUs), calls handed out by
    ``ray.util.ActorPool``; this driver appends every record to the one manifest as calls finish."""
    try:
        import ray
        from ray.util import ActorPool
    except ImportError:
        raise CLIError("--ray needs Ray: pip install '.[ray]' in nagkit's folder (or pip install 'ray>=2.9')") \
            from None
    from tqdm.auto import tqdm

    quiet = args.quiet
    if not ray.is_initialized():
        ray.init(address=args.ray_address, include_dashboard=False, log_to_driver=not quiet)
    gpus = int(ray.cluster_resources().get("GPU", 0))
    workers = args.ray_workers or gpus or 1
    use_gpu = gpus > 0 and args.device in (None, "cuda")
    actor = ray.remote(num_gpus=1 if use_gpu else 0, num_cpus=0 if use_gpu else 1)(_Worker)
    versions = _versions()
    writer = Appender(manifest)
    counts = {"done": 0, "failed": 0}
    bar = tqdm(total=len(rows), initial=skipped, unit="row", disable=quiet, desc="nagkit batch (ray)")
    failed = [r for r in pending if r.error is not None]
    good = [r for r in pending if r.error is None]
    run_started = time.perf_counter()
    try:
        writer.write([{"key": r.key, "index": r.index, "status": "failed", "source": r.source, "row": r.spec,
                       "error": r.error, "rank": "driver", "versions": versions} for r in failed])
        counts["failed"] += len(failed)
        bar.update(len(failed))
        chunks = _chunks(good, args.batch_size)
        if chunks:
            say(f"nagkit batch: {len(chunks)} calls on {min(workers, len(chunks))} Ray actor(s)", quiet)
            pool = ActorPool([actor.remote(args.model, args.dtype, "cuda" if use_gpu else (args.device or "cpu"),
                                           str(out), image_fmt, video_fmt, i)
                              for i in range(min(workers, len(chunks)))])
            items = [[(r.index, r.key, r.spec, r.source) for r in chunk] for chunk in chunks]
            for records in pool.map_unordered(lambda a, v: a.run.remote(v), items):
                writer.write(records)
                for record in records:
                    counts[record["status"]] += 1
                bar.update(len(records))
                if args.stop_after is not None and counts["done"] >= args.stop_after:
                    say(f"nagkit batch: stopped after {counts['done']} rows (--stop-after)", args.quiet)
                    return 3
    finally:
        bar.close()
        writer.close()
    seconds = time.perf_counter() - run_started
    say(f"nagkit batch: {counts['done']} done, {counts['failed']} failed, {skipped} skipped (already in "
        f"{manifest}); {counts['done']} images in {seconds:.1f} s ({counts['done'] / max(seconds, 1e-9):.2f} "
        f"images/s) on {workers} Ray actor(s); total {time.perf_counter() - started:.1f} s", args.quiet)
    print(manifest)
    return 1 if counts["failed"] else 0


def _versions() -> dict[str, Any]:
    import diffusers
    import torch

    from .. import __version__
    from .generate import _version

    return {"nagkit": __version__, "diffusers": diffusers.__version__, "torch": torch.__version__,
            "transformers": _version("transformers"), "accelerate": _version("accelerate"),
            "python": sys.version.split()[0]}
