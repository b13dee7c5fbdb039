"""Where ``nagkit generate`` writes, checked before any work: formats, existing files, writable folders.

``--out`` is a file (its extension picks the format: PNG/JPEG/WebP for images, MP4/WebM/GIF for videos) or a
folder (``nagkit.png`` / ``nagkit.mp4`` inside, numbered ``nagkit-2.png``… when taken). With ``--batch N`` the files
are ``STEM_0…STEM_{N-1}``. The JSON sidecar is ``STEM.json`` next to them. An existing file is never overwritten
without ``--overwrite``.
"""

from __future__ import annotations

import os
import tempfile
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from .common import CLIError

IMAGE_FORMATS = {".png": "PNG", ".jpg": "JPEG", ".jpeg": "JPEG", ".webp": "WEBP"}
VIDEO_FORMATS = {".mp4": "MP4", ".webm": "WebM", ".gif": "GIF"}
_DEFAULT = {"image": ".png", "video": ".mp4"}


@dataclass(frozen=True)
class OutputPlan:
    """The files one generation writes.

    Attributes:
        files: one per image/video.
        sidecar: the JSON settings file.
        kind: ``"image"`` or ``"video"``.
    """

    files: list[Path]
    sidecar: Path
    kind: str

    @property
    def suffix(self) -> str:
        """The files' extension (lower case)."""
        return self.files[0].suffix.lower()


def _writable_folder(folder: Path, option: str) -> None:
    """``folder`` exists and is writable, or can be created (its nearest existing ancestor is a writable folder)."""
    probe = folder
    while not probe.exists():
        if probe.parent == probe:
            break
        probe = probe.parent
    if not probe.is_dir():
        raise CLIError(f"{option} {folder}: {probe} is a file, not a folder")
    if not os.access(probe, os.W_OK | os.X_OK):
        raise CLIError(f"{option} {folder}: cannot write in {probe} (permission denied)")
    try:  # what os.access cannot see (root on a read-only or virtual file system): one empty file, removed at once
        with tempfile.TemporaryFile(dir=probe):
            pass
    except OSError as err:
        raise CLIError(f"{option} {folder}: cannot write in {probe} ({err.strerror or err})") from None


def check_out_syntax(out: str) -> None:
    """What can be said of ``--out`` before the model is known: a known extension (or none: a folder)."""
    suffix = Path(out).suffix.lower()
    if suffix and suffix not in IMAGE_FORMATS and suffix not in VIDEO_FORMATS and not Path(out).is_dir():
        raise CLIError(f"--out {out}: unknown format {suffix!r}; images: {', '.join(IMAGE_FORMATS)}; videos: "
                       f"{', '.join(VIDEO_FORMATS)} (or a folder)")


def plan_outputs(out: str, count: int, kind: str, overwrite: bool = False) -> OutputPlan:
    """The files of one generation, checked: format known for ``kind``, folder writable, nothing overwritten.

    Args:
        out: the ``--out`` value.
        count: images/videos the call returns.
        kind: ``"image"`` or ``"video"``.
        overwrite: allow replacing existing files.

    Returns:
        The :class:`OutputPlan`.

    Raises:
        CLIError: with the reason, naming ``--out``.
    """
    path = Path(out).expanduser()
    formats = IMAGE_FORMATS if kind == "image" else VIDEO_FORMATS
    folder_given = path.is_dir() or not path.suffix or out.endswith(("/", os.sep))
    if not folder_given and path.suffix.lower() not in formats:
        other = "videos" if kind == "image" else "images"
        raise CLIError(f"--out {out}: this model makes {kind}s; {path.suffix} is for {other} "
                       f"(use {', '.join(formats)})")
    if not folder_given and path.parent.exists() and not path.parent.is_dir():
        raise CLIError(f"--out {out}: {path.parent} is a file, not a folder")
    folder = path if folder_given else path.parent
    _writable_folder(folder, "--out")

    def files_for(stem_path: Path) -> tuple[list[Path], Path]:
        if count == 1:
            files = [stem_path]
        else:
            files = [stem_path.with_name(f"{stem_path.stem}_{i}{stem_path.suffix}") for i in range(count)]
        return files, stem_path.with_suffix(".json")

    if folder_given:  # a folder: the first free nagkit[-N] name
        n = 1
        while True:
            stem = "nagkit" if n == 1 else f"nagkit-{n}"
            files, sidecar = files_for(folder / f"{stem}{_DEFAULT[kind]}")
            if overwrite or not any(p.exists() for p in (*files, sidecar)):
                return OutputPlan(files, sidecar, kind)
            n += 1
    files, sidecar = files_for(path)
    taken = [p for p in (*files, sidecar) if p.exists()]
    if taken and not overwrite:
        raise CLIError(f"--out {out}: {taken[0]} exists (pass --overwrite to replace it, or give a folder to number "
                       "the outputs)")
    for p in taken:
        if p.is_dir():
            raise CLIError(f"--out {out}: {p} is a folder")
    return OutputPlan(files, sidecar, kind)


def check_video_writer(suffix: str) -> None:
    """MP4/WebM need imageio with its ffmpeg plugin (the ``video`` extra); GIF needs only Pillow."""
    if suffix == ".gif":
        return
    try:
        import imageio.v2  # noqa: F401
        import imageio_ffmpeg  # noqa: F401
    except ImportError:
        raise CLIError(f"writing {suffix} needs the video extra: pip install '.[video]' in nagkit's folder "
                       "(or --out NAME.gif)") from None


def write_outputs(result: Any, plan: OutputPlan, fps: int) -> list[dict[str, Any]]:
    """Write a pipeline result's images or videos as planned.

    Args:
        result: the pipeline output (``.images`` or ``.frames``).
        plan: from :func:`plan_outputs`.
        fps: video frame rate.

    Returns:
        Per file what was written: ``{"file", "width", "height"}`` and for videos ``"frames"``, ``"fps"``.
    """
    import numpy as np
    from PIL import Image

    written: list[dict[str, Any]] = []
    try:
        plan.files[0].parent.mkdir(parents=True, exist_ok=True)
    except OSError as err:
        raise CLIError(f"cannot create {plan.files[0].parent}: {err}") from None
    if plan.kind == "video":
        for path, video in zip(plan.files, result.frames, strict=True):
            array = np.asarray(video)
            if array.dtype != np.uint8:
                array = (np.clip(array, 0, 1) * 255).round().astype(np.uint8)
            frames = [Image.fromarray(frame) for frame in array]
            if path.suffix.lower() == ".gif":
                frames[0].save(path, save_all=True, append_images=frames[1:], duration=round(1000 / fps), loop=0)
            else:
                import imageio.v2 as imageio

                try:
                    imageio.mimsave(path, list(array), fps=fps, macro_block_size=1)
                except Exception as err:  # noqa: BLE001 - a missing codec/backend
                    raise CLIError(f"cannot write {path}: {err}") from None
            written.append({"file": str(path), "width": frames[0].width, "height": frames[0].height,
                            "frames": len(frames), "fps": fps})
        return written
    for path, image in zip(plan.files, result.images, strict=True):
        form = IMAGE_FORMATS[path.suffix.lower()]
        image = image.convert("RGB") if form == "JPEG" else image
        try:
            image.save(path, format=form, **({"quality": 95} if form == "JPEG" else
                                             {"lossless": True} if form == "WEBP" else {}))
        except OSError as err:
            raise CLIError(f"cannot write {path}: {err}") from None
        written.append({"file": str(path), "width": image.width, "height": image.height})
    return written
