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
- ``video=IN.mp4`` with an edit (the input's picture and its own sound; the README's "Edits"):
  ``extend=S`` continues it by S seconds (the last ``seconds - S`` of the input are the clean context,
  ``seconds`` defaulting to the training length; the mp4 is the input followed by the new part),
  ``retake=[t0,t1]`` regenerates that window (``retake_video`` / ``retake_audio`` false: that stream
  kept), ``remix="new prompt" strength=0.6`` re-noises the clip to that level and samples it back
  (``remix_video`` / ``remix_audio``). Kept latent tokens are bit-equal to the input's encoding.
- ``script=FILE``: a timed multi-shot script (:mod:`sora.script`; ``0-2s: a red ball bounces`` a line, or
  YAML/JSON, an optional ``global:`` caption and ``| sound: ...`` per shot): the clip lasts the script,
  each shot's caption conditions the picture and sound of its seconds only.
- ``prompts=FILE``: one prompt per (non-blank) line, seed ``seed + i`` for line ``i``; ``out``
  is then a folder (``out=DIR`` -> DIR/000.mp4, DIR/001.mp4, ...) or a pattern with a
  printf field (``out=clips/ball-%03d.mp4``); default ``outputs/samples/``.
"""

from __future__ import annotations

import logging
import sys
import time
from pathlib import Path

import hydra
from omegaconf import DictConfig

from sora.cli.overrides import CONFIGS, check_overrides

log = logging.getLogger("sora.sample")


def read_checkpoint(ckpt_path: str) -> dict:
    """The checkpoint dict of a DiT run: any checkpoint sora-train writes (a ``.ckpt`` file, a DeepSpeed / FSDP2
    folder) or a ``.safetensors`` export; one-line SystemExit for anything else."""
    from sora.cli.checkpoints import read_checkpoint as read

    ckpt = read(ckpt_path, "sora-sample")
    model = (ckpt.get("sora_config") or {}).get("model") if isinstance(ckpt, dict) else None
    if not isinstance(model, dict) or not str(model.get("_target_", "")).endswith("DiTModule"):
        raise SystemExit(f"sora-sample: {ckpt_path} is not a checkpoint of a DiT run (sora-train model=dit)")
    return ckpt


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

    from sora.inference import AVPipeline, PipelineError
    from sora.inference.pipeline import run_timeline
    from sora.media import MediaError, probe_av, read_audio
    from sora.timeline import TimelineError

    if not Path(cfg.ckpt).exists():
        raise SystemExit(f"sora-sample: no checkpoint at {cfg.ckpt}")
    if cfg.video is not None and cfg.audio is not None:
        raise SystemExit("sora-sample: give video= (generate its sound) or audio= (generate its picture), not both")
    for key in ("video", "audio", "prompts"):
        if cfg[key] is not None and not Path(str(cfg[key])).is_file():
            raise SystemExit(f"sora-sample: {key}={cfg[key]}: no such file")
    if cfg.prompts is not None and cfg.prompt:
        raise SystemExit("sora-sample: give prompt= or prompts= (a file, one prompt per line), not both")
    if cfg.get("script") is not None:
        if cfg.prompt or cfg.prompts is not None or cfg.video is not None or cfg.audio is not None:
            raise SystemExit("sora-sample: script= holds the captions: give it without prompt=, prompts=, video=, audio=")
        return [scripted(cfg)]
    edits = [k for k in ("extend", "retake", "remix") if cfg.get(k) is not None]
    if edits and (cfg.video is None or len(edits) > 1 or cfg.prompts is not None):
        raise SystemExit(f"sora-sample: {'/'.join(edits)}= edits a clip: give video=IN.mp4, one edit at a time, "
                         "and prompt= (not prompts=)")
    if edits:
        return [edit(cfg, edits[0])]
    prompts = read_prompts(cfg.prompts) if cfg.prompts is not None else [str(cfg.prompt)]
    paths = output_paths(cfg.out, len(prompts), cfg.prompts is not None)
    device = ("cuda" if torch.cuda.is_available() else "cpu") if cfg.device == "auto" else cfg.device
    t0 = time.perf_counter()
    ckpt = read_checkpoint(cfg.ckpt)
    seconds, given = cfg.seconds, cfg.video if cfg.video is not None else cfg.audio
    try:
        if seconds is None and given is not None:  # the input's duration, rounded down to a valid length
            trained = run_timeline(ckpt["sora_config"])
            if cfg.video is not None:
                seconds = trained.fit_seconds(probe_av(str(given)).duration, f"video={given}")
            else:
                sound, _ = read_audio(str(given), sample_rate=trained.sample_rate, channels=1)
                seconds = trained.fit_seconds(sound.shape[-1] / trained.sample_rate, f"audio={given}")
        pipe = AVPipeline.from_checkpoint(ckpt, seconds, cfg.use_ema, device, size=cfg.size)
        del ckpt
        cond_video = pipe.load_video(cfg.video) if cfg.video is not None else None
        cond_audio = pipe.load_audio(cfg.audio) if cfg.audio is not None else None
        for i, (prompt, out) in enumerate(zip(prompts, paths)):
            t1 = time.perf_counter()
            clip = pipe.generate(prompt, cfg.negative_prompt, steps=cfg.steps, guidance=cfg.guidance,
                                 sampler=cfg.sampler, shift=cfg.shift, seed=cfg.seed + i,
                                 audio_decoder=cfg.audio_decoder, video=cond_video, audio=cond_audio)
            clip.write(out)
            frames, tl = clip.frames, pipe.timeline
            print(f"sora-sample: wrote {out} ({clip.task}: {len(frames)} frames {frames.shape[1]}x{frames.shape[2]} "
                  f"at {tl.fps:g} fps, {clip.audio.shape[-1] / tl.sample_rate:.2f} s of sound) in "
                  f"{time.perf_counter() - t1:.1f} s; prompt {prompt!r}, {cfg.steps} {cfg.sampler} steps, "
                  f"guidance {cfg.guidance}, seed {cfg.seed + i}")
    except (PipelineError, TimelineError) as e:
        raise SystemExit(f"sora-sample: {e}") from None
    except MediaError as e:
        raise SystemExit(f"sora-sample: {'video' if cfg.video is not None else 'audio'}={e}") from None
    if len(paths) > 1:
        print(f"sora-sample: {len(paths)} samples in {time.perf_counter() - t0:.1f} s")
    return paths


def scripted(cfg: DictConfig) -> Path:
    """``sora-sample script=FILE``: one clip as long as the script, each shot's caption on its seconds."""
    import torch

    from sora.inference import AVPipeline, PipelineError
    from sora.inference.pipeline import run_timeline
    from sora.script import ScriptError, read_script

    device = ("cuda" if torch.cuda.is_available() else "cpu") if cfg.device == "auto" else cfg.device
    ckpt = read_checkpoint(cfg.ckpt)
    out = output_paths(cfg.out, 1, False)[0]
    t0 = time.perf_counter()
    try:
        script = read_script(cfg.script, run_timeline(ckpt["sora_config"]))
        pipe = AVPipeline.from_checkpoint(ckpt, script.seconds, cfg.use_ema, device, size=cfg.size)
        clip = pipe.generate(script, cfg.negative_prompt, steps=cfg.steps, guidance=cfg.guidance, sampler=cfg.sampler,
                             shift=cfg.shift, seed=cfg.seed, audio_decoder=cfg.audio_decoder)
    except (PipelineError, ScriptError) as e:
        raise SystemExit(f"sora-sample: {e}") from None
    clip.write(out)
    cuts = ", ".join(f"{c:g}" for c in script.cuts) or "none"
    print(f"sora-sample: wrote {out} (script: {len(script.shots)} shots, cuts at {cuts} s; {len(clip.frames)} frames) "
          f"in {time.perf_counter() - t0:.1f} s")
    return out


def edit(cfg: DictConfig, kind: str) -> Path:
    """``sora-sample video=IN.mp4`` with ``extend=`` / ``retake=`` / ``remix=``; the mp4 written."""
    import numpy as np
    import torch

    from sora.inference import AVPipeline, PipelineError
    from sora.inference.pipeline import run_timeline
    from sora.media import MediaError, probe_av
    from sora.timeline import TimelineError

    device = ("cuda" if torch.cuda.is_available() else "cpu") if cfg.device == "auto" else cfg.device
    ckpt = read_checkpoint(cfg.ckpt)
    out = output_paths(cfg.out, 1, False)[0]
    opts = dict(negative_prompt=cfg.negative_prompt, steps=cfg.steps, guidance=cfg.guidance, sampler=cfg.sampler,
                shift=cfg.shift, seed=cfg.seed, audio_decoder=cfg.audio_decoder)
    t0 = time.perf_counter()
    try:
        trained = run_timeline(ckpt["sora_config"])
        have = trained.fit_seconds(probe_av(str(cfg.video)).duration, f"video={cfg.video}")
        if kind == "extend":
            window = float(cfg.seconds or trained.seconds)
            context = min(window - float(cfg.extend), have)
            if context <= 0:
                raise PipelineError(f"extend={cfg.extend}: longer than the window seconds={window:g}; give a "
                                    "larger seconds= (context + extension)")
            pipe = AVPipeline.from_checkpoint(ckpt, context + float(cfg.extend), cfg.use_ema, device, size=cfg.size)
            start = have - context  # the context is the end of the input
            clip = pipe.extend(cfg.prompt, pipe.load_video(cfg.video, start=start, seconds=context),
                               pipe.load_audio(cfg.video, start=start, seconds=context), float(cfg.extend), **opts)
            if start > 0:  # the input before the context, as read
                before = pipe.load_video(cfg.video, start=0.0, seconds=start)[:-1]
                clip.frames = np.concatenate([before, clip.frames])
                clip.audio = np.concatenate([pipe.load_audio(cfg.video, seconds=start), clip.audio], axis=1)
        else:
            pipe = AVPipeline.from_checkpoint(ckpt, cfg.seconds or have, cfg.use_ema, device, size=cfg.size)
            frames, sound = pipe.load_video(cfg.video), pipe.load_audio(cfg.video)
            if kind == "retake":
                window = list(cfg.retake)
                streams = [m for m in ("video", "audio") if cfg[f"retake_{m}"]]
                if len(window) != 2:
                    raise PipelineError(f"retake={window}: give [start, end] in seconds")
                clip = pipe.retake(cfg.prompt, frames, sound, float(window[0]), float(window[1]), streams, **opts)
            else:
                streams = [m for m in ("video", "audio") if cfg[f"remix_{m}"]]
                clip = pipe.remix(str(cfg.remix), frames, sound, float(cfg.strength), streams, **opts)
    except (PipelineError, TimelineError) as e:
        raise SystemExit(f"sora-sample: {e}") from None
    except MediaError as e:
        raise SystemExit(f"sora-sample: video={e}") from None
    clip.write(out)
    print(f"sora-sample: wrote {out} ({kind}: {len(clip.frames)} frames, {clip.audio.shape[-1] / clip.sample_rate:.2f} s "
          f"of sound) in {time.perf_counter() - t0:.1f} s")
    return out


@hydra.main(config_path=CONFIGS, config_name="sample", version_base="1.3")
def hydra_main(cfg: DictConfig) -> None:
    sample(cfg)


def main() -> None:
    sys.argv[1:] = check_overrides(sys.argv[1:], config="sample", prog="sora-sample")
    hydra_main()


if __name__ == "__main__":
    main()
