"""Text -> (frames, waveform) with a trained :class:`~sora.training.dit.DiTModule`.

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


@torch.no_grad()
def generate(module, timeline, prompt: str, negative_prompt: str, size, steps: int, guidance: float,
             sampler: str, shift: float, seed: int, audio_decoder: str):
    """-> (frames uint8 [T, H, W, 3], audio float [1, N], latents dict)."""
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

    def model_fn(x, t, c):
        return module.velocity(x, t, c["text"], c["text_mask"])

    guided = text_cfg(model_fn, guidance, uncond)
    z = SAMPLERS[sampler](guided, noise, make_schedule(steps, shift, device=device), cond)
    with torch.no_grad():
        z = module.denormalize(z)
        video = vae.decode(z["video"]).clamp(-1, 1)[0]
        mel = module.audio_vae.decode(z["audio"])
        if audio_decoder == "vocoder" and module.vocoder is not None:
            wave = module.vocoder(mel)
        elif audio_decoder in ("vocoder", "griffin_lim"):
            m = module.audio_vae.mel
            wave = griffin_lim(mel, sample_rate=m.sample_rate, n_fft=m.n_fft, hop=m.hop, fmin=m.fmin, fmax=m.fmax)
        else:
            raise ValueError(f"audio_decoder={audio_decoder!r}: choose vocoder or griffin_lim")
    return to_uint8(video), wave[0].float().clamp(-1, 1).cpu().numpy(), z
