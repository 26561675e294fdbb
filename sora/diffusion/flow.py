"""Rectified flow: timesteps, shift, interpolation, the multi-task conditioning and the loss.

Convention (used by every sampler and the DiT):

    x_t = (1 - t) * x0 + t * noise,    t in [0, 1], t = 1 is pure noise, t = 0 is data
    v   = noise - x0                    (the model predicts v)

so that ``x0 = x_t - t * v`` and ``noise = x_t + (1 - t) * v``.

Latents have their time axis at dim 2: video ``[B, C, T, h, w]``, audio ``[B, C, L]``.
Per-token masks (clean conditions, loss weights) are ``[B, T]`` / ``[B, L]`` on that axis.

One model learns these tasks from one timestep per modality and a clean mask per token (a
clean token has t = 0 and no loss; the DiT sees the per-token timesteps):

    t2av          text -> video + audio         both modalities noised
    v2a           video -> audio                video given clean (t_video = 0)
    a2v           audio -> video                audio given clean (t_audio = 0)
    continuation  first seconds -> the rest     the first k latent steps of both are clean
    retake        regenerate a time window      outside [a, b) clean, in the window noised; on both
                                                streams, or on one with the other kept whole
    first_last    first and last frames given   the first and last latent steps clean; on both
                                                streams, or on one with the other generated

A window in seconds covers the same span of both streams: video steps ``[i, j)`` of ``V`` go with
audio steps ``[round(i A / V), round(j A / V))`` of ``A``.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Mapping, Sequence

import torch

TASKS: tuple[str, ...] = ("t2av", "v2a", "a2v", "continuation", "retake", "first_last")
DEFAULT_TASK_PROBS: dict[str, float] = {"t2av": 0.5, "v2a": 0.1, "a2v": 0.1, "continuation": 0.1, "retake": 0.1,
                                        "first_last": 0.1}


# ----------------------------------------------------------------------------- timesteps


def logit_normal_timesteps(
    n: int,
    mean: float = 0.0,
    std: float = 1.0,
    generator: torch.Generator | None = None,
    device: torch.device | str | None = None,
) -> torch.Tensor:
    """``n`` training timesteps ``sigmoid(N(mean, std))`` in (0, 1) (SD3's logit-normal), float32."""
    z = torch.randn(n, generator=generator, device=device) * std + mean
    return torch.sigmoid(z)


def shift_timesteps(t: torch.Tensor | float, shift: float) -> torch.Tensor | float:
    """SD3 / Flux shift ``shift * t / (1 + (shift - 1) * t)``.

    Monotone in ``t``, fixes 0 and 1, identity for ``shift = 1``; ``shift > 1`` moves
    timesteps towards noise (more tokens need more noise to destroy the same structure).
    """
    return shift * t / (1 + (shift - 1) * t)



# ----------------------------------------------------------------------------- interpolation


def _expand_t(t: torch.Tensor | float, x: torch.Tensor) -> torch.Tensor:
    """Broadcast ``t`` (scalar, ``[B]``, or per-token ``[B, T]`` on dim 2) against ``x``."""
    t = torch.as_tensor(t, dtype=x.dtype, device=x.device)
    if t.ndim == 0:
        return t
    if t.ndim == 1:
        return t.reshape(t.shape[0], *([1] * (x.ndim - 1)))
    if t.ndim == 2:  # per token along the time axis (dim 2)
        return t.reshape(t.shape[0], 1, t.shape[1], *([1] * (x.ndim - 3)))
    raise ValueError(f"t must be a scalar, [B] or [B, T], got shape {tuple(t.shape)}")


def _expand_mask(mask: torch.Tensor, x: torch.Tensor) -> torch.Tensor:
    """``[B, T]`` token mask -> broadcastable against ``x`` with time at dim 2."""
    if mask.ndim != 2 or mask.shape[0] != x.shape[0] or mask.shape[1] != x.shape[2]:
        raise ValueError(f"mask {tuple(mask.shape)} does not match x {tuple(x.shape)} on (B, time)")
    return mask.reshape(mask.shape[0], 1, mask.shape[1], *([1] * (x.ndim - 3)))


def interpolate(
    x0: torch.Tensor, noise: torch.Tensor, t: torch.Tensor | float, clean_mask: torch.Tensor | None = None
) -> torch.Tensor:
    """``x_t = (1 - t) x0 + t noise``; ``t`` is a scalar, ``[B]`` or per-token ``[B, T]``.

    Tokens where ``clean_mask`` ``[B, T]`` is True are left at ``x0`` (a clean condition).
    """
    te = _expand_t(t, x0)
    xt = (1 - te) * x0 + te * noise
    if clean_mask is not None:
        xt = torch.where(_expand_mask(clean_mask.bool(), x0), x0, xt)
    return xt


def velocity_target(x0: torch.Tensor, noise: torch.Tensor) -> torch.Tensor:
    """The regression target ``v = noise - x0``."""
    return noise - x0


# ----------------------------------------------------------------------------- tasks


def sample_task(
    batch_size: int,
    probs: Mapping[str, float] | None = None,
    generator: torch.Generator | None = None,
) -> torch.Tensor:
    """Per-sample task ids ``[B]`` (int64), indices into :data:`TASKS`.

    ``probs`` maps task names to (unnormalized) probabilities; missing tasks get 0.
    """
    probs = DEFAULT_TASK_PROBS if probs is None else probs
    unknown = set(probs) - set(TASKS)
    if unknown:
        raise ValueError(f"unknown tasks {sorted(unknown)}; known: {TASKS}")
    p = [float(probs.get(name, 0.0)) for name in TASKS]
    if min(p) < 0 or sum(p) <= 0:
        raise ValueError(f"task probabilities must be >= 0 with a positive sum, got {dict(probs)}")
    return torch.multinomial(torch.tensor(p) / sum(p), batch_size, replacement=True, generator=generator)


def task_ids(names: Sequence[str]) -> torch.Tensor:
    """Task names -> ids (``["v2a", "t2av"]`` -> ``tensor([1, 0])``)."""
    return torch.tensor([TASKS.index(n) for n in names], dtype=torch.long)


@dataclass
class TaskTimesteps:
    """Per-modality timesteps and clean-token masks for one batch.

    ``t_video``/``t_audio`` ``[B]`` are the noise levels of the generated tokens (0 where the
    whole modality is a clean condition); ``clean_video`` ``[B, T']`` and ``clean_audio``
    ``[B, L]`` are True at tokens given clean (whole modality for v2a/a2v, a prefix for
    continuation). Use the ``*_token_t`` properties as per-token timesteps for the model and
    ``~clean_*`` as the loss weight mask. ``partly``: whether some sample has a stream partly clean (known
    on the host when the masks were made there; None: read from the masks when needed).
    """

    t_video: torch.Tensor
    t_audio: torch.Tensor
    clean_video: torch.Tensor
    clean_audio: torch.Tensor
    partly: bool | None = None

    @property
    def video_token_t(self) -> torch.Tensor:
        return torch.where(self.clean_video, torch.zeros_like(self.t_video)[:, None], self.t_video[:, None])

    @property
    def audio_token_t(self) -> torch.Tensor:
        return torch.where(self.clean_audio, torch.zeros_like(self.t_audio)[:, None], self.t_audio[:, None])


def timesteps_for_tasks(
    tasks: torch.Tensor,
    t_video: torch.Tensor,
    t_audio: torch.Tensor,
    video_len: int,
    audio_len: int,
    max_prefix: float = 0.5,
    max_window: float = 0.5,
    generator: torch.Generator | None = None,
) -> TaskTimesteps:
    """Apply the task of each sample to its timesteps (the task table in the module doc).

    - ``t2av``: unchanged, nothing clean.
    - ``v2a``: ``t_video = 0``, every video token clean.
    - ``a2v``: ``t_audio = 0``, every audio token clean.
    - ``continuation``: a prefix fraction ``f ~ U(0, max_prefix]`` of the clip is given clean in
      both streams: the first ``k_v = max(1, round(f * video_len))`` video latent steps and the
      first ``k_a = round(k_v / video_len * audio_len)`` audio latent steps (the same seconds).
    - ``retake``: a window of ``max(1, round(f * video_len))`` video steps, ``f ~ U(0, max_window]``,
      at a uniform start, is noised and the rest clean; on both streams (probability 1/2), or on
      the video (1/4) or the audio (1/4) alone, the other stream then clean as a whole.
    - ``first_last``: the first and the last video latent step (and the audio steps of the same
      seconds) are clean; on both streams (1/2) or one (1/4 each), the other one generated.

    ``t_video``/``t_audio`` ``[B]`` stay the noise level of the generated tokens (they may be the
    same tensor for a shared t); a stream that is clean as a whole gets 0.
    """
    tasks = tasks.long()
    b = tasks.shape[0]
    device = t_video.device
    is_ = {name: (tasks == TASKS.index(name)).cpu() for name in TASKS}
    draw = torch.rand(b, 3, generator=generator)  # fraction, position, stream
    stream = (draw[:, 2] >= 0.5).long() + (draw[:, 2] >= 0.75).long()  # 0 both, 1 video, 2 audio
    clean_v = torch.zeros(b, video_len, dtype=torch.bool)
    clean_a = torch.zeros(b, audio_len, dtype=torch.bool)
    steps_v, steps_a = torch.arange(video_len)[None], torch.arange(audio_len)[None]

    def audio_of(k):  # video step count or index -> audio step, the same seconds
        return (k.double() / video_len * audio_len).round().long()

    frac = 1 - draw[:, 0]  # (0, 1]
    k_pre = (frac * max_prefix * video_len).round().clamp(min=1, max=video_len).long()
    cont = is_["continuation"][:, None]
    clean_v |= cont & (steps_v < k_pre[:, None])
    clean_a |= cont & (steps_a < audio_of(k_pre)[:, None])

    width = (frac * max_window * video_len).round().clamp(min=1, max=video_len).long()
    lo = ((video_len - width + 1) * draw[:, 1]).floor().long().clamp(max=video_len - width)
    hi = lo + width
    window_v = (steps_v >= lo[:, None]) & (steps_v < hi[:, None])
    window_a = (steps_a >= audio_of(lo)[:, None]) & (steps_a < audio_of(hi)[:, None])
    retake = is_["retake"][:, None]
    clean_v |= retake & torch.where((stream == 2)[:, None], True, ~window_v)
    clean_a |= retake & torch.where((stream == 1)[:, None], True, ~window_a)

    ends_v = (steps_v == 0) | (steps_v == video_len - 1)
    first_a, last_a = audio_of(torch.ones(b)), audio_of(torch.full((b,), video_len - 1))
    ends_a = (steps_a < first_a[:, None]) | (steps_a >= last_a[:, None])
    fl = is_["first_last"][:, None]
    clean_v |= fl & (stream != 2)[:, None] & ends_v
    clean_a |= fl & (stream != 1)[:, None] & ends_a

    clean_v |= is_["v2a"][:, None]
    clean_a |= is_["a2v"][:, None]
    partly = any(bool((c.any(1) & ~c.all(1)).any()) for c in (clean_v, clean_a))  # host tensors: no device sync
    clean_v, clean_a = clean_v.to(device, non_blocking=True), clean_a.to(device, non_blocking=True)
    t_video = torch.where(clean_v.all(1), torch.zeros_like(t_video), t_video)
    t_audio = torch.where(clean_a.all(1), torch.zeros_like(t_audio), t_audio)
    return TaskTimesteps(t_video, t_audio, clean_v, clean_a, partly)


def drop_text(
    mask_or_flags: torch.Tensor | int, p: float = 0.1, generator: torch.Generator | None = None
) -> torch.Tensor:
    """Which samples get the empty caption (classifier-free guidance dropout), bool ``[B]``.

    ``mask_or_flags`` is the batch size, or any tensor whose first dim is the batch (e.g.
    the text mask ``[B, L]``, or a bool ``[B]`` of samples that may be dropped: where that is
    False the caption is always kept).
    """
    if isinstance(mask_or_flags, int):
        b, allowed = mask_or_flags, None
    else:
        b = mask_or_flags.shape[0]
        allowed = mask_or_flags.bool() if mask_or_flags.ndim == 1 and mask_or_flags.dtype == torch.bool else None
    drop = torch.rand(b, generator=generator) < p
    if allowed is not None:
        drop = drop & allowed.cpu()
    return drop if isinstance(mask_or_flags, int) else drop.to(mask_or_flags.device)


def drop_captions(captions: Sequence[str], drop: torch.Tensor) -> list[str]:
    """Replace the dropped captions by ``""`` (encode the result with the text encoder)."""
    return ["" if bool(d) else c for c, d in zip(captions, drop.tolist())]


# ----------------------------------------------------------------------------- loss


def flow_loss(
    v_pred: torch.Tensor,
    x0: torch.Tensor,
    noise: torch.Tensor,
    weight_mask: torch.Tensor | None = None,
    *,
    clean_mask: torch.Tensor | None = None,
) -> torch.Tensor:
    """Mean squared velocity error over the tokens that are generated, a scalar.

    ``weight_mask`` ``[B, T]`` (bool or float, time on dim 2 of the latent) marks the tokens
    that count (1/True) — pass ``~clean`` from :class:`TaskTimesteps` (or give ``clean_mask``,
    which counts its complement). The mean is over counted tokens and all their channels /
    pixels; a batch with no counted token gives a zero that still backpropagates.
    Works for video ``[B, C, T, h, w]`` and audio ``[B, C, L]``; call once per modality.
    """
    se = (v_pred.float() - velocity_target(x0, noise).float()) ** 2
    if clean_mask is not None:
        w = (~clean_mask.bool()).float()
        weight_mask = w if weight_mask is None else weight_mask.float() * w
    if weight_mask is None:
        return se.mean()
    w = _expand_mask(weight_mask.float(), se)
    per_token = se[0, :, 0].numel()  # elements per (sample, time step)
    denom = weight_mask.float().sum() * per_token
    return (se * w).sum() / torch.where(denom > 0, denom, 1.0)  # no token counted: a zero that backpropagates
