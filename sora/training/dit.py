"""LightningModule for the joint stage: the AV diffusion transformer on frozen VAE latents.

Each ClipBatch is encoded on the fly: video -> ``VideoVAE`` posterior mode, audio (mono) ->
log-mel -> ``AudioVAE`` posterior mode (or the batch brings those latents, and frozen text
embeddings, from a cache: ``data=latents``, :mod:`sora.data.latents`). Latents are standardised
per modality with a shift and scale (fixed in the config, or measured on the first batch and kept
in the checkpoint). Then rectified flow (:mod:`sora.diffusion.flow`): a task per sample (t2av,
v2a, a2v, continuation, retake, first_last; clean condition tokens get t = 0 per token and no
loss), a logit-normal timestep per modality, caption dropout for
classifier-free guidance, and the velocity loss per modality over the generated tokens
(``train/loss_video``, ``train/loss_audio``). Validation: text-to-AV loss at fixed timesteps with
fixed noise.
Rotary positions come from the timing contract (token times in seconds).

A packed batch (``data.train.pack``, :class:`sora.data.packing.PackedBatch`: clips of several
buckets) takes the same step: encoded part by part, each bucket at its own shape, then ONE packed DiT
forward (block-diagonal attention, conditioning per sample, per-token timesteps as in a dense batch:
``AVDiT.forward_packed``); each modality's loss is the mean over all the pack's generated latent
elements, as in a dense batch.

The frozen autoencoders (and the vocoder) are part of this module's state, so a DiT checkpoint
alone is enough to sample.
"""

from __future__ import annotations

import logging
import math
from typing import Mapping, Sequence

import lightning as L
import torch
from lightning.pytorch.strategies import DDPStrategy, DeepSpeedStrategy, SingleDeviceStrategy
from torch import nn

from sora.checkpoints.export import load_frozen
from sora.data.latents import check_cache, text_is_frozen
from sora.data.packing import PackedBatch
from sora.diffusion.flow import (TaskTimesteps, drop_captions, drop_text, flow_loss, interpolate,
                                 logit_normal_timesteps, sample_task, shift_timesteps, timesteps_for_tasks)
from sora.models.audio_vae import AudioVAE, Vocoder
from sora.models.dit import AVDiT
from sora.models.text import token_counts
from sora.models.video_vae import VideoVAE
from sora.script import Script, Shot
from sora.timeline import Timeline
from sora.training.autoencoders import mono
from sora.training.muon import muon_with_schedule
from sora.training.optim import adamw_with_schedule, clip_gradients, fused_for
from sora.training.sequence_parallel import check_sequence_parallel, sequence_parallel_size
from sora.training.strategies import configure_sharding, parallelize_dit

log = logging.getLogger(__name__)
MODALITIES = ("video", "audio")


class DiTModule(L.LightningModule):
    """The DiT stage. ``video_vae`` / ``audio_vae`` / ``vocoder`` are built from the config and get
    their weights from ``video_vae_ckpt`` / ``audio_vae_ckpt`` (Lightning checkpoints of the
    autoencoder stages, EMA weights when ``use_ema``); a null path leaves them random (tests only,
    warned). ``task_probs`` / ``timestep_*`` / ``text_drop_prob`` drive :mod:`sora.diffusion.flow`;
    ``latent_shift`` / ``latent_scale`` per modality (null: measured on the first batch).
    """

    def __init__(self, dit: AVDiT, text_encoder: nn.Module, video_vae: VideoVAE, audio_vae: AudioVAE,
                 timeline: Timeline, video_vae_ckpt: str | None = None, audio_vae_ckpt: str | None = None,
                 vocoder: Vocoder | None = None, use_ema: bool = True, train_text_encoder: bool = True,
                 lr: float = 1e-4, weight_decay: float = 0.0, betas: Sequence[float] = (0.9, 0.95),
                 optimizer: str = "adamw", muon_lr: float = 1e-2,
                 warmup_steps: int = 1000, total_steps: int | None = None, schedule: str = "constant",
                 min_lr_ratio: float = 0.1, task_probs: Mapping[str, float] | None = None,
                 timestep_mean: float = 0.0, timestep_std: float = 1.0, timestep_shift: float = 1.0,
                 independent_timesteps: bool = True, text_drop_prob: float = 0.1,
                 loss_weights: Mapping[str, float] | None = None,
                 latent_shift: Mapping[str, float | None] | None = None,
                 latent_scale: Mapping[str, float | None] | None = None,
                 val_timesteps: Sequence[float] = (0.25, 0.5, 0.75), val_seed: int = 0,
                 activation_checkpointing: bool = False, compile: bool = False, sequence_parallel: int = 1):
        super().__init__()
        # ranks that split each clip's tokens (Ulysses); checked here, applied by the strategy
        self.sequence_parallel = check_sequence_parallel(dit.heads, sequence_parallel)
        self.dit = parallelize_dit(dit, activation_checkpointing=activation_checkpointing, compile=compile)
        self.text_encoder = text_encoder
        self.video_vae = load_frozen(video_vae, video_vae_ckpt, "vae.", "video_vae", use_ema)
        self.audio_vae = load_frozen(audio_vae, audio_vae_ckpt, "vae.", "audio_vae", use_ema)
        self.vocoder = None if vocoder is None else load_frozen(vocoder, audio_vae_ckpt, "vocoder.", "vocoder",
                                                                 use_ema)
        if not train_text_encoder:
            self.text_encoder.requires_grad_(False)
        self.timeline = timeline
        if video_vae.temporal_stride != timeline.vae_time_stride or audio_vae.stride != timeline.audio_latent_stride:
            raise ValueError(f"the VAEs' strides (video {video_vae.temporal_stride}, audio {audio_vae.stride}) differ "
                             f"from the timeline's ({timeline.vae_time_stride}, {timeline.audio_latent_stride})")
        self.register_buffer("video_times", torch.from_numpy(timeline.video_token_times()), persistent=False)
        self.register_buffer("audio_times", torch.from_numpy(timeline.audio_token_times()), persistent=False)
        # per modality (shift, scale); NaN = measured on the first batch; saved with the weights
        for m in MODALITIES:
            shift, scale = (latent_shift or {}).get(m), (latent_scale or {}).get(m)
            stats = torch.tensor([math.nan if shift is None else shift, math.nan if scale is None else scale])
            self.register_buffer(f"{m}_latent_stats", stats)
        self._stats_known: set[str] = set()  # modalities whose stats were read as measured (not NaN)
        self.optim = dict(lr=float(lr), weight_decay=float(weight_decay), betas=tuple(float(b) for b in betas),
                          warmup_steps=warmup_steps, total_steps=total_steps, schedule=schedule,
                          min_lr_ratio=min_lr_ratio)
        if optimizer not in ("adamw", "muon"):
            raise ValueError(f"model.optimizer={optimizer!r}: choose adamw or muon")
        self.optimizer_name, self.muon_lr = optimizer, float(muon_lr)
        self.task_probs = dict(task_probs) if task_probs is not None else None
        self.timestep_mean, self.timestep_std, self.timestep_shift = timestep_mean, timestep_std, timestep_shift
        self.independent_timesteps, self.text_drop_prob = independent_timesteps, text_drop_prob
        self.loss_weights = {"video": 1.0, "audio": 1.0, **dict(loss_weights or {})}
        self.val_timesteps, self.val_seed = tuple(float(t) for t in val_timesteps), int(val_seed)
        self._tokens = (0, 0, 0)  # (video, audio, text) tokens per sample of the last training batch

    def on_fit_start(self):
        """Refuse a run configured for sequence parallelism that its strategy did not set up."""
        if sequence_parallel_size(self.dit) != self.sequence_parallel:
            raise RuntimeError(f"model.sequence_parallel={self.sequence_parallel}: the trainer's strategy did not "
                               "apply it (sora.training.sequence_parallel.apply_sequence_parallel); set it to 1")

    def on_load_checkpoint(self, checkpoint: dict) -> None:
        self._stats_known = set()  # the loaded latent stats are read again at the next batch

    def train(self, mode: bool = True):
        super().train(mode)
        for m in (self.video_vae, self.audio_vae, self.vocoder):
            if m is not None:
                m.eval()  # frozen: always in inference mode
        return self

    # -- latents --------------------------------------------------------------------------
    @torch.no_grad()
    def encode(self, batch) -> dict[str, torch.Tensor]:
        """Raw VAE latents: video [B, Cv, T', h, w], audio [B, Ca, L] (posterior modes). A batch of cached
        latents (``data=latents``, :mod:`sora.data.latents`) brings its own, checked to be these encoders'."""
        if getattr(batch, "latents", None):
            check_cache(self, batch, text=self.cached_text(batch))
            z = dict(batch.latents)
        else:
            z = {"video": self.video_vae.encode(batch.video).mode(),
                 "audio": self.audio_vae.encode_audio(mono(batch.audio)).mode()}
        tl = self.timeline
        if z["video"].shape[2] != tl.video_latent_steps or z["audio"].shape[2] != tl.audio_latent_steps:
            raise ValueError(f"latents have {z['video'].shape[2]} video / {z['audio'].shape[2]} audio steps, the "
                             f"timeline {tl.video_latent_steps} / {tl.audio_latent_steps}: the batch's clip length "
                             f"differs from timeline.seconds={tl.seconds}")
        return z

    def cached_text(self, batch) -> bool:
        """Whether the batch's cached text embeddings stand in for the text encoder (only a frozen one)."""
        return getattr(batch, "text", None) is not None and text_is_frozen(self)

    def encode_text(self, batch, drop: torch.Tensor | None = None) -> tuple[torch.Tensor, torch.Tensor]:
        """The captions' text tokens and mask, with "" where ``drop`` (cached when :meth:`cached_text`)."""
        if self.cached_text(batch):
            return batch.text_for(drop)
        return self.text_encoder(list(batch.captions) if drop is None else drop_captions(batch.captions, drop))

    def encode_script_text(self, batch, drop: torch.Tensor | None = None):
        """For a batch holding multi-shot clips (``meta["shots"]``: the world's, a timed caption sidecar's): each
        sample's shot captions as one token sequence with the shot id of every token (a plain caption: id -1,
        global) and each video/audio latent step's shot -> (text [B, L, D], mask [B, L], shots for the DiT), or
        None when no sample has shots. ``drop``: samples given the empty caption (classifier-free guidance).
        Cached text (data=latents): a multi-shot clip's embedding is its shots' real tokens one after the
        other, ``text_tokens`` of each in its shot row (sora-cache-latents writes them so)."""
        metas = list(batch.meta) if batch.meta else [{}] * len(batch)
        if not any("shots" in m for m in metas):
            return None
        dropped = [False] * len(metas) if drop is None else drop.tolist()  # a host tensor (drop_text)
        seqs, ids = [], []  # per sample: its real text tokens [n, D] and their shot ids [n]
        if self.cached_text(batch):
            lengths = batch.lengths()
            for i, m in enumerate(metas):
                if dropped[i]:
                    q, k = batch.text_empty.to(batch.text.device), torch.full((len(batch.text_empty),), -1)
                else:
                    q = batch.text[i, : lengths[i]]
                    k = torch.full((len(q),), -1) if "shots" not in m else torch.cat(
                        [torch.full((int(s["text_tokens"]),), n) for n, s in enumerate(m["shots"])])
                    if len(k) != len(q):
                        raise ValueError(f"the latent cache {batch.cache}: {batch.keys[i]} has {len(q)} text "
                                         f"tokens, its shots' text_tokens add up to {len(k)}")
                seqs.append(q)
                ids.append(k.long())
            tokens = batch.text
        else:
            entries = [[("", -1)] if dropped[i] else [(s["caption"], k) for k, s in enumerate(m["shots"])]
                       if "shots" in m else [(batch.captions[i], -1)] for i, m in enumerate(metas)]
            captions = [c for e in entries for c, _ in e]
            tokens, mask = self.text_encoder(captions)
            lengths = token_counts(self.text_encoder, captions, mask)
            j = 0
            for e in entries:  # a sample's captions' real tokens one after the other
                parts = [(tokens[j + n][: lengths[j + n]], k) for n, (_, k) in enumerate(e)]
                seqs.append(torch.cat([t for t, _ in parts]))
                ids.append(torch.cat([torch.full((len(t),), k, dtype=torch.long) for t, k in parts]))
                j += len(e)
        length = max(1, max(len(q) for q in seqs))
        text = tokens.new_zeros(len(seqs), length, tokens.shape[-1])
        text_mask = torch.zeros(len(seqs), length, dtype=torch.bool, device=tokens.device)
        tid = torch.full((len(seqs), length), -1, dtype=torch.long, device=tokens.device)
        for i, (q, k) in enumerate(zip(seqs, ids)):
            text[i, :len(q)], text_mask[i, :len(q)], tid[i, :len(q)] = q, True, k.to(tokens.device, non_blocking=True)
        steps = {"video": [], "audio": []}
        for m in metas:
            script = Script(tuple(Shot(float(s["start"]), float(s["end"]), s["caption"]) for s in m["shots"])) \
                if "shots" in m else None
            for stream, fn in (("video", "video_shots"), ("audio", "audio_shots")):
                n = self.timeline.video_latent_steps if stream == "video" else self.timeline.audio_latent_steps
                steps[stream].append(torch.zeros(n, dtype=torch.long) if script is None else
                                     torch.from_numpy(getattr(script, fn)(self.timeline)))
        shots = {"text": tid, **{m: torch.stack(v).to(tokens.device, non_blocking=True) for m, v in steps.items()}}
        return text, text_mask, shots

    def normalize(self, z: dict[str, torch.Tensor]) -> dict[str, torch.Tensor]:
        out = {}
        for m, x in z.items():
            stats = getattr(self, f"{m}_latent_stats")
            if m not in self._stats_known and torch.isnan(stats).any():  # first batch: measure (averaged over ranks)
                measured = torch.stack([x.float().mean(), x.float().std().clamp(min=1e-6).reciprocal()])
                if self._trainer is not None:
                    measured = self.trainer.strategy.reduce(measured, reduce_op="mean")
                stats.copy_(torch.where(torch.isnan(stats), measured.to(stats), stats))
                log.info("%s latents: shift %.4g, scale %.4g", m, float(stats[0]), float(stats[1]))
            self._stats_known.add(m)  # read once: no host sync in later steps
            out[m] = (x - stats[0].to(x.dtype)) * stats[1].to(x.dtype)
        return out

    def denormalize(self, z: dict[str, torch.Tensor]) -> dict[str, torch.Tensor]:
        return {m: x / getattr(self, f"{m}_latent_stats")[1].to(x.dtype) + getattr(self, f"{m}_latent_stats")[0]
                .to(x.dtype) for m, x in z.items()}

    # -- the model function -------------------------------------------------------------------
    def velocity(self, x: dict, t: dict, text: torch.Tensor, text_mask: torch.Tensor,
                 shots: dict | None = None) -> dict:
        """``x`` {video, audio} latents, ``t`` {video, audio} [B] or per token [B, T'] / [B, L] -> velocities,
        same structure. ``shots``: a timed script's shot ids (``AVDiT.forward``)."""
        extra = {} if shots is None else {"shots": shots}
        vv, va = self.dit(x["video"], x["audio"], text, text_mask, t["video"], t["audio"], self.video_times,
                          self.audio_times, **extra)
        return {"video": vv, "audio": va}

    def weighted(self, losses: dict) -> torch.Tensor:
        """The loss to minimise: ``loss_weights``-weighted sum of the per-modality ``loss_<m>`` (the only one)."""
        return sum(self.loss_weights[m] * losses[f"loss_{m}"] for m in MODALITIES)

    @staticmethod
    def model_timesteps(tt: TaskTimesteps) -> dict[str, torch.Tensor]:
        """The DiT's timesteps: per token (0 at clean tokens) when some sample has a stream partly clean
        (continuation, retake, first/last frames), else one per sample (the cheaper modulation). Both streams
        switch together, so a compiled DiT sees two input structures, not four."""
        partly = tt.partly if tt.partly is not None else any(
            bool((c.any(1) & ~c.all(1)).any()) for c in (tt.clean_video, tt.clean_audio))
        if partly:
            return {"video": tt.video_token_t, "audio": tt.audio_token_t}
        return {"video": tt.t_video, "audio": tt.t_audio}

    def losses(self, z, noise, tt, text, text_mask, shots=None) -> dict[str, torch.Tensor]:
        """Flow losses per modality and their weighted sum. ``z`` / ``noise``: the batch's {video, audio}
        latents, one DiT forward; or lists of them, one per part of a pack (a bucket's samples, in pack
        order): ONE packed DiT forward (``AVDiT.forward_packed``), and each modality's loss is the mean
        squared velocity error over the generated elements of all samples (a dense batch's loss when every
        sample has the same shape). ``tt``: the tasks and timesteps of all samples, in that order."""
        packed = isinstance(z, (list, tuple))
        zs, noises = (z, noise) if packed else ([z], [noise])
        if packed and self.sequence_parallel > 1:
            raise ValueError(f"data.train.pack with model.sequence_parallel={self.sequence_parallel} is not "
                             "supported yet; turn one of them off")
        clean = {"video": tt.clean_video, "audio": tt.clean_audio}
        token_t = {"video": tt.video_token_t, "audio": tt.audio_token_t}
        parts, start = [], 0  # each part's samples
        for part in zs:
            parts.append(slice(start, start + len(part["video"])))
            start = parts[-1].stop
        x = [{m: interpolate(part[m], n[m], token_t[m][p], clean[m][p]) for m in MODALITIES}
             for part, n, p in zip(zs, noises, parts)]
        t = self.model_timesteps(tt)
        if packed:
            b = start
            vv, va = self.dit([v for xi in x for v in xi["video"].unbind(0)],
                              [a for xi in x for a in xi["audio"].unbind(0)], text, text_mask, t["video"],
                              t["audio"], [self.video_times] * b, [self.audio_times] * b)
            v = [{"video": torch.stack(vv[p]), "audio": torch.stack(va[p])} for p in parts]
        else:
            v = [self.velocity(x[0], t, text, text_mask, shots)]
        out = {}
        for m in MODALITIES:
            losses = [flow_loss(vi[m], part[m], n[m], clean_mask=clean[m][p])
                      for vi, part, n, p in zip(v, zs, noises, parts)]
            if packed:  # weighted by each part's generated elements
                counts = [int((~clean[m][p]).sum()) * part[m][0, :, 0].numel() for part, p in zip(zs, parts)]
                out[f"loss_{m}"] = sum(loss * c for loss, c in zip(losses, counts)) / max(sum(counts), 1)
            else:
                out[f"loss_{m}"] = losses[0]
        out["loss"] = self.weighted(out)
        return out

    def sample_timesteps(self, b: int, video_len: int, audio_len: int, device) -> TaskTimesteps:
        """A training task and per-modality timesteps for each of ``b`` samples (:mod:`sora.diffusion.flow`)."""
        tasks = sample_task(b, self.task_probs).to(device, non_blocking=True)
        t = logit_normal_timesteps(b, self.timestep_mean, self.timestep_std, device=device)
        ta = logit_normal_timesteps(b, self.timestep_mean, self.timestep_std, device=device) \
            if self.independent_timesteps else t.clone()
        t, ta = shift_timesteps(t, self.timestep_shift), shift_timesteps(ta, self.timestep_shift)
        return timesteps_for_tasks(tasks, t, ta, video_len, audio_len)

    def training_step(self, batch, batch_idx):
        """A dense batch, or a pack of clips of several buckets (:class:`PackedBatch`: each bucket encoded at its
        own shape, then one packed DiT forward): the same step."""
        packed = isinstance(batch, PackedBatch)
        if packed and any("shots" in m for part in batch.parts for m in (part.meta or [])):
            raise ValueError("multi-shot clips (data.train.shots) with data.train.pack are not supported yet: set "
                             "data.train.shots=null or turn packing off")
        zs = [self.normalize(self.encode(part)) for part in (batch.parts if packed else [batch])]
        b, device = len(batch), zs[0]["video"].device
        drop = drop_text(b, self.text_drop_prob)
        script = None if packed else self.encode_script_text(batch, drop)  # multi-shot clips: captions per shot
        text, text_mask, shots = script if script is not None else (*self.encode_text(batch, drop), None)
        p = self.dit.patch_size
        video_tokens = sum(len(z["video"]) * math.prod(z["video"].shape[2:]) // (p * p) for z in zs)
        text_tokens = round(float(text_mask.sum()) / b) if packed else text.shape[1]
        self._tokens = (round(video_tokens / b), zs[0]["audio"].shape[2], text_tokens)
        tt = self.sample_timesteps(b, zs[0]["video"].shape[2], zs[0]["audio"].shape[2], device)
        noise = [{m: torch.randn_like(x) for m, x in z.items()} for z in zs]
        out = self.losses(zs if packed else zs[0], noise if packed else noise[0], tt, text, text_mask, shots)
        self.log_dict({f"train/{k}": v.detach() for k, v in out.items() if k != "loss"}, batch_size=b)
        if packed:
            self.log_dict({"train/pack_samples": float(b), "train/pack_tokens": float(self.batch_tokens(batch))},
                          batch_size=b)
        self.log("train/loss", out["loss"].detach(), batch_size=b)  # in the bar: callbacks.ProgressBar (no sync)
        return out["loss"]

    @torch.no_grad()
    def fixed_timestep_losses(self, batch, index: int = 0) -> dict[str, torch.Tensor]:
        """Text-to-AV flow losses at each of ``val_timesteps`` with noise fixed by (``val_seed``,
        ``index``): ``loss_<modality>_t<t>`` and their means ``loss_<modality>``, ``loss`` (weighted).
        The validation metric, and ``sora-eval``'s per-modality loss."""
        z = self.normalize(self.encode(batch))
        b, device = len(batch), z["video"].device
        text, text_mask = self.encode_text(batch)
        gen = torch.Generator().manual_seed(self.val_seed * 100003 + index)
        noise = {m: torch.randn(x.shape, generator=gen).to(x) for m, x in z.items()}
        totals, out = {"loss_video": 0.0, "loss_audio": 0.0}, {}
        for tv in self.val_timesteps:
            t = torch.full((b,), tv, device=device)
            clean = {m: torch.zeros(b, x.shape[2], dtype=torch.bool, device=device) for m, x in z.items()}
            losses = self.losses(z, noise, TaskTimesteps(t, t, clean["video"], clean["audio"]), text, text_mask)
            for k in totals:
                out[f"{k}_t{tv:.2f}"] = losses[k]
                totals[k] = totals[k] + losses[k] / len(self.val_timesteps)
        totals["loss"] = self.weighted(totals)
        return {**out, **totals}

    def validation_step(self, batch, batch_idx):
        if isinstance(batch, PackedBatch):
            raise ValueError("data.val.pack: validation takes unpacked batches; set pack under data.train only")
        out = self.fixed_timestep_losses(batch, batch_idx)  # averaged over ranks: the sweeps' objective
        self.log_dict({f"val/{k}": v for k, v in out.items() if "_t" in k}, batch_size=len(batch), sync_dist=True)
        self.log_dict({f"val/{k}": v for k, v in out.items() if "_t" not in k}, batch_size=len(batch), prog_bar=True,
                      sync_dist=True)

    def configure_model(self) -> None:
        """Sharding, applied from outside (``strategy=fsdp``: FSDP2; nothing for other strategies)."""
        configure_sharding(self)

    def configure_optimizers(self):
        o = dict(self.optim)
        if o["total_steps"] is None and self._trainer is not None and (self.trainer.max_steps or 0) > 0:
            o["total_steps"] = self.trainer.max_steps
        if self.optimizer_name == "muon":
            strategy = self._trainer and self.trainer.strategy
            if not strategy or (isinstance(strategy, (SingleDeviceStrategy, DDPStrategy))
                                and not isinstance(strategy, DeepSpeedStrategy)):
                return muon_with_schedule(self.named_parameters(), muon_lr=self.muon_lr, **o,
                                          fused=fused_for(self._trainer))
            log.warning("model.optimizer=muon orthogonalises whole weight matrices, which %s shards: training with "
                        "AdamW (model.lr) instead", type(strategy).__name__)
        return adamw_with_schedule(self.parameters(), **o, fused=fused_for(self._trainer))

    def configure_gradient_clipping(self, optimizer, gradient_clip_val=None, gradient_clip_algorithm=None) -> None:
        clip_gradients(self, optimizer, gradient_clip_val, gradient_clip_algorithm)

    # -- accounting ------------------------------------------------------------------------------
    def flops_per_token(self) -> float:
        """Training FLOPs per token of the last training batch's sizes (for ``perf/mfu``)."""
        return self.dit.estimate_flops_per_token(*self._tokens)

    def batch_tokens(self, batch) -> int:
        if isinstance(batch, PackedBatch):
            return sum(self.batch_tokens(part) for part in batch.parts)
        latents = getattr(batch, "latents", None)
        _, _, t, h, w = latents["video"].shape if latents else self.video_vae.latent_shape(batch.video.shape)
        p = self.dit.patch_size
        return (t * (h // p) * (w // p) + self.timeline.audio_latent_steps) * len(batch)
