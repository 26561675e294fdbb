"""Cached latents: a stream of pre-encoded clips, and the checks that keep a cache honest.

``sora-cache-latents`` runs a DiT config's frozen encoders over its raw clip stream once and
writes webdataset shards, one sample per clip (tensors as ``.npy``, never pickle)::

    KEY.video.npy   float32 [Cv, T', h, w]  video VAE posterior mode (un-normalised)
    KEY.audio.npy   float32 [Ca, L]         audio VAE posterior mode of the channel-mean waveform
    KEY.text.npy    float32 [Lt, D]         text embedding of the caption, real tokens only
                                            (only when the run's text encoder is frozen)
    KEY.txt         the caption
    KEY.json        {"bucket": i, "start": s, "has_audio": b, "meta": the raw clip's meta}

and, beside the shards, ``manifest.json`` (the hashes below, the timeline, the buckets, the raw
stream's config) and ``text_empty.npy`` (the embedding of ``""``, when text is cached).

:class:`LatentClipStream` reads such shards with :class:`~sora.data.streams.ShardClipStream`'s
machinery (split over ranks and workers, shuffle buffer, bucketed batches, exact resume) and
yields :class:`LatentBatch` es, which :class:`sora.training.dit.DiTModule` uses instead of
running its VAEs. The DiT sees the same numbers either way: latents are stored before the
DiT's normalisation (its shift/scale are applied, or measured on the first batch, at training
time exactly as for raw clips); the posterior mode is what the DiT takes; caption dropout
(classifier-free guidance) draws the same random flags and swaps in the cached embedding of
``""``. A text encoder that trains cannot be cached: then the captions are used.

A cache is keyed by :func:`encoder_hashes`: the video VAE's, audio VAE's (and text encoder's)
weights and architecture, the timing contract, and :data:`FORMAT`. A run whose encoders or
timeline differ refuses the cache with one line naming what differs (:class:`StaleLatentCache`).
"""

from __future__ import annotations

import dataclasses
import hashlib
import io
import json
import weakref
from collections.abc import Mapping, Sequence
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np
import torch

from sora.data.buckets import Bucket
from sora.data.pipeline import ClipBatch, Sample
from sora.data.shard_reader import caption_text
from sora.data.streams import ShardClipStream, expand_shards
from sora.timeline import Timeline, as_fraction

FORMAT = "sora-latents/1: float32 posterior modes (audio: channel mean), text embeddings of real tokens"
MANIFEST, TEXT_EMPTY = "manifest.json", "text_empty.npy"
_LATENTS = "__latents__"  # meta key that carries a sample's arrays from decode() to the batch


class StaleLatentCache(ValueError):
    """A latent cache made with other encoders, another timeline, or other raw data settings."""


# ----------------------------------------------------------------------------- hashes


def _whole(t: torch.Tensor) -> torch.Tensor:
    """A parameter or buffer whole: an FSDP2 DTensor or a ZeRO-3 partition is gathered (a collective:
    every rank hashes at the same point, the first cached batch)."""
    if hasattr(t, "ds_tensor"):  # DeepSpeed ZeRO-3: p.data is empty, p.ds_tensor this rank's flat part
        dist = torch.distributed
        parts = [torch.empty_like(t.ds_tensor) for _ in range(dist.get_world_size(t.ds_process_group))]
        dist.all_gather(parts, t.ds_tensor.contiguous(), group=t.ds_process_group)
        return torch.cat(parts)[: t.ds_numel].view(t.ds_shape)
    if hasattr(t, "full_tensor"):  # DTensor
        return t.full_tensor()
    return t


def weights_hash(module: torch.nn.Module) -> str:
    """sha256 (16 hex) of a module's class, structure (``repr``: layer shapes, strides) and every
    state-dict tensor (name, dtype, shape, bytes); the same for the module sharded (FSDP2, ZeRO-3)."""
    cls = next(c for c in type(module).__mro__ if not c.__name__.startswith("FSDP"))  # FSDP2 renames the class
    structure = repr(module).replace(type(module).__name__, cls.__name__, 1)
    h = hashlib.sha256(f"{cls.__name__}\n{structure}\n{getattr(module, 'max_len', '')}".encode())
    with torch.no_grad():
        for name, tensor in sorted(module.state_dict(keep_vars=True).items()):
            t = _whole(tensor).detach().cpu().contiguous()
            h.update(f"{name}:{t.dtype}:{tuple(t.shape)}".encode())
            h.update(t.reshape(-1).view(torch.uint8).numpy().tobytes())
    return h.hexdigest()[:16]


def timeline_fields(timeline: Timeline) -> dict[str, str]:
    """The timing contract's fields as exact strings (``1.0`` and ``1`` are the same second)."""
    return {f.name: str(as_fraction(getattr(timeline, f.name))) for f in dataclasses.fields(timeline)}


def encoder_hashes(module, text: bool) -> dict[str, str]:
    """What a cache is keyed by, from a DiT module (its ``video_vae``, ``audio_vae``, ``timeline``
    and, with ``text``, ``text_encoder``)."""
    out = {"format": FORMAT, "video_vae": weights_hash(module.video_vae), "audio_vae": weights_hash(module.audio_vae),
           "timeline": hashlib.sha256(json.dumps(timeline_fields(module.timeline), sort_keys=True).encode())
           .hexdigest()[:16]}
    if text:
        out["text_encoder"] = weights_hash(module.text_encoder)
    return out


def text_is_frozen(module) -> bool:
    """Cached text embeddings stay valid only for a text encoder that does not train."""
    return not any(p.requires_grad for p in module.text_encoder.parameters())


_VERIFIED: "weakref.WeakKeyDictionary[torch.nn.Module, set[str]]" = weakref.WeakKeyDictionary()


def check_cache(module, batch: "LatentBatch", text: bool) -> None:
    """Raise :class:`StaleLatentCache` unless the batch's cache was made by these encoders (and, with
    ``text``, this text encoder). Each distinct cache is hashed once per module."""
    names = ["format", "video_vae", "audio_vae", "timeline"] + (["text_encoder"] if text else [])
    key = json.dumps({n: batch.hashes.get(n) for n in names}, sort_keys=True)
    seen = _VERIFIED.setdefault(module, set())
    if key in seen:
        return
    current = encoder_hashes(module, text)
    bad = [n for n in names if batch.hashes.get(n) != current[n]]
    if bad:
        what = ", ".join(f"{n} (cache {batch.hashes.get(n)}, this run {current[n]})" for n in bad)
        verb = "differ" if len(bad) > 1 else "differs"
        raise StaleLatentCache(f"the latent cache {batch.cache} is stale: {what} {verb}; re-encode it with "
                               f"sora-cache-latents and this run's config")
    seen.add(key)


# ----------------------------------------------------------------------------- tensors as .npy bytes


def npy_bytes(array: np.ndarray | torch.Tensor) -> bytes:
    if isinstance(array, torch.Tensor):
        array = array.detach().float().cpu().numpy()
    buf = io.BytesIO()
    np.save(buf, np.ascontiguousarray(array), allow_pickle=False)
    return buf.getvalue()


def npy_load(data: bytes) -> np.ndarray:
    return np.load(io.BytesIO(data), allow_pickle=False)


def _plain(x):
    """Configs (DictConfig, dataclasses, tuples) -> plain dicts / lists for comparison."""
    if dataclasses.is_dataclass(x) and not isinstance(x, type):
        return {f.name: _plain(getattr(x, f.name)) for f in dataclasses.fields(x)}
    if isinstance(x, Mapping):
        return {str(k): _plain(v) for k, v in x.items()}
    if isinstance(x, Sequence) and not isinstance(x, (str, bytes)):
        return [_plain(v) for v in x]
    return x


def _flatten(x, prefix: str = "") -> dict:
    if isinstance(x, dict):
        out = {}
        for k, v in x.items():
            out.update(_flatten(v, f"{prefix}{k}."))
        return out
    return {prefix[:-1]: x}


# ----------------------------------------------------------------------------- the batch


@dataclass
class LatentBatch(ClipBatch):
    """A :class:`ClipBatch` of cached clips. ``video`` is uint8 ``[B, 3, 0, H, W]`` (no frames, only the
    clip size, which callbacks read) and ``audio`` ``[B, channels, 0]``; the content is in:"""

    latents: dict[str, torch.Tensor] = field(default_factory=dict)  # video [B,Cv,T',h,w], audio [B,Ca,L]
    text: torch.Tensor | None = None        # float [B, Lt, D], zero-padded (None: text not cached)
    text_mask: torch.Tensor | None = None   # bool [B, Lt]
    text_empty: torch.Tensor | None = None  # float [Le, D]: the embedding of "" (caption dropout)
    text_lengths: list[int] | None = None   # each sample's real tokens (the mask's sums, known on the host)
    hashes: dict[str, str] = field(default_factory=dict)  # the cache's encoder_hashes
    cache: str = ""                         # the cache's folder (for messages)

    def text_for(self, drop: torch.Tensor | None = None) -> tuple[torch.Tensor, torch.Tensor]:
        """Cached ``(text [B, L, D], mask [B, L])``, the empty caption's embedding where ``drop``, padded
        with zeros to the longest: what the text encoder gives for the captions with "" swapped in."""
        if self.text is None:
            raise ValueError(f"the latent cache {self.cache} holds no text embeddings (its text encoder trained)")
        lengths = self.lengths()
        dropped = [False] * len(self) if drop is None else drop.tolist()  # a host tensor (drop_text)
        rows = [self.text_empty if dropped[i] else self.text[i, : lengths[i]] for i in range(len(self))]
        length = max(r.shape[0] for r in rows)
        text = self.text.new_zeros(len(rows), length, self.text.shape[-1])
        mask = torch.zeros(len(rows), length, dtype=torch.bool, device=self.text.device)
        for i, r in enumerate(rows):
            text[i, : r.shape[0]], mask[i, : r.shape[0]] = r, True
        return text, mask

    def lengths(self) -> list[int]:
        """Real text tokens per sample: from the host (``text_lengths``), else read from the mask (a device sync)."""
        return list(self.text_lengths) if self.text_lengths is not None else self.text_mask.sum(1).tolist()


# ----------------------------------------------------------------------------- the stream


def read_manifest(urls: list[str]) -> tuple[Path, dict]:
    """The manifest beside the shards (one cache: every shard's folder must agree)."""
    folders = sorted({Path(u).parent for u in urls})
    manifests = []
    for folder in folders:
        path = folder / MANIFEST
        if not path.is_file():
            raise FileNotFoundError(f"data.train.urls: no {MANIFEST} beside the shards in {folder}: "
                                    f"not a cache written by sora-cache-latents")
        manifests.append(json.loads(path.read_text()))
    for folder, m in zip(folders[1:], manifests[1:]):
        if m["hashes"] != manifests[0]["hashes"]:
            raise StaleLatentCache(f"data.train.urls mixes latent caches of different encoders: {folders[0]} "
                                   f"and {folder}")
    return folders[0], manifests[0]


class LatentClipStream(ShardClipStream):
    """Batches of cached latents (:class:`LatentBatch`) from ``sora-cache-latents`` shards.

    ``urls``: the cache's shards (``CACHE/latents-*.tar``); ``timeline`` must be the cache's.
    Shuffling, splitting over ranks and workers, bucketed batching and the exact-resume state are
    :class:`~sora.data.streams.ShardClipStream`'s. ``source``: the raw stream's settings an
    experiment sets under ``data.train`` (``world``, ``clips``, ``size`` ...): the cache was made from
    one raw stream, so every such setting it recorded must be equal here, else a one-line error
    names the key; settings it did not record (another kind of raw stream) are not used. Packing
    (``pack``) is refused for now: batches are ``batch_size`` clips of one bucket.
    """

    def __init__(self, urls, timeline: Timeline, batch_size: int, shuffle_buffer: int = 64, seed: int = 0,
                 shuffle: bool = True, infinite: bool = True, pack: dict | None = None, **source):
        if pack is not None:
            raise ValueError("data.train.pack: packing batches of cached latents is not supported yet; set "
                             "data.train.pack=null (the cache holds the clips of every bucket)")
        shard_urls = expand_shards(urls)
        folder, manifest = read_manifest(shard_urls)
        self.cache, self.manifest = str(folder), manifest
        self._check_timeline(timeline)
        self._check_source(source)
        buckets = [Bucket(int(h), int(w)) for h, w in manifest["buckets"]]
        super().__init__(shard_urls, timeline, batch_size, shuffle_buffer=shuffle_buffer,
                         size=(buckets[0].height, buckets[0].width), seed=seed, shuffle=shuffle, infinite=infinite,
                         channels=int(manifest["channels"]), random_crop=False)
        self.buckets = buckets
        self.text_empty = None
        if manifest.get("text"):
            self.text_empty = torch.from_numpy(npy_load((folder / TEXT_EMPTY).read_bytes()))

    def _check_timeline(self, timeline: Timeline) -> None:
        cached, current = self.manifest["timeline"], timeline_fields(timeline)
        bad = [f"{k}={cached.get(k)} (this run {v})" for k, v in current.items() if cached.get(k) != v]
        if bad:
            raise StaleLatentCache(f"the latent cache {self.cache} is stale: made on the timeline "
                                   f"{', '.join(bad)}; re-encode it, or set timeline.* as the cache's")

    def _check_source(self, source: dict) -> None:
        recorded = _flatten(_plain(self.manifest.get("source") or {}))
        for key, value in _flatten(_plain(source)).items():
            if key in recorded and recorded[key] != value and str(recorded[key]) != str(value):
                raise StaleLatentCache(f"data.train.{key}={value!r}, but the latent cache {self.cache} was made "
                                       f"from {key}={recorded[key]!r}: set data.train.{key}={recorded[key]!r} "
                                       f"or re-encode")

    def _bucket_of(self, sample: dict) -> int:  # a bad json: the sample is skipped, named and counted
        b = int(json.loads(sample["json"])["bucket"])
        if not 0 <= b < len(self.buckets):
            raise ValueError(f"bucket {b} is not one of the cache's {len(self.buckets)}")
        return b

    def decode(self, item, bucket, rng) -> Sample:
        info = json.loads(item["json"])
        if not isinstance(info, dict):
            raise ValueError(f"the .json is a {type(info).__name__}, not an object")
        arrays = {m: npy_load(item[f"{m}.npy"]) for m in ("video", "audio", "text") if f"{m}.npy" in item}
        if "video" not in arrays or "audio" not in arrays:
            raise ValueError(f"no video.npy/audio.npy in cached sample, only {sorted(item)}")
        if any(a.dtype.kind != "f" for a in arrays.values()):
            raise ValueError(f"cached arrays must be float, got {({m: str(a.dtype) for m, a in arrays.items()})}")
        caption = caption_text(item["txt"]) if "txt" in item else ""
        return Sample(item["__key__"], np.zeros((0, bucket.height, bucket.width, 3), np.uint8),
                      np.zeros((self.channels, 0), np.float32), np.zeros(0, bool), bool(info.get("has_audio", True)),
                      caption, float(info.get("start", 0.0)), {**(info.get("meta") or {}), _LATENTS: arrays})

    def __iter__(self):
        for batch in super().__iter__():  # ClipStream's plan, decode and resume position
            yield self._latent_batch(batch)

    def _latent_batch(self, batch: ClipBatch) -> LatentBatch:
        arrays = [m.pop(_LATENTS) for m in batch.meta]
        dtypes = self.manifest.get("latent_dtype") or {}  # e.g. bfloat16 under bf16-mixed: as the raw run's
        latents = {m: torch.from_numpy(np.stack([a[m] for a in arrays])).to(getattr(torch, dtypes.get(m, "float32")))
                   for m in ("video", "audio")}
        text = mask = lengths = None
        if self.text_empty is not None and all("text" in a for a in arrays):
            length = max(a["text"].shape[0] for a in arrays)
            text = torch.zeros(len(arrays), length, self.text_empty.shape[-1])
            mask = torch.zeros(len(arrays), length, dtype=torch.bool)
            for i, a in enumerate(arrays):
                text[i, : len(a["text"])], mask[i, : len(a["text"])] = torch.from_numpy(a["text"]), True
            lengths = [len(a["text"]) for a in arrays]
        fields = {f.name: getattr(batch, f.name) for f in dataclasses.fields(ClipBatch)}
        return LatentBatch(**fields, latents=latents, text=text, text_mask=mask, text_lengths=lengths,
                           text_empty=None if text is None else self.text_empty, hashes=dict(self.manifest["hashes"]),
                           cache=self.cache)
