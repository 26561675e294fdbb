"""Webdataset shards from videos (or generated bouncing-ball world clips): the library behind
``sora-make-shards`` (:mod:`sora.cli.make_shards`, where the options are described).

Each sample holds the video under its container extension (original bytes, untouched) or under
``mp4`` when a re-encode is asked (``max_side``/``fps``), a ``json`` with the probe metadata of
the stored video plus ``caption``/``source``/``bytes`` (and ``world`` ground truth for world
clips), and the caption in ``txt``.  Every input is probed and decoded at its head and tail;
unreadable, empty, truncated or undecodable files are skipped with a reason each.  Workers
probe/encode in parallel, in order, so the output is deterministic; the calling process writes the
shards (tar mtimes are 0, so equal inputs give byte-identical shards).  Re-encoding decodes a whole
clip into memory (``write_av`` takes the clip at once), so clips whose decoded frames would exceed
REENCODE_LIMIT bytes are skipped rather than exhausting memory.
"""

from __future__ import annotations

import csv
import io
import json
import multiprocessing
import os
import re
import sys
import unicodedata
from collections import Counter
from dataclasses import dataclass, field
from functools import partial
from pathlib import Path

from tqdm import tqdm

from sora.data.world import WorldConfig, clip_seed, make_clip
from sora.media import VIDEO_EXTS, MediaError, probe_av, read_av, write_av

REENCODE_LIMIT = 4 << 30  # bytes of decoded RGB frames one re-encoded clip may take
CHECK_SECONDS = 0.1  # length of the head / tail windows decoded to validate a file


@dataclass(frozen=True)
class Job:
    key: str
    source: str  # path relative to INPUT, or "world:seed=N"
    caption: str
    path: str | None = None  # absolute path of the video (None for world clips)
    ext: str = "mp4"
    seed: int = 0
    caption_from: str = "generated"  # sidecar / manifest / none / generated


@dataclass(frozen=True)
class Options:
    max_side: int | None = None
    fps: float | None = None
    world: WorldConfig | None = None

    @property
    def reencode(self) -> bool:
        return self.max_side is not None or self.fps is not None


# ----------------------------------------------------------------------------- inputs


def find_videos(root: Path) -> list[Path]:
    if root.is_file():
        return [root] if root.suffix[1:].lower() in VIDEO_EXTS else []
    found = []
    for folder, dirs, files in os.walk(root):
        dirs.sort()
        found += [Path(folder, f) for f in sorted(files) if Path(f).suffix[1:].lower() in VIDEO_EXTS]
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


def load_manifest(path: Path, root: Path) -> tuple[dict[str, str], dict[str, str]]:
    """Read a JSONL or CSV caption manifest into (captions by real path, captions by bare name)."""
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
        if not name or row.get("caption") is None:
            raise ValueError(f"{path}:{line}: need 'path' (or 'file') and 'caption'")
        caption = str(row["caption"]).strip()
        by_path[os.path.realpath(os.path.join(root, name))] = caption  # absolute names stay
        if "/" not in name and os.sep not in name:
            by_name[name] = caption
    return by_path, by_name


def video_jobs(root: Path, captions: Path | None) -> list[Job]:
    by_path, by_name = load_manifest(captions, root) if captions else ({}, {})
    base = root.parent if root.is_file() else root
    jobs, used = [], set()
    for path in find_videos(root):
        rel = path.relative_to(base).as_posix()
        sidecar = path.with_suffix(".txt")
        if sidecar.is_file():
            caption, origin = sidecar.read_text(encoding="utf-8", errors="replace").strip(), "sidecar"
        elif (caption := by_path.get(os.path.realpath(path), by_name.get(path.name))) is not None:
            origin = "manifest"
        else:
            caption, origin = "", "none"
        jobs.append(Job(make_key(rel, used), rel, caption, path=str(path), ext=path.suffix[1:].lower(),
                        caption_from=origin))
    return jobs


# ----------------------------------------------------------------------------- workers


def describe(info, job: Job, size: int, caption: str | None = None) -> dict:
    caption = job.caption if caption is None else caption
    return {**info.to_dict(), "caption": caption, "source": job.source, "bytes": size}


def one_line(err: Exception, src) -> str:
    """A MediaError's reason without its "<source>: " prefix, on one line."""
    msg = " ".join(str(err).split())
    for prefix in (f"{src}: ", "<bytes>: "):
        msg = msg[len(prefix):] if msg.startswith(prefix) else msg
    return msg


def check_decodes(src: str, info) -> None:
    """Decode the first frames and the last ones: catches bad streams and truncated files."""
    if len(read_av(src, duration=CHECK_SECONDS).frames) == 0:
        raise MediaError(f"{src}: no decodable video frame")
    if info.duration > 2 * CHECK_SECONDS:  # read_av raises when the data ends before the header says
        try:
            read_av(src, start=info.duration - CHECK_SECONDS)
        except MediaError as e:
            reason = one_line(e, src)
            if not reason.startswith("truncated"):  # the start decodes, the end does not
                reason = f"truncated or corrupt: {reason} at the end"
            raise MediaError(f"{src}: {reason}") from None


def reencode(src: str, info, opts: Options) -> bytes:
    h, w = info.height, info.width
    if opts.max_side is not None and max(h, w) > opts.max_side:
        h, w = h * opts.max_side / max(h, w), w * opts.max_side / max(h, w)
    h, w = max(2, int(round(h / 2)) * 2), max(2, int(round(w / 2)) * 2)
    fps = opts.fps or info.fps or 25.0
    if info.duration * fps * h * w * 3 > REENCODE_LIMIT:
        raise MediaError(f"{src}: too long to re-encode in memory ({info.duration:.0f}s at {w}x{h})")
    sr = info.sample_rate or 16000
    clip = read_av(src, fps=opts.fps, size=(h, w), sample_rate=sr, channels=min(info.channels, 2) or 1)
    if len(clip.frames) == 0:
        raise MediaError(f"{src}: no decodable video frame")
    audio = clip.audio[:, : round(len(clip.frames) / fps * sr)] if info.has_audio else None
    out = io.BytesIO()
    write_av(out, clip.frames, audio, fps, sr)
    return out.getvalue()


def process(job: Job, opts: Options) -> tuple[Job, dict | None, bytes | None, str | None]:
    """Worker: (job, json, re-encoded bytes or None = store the file as is, skip reason or None)."""
    try:
        if opts.world is not None:
            clip = make_clip(job.seed, opts.world)
            out = io.BytesIO()
            write_av(out, clip.frames, clip.audio, clip.fps, clip.sample_rate)
            data = out.getvalue()
            meta = describe(probe_av(data), job, len(data), clip.caption)
            return job, {**meta, "world": clip.meta}, data, None
        info = probe_av(job.path)
        if not opts.reencode:
            check_decodes(job.path, info)
            return job, describe(info, job, os.path.getsize(job.path)), None, None
        data = reencode(job.path, info, opts)
        return job, describe(probe_av(data), job, len(data)), data, None
    except MediaError as e:
        return job, None, None, one_line(e, job.path)
    except Exception as e:  # noqa: BLE001 - one bad file must not stop a long run
        return job, None, None, f"{type(e).__name__}: {' '.join(str(e).split())}"


def reason_kind(reason: str) -> str:
    """'truncated or corrupt: video data ends at 0.4s ...' -> 'truncated or corrupt'."""
    return re.split(r" \(|: ", reason, maxsplit=1)[0]


# ----------------------------------------------------------------------------- jobs and the writer


def world_jobs(n: int, seed: int, config: WorldConfig) -> tuple[list[Job], Options]:
    """N generated world clips: clip i is ``make_clip(clip_seed(seed, i), config)``."""
    if n < 1 or config.height % 2 or config.width % 2:
        raise ValueError(f"--world needs N >= 1 and an even --world-size (H.264), got {n}, "
                         f"{config.height}x{config.width}")
    return [Job(f"world-{i:07d}", f"world:seed={seed}:{i}", "", seed=clip_seed(seed, i)) for i in range(n)], \
        Options(world=config)


def folder_jobs(root: Path, captions: Path | None, max_side: int | None = None,
                fps: float | None = None) -> tuple[list[Job], Options]:
    """Every video under ``root`` (a folder, searched recursively, or one file), captioned from a sidecar
    ``<stem>.txt``, else the ``captions`` manifest (JSONL or CSV), else empty. ValueError when none."""
    if not root.exists():
        raise ValueError(f"INPUT {root} does not exist")
    if captions is not None and not captions.is_file():
        raise ValueError(f"--captions {captions} is not a file")
    jobs = video_jobs(root, captions)  # ValueError for a bad manifest
    if not jobs:
        raise ValueError(f"no videos ({', '.join(sorted(VIDEO_EXTS))}) found in {root}")
    return jobs, Options(max_side=max_side, fps=fps)


@dataclass
class Written:
    """What :func:`write_shards` wrote: shard paths, sample counts, hours, skip reasons by kind."""
    shards: list[str] = field(default_factory=list)
    samples: int = 0
    with_audio: int = 0
    seconds: float = 0.0
    skipped: Counter = field(default_factory=Counter)
    captions: Counter = field(default_factory=Counter)  # by origin: sidecar / manifest / none / generated


def write_shards(jobs: list[Job], opts: Options, out_dir: Path, maxcount: int = 10000, maxsize_mb: float = 256,
                 workers: int = 1) -> Written:
    """Process ``jobs`` (``workers`` spawned processes, results in order) into ``out_dir/shard-%06d.tar``;
    each skipped input is one line on stderr with its reason."""
    import webdataset as wds  # here, not at the top: it imports torch, which workers don't need

    done, writer = Written(), None
    workers = min(workers, len(jobs))
    pool = multiprocessing.get_context("spawn").Pool(workers) if workers > 1 else None
    try:
        results = (pool.imap if pool else map)(partial(process, opts=opts), jobs)
        for job, meta, data, reason in tqdm(results, total=len(jobs), unit="clip", file=sys.stderr,
                                            disable=None, desc="make_shards"):
            ext = "mp4" if data is not None else job.ext
            if data is None and reason is None:
                try:  # stored as is: read here, not shipped through the pool's pipes
                    data = Path(job.path).read_bytes()
                except OSError as e:
                    reason = f"cannot read ({e.strerror})"
            if reason is not None:
                tqdm.write(f"skip {job.source}: {reason}", file=sys.stderr)
                done.skipped[reason_kind(reason)] += 1
                continue
            if writer is None:  # opened on the first sample: no empty shard when all are skipped
                writer = wds.ShardWriter(str(out_dir / "shard-%06d.tar"), maxcount=maxcount,
                                         maxsize=maxsize_mb * 1e6, post=done.shards.append, verbose=0, mtime=0)
            writer.write({"__key__": job.key, ext: data, "json": json.dumps(meta).encode(), "txt": meta["caption"]})
            done.samples, done.with_audio = done.samples + 1, done.with_audio + meta["has_audio"]
            done.seconds += meta["duration"]
            done.captions[job.caption_from] += 1
    finally:
        if pool is not None:
            pool.terminate()
        if writer is not None:
            writer.close()
    return done
