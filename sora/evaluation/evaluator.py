"""The engine of ``sora-eval``: reference clips, clips to evaluate, feature extractors with their
identities, a cache of reference features, and the metric set with its baselines.

A clip is uint8 frames ``[T, H, W, 3]`` and mono float audio ``[N]`` on one timing contract
(:class:`sora.timeline.Timeline`); samples and references are read or cut to the same contract
and frame size, so every metric compares like with like. :func:`clip_metrics` is the metric set:

* ``fvd``, ``kvd`` (``kvd_std``): Frechet and kernel distance of I3D Kinetics-400 logits
  (:mod:`sora.evaluation.i3d`), when I3D weights are given;
* ``fd_<embedding>``: Frechet distance of an audio embedding (``fd_mel`` by default, the
  weight-free mel-statistics embedding; ``fd_vggish`` / ``fd_panns`` / ``fd_clap`` from local
  weights), clips with sound only;
* ``sync/*``: the model-free audio-video offset (:func:`sora.evaluation.sync.av_offset_batch`);
* ``physics/*``: the bouncing-world probe (:mod:`sora.evaluation.physics`) when the
  references carry the world's ground truth.

All distances are unscaled (no powers of ten) and, with few clips, biased upwards: compare a
number only with one computed on the same protocol (``metrics.json`` records it), e.g. the
"real held-out clips" baseline of the same run.
"""

from __future__ import annotations

import hashlib
import json
import logging
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np

from sora.evaluation.audio_features import audio_embedding
from sora.evaluation.frechet import frechet_distance, kernel_distance
from sora.evaluation.sync import av_offset_batch

log = logging.getLogger("sora.eval")


@dataclass
class Clip:
    frames: np.ndarray            # uint8 [T, H, W, 3]
    audio: np.ndarray             # float32 [N], mono, at the timeline's sample rate
    caption: str = ""
    key: str = ""
    has_audio: bool = True
    meta: dict = field(default_factory=dict)


# -- reading clips ------------------------------------------------------------------------------
class DataError(ValueError):
    """Held-out data that cannot be read (``data=...: why``): sora-eval prints it as one line."""


def reference_clips(urls, timeline, size, count: int, seed: int = 0, batch_size: int = 8) -> list[Clip]:
    """The first ``count`` clips of a shard set in order (deterministic windows given ``seed``,
    centre crops of ``size``)."""
    from sora.data.streams import ShardClipStream

    stream = ShardClipStream([str(p) for p in data_files(urls)], timeline, batch_size=batch_size, size=list(size),
                             shuffle=False, infinite=False, seed=seed, random_crop=False)
    clips = []
    for batch in stream:  # uint8 video [B, 3, T, H, W]
        for i in range(len(batch)):
            clips.append(Clip(batch.video[i].permute(1, 2, 3, 0).numpy(), batch.audio[i].mean(0).numpy(),
                              batch.captions[i], batch.keys[i], bool(batch.has_audio[i]),
                              dict(batch.meta[i]) if batch.meta else {}))
        if len(clips) >= count:
            break
    if not clips:
        raise DataError(f"data={urls}: no readable clip of {timeline.seconds:g} s")
    return clips[:count]


def clip_batches(clips: list[Clip], fps: float, sample_rate: int, batch_size: int = 8) -> list:
    """The clips as :class:`sora.data.pipeline.ClipBatch` es (float video in [-1, 1]), in order."""
    from sora.data.pipeline import Sample, collate

    samples = [Sample(c.key, c.frames, c.audio[None], np.ones(len(c.audio), bool), c.has_audio, c.caption,
                      meta=c.meta) for c in clips]
    return [collate(samples[i:i + batch_size], fps, sample_rate).normalize()
            for i in range(0, len(samples), batch_size)]


def read_clip(path, timeline, size) -> Clip:
    """An mp4 (any file PyAV opens) on the timeline: ``timeline.num_frames`` frames at its fps,
    resized to ``size``, mono audio of ``timeline.num_samples`` samples; a short file repeats its
    last frame and pads silence."""
    from sora.media import read_av

    clip = read_av(str(path), duration=timeline.read_duration, fps=float(timeline.fps_q), size=tuple(size),
                   sample_rate=timeline.sample_rate)
    frames = clip.frames[: timeline.num_frames]
    if len(frames) == 0:
        raise ValueError(f"{path}: no decodable frames")
    if len(frames) < timeline.num_frames:
        frames = np.concatenate([frames, np.repeat(frames[-1:], timeline.num_frames - len(frames), 0)])
    audio = np.asarray(clip.audio, np.float32).reshape(-1, clip.audio.shape[-1]).mean(0)[: timeline.num_samples]
    has_audio = bool(clip.audio_mask.any()) if clip.audio_mask is not None else bool(np.any(audio))
    audio = np.pad(audio, (0, timeline.num_samples - len(audio)))
    return Clip(frames, audio, key=Path(path).stem, has_audio=has_audio)


# -- identities and the cache -------------------------------------------------------------------
def file_sha256(path) -> str:
    h = hashlib.sha256()
    with open(path, "rb") as f:
        for block in iter(lambda: f.read(1 << 20), b""):
            h.update(block)
    return h.hexdigest()


def data_files(urls) -> list[Path]:
    """The shard files ``urls`` names (a folder of ``.tar``, a path, a glob, a brace pattern or a
    list of them), in order."""
    import glob

    from braceexpand import braceexpand

    out = []
    for url in [urls] if isinstance(urls, (str, Path)) else list(urls):
        if Path(str(url)).is_dir():
            out += sorted(Path(str(url)).glob("*.tar"))
            continue
        for pattern in braceexpand(str(url)):
            out += [Path(p) for p in sorted(glob.glob(pattern))] or [Path(pattern)]
    missing = [str(p) for p in out if not p.is_file()]
    if missing or not out:
        raise DataError(f"data={urls}: no such shard file {missing[0] if missing else '(no .tar)'}")
    return out


def data_fingerprint(urls) -> str:
    """sha256 over the shards' names and contents: the identity of a reference set's source."""
    h = hashlib.sha256()
    for p in data_files(urls):
        h.update(p.name.encode() + b"\0" + file_sha256(p).encode())
    return h.hexdigest()


class Extractors:
    """The feature networks of the metrics and their identities (name + weights' sha256)."""

    def __init__(self, i3d_weights: str | None = None, audio: str = "fd_mel", audio_weights: str | None = None,
                 device: str = "cpu", batch_size: int = 8):
        self.batch_size, self.i3d, self.i3d_sha256 = batch_size, None, None
        if i3d_weights:
            from sora.evaluation.i3d import load_i3d

            self.i3d, self.i3d_sha256 = load_i3d(i3d_weights, device), file_sha256(i3d_weights)
        self.audio = audio_embedding(audio, audio_weights)
        self.audio_name = audio
        self.audio_sha256 = file_sha256(audio_weights) if audio_weights and Path(audio_weights).is_file() else None

    def describe(self) -> dict:
        return {"video": {"name": "i3d_kinetics400_logits", "weights_sha256": self.i3d_sha256} if self.i3d else None,
                "audio": {"name": self.audio_name, "class": type(self.audio).__name__,
                          "sample_rate": self.audio.sample_rate, "dim": self.audio.dim,
                          "weights_sha256": self.audio_sha256}}

    def features(self, clips: list[Clip], sample_rate: int, progress: bool = False, cache: FeatureCache | None = None,
                 store: bool = False) -> dict[str, np.ndarray]:
        """``video`` I3D logits ``[N, 400]`` (when I3D is loaded), ``audio`` embeddings of the clips
        with sound ``[sum K, dim]``. ``cache``: each clip's I3D row is looked up there by its frames'
        bytes and the weights (a reconstruction that kept the reference's frames, the real baseline
        of an earlier evaluation), and the computed rows are written there when ``store``."""
        out = {}
        if self.i3d is not None:
            out["video"] = self.video_features([c.frames for c in clips], progress, cache, store)
        audible = [c.audio for c in clips if c.has_audio]
        out["audio"] = self.audio.embed_many(audible, sample_rate) if audible else np.zeros((0, self.audio.dim))
        return out

    def video_features(self, videos: list[np.ndarray], progress: bool, cache: FeatureCache | None,
                       store: bool) -> np.ndarray:
        from sora.evaluation.i3d import i3d_features

        def compute(indices: list[int]) -> np.ndarray:
            return i3d_features([videos[i] for i in indices], self.i3d, self.batch_size, progress=progress)

        if cache is None or cache.directory is None or not videos:
            return compute(list(range(len(videos))))
        keys = [FeatureCache.key(i3d=self.i3d_sha256, shape=v.shape, dtype=str(v.dtype),
                                 frames=hashlib.sha256(np.ascontiguousarray(v).tobytes()).hexdigest()) for v in videos]
        return cache.rows(keys, compute, store)


class FeatureCache:
    """Reference features on disk, one ``.npz`` per key (a hash of data, protocol and extractors), and
    single clips' I3D rows, one ``row-<key>.npy`` per clip (:meth:`rows`)."""

    def __init__(self, directory: str | None):
        self.directory = Path(directory).expanduser() if directory else None

    @staticmethod
    def key(**parts) -> str:
        return hashlib.sha256(json.dumps(parts, sort_keys=True, default=str).encode()).hexdigest()[:32]

    def get(self, key: str, compute) -> tuple[dict[str, np.ndarray], bool]:
        """(features, whether they came from the cache)."""
        path = self.directory / f"{key}.npz" if self.directory else None
        if path is not None and path.is_file():
            with np.load(path, allow_pickle=False) as f:
                return {k: f[k] for k in f.files}, True
        feats = compute()
        if path is not None:
            self.save(path, lambda tmp: np.savez(tmp, **feats))
        return feats, False

    def rows(self, keys: list[str], compute, store: bool) -> np.ndarray:
        """One feature row per key, in order: those on disk (``row-<key>.npy``) read, the others from
        ``compute(indices)`` (their rows in that order) and written when ``store``."""
        paths = [self.directory / f"row-{k}.npy" for k in keys]
        found = {i: np.load(p, allow_pickle=False) for i, p in enumerate(paths) if p.is_file()}
        missing = [i for i in range(len(keys)) if i not in found]
        for i, row in zip(missing, compute(missing) if missing else []):
            found[i] = row
            if store:
                self.save(paths[i], lambda tmp: np.save(tmp, row))
        log.info("I3D: %d of %d clips' features from the cache %s", len(keys) - len(missing), len(keys), self.directory)
        return np.stack([found[i] for i in range(len(keys))])

    @staticmethod
    def save(path: Path, write) -> None:
        """``write(tmp)`` next to ``path``, then renamed: a reader never sees half a file."""
        path.parent.mkdir(parents=True, exist_ok=True)
        tmp = path.with_suffix(".tmp" + path.suffix)
        write(tmp)
        tmp.replace(path)


# -- the metric set -------------------------------------------------------------------------------
def distances(feats: dict[str, np.ndarray], ref: dict[str, np.ndarray], audio_name: str, seed: int = 0) -> dict:
    """FVD / KVD and the audio Frechet distance of ``feats`` against ``ref``."""
    out = {}
    if "video" in feats and "video" in ref:
        out["fvd"] = frechet_distance(feats["video"], ref["video"])
        kd = kernel_distance(feats["video"], ref["video"], subsets=100, subset_size=1000, seed=seed)
        out["kvd"], out["kvd_std"] = kd.mean, kd.std
    name = audio_name if audio_name.startswith("fd_") else f"fd_{audio_name}"
    if len(feats["audio"]) >= 2 and len(ref["audio"]) >= 2:
        out[name] = frechet_distance(feats["audio"], ref["audio"])
    else:
        log.warning("%s: fewer than 2 clips with sound on a side; not computed", name)
    return out


def av_metrics(clips: list[Clip], fps: float, sample_rate: int, world=None) -> dict:
    """Sync offset over the clips with sound, and the physics probe when ``world`` (a
    :class:`sora.data.world.WorldConfig` of the evaluated size) is given."""
    audible = [c for c in clips if c.has_audio]
    out = av_offset_batch([(c.frames, c.audio) for c in audible], fps, sample_rate) if audible else {}
    if world is not None:
        from sora.evaluation.physics import probe_batch

        out.update(probe_batch([(c.frames, c.audio) for c in clips], fps, sample_rate, world,
                               captions=[c.caption for c in clips]))
    return out


def world_config(clips: list[Clip], size):
    """The bouncing world drawn at ``size`` when the reference shards were made from it (their json
    carries the world's ground truth), else None. Clips are whole-frame resizes of the world's
    frames, so the world's geometry at ``size`` is the default world's at that size."""
    from sora.data.world import WorldConfig

    meta = next((c.meta.get("world") for c in clips if c.meta.get("world")), None)
    if not meta:
        return None
    h, w = (int(x) for x in size)
    return WorldConfig(width=w, height=h, fps=float(meta["fps"]), seconds=float(meta["seconds"]),
                       sample_rate=int(meta["sample_rate"]))


def clip_metrics(clips: list[Clip], ref_feats: dict, extractors: Extractors, fps: float, sample_rate: int,
                 world=None, seed: int = 0, progress: bool = False, cache: FeatureCache | None = None,
                 store: bool = False) -> dict:
    """Every metric of ``clips`` against the reference features: distances, sync, physics
    (``cache``, ``store``: :meth:`Extractors.features`)."""
    feats = extractors.features(clips, sample_rate, progress, cache, store)
    return {**distances(feats, ref_feats, extractors.audio_name, seed), **av_metrics(clips, fps, sample_rate, world)}


def shuffled(clips: list[Clip]) -> list[Clip]:
    """Each clip's picture with the next clip's sound: the pairs no longer belong together."""
    n = len(clips)
    return [Clip(c.frames, clips[(i + 1) % n].audio, c.caption, c.key, clips[(i + 1) % n].has_audio)
            for i, c in enumerate(clips)]


def baselines(real: list[Clip], ref_feats: dict, extractors: Extractors, fps: float, sample_rate: int,
              world=None, seed: int = 0, cache: FeatureCache | None = None) -> dict:
    """``real``: held-out real clips against the references (the floor of every metric; their I3D rows
    kept in ``cache`` for the next evaluation on the same data);
    ``shuffled``: the same clips with their sound swapped between clips (sync should break)."""
    return {"real": clip_metrics(real, ref_feats, extractors, fps, sample_rate, world, seed, cache=cache, store=True),
            "shuffled": av_metrics(shuffled(real), fps, sample_rate, world)}
