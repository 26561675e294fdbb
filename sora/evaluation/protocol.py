"""The evaluation protocol: one reference set of held-out clips (and the real-clip baseline beside it) on one
timeline and frame size, its features cached, scored against any number of generated clip sets."""

from __future__ import annotations

from sora.evaluation.evaluator import (DataError, FeatureCache, baselines, clip_metrics, data_fingerprint,
                                       reference_clips, world_config)


class Evaluation:
    """``num_samples`` reference clips from ``data`` (fixed windows for ``seed``) and the next clips of ``data``
    as the real baseline; ``extractors`` (:class:`sora.evaluation.evaluator.Extractors`) give the features,
    cached under ``cache_dir``. ``protocol`` records everything a number depends on."""

    def __init__(self, data, timeline, size, extractors, num_samples: int, seed: int = 0, cache_dir=None,
                 progress: bool = True):
        self.timeline, self.size, self.extractors, self.seed = timeline, list(size), extractors, int(seed)
        n = int(num_samples)
        clips = reference_clips(data, timeline, size, 2 * n, seed=self.seed)
        self.refs, self.real = clips[:n], clips[n:]
        if len(self.real) < 2:  # other windows of the same clips would be the same fixed windows
            raise DataError(f"data={data}: {len(clips)} clips of {timeline.seconds:g} s; the real held-out baseline "
                            f"needs other clips than the num_samples={n} references: give at least {n + 2} clips "
                            f"(2 x num_samples for a baseline of the same size) or lower num_samples")
        self.real_source = "the next clips of data" + (
            "" if len(self.real) == n else f" (only {len(self.real)}: data has {len(clips)} clips; distances "
                                           f"on fewer clips are biased upwards)")
        self.world = world_config(self.refs, size)
        self.fps, self.sr = float(timeline.fps_q), timeline.sample_rate
        self.protocol = {
            "references": len(self.refs), "real_baseline": len(self.real), "real_baseline_source": self.real_source,
            "data": str(data), "data_sha256": data_fingerprint(data), "seed": self.seed,
            "seconds": float(timeline.seconds), "frames": timeline.num_frames, "fps": self.fps,
            "size": self.size, "sample_rate": self.sr, "extractors": extractors.describe(),
            "physics_probe": self.world is not None}
        key = FeatureCache.key(**{k: v for k, v in self.protocol.items() if k not in ("data", "real_baseline_source")})
        self.cache = FeatureCache(cache_dir)
        self.ref_feats, cached = self.cache.get(key, lambda: extractors.features(
            self.refs, self.sr, progress, self.cache, store=True))
        self.protocol["reference_features"] = "cache " + key if cached else "computed (cached as " + key + ")"

    def score(self, clips) -> dict:
        return clip_metrics(clips, self.ref_feats, self.extractors, self.fps, self.sr, self.world, self.seed,
                            cache=self.cache)

    def baselines(self) -> dict:
        return baselines(self.real, self.ref_feats, self.extractors, self.fps, self.sr, self.world, self.seed,
                         self.cache)
