"""`sora-sample`: a prompt in, an mp4 with synchronized sound out, from a DiT checkpoint.

    sora-sample ckpt=outputs/quickstart/dit/checkpoints/last.ckpt prompt="a red ball bounces" \
        seconds=1 out=ball.mp4 steps=30 guidance=4 seed=0

The checkpoint holds the run's config (``sora_config``) and every weight the pipeline needs: the
DiT, the text encoder, the frozen video / audio VAEs, the vocoder and the latent statistics. The
sampler runs rectified flow from noise (``sora.diffusion.samplers``) with text classifier-free
guidance (``sora.diffusion.guidance.cfg``); latents are decoded by the VAEs, audio by the vocoder
(or Griffin-Lim), and ``sora.media.write_av`` writes the file.

Besides ``prompt=``:

- ``video=IN.mp4`` (video-to-audio): the clip is read at the checkpoint's fps, resized to cover
  the trained frame size and centre-cropped, cut to ``seconds`` (default: the video's duration
  rounded down to a length the timeline allows; a missing last frame repeats the one before),
  encoded by the embedded video VAE and kept clean (t = 0) while the sound is sampled. The mp4
  has those input frames and the generated sound.
- ``audio=IN.wav`` (audio-to-video; any file PyAV opens, e.g. the audio track of an mp4): the
  sound, 16 kHz mono, cut / zero-padded to ``seconds`` (default: its duration rounded down), is
  the clean condition; the mp4 has the generated picture and the input sound.
- ``prompts=FILE``: one prompt per (non-blank) line, seed ``seed + i`` for line ``i``; ``out``
  is then a folder (``out=DIR`` -> DIR/000.mp4, DIR/001.mp4, ...) or a pattern with a
  printf field (``out=clips/ball-%03d.mp4``); default ``outputs/samples/``.
"""

from __future__ import annotations

import logging
import math
import sys
import time
from fractions import Fraction
from pathlib import Path

import hydra
import numpy as np
from omegaconf import DictConfig, OmegaConf

from sora.cli.overrides import CONFIGS, check_overrides

log = logging.getLogger("sora.sample")


def read_checkpoint(ckpt_path: str) -> dict:
    """The checkpoint dict of a DiT run (a Lightning ``.ckpt``, read with ``weights_only=True``, or a
    ``.safetensors`` export of ``tools/export_checkpoint.py``); one-line SystemExit for anything else."""
    from sora.training.checkpoint_io import CheckpointError, load_checkpoint_file
    from sora.training.export import SUFFIX, ExportError, read_export

    try:
        if str(ckpt_path).endswith(SUFFIX):
            ckpt = read_export(ckpt_path)
        else:
            ckpt = load_checkpoint_file(ckpt_path)
    except ExportError as e:
        raise SystemExit(f"sora-sample: {e}") from None
    except CheckpointError as e:  # refused (pickled code), truncated, or not a torch file at all
        raise SystemExit(f"sora-sample: {ckpt_path} is not a checkpoint it can load: {e.reason}") from None
    model = (ckpt.get("sora_config") or {}).get("model") if isinstance(ckpt, dict) else None
    if not isinstance(model, dict) or not str(model.get("_target_", "")).endswith("DiTModule"):
        raise SystemExit(f"sora-sample: {ckpt_path} is not a checkpoint of a DiT run (sora-train model=dit)")
    return ckpt


def load_module(ckpt_path: str, seconds: float | None, use_ema: bool, device, ckpt: dict | None = None):
    """The DiTModule of a checkpoint (rebuilt from its stored config) and that config.
    ``ckpt``: the already loaded checkpoint dict of ``ckpt_path`` (:func:`read_checkpoint`)."""
    from hydra.utils import instantiate

    ckpt = read_checkpoint(ckpt_path) if ckpt is None else ckpt
    cfg = OmegaConf.create(ckpt["sora_config"])
    if seconds is not None:
        try:
            train_tl = instantiate(cfg.timeline)
        except Exception:  # noqa: BLE001 - reported below with the requested length
            train_tl = None
        cfg.timeline.seconds = float(seconds)
    try:
        timeline = instantiate(cfg.timeline)
    except Exception as e:  # noqa: BLE001 - a timing error is one line naming the field and a valid value
        msg = ' '.join(str(getattr(e, '__cause__', None) or e).split())
        if seconds is not None and train_tl is not None:
            q = seconds_quantum(train_tl)
            ok = max(1, round(Fraction(float(seconds)).limit_denominator(10**6) / q)) * q
            raise SystemExit(f"sora-sample: seconds={seconds} does not fit this checkpoint's timeline (1 + "
                             f"{train_tl.vae_time_stride}k frames at {train_tl.fps:g} fps, audio latents of "
                             f"{train_tl.audio_window} samples at {train_tl.sample_rate} Hz): use a multiple of "
                             f"{float(q):g} s, e.g. seconds={float(ok):g}") from None
        raise SystemExit(f"sora-sample: {msg.replace('timeline.seconds=', 'seconds=', 1)}") from None
    cfg.model.timeline = cfg.timeline
    cfg.model.video_vae_ckpt = cfg.model.audio_vae_ckpt = None  # the weights come from this checkpoint
    dit_log = logging.getLogger("sora.training.dit")
    level, dit_log.level = dit_log.level, logging.ERROR  # no "randomly initialised" warnings: loaded below
    try:
        module = instantiate(cfg.model)
    finally:
        dit_log.setLevel(level)
    state = dict(ckpt["state_dict"])
    ema = (ckpt.get("callbacks") or {}).get("EMA") or {}
    if use_ema and ema.get("shadow"):
        state.update(ema["shadow"])
    module.load_state_dict(state)
    return module.to(device).eval(), cfg, timeline


def default_size(cfg) -> list[int]:
    train = cfg.data.train
    if train.get("size"):
        return list(train.size)
    if train.get("world"):
        return [train.world.height, train.world.width]
    raise SystemExit("sora-sample: the checkpoint's data config has no fixed frame size; give size=[H,W]")


def seconds_quantum(timeline) -> Fraction:
    """The shortest clip the timeline allows; every valid ``seconds`` is a multiple of it."""
    a = Fraction(timeline.vae_time_stride) / timeline.fps_q
    b = Fraction(timeline.audio_window, timeline.sample_rate)
    return Fraction(math.lcm(a.numerator, b.numerator), math.gcd(a.denominator, b.denominator))


def fit_seconds(timeline, duration: float, what: str) -> float:
    """``duration`` rounded down to a valid clip length (SystemExit if shorter than the shortest)."""
    q = seconds_quantum(timeline)
    k = math.floor(Fraction(duration).limit_denominator(10**6) / q + Fraction(1, 10**6))
    if k < 1:
        raise SystemExit(f"sora-sample: {what} lasts {duration:.3f} s, shorter than the shortest clip this "
                         f"checkpoint's timeline allows (seconds={float(q):g})")
    return float(k * q)


def read_video_condition(path: str, timeline, size) -> np.ndarray:
    """uint8 [num_frames, H, W, 3]: `path` at the timeline's fps, covering ``size`` and centre-cropped,
    cut to the timeline's length; a short clip repeats its last frame."""
    from sora.media import MediaError, probe_av, read_av

    h, w = (int(x) for x in size)
    try:
        info = probe_av(path)
        scale = max(h / info.height, w / info.width)
        cover = (max(h, math.ceil(info.height * scale - 1e-6)), max(w, math.ceil(info.width * scale - 1e-6)))
        clip = read_av(path, duration=timeline.read_duration, fps=float(timeline.fps_q), size=cover,
                       sample_rate=timeline.sample_rate)
    except MediaError as e:
        raise SystemExit(f"sora-sample: video={e}") from None
    if not len(clip.frames):
        raise SystemExit(f"sora-sample: video={path}: no decodable frames")
    frames = clip.frames[:timeline.num_frames]
    if len(frames) < timeline.num_frames:
        log.info("video=%s: %d of %d frames, the last one repeated", path, len(frames), timeline.num_frames)
        frames = np.concatenate([frames, np.repeat(frames[-1:], timeline.num_frames - len(frames), 0)])
    y, x = (cover[0] - h) // 2, (cover[1] - w) // 2
    return np.ascontiguousarray(frames[:, y:y + h, x:x + w])


def output_paths(out: str | None, n: int, batch: bool) -> list[Path]:
    """The mp4 path(s): ``out`` as is for one sample; a folder or a printf pattern for a batch."""
    if not batch:
        return [Path(out or "outputs/samples/sample.mp4")]
    out = out or "outputs/samples"
    if "%" in out:
        try:
            paths = [Path(out % i) for i in range(n)]
        except (TypeError, ValueError):
            raise SystemExit(f"sora-sample: out={out}: a pattern needs one integer field, e.g. out=clips/%03d.mp4") \
                from None
        if len(set(paths)) < n:
            raise SystemExit(f"sora-sample: out={out}: the pattern gives the same name to several prompts")
        return paths
    if out.endswith(".mp4"):
        raise SystemExit(f"sora-sample: with prompts=, out= is a folder or a pattern (out=samples or "
                         f"out=clips/%03d.mp4), not the single file {out}")
    return [Path(out) / f"{i:03d}.mp4" for i in range(n)]


def read_prompts(path: str) -> list[str]:
    try:
        text = Path(path).read_text(encoding="utf-8")
    except (OSError, UnicodeDecodeError) as e:
        raise SystemExit(f"sora-sample: prompts={path}: cannot read ({e.strerror or e})") from None
    prompts = [line.strip() for line in text.splitlines() if line.strip()]
    if not prompts:
        raise SystemExit(f"sora-sample: prompts={path}: no prompt in the file (one per line)")
    return prompts


def sample(cfg: DictConfig) -> list[Path]:
    """The whole command on a composed ``sample`` config; returns the mp4s written. Errors are
    one-line ``SystemExit("sora-sample: ...")``."""
    import torch
    from hydra.utils import instantiate

    from sora.media import MediaError, read_audio, write_av
    from sora.training.sampling import generate

    if Path(cfg.ckpt).is_dir():
        raise SystemExit(f"sora-sample: ckpt={cfg.ckpt} is a sharded checkpoint folder (DeepSpeed / FSDP2): export it "
                         f"first: python tools/export_checkpoint.py {cfg.ckpt} model.safetensors")
    if not Path(cfg.ckpt).is_file():
        raise SystemExit(f"sora-sample: no checkpoint at {cfg.ckpt}")
    if cfg.video is not None and cfg.audio is not None:
        raise SystemExit("sora-sample: give video= (generate its sound) or audio= (generate its picture), not both")
    for key in ("video", "audio", "prompts"):
        if cfg[key] is not None and not Path(str(cfg[key])).is_file():
            raise SystemExit(f"sora-sample: {key}={cfg[key]}: no such file")
    if cfg.prompts is not None and cfg.prompt:
        raise SystemExit("sora-sample: give prompt= or prompts= (a file, one prompt per line), not both")
    prompts = read_prompts(cfg.prompts) if cfg.prompts is not None else [str(cfg.prompt)]
    paths = output_paths(cfg.out, len(prompts), cfg.prompts is not None)
    device = ("cuda" if torch.cuda.is_available() else "cpu") if cfg.device == "auto" else cfg.device
    t0 = time.perf_counter()
    ckpt = read_checkpoint(cfg.ckpt)
    seconds, cond_audio = cfg.seconds, None
    if cfg.audio is not None:
        try:
            cond_audio, _ = read_audio(str(cfg.audio), sample_rate=int(ckpt["sora_config"]["timeline"].get(
                "sample_rate", 16000)), channels=1)
        except MediaError as e:
            raise SystemExit(f"sora-sample: audio={e}") from None
    if seconds is None and (cfg.video is not None or cfg.audio is not None):
        train_tl = instantiate(OmegaConf.create(ckpt["sora_config"]).timeline)
        if cfg.video is not None:
            from sora.media import probe_av
            try:
                duration = probe_av(str(cfg.video)).duration
            except MediaError as e:
                raise SystemExit(f"sora-sample: video={e}") from None
            seconds = fit_seconds(train_tl, duration, f"video={cfg.video}")
        else:
            seconds = fit_seconds(train_tl, cond_audio.shape[-1] / train_tl.sample_rate, f"audio={cfg.audio}")
    module, run_cfg, timeline = load_module(cfg.ckpt, seconds, cfg.use_ema, device, ckpt=ckpt)
    del ckpt
    size = list(cfg.size) if cfg.size is not None else default_size(run_cfg)
    cond_video = read_video_condition(str(cfg.video), timeline, size) if cfg.video is not None else None
    if cond_audio is not None:
        n = timeline.num_samples
        cond_audio = np.pad(cond_audio[:, :n], ((0, 0), (0, max(0, n - cond_audio.shape[-1]))))
    task = "v2a" if cond_video is not None else "a2v" if cond_audio is not None else "t2av"
    for i, (prompt, out) in enumerate(zip(prompts, paths)):
        t1 = time.perf_counter()
        try:
            frames, audio, _ = generate(module, timeline, prompt, cfg.negative_prompt, size, cfg.steps, cfg.guidance,
                                        cfg.sampler, cfg.shift, cfg.seed + i, cfg.audio_decoder, video=cond_video,
                                        audio=cond_audio)
        except ValueError as e:
            raise SystemExit(f"sora-sample: {e}") from None
        out.parent.mkdir(parents=True, exist_ok=True)
        write_av(out, frames, audio, fps=float(timeline.fps_q), sample_rate=timeline.sample_rate)
        print(f"sora-sample: wrote {out} ({task}: {len(frames)} frames {frames.shape[1]}x{frames.shape[2]} "
              f"at {timeline.fps:g} fps, "
              f"{audio.shape[-1] / timeline.sample_rate:.2f} s of sound) in {time.perf_counter() - t1:.1f} s; "
              f"prompt {prompt!r}, {cfg.steps} {cfg.sampler} steps, guidance {cfg.guidance}, seed {cfg.seed + i}")
    if len(paths) > 1:
        print(f"sora-sample: {len(paths)} samples in {time.perf_counter() - t0:.1f} s")
    return paths


@hydra.main(config_path=CONFIGS, config_name="sample", version_base="1.3")
def hydra_main(cfg: DictConfig) -> None:
    sample(cfg)


def main() -> None:
    sys.argv[1:] = check_overrides(sys.argv[1:], config="sample", prog="sora-sample")
    hydra_main()


if __name__ == "__main__":
    main()
