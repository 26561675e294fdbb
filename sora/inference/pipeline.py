"""``AVPipeline``: the one way to generate with a trained DiT. Text -> picture and sound (t2av), a picture ->
its sound (v2a), a sound -> its picture (a2v). ``sora-sample``, ``sora-eval`` and the in-training ``Samples``
callback all call it; the next controls (timed scripts, extension, retake, remix) become its options.

    from sora.inference import AVPipeline

    pipe = AVPipeline.from_checkpoint("outputs/quickstart/dit/checkpoints/last.ckpt")
    clip = pipe.generate("a red ball bounces on a gray floor", steps=30, guidance=4.0, seed=0)
    clip.write("outputs/ball.mp4")                               # H.264 + AAC at the timeline's rates
    with_sound = pipe.generate(video=pipe.load_video("in.mp4"))  # v2a: the input's frames, generated sound

Rectified-flow sampling from noise (:mod:`sora.diffusion.samplers`) with text classifier-free guidance
(:func:`sora.diffusion.guidance.cfg`); a given modality is encoded by its VAE (posterior mode), normalised and
kept clean (t = 0, ``cond["clean"]``) while the other is sampled; latents are decoded by the module's frozen
VAEs and the sound by its vocoder (or Griffin-Lim). Errors are :class:`PipelineError` with one line.
"""

from __future__ import annotations

import logging
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import torch

from sora.data.buckets import Bucket, cover_size, crop
from sora.diffusion.guidance import cfg as text_cfg
from sora.diffusion.guidance import replace_cond
from sora.diffusion.samplers import SAMPLERS, make_schedule
from sora.models.audio_vae import griffin_lim
from sora.timeline import Timeline, TimelineError

log = logging.getLogger(__name__)


class PipelineError(ValueError):
    """A request the pipeline cannot serve (a bad option, input or checkpoint): one line saying why."""


def to_uint8(video: torch.Tensor) -> np.ndarray:
    """[3, T, H, W] float in [-1, 1] -> [T, H, W, 3] uint8."""
    return ((video.permute(1, 2, 3, 0).float().cpu().numpy() + 1) * 127.5).round().clip(0, 255).astype(np.uint8)


def from_uint8(frames: np.ndarray) -> torch.Tensor:
    """[T, H, W, 3] uint8 -> [3, T, H, W] float in [-1, 1]."""
    return torch.from_numpy(np.ascontiguousarray(frames)).permute(3, 0, 1, 2).float() / 127.5 - 1


@dataclass
class Generated:
    """One generated clip: ``frames`` uint8 [T, H, W, 3], ``audio`` float [1, N] in [-1, 1], the (denormalised)
    ``latents`` per modality, the rates to write them at and the ``task`` (t2av, v2a, a2v)."""
    frames: np.ndarray
    audio: np.ndarray
    latents: dict
    fps: float
    sample_rate: int
    task: str

    def write(self, path) -> Path:
        from sora.media import write_av

        path = Path(path)
        path.parent.mkdir(parents=True, exist_ok=True)
        write_av(path, self.frames, self.audio, fps=self.fps, sample_rate=self.sample_rate)
        return path


def run_timeline(config: dict, seconds: float | None = None) -> Timeline:
    """The timeline a run trained on (its stored ``timeline`` config), at ``seconds`` when given."""
    fields = {k: v for k, v in dict(config["timeline"]).items() if k != "_target_"}
    return Timeline(**{**fields, **({} if seconds is None else {"seconds": float(seconds)})})


def training_size(config: dict) -> tuple[int, int] | None:
    """The frame size a run trained at (its data config's ``size``, or its world's), or None (buckets)."""
    train = ((config.get("data") or {}).get("train") or {})
    if train.get("size"):
        return tuple(int(x) for x in train["size"])
    world = train.get("world") or {}
    return (int(world["height"]), int(world["width"])) if world.get("height") else None


class AVPipeline:
    """A DiT stage module (``DiTModule``: its text encoder, frozen VAEs and vocoder inside), the timeline it
    generates on and the default frame size."""

    def __init__(self, module, timeline: Timeline, size=None):
        self.module, self.timeline = module, timeline
        self.size = None if size is None else tuple(int(s) for s in size)

    @classmethod
    def from_checkpoint(cls, ckpt, seconds: float | None = None, use_ema: bool = True, device="cpu",
                        size=None) -> "AVPipeline":
        """The pipeline of a DiT run's checkpoint: a path (any checkpoint the run wrote: a ``.ckpt``, a DeepSpeed /
        FSDP2 folder, a ``.safetensors`` export) or the dict read from one. ``seconds``: the clip length to
        generate (null: the training length; it must fit the timing contract). ``use_ema``: the EMA weights
        when the run kept them. ``size``: the default frame size (null: the training size)."""
        from hydra.utils import instantiate
        from omegaconf import OmegaConf

        from sora.checkpoints.export import ExportError, model_weights, read_training_checkpoint

        if not isinstance(ckpt, dict):
            try:
                ckpt = read_training_checkpoint(ckpt)
            except ExportError as e:
                raise PipelineError(str(e)) from None
        model = (ckpt.get("sora_config") or {}).get("model") or {}
        if not str(model.get("_target_", "")).endswith("DiTModule"):
            raise PipelineError("not a checkpoint of a DiT run (sora-train model=dit)")
        cfg = OmegaConf.create(ckpt["sora_config"])
        trained = timeline = run_timeline(ckpt["sora_config"])
        if seconds is not None:
            try:
                timeline = run_timeline(ckpt["sora_config"], seconds)
            except TimelineError:
                raise PipelineError(
                    f"seconds={seconds} does not fit this checkpoint's timeline (1 + {trained.vae_time_stride}k frames "
                    f"at {trained.fps:g} fps, audio latents of {trained.audio_window} samples at "
                    f"{trained.sample_rate} Hz): use a multiple of {float(trained.quantum):g} s, e.g. "
                    f"seconds={trained.nearest_seconds(seconds):g}") from None
        cfg.timeline.seconds = timeline.seconds
        cfg.model.timeline = cfg.timeline
        cfg.model.video_vae_ckpt = cfg.model.audio_vae_ckpt = None  # the weights come from this checkpoint
        dit_log = logging.getLogger("sora.training.dit")
        level, dit_log.level = dit_log.level, logging.ERROR  # no "randomly initialised" warnings: loaded below
        try:
            module = instantiate(cfg.model)
        finally:
            dit_log.setLevel(level)
        module.load_state_dict(model_weights(ckpt, use_ema))
        return cls(module.to(device).eval(), timeline, size or training_size(ckpt["sora_config"]))

    @property
    def device(self) -> torch.device:
        return self.module.video_times.device

    def frame_size(self, size=None) -> tuple[int, int]:
        size = size or self.size
        if size is None:
            raise PipelineError("this run trained on several frame sizes (buckets): give size=[H,W]")
        h, w = (int(s) for s in size)
        stride = self.module.video_vae.spatial_stride
        if h % stride or w % stride:
            raise PipelineError(f"size={h}x{w} must be a multiple of {stride}")
        return h, w

    # -- inputs -------------------------------------------------------------------------------
    def load_video(self, path, size=None) -> np.ndarray:
        """uint8 [num_frames, H, W, 3]: ``path`` at the timeline's fps, resized to cover ``size`` and centre-cropped
        (as the data pipeline crops a bucket), cut to the timeline's length; a short clip repeats its last frame."""
        from sora.media import MediaError, probe_av, read_av

        h, w = self.frame_size(size)
        tl = self.timeline
        try:
            info = probe_av(str(path))
            cover = cover_size(info.height, info.width, Bucket(h, w))
            clip = read_av(str(path), duration=tl.read_duration, fps=float(tl.fps_q), size=cover,
                           sample_rate=tl.sample_rate)
        except MediaError as e:
            raise PipelineError(f"video={e}") from None
        if not len(clip.frames):
            raise PipelineError(f"video={path}: no decodable frames")
        frames = clip.frames[:tl.num_frames]
        if len(frames) < tl.num_frames:
            log.info("video=%s: %d of %d frames, the last one repeated", path, len(frames), tl.num_frames)
            frames = np.concatenate([frames, np.repeat(frames[-1:], tl.num_frames - len(frames), 0)])
        return np.ascontiguousarray(crop(frames, Bucket(h, w), None))

    def load_audio(self, path) -> np.ndarray:
        """float [1, num_samples]: the sound of ``path`` (any file with an audio track), mono at the timeline's
        rate, cut or zero-padded to the clip length."""
        from sora.media import MediaError, read_audio

        try:
            audio, _ = read_audio(str(path), sample_rate=self.timeline.sample_rate, channels=1)
        except MediaError as e:
            raise PipelineError(f"audio={e}") from None
        n = self.timeline.num_samples
        return np.pad(audio[:, :n], ((0, 0), (0, max(0, n - audio.shape[-1]))))

    # -- generation ---------------------------------------------------------------------------
    @torch.no_grad()
    def generate(self, prompt: str = "", negative_prompt: str = "", *, steps: int = 30, guidance: float = 4.0,
                 sampler: str = "euler", shift: float = 1.0, seed: int = 0, audio_decoder: str = "vocoder",
                 size=None, video: np.ndarray | None = None, audio: np.ndarray | None = None) -> Generated:
        """One clip. ``video`` (uint8 [num_frames, H, W, 3], e.g. :meth:`load_video`) or ``audio`` (float
        [1, num_samples], e.g. :meth:`load_audio`): that modality is the condition, returned as given (not
        re-decoded), and only the other one is generated. ``guidance``: text CFG scale (1: none); ``shift``:
        timestep shift of the schedule (> 1: more steps near noise)."""
        module, tl = self.module, self.timeline
        if sampler not in SAMPLERS:
            raise PipelineError(f"sampler={sampler!r}: choose from {sorted(SAMPLERS)}")
        if audio_decoder not in ("vocoder", "griffin_lim"):
            raise PipelineError(f"audio_decoder={audio_decoder!r}: choose vocoder or griffin_lim")
        if video is not None and audio is not None:
            raise PipelineError("give video (generate its sound) or audio (generate its picture), not both")
        h, w = self.frame_size(size if video is None else video.shape[1:3])
        device, vae = self.device, module.video_vae
        tokens, mask = module.text_encoder([prompt, negative_prompt])
        cond = {"text": tokens[:1], "text_mask": mask[:1]}
        uncond = replace_cond(text=tokens[1:], text_mask=mask[1:])
        gen = torch.Generator().manual_seed(int(seed))
        shapes = {"video": (1, vae.latent_channels, tl.video_latent_steps, h // vae.spatial_stride,
                            w // vae.spatial_stride),
                  "audio": (1, module.audio_vae.latent_channels, tl.audio_latent_steps)}
        noise = {m: torch.randn(s, generator=gen).to(device) for m, s in shapes.items()}
        clean = {}
        if video is not None:
            if tuple(video.shape) != (tl.num_frames, h, w, 3):
                raise PipelineError(f"video has shape {tuple(video.shape)}, need {(tl.num_frames, h, w, 3)}")
            clean["video"] = vae.encode(from_uint8(video)[None].to(device)).mode()
        if audio is not None:
            audio = np.atleast_2d(np.asarray(audio, np.float32))
            if audio.shape != (1, tl.num_samples):
                raise PipelineError(f"audio has shape {audio.shape}, need (1, {tl.num_samples})")
            clean["audio"] = module.audio_vae.encode_audio(torch.from_numpy(audio)[None].to(device)).mode()
        if clean:
            cond["clean"] = module.normalize(clean)

        def model_fn(x, t, c):
            return module.velocity(x, t, c["text"], c["text_mask"])

        z = SAMPLERS[sampler](text_cfg(model_fn, guidance, uncond), noise, make_schedule(steps, shift, device=device),
                              cond)
        z = module.denormalize(z)
        task = "v2a" if video is not None else "a2v" if audio is not None else "t2av"
        frames = np.ascontiguousarray(video) if video is not None else to_uint8(vae.decode(z["video"]).clamp(-1, 1)[0])
        if audio is None:
            mel = module.audio_vae.decode(z["audio"])
            if audio_decoder == "vocoder" and module.vocoder is not None:
                wave = module.vocoder(mel)
            else:
                m = module.audio_vae.mel
                wave = griffin_lim(mel, sample_rate=m.sample_rate, n_fft=m.n_fft, hop=m.hop, fmin=m.fmin, fmax=m.fmax)
            audio = wave[0].float().clamp(-1, 1).cpu().numpy()
        return Generated(frames, audio, z, float(tl.fps_q), tl.sample_rate, task)
