"""LightningModules for the autoencoder stages: the video VAE, and the audio VAE + vocoder.

Batches are :class:`sora.data.pipeline.ClipBatch` (video float in [-1, 1] on the device, audio
``[B, channels, N]``). Every loss term is logged as ``train/<term>``; validation logs
reconstruction metrics (``val/psnr`` for video, ``val/mel_l1`` for audio).
"""

from __future__ import annotations

import math

import lightning as L
import torch

from sora.models.audio_vae import AudioVAE, Vocoder, mel_loss
from sora.models.video_vae import VideoVAE
from sora.training.optim import adamw_with_schedule


def psnr(x: torch.Tensor, y: torch.Tensor, data_range: float = 2.0) -> torch.Tensor:
    """Peak signal-to-noise ratio in dB per sample ``[B]`` (video in [-1, 1]: range 2)."""
    mse = (x.float() - y.float()).pow(2).flatten(1).mean(1).clamp(min=1e-10)
    return 10.0 * torch.log10(data_range**2 / mse)


class _Stage(L.LightningModule):
    """What both autoencoder stages share: the optimizer and its schedule."""

    def __init__(self, lr: float, weight_decay: float, betas, warmup_steps: int, total_steps: int | None,
                 schedule: str, min_lr_ratio: float):
        super().__init__()
        self.lr, self.weight_decay, self.betas = float(lr), float(weight_decay), tuple(float(b) for b in betas)
        self.warmup_steps, self.total_steps, self.schedule = warmup_steps, total_steps, schedule
        self.min_lr_ratio = min_lr_ratio

    def configure_optimizers(self):
        total = self.total_steps
        if total is None and self.trainer is not None and self.trainer.max_steps and self.trainer.max_steps > 0:
            total = self.trainer.max_steps
        return adamw_with_schedule(self.parameters(), self.lr, self.weight_decay, self.betas, self.warmup_steps,
                                   total, self.schedule, self.min_lr_ratio)

    def log_terms(self, prefix: str, terms: dict, batch_size: int) -> None:
        """Every term as ``<prefix>/<term>``; ``loss`` also on the progress bar."""
        self.log_dict({f"{prefix}/{k}": v.detach().float() for k, v in terms.items() if k != "loss"},
                      batch_size=batch_size)
        self.log(f"{prefix}/loss", terms["loss"].detach().float(), batch_size=batch_size, prog_bar=True)


class VideoVAEModule(_Stage):
    """Trains :class:`VideoVAE` with L1 + ``kl_weight`` * KL (``VideoVAE.loss``).

    ``chunk``: encode/decode in causal chunks of that many latent steps (memory bound, exact).
    """

    def __init__(self, vae: VideoVAE, lr: float = 1e-4, kl_weight: float = 1e-6, warmup_steps: int = 100,
                 total_steps: int | None = None, schedule: str = "cosine", min_lr_ratio: float = 0.1,
                 weight_decay: float = 0.0, betas=(0.9, 0.99), sample_posterior: bool = True,
                 chunk: int | None = None):
        super().__init__(lr, weight_decay, betas, warmup_steps, total_steps, schedule, min_lr_ratio)
        self.vae, self.kl_weight = vae, kl_weight
        self.sample_posterior, self.chunk = sample_posterior, chunk

    def batch_tokens(self, batch) -> int:
        return math.prod(self.vae.latent_shape(batch.video.shape)[2:]) * len(batch)

    def training_step(self, batch, batch_idx):
        x = batch.video
        recon, posterior = self.vae(x, sample=self.sample_posterior, chunk=self.chunk)
        terms = VideoVAE.loss(x, recon, posterior, kl_weight=self.kl_weight)
        self.log_terms("train", terms, len(batch))
        return terms["loss"]

    def validation_step(self, batch, batch_idx):
        x = batch.video
        recon, posterior = self.vae(x, sample=False, chunk=self.chunk)
        recon = recon.clamp(-1, 1)
        kl = VideoVAE.loss(x, recon, posterior)["kl"]  # the training term's definition
        self.log_dict({"val/psnr": psnr(recon, x).mean(), "val/l1": (recon - x).abs().mean(), "val/kl": kl},
                      batch_size=len(batch), prog_bar=True)


def mono(audio: torch.Tensor) -> torch.Tensor:
    """``[B, channels, N]`` -> ``[B, N]`` (channel mean)."""
    return audio.mean(1) if audio.ndim == 3 else audio


class AudioVAEModule(_Stage):
    """Trains :class:`AudioVAE` on log-mel (L1 + ``kl_weight`` * KL) and the :class:`Vocoder` on
    (real log-mel -> waveform) pairs (multi-resolution STFT + mel losses), one optimizer.

    ``vocoder_segment``: train the vocoder on a random window of that many mel frames per clip
    (its cost is per sample; the autoencoder always sees whole clips). Clips without sound
    (``has_audio`` False) are left out of the losses when the batch has any clip with sound.
    """

    def __init__(self, vae: AudioVAE, vocoder: Vocoder | None = None, lr: float = 2e-4, kl_weight: float = 1e-4,
                 vocoder_weight: float = 1.0, vocoder_segment: int | None = 32, warmup_steps: int = 100,
                 total_steps: int | None = None, schedule: str = "cosine", min_lr_ratio: float = 0.1,
                 weight_decay: float = 0.0, betas=(0.8, 0.99), sample_posterior: bool = True):
        super().__init__(lr, weight_decay, betas, warmup_steps, total_steps, schedule, min_lr_ratio)
        self.vae, self.vocoder = vae, vocoder
        self.kl_weight, self.vocoder_weight, self.vocoder_segment = kl_weight, vocoder_weight, vocoder_segment
        self.sample_posterior = sample_posterior
        if vocoder is not None and vocoder.hop != vae.mel.hop:
            raise ValueError(f"vocoder hop={vocoder.hop} differs from the audio VAE's mel hop={vae.mel.hop}")

    def batch_tokens(self, batch) -> int:
        return batch.audio.shape[-1] // (self.vae.mel.hop * self.vae.stride) * len(batch)

    @staticmethod
    def audible(batch) -> torch.Tensor:
        wave = mono(batch.audio)
        keep = batch.has_audio.to(wave.device).bool()
        return wave[keep] if keep.any() else wave

    def vocoder_pairs(self, mel: torch.Tensor, wave: torch.Tensor):
        """Random ``vocoder_segment``-frame windows of (mel, wave), one per clip."""
        seg, frames = self.vocoder_segment, mel.shape[-1]
        if not seg or seg >= frames:
            return mel, wave[..., : frames * self.vocoder.hop]
        hop = self.vocoder.hop
        starts = torch.randint(0, frames - seg + 1, (mel.shape[0],)).tolist()
        mels = torch.stack([m[:, s:s + seg] for m, s in zip(mel, starts)])
        waves = torch.stack([w[s * hop:(s + seg) * hop] for w, s in zip(wave, starts)])
        return mels, waves

    def training_step(self, batch, batch_idx):
        wave = self.audible(batch)
        mel = self.vae.mel(wave)
        recon, posterior = self.vae(mel, sample=self.sample_posterior)
        terms = self.vae.loss(mel, recon, posterior, kl_weight=self.kl_weight)
        loss = terms["loss"]
        if self.vocoder is not None:
            voc = self.vocoder.loss(*self.vocoder_pairs(mel, wave))
            terms.update(vocoder_stft=voc["stft"], vocoder_mel=voc["mel"], vocoder=voc["loss"])
            loss = loss + self.vocoder_weight * voc["loss"]
        terms["loss"] = loss
        self.log_terms("train", terms, wave.shape[0])
        return loss

    def validation_step(self, batch, batch_idx):
        wave = self.audible(batch)
        mel = self.vae.mel(wave)
        recon, posterior = self.vae(mel, sample=False)
        logs = {"val/mel_l1": (recon - mel).abs().mean(),
                "val/kl": self.vae.loss(mel, recon, posterior)["kl"]}  # the training term's definition
        if self.vocoder is not None:
            logs["val/vocoder_mel_l1"] = mel_loss(self.vocoder(mel), wave[..., : mel.shape[-1] * self.vocoder.hop],
                                                  self.vae.mel)
        self.log_dict(logs, batch_size=wave.shape[0], prog_bar=True)
