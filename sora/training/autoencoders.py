"""LightningModules for the autoencoder stages: the video VAE, and the audio VAE + vocoder.

Batches are :class:`sora.data.pipeline.ClipBatch` (video float in [-1, 1] on the device, audio
``[B, channels, N]``). Every loss term is logged as ``train/<term>``; validation logs
reconstruction metrics (``val/psnr`` for video, ``val/mel_l1`` for audio).

Adversarial training (optional, ``discriminator`` set) keeps Lightning's automatic optimization
and one optimizer: each step adds the discriminator's loss (on real and detached fake inputs)
to the generator's, whose adversarial term sees the discriminator's weights as constants
(:func:`frozen`). So each loss trains only its own network, both networks step together
(simultaneous updates), and ``max_steps``, gradient clipping, precision plugins and the LR
schedule work as without a GAN. The discriminator joins at ``gan_start_step``; before that it
gets no gradients (with DDP use ``strategy=ddp_find_unused_parameters_true``).
"""

from __future__ import annotations

import math

import lightning as L
import torch
from torch import nn

from sora.evaluation.recon import psnr, trivial_psnr
from sora.models.audio_vae import AudioVAE, Vocoder
from sora.models.gan import (MultiPeriodDiscriminator, PatchDiscriminator3D, discriminator_loss,
                             feature_matching_loss, generator_adversarial_loss, hinge_d_loss)
from sora.models.mel import mel_loss
from sora.models.perceptual import LPIPS
from sora.models.video_vae import VideoVAE
from sora.training.optim import adamw_with_schedule, clip_gradients, fused_for


def frozen(module: nn.Module):
    """``module`` as a function of its inputs only: its weights enter as constants, so a loss through
    it trains whatever made the inputs and never ``module`` (the generator's side of a GAN loss)."""
    params = {name: p.detach() for name, p in module.named_parameters()}
    return lambda *args: torch.func.functional_call(module, params, args)


class _Stage(L.LightningModule):
    """What both autoencoder stages share: the optimizer and its schedule, the GAN switch."""

    def __init__(self, lr: float, weight_decay: float, betas, warmup_steps: int, total_steps: int | None,
                 schedule: str, min_lr_ratio: float, discriminator: nn.Module | None = None,
                 disc_lr: float | None = None, gan_start_step: int = 0):
        super().__init__()
        self.lr, self.weight_decay, self.betas = float(lr), float(weight_decay), tuple(float(b) for b in betas)
        self.warmup_steps, self.total_steps, self.schedule = warmup_steps, total_steps, schedule
        self.min_lr_ratio = min_lr_ratio
        self.discriminator, self.gan_start_step = discriminator, int(gan_start_step)
        self.disc_lr = self.lr if disc_lr is None else float(disc_lr)

    @property
    def gan_on(self) -> bool:
        return self.discriminator is not None and self.global_step >= self.gan_start_step

    def configure_optimizers(self):
        total = self.total_steps
        if total is None and self.trainer is not None and self.trainer.max_steps and self.trainer.max_steps > 0:
            total = self.trainer.max_steps
        disc = set(self.discriminator.parameters()) if self.discriminator is not None else set()
        groups = [{"params": [p for p in self.parameters() if p not in disc]}]
        if disc:
            groups.append({"params": list(self.discriminator.parameters()), "lr": self.disc_lr})
        return adamw_with_schedule(groups, self.lr, self.weight_decay, self.betas, self.warmup_steps,
                                   total, self.schedule, self.min_lr_ratio, fused=fused_for(self._trainer))

    def configure_gradient_clipping(self, optimizer, gradient_clip_val=None, gradient_clip_algorithm=None) -> None:
        clip_gradients(self, optimizer, gradient_clip_val, gradient_clip_algorithm)

    def log_terms(self, prefix: str, terms: dict, batch_size: int) -> None:
        """Every term as ``<prefix>/<term>``; ``loss`` also on the progress bar."""
        self.log_dict({f"{prefix}/{k}": v.detach().float() for k, v in terms.items() if k != "loss"},
                      batch_size=batch_size)
        self.log(f"{prefix}/loss", terms["loss"].detach().float(), batch_size=batch_size,
                 prog_bar=prefix != "train")  # training: callbacks.ProgressBar shows it without a sync per step


class VideoVAEModule(_Stage):
    """Trains :class:`VideoVAE` with L1 (pixels weighted by motion when ``motion_weight`` > 0) + ``kl_weight``
    * KL (``VideoVAE.loss``), optionally
    + ``perceptual_weight`` * LPIPS (weights from the local file ``perceptual_weights``) and
    + ``gan_weight`` * hinge generator loss of a :class:`PatchDiscriminator3D` from
    ``gan_start_step`` on (its own hinge loss logged as ``train/disc``), scaled by VQGAN's
    adaptive weight when ``gan_adaptive`` (:func:`sora.models.gan.adaptive_weight`).

    ``chunk``: encode/decode in causal chunks of that many latent steps (memory bound, exact).
    """

    def __init__(self, vae: VideoVAE, lr: float = 1e-4, kl_weight: float = 1e-6, motion_weight: float = 0.0,
                 warmup_steps: int = 100,
                 total_steps: int | None = None, schedule: str = "cosine", min_lr_ratio: float = 0.1,
                 weight_decay: float = 0.0, betas=(0.9, 0.99), sample_posterior: bool = True,
                 chunk: int | None = None, discriminator: PatchDiscriminator3D | None = None,
                 gan_weight: float = 0.1, gan_start_step: int = 0, disc_lr: float | None = None,
                 gan_adaptive: bool = True, perceptual_weights: str | None = None, perceptual_weight: float = 1.0,
                 perceptual_frames: int = 4):
        super().__init__(lr, weight_decay, betas, warmup_steps, total_steps, schedule, min_lr_ratio,
                         discriminator, disc_lr, gan_start_step)
        self.vae, self.kl_weight, self.motion_weight = vae, kl_weight, motion_weight
        self.sample_posterior, self.chunk = sample_posterior, chunk
        self.gan_weight, self.gan_adaptive = gan_weight, gan_adaptive
        self.perceptual = LPIPS.from_file(perceptual_weights) if perceptual_weights else None
        self.perceptual_weight, self.perceptual_frames = perceptual_weight, perceptual_frames

    def batch_tokens(self, batch) -> int:
        return math.prod(self.vae.latent_shape(batch.video.shape)[2:]) * len(batch)

    # The frozen LPIPS weights come from their own file: kept out of checkpoints, put back on load.
    def on_save_checkpoint(self, checkpoint: dict) -> None:
        checkpoint["state_dict"] = {k: v for k, v in checkpoint["state_dict"].items()
                                    if not k.startswith("perceptual.")}

    def on_load_checkpoint(self, checkpoint: dict) -> None:
        if self.perceptual is not None:
            checkpoint["state_dict"].update({f"perceptual.{k}": v for k, v in self.perceptual.state_dict().items()})

    def training_step(self, batch, batch_idx):
        x = batch.video
        recon, posterior = self.vae(x, sample=self.sample_posterior, chunk=self.chunk)
        gan = self.gan_on
        terms = VideoVAE.loss(x, recon, posterior, kl_weight=self.kl_weight, motion_weight=self.motion_weight,
                              perceptual=self.perceptual,
                              perceptual_weight=self.perceptual_weight, perceptual_frames=self.perceptual_frames,
                              discriminator=frozen(self.discriminator) if gan else None, gan_weight=self.gan_weight,
                              last_layer=self.vae.decoder.conv_out.weight if self.gan_adaptive else None)
        if gan:
            terms["disc"] = hinge_d_loss(self.discriminator(x), self.discriminator(recon.detach()))
        self.log_terms("train", terms, len(batch))
        return terms["loss"] + terms["disc"] if gan else terms["loss"]

    def validation_step(self, batch, batch_idx):
        x = batch.video
        recon, posterior = self.vae(x, sample=False, chunk=self.chunk)
        recon = recon.clamp(-1, 1)
        kl = VideoVAE.loss(x, recon, posterior)["kl"]  # the training term's definition
        self.log_dict({"val/psnr": psnr(recon, x).mean(), "val/l1": (recon - x).abs().mean(), "val/kl": kl},
                      batch_size=len(batch), prog_bar=True)
        trivial = trivial_psnr(x)  # the baselines any PSNR must beat: a still frame per clip, the mean frame
        self.log_dict({f"val/psnr_{k}": v.mean() for k, v in trivial.items()}, batch_size=len(batch))


def mono(audio: torch.Tensor) -> torch.Tensor:
    """``[B, channels, N]`` -> ``[B, N]`` (channel mean)."""
    return audio.mean(1) if audio.ndim == 3 else audio


class AudioVAEModule(_Stage):
    """Trains :class:`AudioVAE` on log-mel (L1 + ``kl_weight`` * KL) and the :class:`Vocoder` on
    (real log-mel -> waveform) pairs (multi-resolution STFT + mel losses), one optimizer.

    With a :class:`MultiPeriodDiscriminator` (HiFi-GAN's), the vocoder also gets
    ``gan_weight`` * its adversarial loss (``gan_kind`` lsgan | hinge) + ``feature_matching_weight``
    * feature matching from ``gan_start_step`` on; the discriminator's loss is ``train/disc``.

    ``vocoder_segment``: train the vocoder on a random window of that many mel frames per clip
    (its cost is per sample; the autoencoder always sees whole clips). Clips without sound
    (``has_audio`` False) are left out of the losses when the batch has any clip with sound.
    """

    def __init__(self, vae: AudioVAE, vocoder: Vocoder | None = None, lr: float = 2e-4, kl_weight: float = 1e-4,
                 vocoder_weight: float = 1.0, vocoder_segment: int | None = 32, warmup_steps: int = 100,
                 total_steps: int | None = None, schedule: str = "cosine", min_lr_ratio: float = 0.1,
                 weight_decay: float = 0.0, betas=(0.8, 0.99), sample_posterior: bool = True,
                 discriminator: MultiPeriodDiscriminator | None = None, gan_kind: str = "lsgan",
                 gan_weight: float = 1.0, feature_matching_weight: float = 2.0, gan_start_step: int = 0,
                 disc_lr: float | None = None):
        super().__init__(lr, weight_decay, betas, warmup_steps, total_steps, schedule, min_lr_ratio,
                         discriminator, disc_lr, gan_start_step)
        if discriminator is not None and vocoder is None:
            raise ValueError("model.discriminator is set but model.vocoder is null: the GAN trains the vocoder")
        if gan_kind not in ("lsgan", "hinge"):
            raise ValueError(f"model.gan_kind={gan_kind!r}: choose lsgan or hinge")
        self.gan_kind, self.gan_weight, self.feature_matching_weight = gan_kind, gan_weight, feature_matching_weight
        self.vae, self.vocoder = vae, vocoder
        self.kl_weight, self.vocoder_weight, self.vocoder_segment = kl_weight, vocoder_weight, vocoder_segment
        self.sample_posterior = sample_posterior
        if vocoder is not None and vocoder.hop != vae.mel.hop:
            raise ValueError(f"vocoder hop={vocoder.hop} differs from the audio VAE's mel hop={vae.mel.hop}")

    def batch_tokens(self, batch) -> int:
        return batch.audio.shape[-1] // (self.vae.mel.hop * self.vae.stride) * len(batch)

    def on_before_batch_transfer(self, batch, dataloader_idx: int):
        """Clips without sound leave the batch here, on the host, where ``has_audio`` is read without a device
        sync (unless no clip has sound: then the batch stays whole)."""
        keep = batch.has_audio.tolist()
        return batch.select([i for i, k in enumerate(keep) if k]) if any(keep) and not all(keep) else batch

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
        wave = mono(batch.audio)  # silent clips left out on the host: on_before_batch_transfer
        mel = self.vae.mel(wave)
        recon, posterior = self.vae(mel, sample=self.sample_posterior)
        terms = self.vae.loss(mel, recon, posterior, kl_weight=self.kl_weight)
        loss = terms["loss"]
        gan = self.gan_on
        if self.vocoder is not None:
            mel_seg, real = self.vocoder_pairs(mel, wave)
            voc = self.vocoder.loss(mel_seg, real)
            terms.update(vocoder_stft=voc["stft"], vocoder_mel=voc["mel"], vocoder=voc["loss"])
            loss = loss + self.vocoder_weight * voc["loss"]
            if gan:
                real, fake = real[:, None], voc["pred"]
                real_outs, fake_outs = self.discriminator(real), frozen(self.discriminator)(fake)
                terms["gan"] = generator_adversarial_loss(fake_outs, self.gan_kind)
                terms["feature_matching"] = feature_matching_loss(real_outs, fake_outs)
                loss = loss + self.gan_weight * terms["gan"] + self.feature_matching_weight * terms["feature_matching"]
                terms["disc"] = discriminator_loss(real_outs, self.discriminator(fake.detach()), self.gan_kind)
        terms["loss"] = loss
        self.log_terms("train", terms, wave.shape[0])
        return loss + terms["disc"] if gan else loss

    def validation_step(self, batch, batch_idx):
        wave = mono(batch.audio)  # silent clips left out on the host: on_before_batch_transfer
        mel = self.vae.mel(wave)
        recon, posterior = self.vae(mel, sample=False)
        logs = {"val/mel_l1": (recon - mel).abs().mean(),
                "val/kl": self.vae.loss(mel, recon, posterior)["kl"]}  # the training term's definition
        if self.vocoder is not None:
            logs["val/vocoder_mel_l1"] = mel_loss(self.vocoder(mel), wave[..., : mel.shape[-1] * self.vocoder.hop],
                                                  self.vae.mel)
        self.log_dict(logs, batch_size=wave.shape[0], prog_bar=True)
