"""Text -> (frames, waveform) with a trained :class:`~sora.training.dit.DiTModule`; optionally
with one modality given (v2a: the video, a2v: the audio), kept clean (t = 0) while the other is
sampled (``cond["clean"]`` of :mod:`sora.diffusion.samplers`).

Rectified-flow sampling from noise (:mod:`sora.diffusion.samplers`) with text classifier-free
guidance (:func:`sora.diffusion.guidance.cfg`), latents decoded by the module's frozen VAEs and
the audio by its vocoder (or Griffin-Lim). Used by ``sora-sample`` and the ``Samples`` callback.
"""

from __future__ import annotations

import numpy as np
import torch

from sora.diffusion.guidance import cfg as text_cfg
from sora.diffusion.guidance import replace_cond
from sora.diffusion.samplers import SAMPLERS, make_schedule
from sora.models.audio_vae import griffin_lim


def to_uint8(video: torch.Tensor) -> np.ndarray:
    """[3, T, H, W] float in [-1, 1] -> [T, H, W, 3] uint8."""
    return ((video.permute(1, 2, 3, 0).float().cpu().numpy() + 1) * 127.5).round().clip(0, 255).astype(np.uint8)


def from_uint8(frames: np.ndarray) -> torch.Tensor:
    """[T, H, W, 3] uint8 -> [3, T, H, W] float in [-1, 1]."""
    return torch.from_numpy(np.ascontiguousarray(frames)).permute(3, 0, 1, 2).float() / 127.5 - 1


@torch.no_grad()
def generate(module, timeline, prompt: str, negative_prompt: str, size, steps: int, guidance: float,
             sampler: str, shift: float, seed: int, audio_decoder: str, video: np.ndarray | None = None,
             audio: np.ndarray | None = None):
    """-> (frames uint8 [T, H, W, 3], audio float [1, N], latents dict).

    ``video`` (uint8 [num_frames, H, W, 3] at ``size``) or ``audio`` (float [1, num_samples]):
    that modality is the condition, encoded by its VAE (posterior mode), normalised and kept
    clean; it is returned as given (not re-decoded) and only the other one is generated."""
    if sampler not in SAMPLERS:
        raise ValueError(f"sampler={sampler!r}: choose from {sorted(SAMPLERS)}")
    device = module.video_times.device
    h, w = (int(s) for s in size)
    vae = module.video_vae
    if h % vae.spatial_stride or w % vae.spatial_stride:
        raise ValueError(f"size={h}x{w} must be a multiple of {vae.spatial_stride}")
    with torch.no_grad():
        tokens, mask = module.text_encoder([prompt, negative_prompt])
    cond = {"text": tokens[:1], "text_mask": mask[:1]}
    uncond = replace_cond(text=tokens[1:], text_mask=mask[1:])
    gen = torch.Generator().manual_seed(int(seed))
    shapes = {"video": (1, vae.latent_channels, timeline.video_latent_steps, h // vae.spatial_stride,
                        w // vae.spatial_stride),
              "audio": (1, module.audio_vae.latent_channels, timeline.audio_latent_steps)}
    noise = {m: torch.randn(s, generator=gen).to(device) for m, s in shapes.items()}
    if video is not None and audio is not None:
        raise ValueError("give video or audio as the condition, not both")
    clean = {}
    if video is not None:
        if tuple(video.shape) != (timeline.num_frames, h, w, 3):
            raise ValueError(f"video has shape {tuple(video.shape)}, need {(timeline.num_frames, h, w, 3)}")
        clean["video"] = vae.encode(from_uint8(video)[None].to(device)).mode()
    if audio is not None:
        audio = np.atleast_2d(np.asarray(audio, np.float32))
        if audio.shape != (1, timeline.num_samples):
            raise ValueError(f"audio has shape {audio.shape}, need (1, {timeline.num_samples})")
        clean["audio"] = module.audio_vae.encode_audio(torch.from_numpy(audio)[None].to(device)).mode()
    if clean:
        clean = module.normalize(clean)
        for m, x in clean.items():
            if x.shape != noise[m].shape:
                raise ValueError(f"the {m} condition encodes to {tuple(x.shape)}, need {tuple(noise[m].shape)}")
        cond["clean"] = clean

    def model_fn(x, t, c):
        return module.velocity(x, t, c["text"], c["text_mask"])

    guided = text_cfg(model_fn, guidance, uncond)
    z = SAMPLERS[sampler](guided, noise, make_schedule(steps, shift, device=device), cond)
    with torch.no_grad():
        z = module.denormalize(z)
        frames = np.ascontiguousarray(video) if video is not None else \
            to_uint8(vae.decode(z["video"]).clamp(-1, 1)[0])
        if audio is not None:
            return frames, audio, z
        mel = module.audio_vae.decode(z["audio"])
        if audio_decoder == "vocoder" and module.vocoder is not None:
            wave = module.vocoder(mel)
        elif audio_decoder in ("vocoder", "griffin_lim"):
            m = module.audio_vae.mel
            wave = griffin_lim(mel, sample_rate=m.sample_rate, n_fft=m.n_fft, hop=m.hop, fmin=m.fmin, fmax=m.fmax)
        else:
            raise ValueError(f"audio_decoder={audio_decoder!r}: choose vocoder or griffin_lim")
    return frames, wave[0].float().clamp(-1, 1).cpu().numpy(), z
