"""`sora-eval`: score a checkpoint (or any folder of mp4s) against held-out clips, offline.

    sora-eval ckpt=RUN/checkpoints/last.ckpt data='HELDOUT/shard-*.tar' out=eval num_samples=16
    sora-eval ckpt=RUN/checkpoints data=... out=eval     # each checkpoint: a table and plots over steps
    sora-eval samples=DIR data=... out=eval              # mp4s made by anything, no checkpoint

References are the first ``num_samples`` clips of ``data`` (fixed windows given ``seed``,
centre crops at the evaluated size); the next ``num_samples`` clips are the "real held-out"
baseline (the floor of every metric), and those clips with their sound swapped between clips
are the "shuffled pairs" baseline (sync should break). A DiT checkpoint samples one clip per
reference caption (seed + i; ``task=v2a`` / ``a2v`` give it the reference's video / audio),
then :func:`sora.evaluation.evaluator.clip_metrics` scores them; its fixed-timestep flow loss
per modality on the references is reported too. An autoencoder checkpoint gets reconstruction
metrics (PSNR/SSIM or mel distance/SI-SDR) and the distances of its reconstructions.
Everything lands in ``out/metrics.json`` (numbers + protocol) and ``out/report.md``.
"""

from __future__ import annotations

import json
import logging
import dataclasses
import sys
import time
from pathlib import Path

import hydra
import numpy as np
from omegaconf import DictConfig, OmegaConf

from sora.cli import overrides
from sora.cli.overrides import check_overrides

log = logging.getLogger("sora.eval")
CONFIGS = str(Path(overrides.CONFIGS) / "eval")  # its own root: `data=` is a key
KINDS = {"DiTModule": "dit", "VideoVAEModule": "video_vae", "AudioVAEModule": "audio_vae"}


def checkpoint_kind(ckpt: dict, path) -> str:
    target = str(((ckpt.get("sora_config") or {}).get("model") or {}).get("_target_", "")) if isinstance(ckpt, dict) \
        else ""
    kind = KINDS.get(target.rsplit(".", 1)[-1])
    if kind is None:
        raise SystemExit(f"sora-eval: {path} is not a checkpoint of a sora-train run (no DiT/VAE model config)")
    return kind


def load_checkpoint(path) -> dict:
    """Any checkpoint a run wrote (file, DeepSpeed / FSDP2 folder, ``.safetensors`` export): one reader for all."""
    from sora.cli.checkpoints import read_checkpoint

    return read_checkpoint(path, "sora-eval")


def load_autoencoder(ckpt: dict, use_ema: bool, device):
    """A video / audio VAE stage module rebuilt from its checkpoint's config and weights."""
    from hydra.utils import instantiate

    from sora.checkpoints.export import model_weights

    cfg = OmegaConf.create(ckpt["sora_config"])
    if "perceptual_weights" in cfg.model:
        cfg.model.perceptual_weights = None  # a training-only loss; its file may not be here
    module = instantiate(cfg.model)
    module.load_state_dict(model_weights(ckpt, use_ema), strict=False)
    return module.to(device).eval(), cfg


def list_checkpoints(folder: Path) -> list[tuple[int, Path, dict]]:
    """(global_step, path, checkpoint) of every ``*.ckpt`` in ``folder``, by step; one per step."""
    found = {}
    for path in sorted(folder.glob("*.ckpt")):
        ckpt = load_checkpoint(path)
        step = int(ckpt.get("global_step", -1))
        if step not in found or path.name != "last.ckpt":
            found[step] = (step, path, ckpt)
    if not found:
        raise SystemExit(f"sora-eval: ckpt={folder}: no *.ckpt files in the folder")
    return [found[s] for s in sorted(found)]


def protocol(cfg: DictConfig, timeline, size, extractors):
    """The evaluation protocol of this command's config (:class:`sora.evaluation.protocol.Evaluation`)."""
    from sora.evaluation.protocol import Evaluation

    return Evaluation(cfg.data, timeline, size, extractors, num_samples=int(cfg.num_samples), seed=int(cfg.seed),
                      cache_dir=cfg.cache_dir)


def generate_clips(pipe, refs, cfg: DictConfig, out: Path) -> list:
    """One DiT sample per reference (its caption; its video or audio for v2a / a2v), as mp4s too."""
    from tqdm import tqdm

    from sora.evaluation.evaluator import Clip

    if cfg.task not in ("t2av", "v2a", "a2v"):
        raise SystemExit(f"sora-eval: task={cfg.task}: choose t2av, v2a or a2v")
    clips = []
    for i, ref in enumerate(tqdm(refs, desc=f"sampling ({cfg.task})", unit="clip")):
        clip = pipe.generate(ref.caption, steps=cfg.steps, guidance=cfg.guidance, sampler=cfg.sampler,
                             shift=float(cfg.shift), seed=int(cfg.seed) + i, size=ref.frames.shape[1:3],
                             video=ref.frames if cfg.task == "v2a" else None,
                             audio=ref.audio[None] if cfg.task == "a2v" else None)
        clip.audio = np.asarray(clip.audio, np.float32).reshape(1, -1)
        clip.write(out / "samples" / f"{i:03d}.mp4")
        clips.append(Clip(clip.frames, clip.audio[0], ref.caption, f"{i:03d}"))
    return clips


def evaluate_dit(ckpt: dict, cfg: DictConfig, extractors, device, out: Path, evaluation=None):
    import torch

    from sora.evaluation.evaluator import clip_batches
    from sora.inference import AVPipeline

    pipe = AVPipeline.from_checkpoint(ckpt, cfg.seconds, cfg.use_ema, device, size=cfg.size)
    module, timeline, size = pipe.module, pipe.timeline, list(pipe.frame_size())
    evaluation = evaluation or protocol(cfg, timeline, size, extractors)
    t0 = time.perf_counter()
    clips = generate_clips(pipe, evaluation.refs, cfg, out)
    metrics = {"sampling_seconds": time.perf_counter() - t0, **evaluation.score(clips)}
    batches = clip_batches(evaluation.refs, evaluation.fps, evaluation.sr, int(cfg.batch_size))
    with torch.no_grad():
        losses = [module.fixed_timestep_losses(dataclasses.replace(b, video=b.video.to(device),
                                                                   audio=b.audio.to(device)), i)
                  for i, b in enumerate(batches)]
    for key in ("loss", "loss_video", "loss_audio"):  # a mean over clips
        metrics[f"val/{key}"] = float(sum(float(x[key]) * len(b) for x, b in zip(losses, batches))
                                      / len(evaluation.refs))
    return metrics, evaluation, clips


def evaluate_autoencoder(kind: str, ckpt: dict, cfg: DictConfig, extractors, device, out: Path, evaluation=None):
    """Reconstruct the references: PSNR/SSIM (video) or mel distance/SI-SDR (audio), and the
    distances of the reconstructions (the other modality kept from the reference)."""
    import torch
    from hydra.utils import instantiate

    from sora.evaluation.evaluator import Clip
    from sora.evaluation.recon import mel_distance, psnr, si_sdr, ssim, trivial_psnr
    from sora.inference.pipeline import from_uint8, to_uint8

    module, run_cfg = load_autoencoder(ckpt, cfg.use_ema, device)
    timeline = instantiate(run_cfg.timeline if cfg.seconds is None else
                           OmegaConf.merge(run_cfg.timeline, {"seconds": float(cfg.seconds)}))
    train = run_cfg.data.train
    size = list(cfg.size) if cfg.size is not None else list(train.get("size") or [train.world.height,
                                                                                  train.world.width])
    evaluation = evaluation or protocol(cfg, timeline, size, extractors)  # one reference set per folder
    clips, values = [], {}
    mean_frame = torch.stack([from_uint8(r.frames) for r in evaluation.refs]).mean(dim=(0, 2))
    with torch.no_grad():
        for ref in evaluation.refs:
            if kind == "video_vae":
                x = from_uint8(ref.frames)[None].to(device)
                recon = module.vae(x, sample=False, chunk=module.chunk)[0].clamp(-1, 1)
                values.setdefault("recon/psnr", []).append(float(psnr(recon, x)[0]))
                for name, value in trivial_psnr(x.cpu(), mean_frame).items():  # what PSNR must beat
                    values.setdefault(f"recon/psnr_{name}", []).append(float(value[0]))
                values.setdefault("recon/ssim", []).append(float(ssim(recon, x)[0]))
                clips.append(Clip(to_uint8(recon[0]), ref.audio, ref.caption, ref.key, ref.has_audio))
            else:
                wave = torch.from_numpy(ref.audio)[None].to(device)
                mel = module.vae.mel(wave)
                recon = module.vae.decode_audio(module.vae.encode(mel).mode(), module.vocoder)
                recon = recon.reshape(1, -1)[:, : wave.shape[-1]].float()
                recon = torch.nn.functional.pad(recon, (0, wave.shape[-1] - recon.shape[-1]))
                values.setdefault("recon/mel_distance", []).append(float(mel_distance(recon, wave, evaluation.sr)[0]))
                values.setdefault("recon/si_sdr_db", []).append(float(si_sdr(recon, wave)[0]))
                clips.append(Clip(ref.frames, recon[0].cpu().numpy(), ref.caption, ref.key, ref.has_audio))
    metrics = {k: float(np.mean(v)) for k, v in values.items()}
    metrics.update(evaluation.score(clips))
    return metrics, evaluation, clips


def evaluate_samples(cfg: DictConfig, extractors):
    from hydra.utils import instantiate

    from sora.evaluation.evaluator import read_clip
    from sora.media import MediaError, probe_av

    folder = Path(str(cfg.samples))
    paths = sorted(p for p in folder.glob("*") if p.suffix.lower() in (".mp4", ".mov", ".mkv", ".webm", ".avi"))
    if not paths:
        raise SystemExit(f"sora-eval: samples={folder}: no video files in the folder")
    paths = paths[: int(cfg.num_samples)]
    timeline = instantiate(cfg.timeline if cfg.seconds is None else
                           OmegaConf.merge(cfg.timeline, {"seconds": float(cfg.seconds)}))
    try:
        size = list(cfg.size) if cfg.size is not None else [probe_av(str(paths[0])).height,
                                                            probe_av(str(paths[0])).width]
        clips = [read_clip(p, timeline, size) for p in paths]
    except (MediaError, ValueError) as e:
        raise SystemExit(f"sora-eval: samples: {e}") from None
    evaluation = protocol(cfg, timeline, size, extractors)
    return evaluation.score(clips), evaluation, clips


def run(cfg: DictConfig) -> dict:
    """The whole command; returns what metrics.json holds."""
    import torch

    from sora.checkpoints.export import is_checkpoint
    from sora.evaluation.eval_report import write_eval_report
    from sora.evaluation.evaluator import Extractors

    if (cfg.ckpt is None) == (cfg.samples is None):
        raise SystemExit("sora-eval: give ckpt=PATH (a checkpoint or a folder of them) or samples=DIR, one of them")
    device = ("cuda" if torch.cuda.is_available() else "cpu") if cfg.device == "auto" else cfg.device
    out = Path(str(cfg.out))
    out.mkdir(parents=True, exist_ok=True)
    t0 = time.perf_counter()
    try:
        extractors = Extractors(cfg.i3d_weights, cfg.audio_embedding, cfg.audio_weights, device, int(cfg.batch_size))
    except (FileNotFoundError, ValueError) as e:
        raise SystemExit(f"sora-eval: {' '.join(str(e).split())}") from None
    result = {"command": "sora-eval " + " ".join(_overrides()), "what": None}
    if cfg.samples is not None:
        metrics, evaluation, clips = evaluate_samples(cfg, extractors)
        result.update(what=f"samples={cfg.samples}", metrics=metrics)
    elif Path(str(cfg.ckpt)).is_dir() and not is_checkpoint(cfg.ckpt):  # a folder of checkpoints
        rows, evaluation, clips = [], None, None
        for step, path, ckpt in list_checkpoints(Path(str(cfg.ckpt))):
            log.info("checkpoint %s (step %d)", path, step)
            kind = checkpoint_kind(ckpt, path)
            sub = out / f"step_{step:07d}"
            if kind == "dit":
                metrics, evaluation, clips = evaluate_dit(ckpt, cfg, extractors, device, sub, evaluation)
            else:
                metrics, evaluation, clips = evaluate_autoencoder(kind, ckpt, cfg, extractors, device, sub, evaluation)
            rows.append({"step": step, "checkpoint": str(path), "kind": kind, "metrics": metrics})
        result.update(what=f"checkpoints in {cfg.ckpt}", checkpoints=rows, metrics=rows[-1]["metrics"])
    else:
        if not Path(str(cfg.ckpt)).exists():
            raise SystemExit(f"sora-eval: ckpt={cfg.ckpt}: no such file or folder")
        ckpt = load_checkpoint(cfg.ckpt)
        kind = checkpoint_kind(ckpt, cfg.ckpt)
        if kind == "dit":
            metrics, evaluation, clips = evaluate_dit(ckpt, cfg, extractors, device, out)
        else:
            metrics, evaluation, clips = evaluate_autoencoder(kind, ckpt, cfg, extractors, device, out)
        result.update(what=f"{kind} checkpoint {cfg.ckpt} (step {ckpt.get('global_step')})", metrics=metrics)
    result["baselines"] = evaluation.baselines()
    result["protocol"] = {**evaluation.protocol, "task": cfg.task if cfg.samples is None else None,
                          "sampler": {"name": cfg.sampler, "steps": cfg.steps, "guidance": cfg.guidance,
                                      "shift": cfg.shift, "use_ema": cfg.use_ema}}
    result["seconds"] = time.perf_counter() - t0
    (out / "metrics.json").write_text(json.dumps(result, indent=2, default=_json))
    write_eval_report(out, result, clips, evaluation.refs)
    _print_summary(result, out)
    return result


def _json(value):
    if isinstance(value, (np.floating, np.integer)):
        return value.item()
    raise TypeError(f"not JSON serializable: {type(value).__name__}")


def _overrides() -> list[str]:
    from hydra.core.hydra_config import HydraConfig

    try:
        return list(HydraConfig.get().overrides.task)
    except ValueError:  # not under Hydra (tests call run() directly)
        return []


def _print_summary(result: dict, out: Path) -> None:
    from sora.evaluation.report import fmt

    metrics, real = result["metrics"], result["baselines"]["real"]
    keys = [k for k in ("fvd", "kvd", "fd_mel", "recon/psnr", "recon/psnr_still", "recon/psnr_mean_frame",
                        "recon/ssim", "recon/mel_distance", "recon/si_sdr_db", "val/loss", "sync/offset_abs_ms_mean",
                        "sync/within_frame", "physics/clips_tracked", "physics/clips_in_sync",
                        "physics/gravity_rel_error") if k in metrics]
    summary = ", ".join(f"{k} {fmt(metrics[k])}" + (f" (real {fmt(real[k])})" if k in real else "") for k in keys)
    print(f"sora-eval: {result['what']}: {summary}")
    print(f"sora-eval: wrote {out / 'metrics.json'} and {out / 'report.md'} in {result['seconds']:.1f} s")


@hydra.main(config_path=CONFIGS, config_name="eval", version_base="1.3")
def hydra_main(cfg: DictConfig) -> None:
    from sora.evaluation.evaluator import DataError
    from sora.inference import PipelineError

    try:
        run(cfg)
    except (DataError, PipelineError) as e:
        raise SystemExit(f"sora-eval: {e}") from None


def main() -> None:
    sys.argv[1:] = check_overrides(sys.argv[1:], config="eval", prog="sora-eval", configs=CONFIGS)
    hydra_main()


if __name__ == "__main__":
    main()
