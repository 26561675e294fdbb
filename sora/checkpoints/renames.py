"""Old ``_target_`` paths of moved classes, so a run's stored config still rebuilds its model and data.

A checkpoint keeps the Hydra config its run was made with (``sora_config``); :func:`upgrade_targets`
rewrites the ``_target_`` strings of classes that have since moved to where they are now. Applied by
:func:`sora.checkpoints.export.read_training_checkpoint`, so every reader (sampling, evaluation, export) sees
today's paths.
"""

from __future__ import annotations

from collections.abc import Mapping

# old import path -> new one: only classes that configs name (a `_target_` a run may have stored)
MOVED_TARGETS = {
    "sora.models.audio_vae.MultiPeriodDiscriminator": "sora.models.gan.MultiPeriodDiscriminator",
    "sora.models.video_vae.PatchDiscriminator3D": "sora.models.gan.PatchDiscriminator3D",
    "sora.data.pipeline.ShardClipStream": "sora.data.streams.ShardClipStream",
    "sora.data.pipeline.WorldClipStream": "sora.data.streams.WorldClipStream",
}


def upgrade_targets(config):
    """A copy of a stored config (plain dicts / lists) with every moved ``_target_`` renamed."""
    if isinstance(config, Mapping):
        return {k: MOVED_TARGETS.get(v, v) if k == "_target_" and isinstance(v, str) else upgrade_targets(v)
                for k, v in config.items()}
    if isinstance(config, (list, tuple)):
        return [upgrade_targets(v) for v in config]
    return config
