"""``AVPipeline``: the one way to generate with a trained DiT. Text -> picture and sound (t2av), a picture ->
its sound (v2a), a sound -> its picture (a2v), and edits of a clip: regenerate a time window of one or both
streams (:meth:`AVPipeline.retake`), continue it (:meth:`AVPipeline.extend`), re-noise it to a level and sample
it back under a new prompt (:meth:`AVPipeline.remix`). ``sora-sample``, ``sora-eval`` and the in-training
``Samples`` callback all call it.

    from sora.inference import AVPipeline

    pipe = AVPipeline.from_checkpoint("outputs/quickstart/dit/checkpoints/last.ckpt")
    clip = pipe.generate("a red ball bounces on a gray floor", steps=30, guidance=4.0, seed=0)
    clip.write("outputs/ball.mp4")                               # H.264 + AAC at the timeline's rates
    with_sound = pipe.generate(video=pipe.load_video("in.mp4"))  # v2a: the input's frames, generated sound

Rectified-flow sampling from noise (:mod:`sora.diffusion.samplers`) with text classifier-free guidance
(:func:`sora.diffusion.guidance.cfg`); a given modality is encoded by its VAE (posterior mode), normalised and
kept clean (t = 0, ``cond["clean"]``) while the other is sampled (edits keep single latent tokens clean:
``cond["clean_mask"]``, per-token timesteps in the DiT); latents are decoded by the module's frozen
VAEs and the sound by its vocoder (or Griffin-Lim). Errors are :class:`PipelineError` with one line.
"""

from __future__ import annotations

import logging
import math
from dataclasses import dataclass
from fractions import Fraction
from pathlib import Path

import numpy as np
import torch

from sora.data.buckets import Bucket, cover_size, crop
from sora.diffusion.guidance import cfg as text_cfg
from sora.diffusion.guidance import replace_cond
from sora.diffusion.samplers import SAMPLERS, make_schedule
from sora.models.mel import griffin_lim
from sora.script import Script
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
    ``latents`` per modality, the rates to write them at and the ``task`` (t2av, v2a, a2v, retake, extend,
    remix)."""
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
    def load_video(self, path, size=None, start: float = 0.0, seconds: float | None = None) -> np.ndarray:
        """uint8 [1 + seconds * fps, H, W, 3] (default: the timeline's ``num_frames``): ``path`` from ``start``
        seconds at the timeline's fps, resized to cover ``size`` and centre-cropped (as the data pipeline crops a
        bucket); a short clip repeats its last frame."""
        from sora.media import MediaError, probe_av, read_av

        h, w = self.frame_size(size)
        tl = self.timeline
        n = tl.num_frames if seconds is None else round(seconds * float(tl.fps_q)) + 1
        try:
            info = probe_av(str(path))
            cover = cover_size(info.height, info.width, Bucket(h, w))
            clip = read_av(str(path), start=start, duration=n / float(tl.fps_q),
                           fps=float(tl.fps_q), size=cover, sample_rate=tl.sample_rate)
        except MediaError as e:
            raise PipelineError(f"video={e}") from None
        if not len(clip.frames):
            raise PipelineError(f"video={path}: no decodable frames from {start:g} s")
        frames = clip.frames[:n]
        if len(frames) < n:
            log.info("video=%s: %d of %d frames, the last one repeated", path, len(frames), n)
            frames = np.concatenate([frames, np.repeat(frames[-1:], n - len(frames), 0)])
        return np.ascontiguousarray(crop(frames, Bucket(h, w), None))

    def load_audio(self, path, start: float = 0.0, seconds: float | None = None) -> np.ndarray:
        """float [1, seconds * sample_rate] (default: the timeline's ``num_samples``): the sound of ``path`` (any
        file with an audio track) from ``start`` seconds, mono at the timeline's rate, cut or zero-padded."""
        from sora.media import MediaError, read_audio

        tl = self.timeline
        n = tl.num_samples if seconds is None else round(seconds * tl.sample_rate)
        try:
            audio, _ = read_audio(str(path), sample_rate=tl.sample_rate, channels=1, start=start,
                                  duration=n / tl.sample_rate)
        except MediaError as e:
            raise PipelineError(f"audio={e}") from None
        return np.pad(audio[:, :n], ((0, 0), (0, max(0, n - audio.shape[-1]))))

    # -- generation ---------------------------------------------------------------------------
    def _check(self, sampler: str, audio_decoder: str) -> None:
        if sampler not in SAMPLERS:
            raise PipelineError(f"sampler={sampler!r}: choose from {sorted(SAMPLERS)}")
        if audio_decoder not in ("vocoder", "griffin_lim"):
            raise PipelineError(f"audio_decoder={audio_decoder!r}: choose vocoder or griffin_lim")

    def encode(self, video: np.ndarray | None = None, audio: np.ndarray | None = None) -> dict:
        """Normalised latents of the given streams: ``video`` uint8 [num_frames, H, W, 3], ``audio`` float
        [1, num_samples] (the timeline's lengths)."""
        module, tl, out = self.module, self.timeline, {}
        if video is not None:
            h, w = self.frame_size(video.shape[1:3])
            if tuple(video.shape) != (tl.num_frames, h, w, 3):
                raise PipelineError(f"video has shape {tuple(video.shape)}, need {(tl.num_frames, h, w, 3)}")
            out["video"] = module.video_vae.encode(from_uint8(video)[None].to(self.device)).mode()
        if audio is not None:
            audio = np.atleast_2d(np.asarray(audio, np.float32))
            if audio.shape != (1, tl.num_samples):
                raise PipelineError(f"audio has shape {audio.shape}, need (1, {tl.num_samples})")
            out["audio"] = module.audio_vae.encode_audio(torch.from_numpy(audio)[None].to(self.device)).mode()
        return module.normalize(out) if out else {}

    def token_mask(self, stream: str, start: float, end: float) -> torch.Tensor:
        """bool [1, tokens] of ``stream``'s latent steps whose time span overlaps [start, end) seconds."""
        spans = self.timeline.video_token_spans() if stream == "video" else self.timeline.audio_token_spans()
        lo, hi = spans[:, 0], spans[:, 1]
        hit = ((lo < end) & (hi > start)) | ((lo == hi) & (lo >= start) & (lo < end))  # the first frame: an instant
        return torch.from_numpy(hit)[None].to(self.device)

    def _sample(self, prompt, negative_prompt, steps, guidance, sampler, shift, seed, size, clean=None, masks=None,
                init=None, strength=1.0) -> dict:
        """Latents (denormalised) of one clip: ``clean`` {stream: normalised latents} kept at t = 0 where
        ``masks`` {stream: bool [1, T]} say so (the whole stream without a mask); ``init`` {stream: normalised
        latents} with ``strength`` < 1: start from them noised to that level (SDEdit) instead of pure noise."""
        module, tl, vae = self.module, self.timeline, self.module.video_vae
        h, w = self.frame_size(size)
        if isinstance(prompt, Script):
            cond, (tokens, mask) = self.script_cond(prompt), module.text_encoder([negative_prompt])
            uncond = replace_cond(text=tokens, text_mask=mask, shots=None)
        else:
            tokens, mask = module.text_encoder([prompt, negative_prompt])
            cond = {"text": tokens[:1], "text_mask": mask[:1]}
            uncond = replace_cond(text=tokens[1:], text_mask=mask[1:])
        gen = torch.Generator().manual_seed(int(seed))
        shapes = {"video": (1, vae.latent_channels, tl.video_latent_steps, h // vae.spatial_stride,
                            w // vae.spatial_stride),
                  "audio": (1, module.audio_vae.latent_channels, tl.audio_latent_steps)}
        x = {m: torch.randn(s, generator=gen).to(self.device) for m, s in shapes.items()}
        schedule = make_schedule(steps, shift, device=self.device)
        if init and strength < 1.0:  # remix: start at t = strength from the given latents
            schedule = schedule * strength
            x = {m: (1 - strength) * init[m] + strength * x[m] if m in init else x[m] for m in x}
        if clean:
            cond["clean"] = clean
        if masks:
            cond["clean_mask"] = masks

        def model_fn(xt, t, c):
            return module.velocity(xt, t, c["text"], c["text_mask"], c.get("shots"))

        return module.denormalize(SAMPLERS[sampler](text_cfg(model_fn, guidance, uncond), x, schedule, cond))

    def script_cond(self, script: Script) -> dict:
        """The DiT's text condition for a timed script: the global caption's and each shot's real tokens in one
        sequence, with their shot ids (-1: global) and each video/audio latent step's shot."""
        tl = self.timeline
        if abs(script.seconds - tl.seconds) > 1e-6:
            raise PipelineError(f"the script lasts {script.seconds:g} s, the pipeline generates {tl.seconds:g} s")
        texts = ([script.global_caption] if script.global_caption else []) + script.captions()
        ids = ([-1] if script.global_caption else []) + list(range(len(script.shots)))
        tokens, mask = self.module.text_encoder(texts)
        seq = torch.cat([tok[m] for tok, m in zip(tokens, mask.bool())])[None]
        tid = torch.cat([torch.full((int(m.sum()),), i, dtype=torch.long) for i, m in zip(ids, mask)])[None]
        shots = {"text": tid.to(self.device),
                 "video": torch.from_numpy(script.video_shots(tl))[None].to(self.device),
                 "audio": torch.from_numpy(script.audio_shots(tl))[None].to(self.device)}
        return {"text": seq, "text_mask": torch.ones(seq.shape[:2], dtype=torch.bool, device=self.device),
                "shots": shots}

    def _decode(self, z: dict, audio_decoder: str) -> tuple[np.ndarray, np.ndarray]:
        module = self.module
        frames = to_uint8(module.video_vae.decode(z["video"]).clamp(-1, 1)[0])
        mel = module.audio_vae.decode(z["audio"])
        if audio_decoder == "vocoder" and module.vocoder is not None:
            wave = module.vocoder(mel)
        else:
            m = module.audio_vae.mel
            wave = griffin_lim(mel, sample_rate=m.sample_rate, n_fft=m.n_fft, hop=m.hop, fmin=m.fmin, fmax=m.fmax)
        return frames, wave[0].float().clamp(-1, 1).cpu().numpy()

    @torch.no_grad()
    def generate(self, prompt: str | Script = "", negative_prompt: str = "", *, steps: int = 30, guidance: float = 4.0,
                 sampler: str = "euler", shift: float = 1.0, seed: int = 0, audio_decoder: str = "vocoder",
                 size=None, video: np.ndarray | None = None, audio: np.ndarray | None = None) -> Generated:
        """One clip. ``prompt``: a caption, or a timed :class:`sora.script.Script` (each shot's caption conditions
        the picture and sound inside its interval; the script lasts the pipeline's seconds). ``video`` (uint8
        [num_frames, H, W, 3], e.g. :meth:`load_video`) or ``audio`` (float
        [1, num_samples], e.g. :meth:`load_audio`): that modality is the condition, returned as given (not
        re-decoded), and only the other one is generated. ``guidance``: text CFG scale (1: none); ``shift``:
        timestep shift of the schedule (> 1: more steps near noise)."""
        self._check(sampler, audio_decoder)
        if video is not None and audio is not None:
            raise PipelineError("give video (generate its sound) or audio (generate its picture), not both")
        clean = self.encode(video, audio)
        z = self._sample(prompt, negative_prompt, steps, guidance, sampler, shift, seed,
                         size if video is None else video.shape[1:3], clean)
        frames, sound = self._decode(z, audio_decoder)
        task = "v2a" if video is not None else "a2v" if audio is not None else "t2av"
        task = f"{task}, script" if isinstance(prompt, Script) else task
        frames = np.ascontiguousarray(video) if video is not None else frames
        sound = np.atleast_2d(np.asarray(audio, np.float32)) if audio is not None else sound
        return Generated(frames, sound, z, float(self.timeline.fps_q), self.timeline.sample_rate, task)

    def _edit(self, task, prompt, video, audio, masks, strength, opts) -> Generated:
        """Sample a clip with the latents of (``video``, ``audio``) kept where ``masks`` say; remix
        (``strength`` < 1 or a stream without a mask) starts the free streams from the given latents."""
        o = {"negative_prompt": "", "steps": 30, "guidance": 4.0, "sampler": "euler", "shift": 1.0, "seed": 0,
             "audio_decoder": "vocoder", **opts}
        self._check(o["sampler"], o["audio_decoder"])
        given = self.encode(video, audio)
        clean = {m: z for m, z in given.items() if m in masks}
        z = self._sample(prompt, o["negative_prompt"], o["steps"], o["guidance"], o["sampler"], o["shift"], o["seed"],
                         video.shape[1:3], clean, masks, init=given if task == "remix" else None, strength=strength)
        frames, sound = self._decode(z, o["audio_decoder"])
        return Generated(frames, sound, z, float(self.timeline.fps_q), self.timeline.sample_rate, task)

    @torch.no_grad()
    def retake(self, prompt: str, video: np.ndarray, audio: np.ndarray, start: float, end: float,
               streams=("video", "audio"), **opts) -> Generated:
        """Regenerate the window [start, end) seconds of ``streams`` of a clip of the timeline's length; every
        other latent token is kept (t = 0, bit-equal before decoding), a stream not in ``streams`` wholly.
        ``opts``: as :meth:`generate` (steps, guidance, seed, ...). The whole clip is decoded."""
        tl = self.timeline
        if not 0 <= start < end <= tl.seconds + 1e-9:
            raise PipelineError(f"retake=[{start}, {end}]: need 0 <= start < end <= {tl.seconds:g} (the clip)")
        bad = set(streams) - {"video", "audio"}
        if bad or not streams:
            raise PipelineError(f"retake streams {sorted(streams)}: choose video, audio or both")
        masks = {m: ~self.token_mask(m, start, end) if m in streams else self.token_mask(m, 0.0, math.inf)
                 for m in ("video", "audio")}
        return self._edit("retake", prompt, video, audio, masks, 1.0, opts)

    @torch.no_grad()
    def extend(self, prompt: str, video: np.ndarray, audio: np.ndarray, seconds: float, **opts) -> Generated:
        """Continue a clip by ``seconds``: ``video`` / ``audio`` are its last ``timeline.seconds - seconds``
        (the context: uint8 [1 + k * stride, H, W, 3] frames, float [1, samples]); returns the context as given
        followed by the generated continuation (picture and sound), ``timeline.seconds`` long."""
        tl = self.timeline
        context = tl.seconds - seconds
        frames_in = round(context * float(tl.fps_q)) + 1
        samples_in = round(context * tl.sample_rate)
        if not seconds > 0 or context <= 0 or (Fraction(context).limit_denominator(10**6) % tl.quantum) != 0:
            raise PipelineError(f"extend={seconds}: the context (seconds - extend = {context:g} s) must be a positive "
                                f"multiple of {float(tl.quantum):g} s")
        audio = np.atleast_2d(np.asarray(audio, np.float32))
        if len(video) != frames_in or audio.shape != (1, samples_in):
            raise PipelineError(f"extend={seconds}: need {frames_in} context frames and {samples_in} samples, got "
                                f"{len(video)} and {audio.shape[-1]}")
        padded_video = np.concatenate([video, np.repeat(video[-1:], tl.num_frames - frames_in, 0)])  # noised anyway
        padded_audio = np.pad(audio, ((0, 0), (0, tl.num_samples - samples_in)))
        masks = {m: self.token_mask(m, 0.0, context) & (self._span_end(m) <= context + 1e-9) for m in ("video", "audio")}
        out = self._edit("extend", prompt, padded_video, padded_audio, masks, 1.0, opts)
        out.frames = np.concatenate([video, out.frames[frames_in:]])
        out.audio = np.concatenate([audio, out.audio[:, samples_in:]], axis=1)
        return out

    def _span_end(self, stream: str) -> torch.Tensor:
        spans = self.timeline.video_token_spans() if stream == "video" else self.timeline.audio_token_spans()
        return torch.from_numpy(spans[:, 1])[None].to(self.device)

    @torch.no_grad()
    def remix(self, prompt: str, video: np.ndarray, audio: np.ndarray, strength: float = 0.6,
              streams=("video", "audio"), **opts) -> Generated:
        """SDEdit: the clip's latents of ``streams`` noised to ``strength`` (0: unchanged, 1: from scratch) and
        sampled back under ``prompt``; a stream not in ``streams`` is kept clean."""
        if not 0 < strength <= 1:
            raise PipelineError(f"strength={strength}: need 0 < strength <= 1")
        bad = set(streams) - {"video", "audio"}
        if bad or not streams:
            raise PipelineError(f"remix streams {sorted(streams)}: choose video, audio or both")
        masks = {m: self.token_mask(m, 0.0, math.inf) for m in ("video", "audio") if m not in streams}
        return self._edit("remix", prompt, video, audio, masks, strength, opts)
