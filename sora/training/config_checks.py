"""Checks of a composed ``sora-train`` config that need no model, data or checkpoint loaded.

They run before anything heavy (``sora.cli.train``), and each failure is one line naming the key
and the fix. Unknown keys are Hydra's (struct configs) and inconsistent timing the timeline's own
(:class:`sora.timeline.TimelineError`); this module covers what spans several config parts:

* every frame size the data can yield (``size``, the world's size, aspect-ratio buckets) divides
  by the model's spatial multiple: the video VAE's stride, times the DiT's patch in the DiT stage;
* the DiT's width divides by its heads, and its heads by ``model.sequence_parallel``;
* every file the config names (earlier stages' checkpoints, weights) exists.
"""

from __future__ import annotations

from pathlib import Path

from omegaconf import DictConfig, ListConfig, OmegaConf

FILE_KEYS = ("_ckpt", "_weights")  # config keys naming files that must exist when set (None: not used)


class ConfigError(ValueError):
    """A config that cannot work: the message names the key and the fix."""


def spatial_multiple(model: DictConfig) -> tuple[int, str] | None:
    """(the multiple frame sides must be, why) for the model's stage, or None (the audio stage)."""
    if model.get("dit") is not None and model.get("video_vae") is not None:
        stride, patch = int(model.video_vae.spatial_stride), int(model.dit.patch_size)
        return stride * patch, f"model.video_vae.spatial_stride={stride} x model.dit.patch_size={patch}"
    if model.get("vae") is not None and "spatial_stride" in model.vae:
        stride = int(model.vae.spatial_stride)
        return stride, f"model.vae.spatial_stride={stride}"
    return None


def frame_sizes(stream: DictConfig, key: str) -> list[tuple[str, int, int]]:
    """(the key to fix, H, W) of each frame size a data stream config yields."""
    from sora.data.buckets import make_buckets

    if stream.get("buckets"):
        return [(f"{key}.buckets.multiple", b.height, b.width) for b in make_buckets(**stream.buckets)]
    if stream.get("size"):
        return [(f"{key}.size", *(int(s) for s in stream.size))]
    world = stream.get("world")
    if world is not None and world.get("height") is not None:
        return [(f"{key}.world.height/width", int(world.height), int(world.width))]
    return []


def check_frame_sizes(cfg: DictConfig) -> None:
    multiple = spatial_multiple(cfg.model)
    if multiple is None:
        return
    m, why = multiple
    for part in ("train", "val"):
        stream = (cfg.get("data") or {}).get(part)
        if not isinstance(stream, DictConfig):
            continue
        for key, h, w in frame_sizes(stream, f"data.{part}"):
            if h % m or w % m:
                fit = f"{max(m, round(h / m) * m)}x{max(m, round(w / m) * m)}"
                raise ConfigError(f"{key}: frames {h}x{w} are not divisible by {m} ({why}); use e.g. {fit}"
                                  + (f", or buckets.multiple={m}" if key.endswith("multiple") else ""))


def check_heads(cfg: DictConfig) -> None:
    dit = cfg.model.get("dit")
    if dit is None:
        return
    dim, heads = int(dit.dim), int(dit.heads)
    if dim % heads:
        fits = [h for h in range(1, min(dim, 64) + 1) if dim % h == 0]
        raise ConfigError(f"model.dit.heads={heads}: model.dit.dim={dim} does not split into {heads} heads; "
                          f"use one of {fits} or change model.dit.dim")
    from sora.training.sequence_parallel import check_sequence_parallel

    try:
        check_sequence_parallel(heads, cfg.model.get("sequence_parallel", 1))
    except ValueError as e:
        raise ConfigError(str(e)) from None


def check_files(node, key: str = "model") -> None:
    """Every set ``*_ckpt`` / ``*_weights`` string under ``node`` names an existing file or folder."""
    if isinstance(node, DictConfig):
        children = [(f"{key}.{k}", str(k), node[k]) for k in node if not OmegaConf.is_missing(node, k)]
    elif isinstance(node, ListConfig):
        children = [(f"{key}[{i}]", "", v) for i, v in enumerate(node)]
    else:
        return
    for path, name, value in children:
        if isinstance(value, str) and name.endswith(FILE_KEYS) and value and not Path(value).exists():
            raise ConfigError(f"{path}={value}: no such file; give the path of an existing one (or null "
                              "where the key allows it)")
        check_files(value, path)


def check_validation(cfg: DictConfig) -> None:
    """A run that must return a validation metric (``optimized_metric``, a sweep's objective) validates at least
    once: else every trial would end with "no result" after all its training."""
    name, trainer = cfg.get("optimized_metric"), cfg.get("trainer") or {}
    every, steps = trainer.get("val_check_interval"), trainer.get("max_steps")
    if (name and str(name).startswith("val/") and isinstance(every, int) and isinstance(steps, int)
            and 0 < steps < every):
        raise ConfigError(f"optimized_metric={name}: this run never validates (trainer.max_steps={steps} < "
                          f"trainer.val_check_interval={every}); set trainer.val_check_interval={steps} or less")


def check(cfg: DictConfig, files: bool = True) -> None:
    """All the checks above (``files=False``: not the files, which a dry run does not read); raises
    :class:`ConfigError` with a one-line message."""
    check_frame_sizes(cfg)
    check_heads(cfg)
    check_validation(cfg)
    if files:
        check_files(cfg.model, "model")
