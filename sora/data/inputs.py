"""What ``sora-make-shards`` shards from a folder (:mod:`sora.data.shards` turns the jobs into shards).

Every video, audio file and image under INPUT (a folder, searched recursively in sorted walk order,
or one file) is one :class:`~sora.data.shards.Job`: its key (ASCII, without dots: webdataset splits
keys at the first dot; ``source`` keeps the file name losslessly, even when it is not UTF-8), its kind
by extension, and its caption: a sidecar ``<stem>.txt``, else the row of a caption manifest (JSONL or
CSV, matched by path or bare name), else its timed captions (a ``<stem>.shots.json`` sidecar, else the
manifest row's ``shots``; read and checked by the worker, :mod:`sora.data.timed_captions`), else empty.
:func:`folder_jobs` also checks the options of a folder run and returns them as
:class:`~sora.data.shards.Options`.
"""

from __future__ import annotations

import csv
import io
import json
import os
import re
import unicodedata
from pathlib import Path

from sora.data.shards import Job, Options
from sora.media import VIDEO_EXTS
from sora.media import scenes

AUDIO_EXTS = ("wav", "flac", "mp3", "ogg", "opus", "m4a", "aac")  # seen, and skipped: no video
IMAGE_EXTS = ("png", "jpg", "jpeg", "webp", "bmp")  # skipped, or stored as still clips (``images``)


def kind_of(path: Path) -> str | None:
    ext = path.suffix[1:].lower()
    return "video" if ext in VIDEO_EXTS else "audio" if ext in AUDIO_EXTS else "image" if ext in IMAGE_EXTS else None


def find_inputs(root: Path) -> list[Path]:
    """Videos, audio files and images under ``root`` (or ``root`` itself), in walk order (sorted)."""
    if root.is_file():
        return [root] if kind_of(root) else []
    found = []
    for folder, dirs, files in os.walk(root):
        dirs.sort()
        found += [Path(folder, f) for f in sorted(files) if kind_of(Path(f))]
    return found


def make_key(rel: str, used: set[str]) -> str:
    """'clips/a.b c.mp4' -> 'clips/a_b_c': no dots (webdataset splits keys at the first dot)."""
    stem, ext = os.path.splitext(rel)
    ascii_stem = unicodedata.normalize("NFKD", stem).encode("ascii", "ignore").decode()  # é -> e
    parts = [re.sub(r"[^A-Za-z0-9_-]+", "_", p).strip("_") or "_" for p in Path(ascii_stem).parts]
    base = "/".join(parts)
    key, n = base, 1
    while key in used:  # a.mp4 and a.mov, or names that only differ in replaced characters
        n += 1
        key = f"{base}_{ext.lstrip('.').lower()}" if n == 2 else f"{base}_{n}"
    used.add(key)
    return key


def load_manifest(path: Path, root: Path) -> tuple[dict[str, dict], dict[str, dict]]:
    """Read a JSONL or CSV caption manifest into (rows by real path, rows by bare name), each row
    ``{"caption": str or None, "shots": raw rows or None, "where": "NAME:LINE"}``."""
    text = path.read_text(encoding="utf-8-sig")
    if path.suffix.lower() == ".csv" or not text.lstrip().startswith("{"):
        rows = list(csv.DictReader(io.StringIO(text)))
        if rows and ("caption" not in rows[0] or not {"path", "file"} & rows[0].keys()):
            raise ValueError(f"{path}: CSV needs columns path (or file) and caption")
        rows = [(i + 2, r) for i, r in enumerate(rows)]
    else:
        rows = []
        for i, line in enumerate(text.splitlines(), 1):
            if line.strip():
                try:
                    rows.append((i, json.loads(line)))
                except json.JSONDecodeError as e:
                    raise ValueError(f"{path}:{i}: bad JSON ({e.msg})") from None
    by_path, by_name = {}, {}
    for line, row in rows:
        name = row.get("path") or row.get("file") if isinstance(row, dict) else None
        if not name or (row.get("caption") is None and row.get("shots") is None):
            raise ValueError(f"{path}:{line}: need 'path' (or 'file') and 'caption' (or 'shots')")
        entry = {"caption": None if row.get("caption") is None else str(row["caption"]).strip(),
                 "shots": row.get("shots"), "where": f"{path.name}:{line}"}
        by_path[os.path.realpath(os.path.join(root, name))] = entry  # absolute names stay
        if "/" not in name and os.sep not in name:
            by_name[name] = entry
    return by_path, by_name


def video_jobs(root: Path, captions: Path | None) -> list[Job]:
    by_path, by_name = load_manifest(captions, root) if captions else ({}, {})
    base = root.parent if root.is_file() else root
    jobs, used = [], set()
    for path in find_inputs(root):
        rel, kind = path.relative_to(base).as_posix(), kind_of(path)
        row = by_path.get(os.path.realpath(path), by_name.get(path.name)) or {}
        sidecar, timed = path.with_suffix(".txt"), path.with_suffix(".shots.json")
        shots = {}  # timed captions (of a video): the sidecar's, else the manifest row's
        if kind == "video" and timed.is_file():
            shots = {"shots_file": str(timed), "shots_from": Path(rel).with_suffix(".shots.json").as_posix()}
        elif kind == "video" and row.get("shots") is not None:
            shots = {"shots": row["shots"], "shots_from": f"{row['where']} shots"}
        if sidecar.is_file():
            caption, origin = sidecar.read_text(encoding="utf-8", errors="replace").strip(), "sidecar"
        elif row.get("caption") is not None:
            caption, origin = row["caption"], "manifest"
        else:
            caption, origin = "", "shots" if shots else "none"
        jobs.append(Job(make_key(rel, used), rel, caption, path=str(path), ext=path.suffix[1:].lower(),
                        caption_from=origin, kind=kind, **shots))
    return jobs


def folder_jobs(root: Path, captions: Path | None, max_side: int | None = None, fps: float | None = None,
                images: float | None = None, max_seconds: float | None = None, hdr: str = "tonemap",
                split_scenes: bool = False, scene_threshold: float = scenes.DEFAULT_THRESHOLD
                ) -> tuple[list[Job], Options]:
    """Every video, audio file and image under ``root`` (a folder, searched recursively, or one file),
    captioned from a sidecar ``<stem>.txt``, else the ``captions`` manifest (JSONL or CSV), else its
    timed captions (a sidecar ``<stem>.shots.json``, else the manifest row's ``shots``), else empty.
    ValueError when none, or when ``split_scenes`` lacks PySceneDetect."""
    if not root.exists():
        raise ValueError(f"INPUT {root} does not exist")
    if captions is not None and not captions.is_file():
        raise ValueError(f"--captions {captions} is not a file")
    jobs = video_jobs(root, captions)  # ValueError for a bad manifest
    if not jobs:
        exts = ", ".join((*VIDEO_EXTS, *AUDIO_EXTS, *IMAGE_EXTS))
        raise ValueError(f"no videos, audio files or images ({exts}) found in {root}")
    if hdr not in ("tonemap", "skip"):
        raise ValueError(f"--hdr must be tonemap or skip, got {hdr!r}")
    if split_scenes:
        if not scene_threshold > 0:
            raise ValueError(f"--scene-threshold must be > 0, got {scene_threshold}")
        try:
            scenes.require()
        except ImportError as e:
            raise ValueError(str(e)) from None
    return jobs, Options(max_side=max_side, fps=fps, images=images, max_seconds=max_seconds, hdr=hdr,
                         split_scenes=split_scenes, scene_threshold=scene_threshold)
