"""`sora-demo run_dir=DIR` / `make demo`: the whole quickstart in one command.

1. data: world clips -> webdataset shards -> the streaming pipeline -> decoded batches, with a
   preview a person can check (``preview.mp4`` with sound, ``preview.png``) and the measured
   audio-video sync of the decoded clips against the world's ground-truth impact times;
2. train the video VAE, the audio VAE + vocoder, then the DiT on their checkpoints
   (``sora-train experiment=quickstart/<stage> hydra.run.dir=DIR/<stage>``, each a subprocess);
   with ``stages.dit.latents`` the DiT's clips are first encoded once (``sora-cache-latents``
   into ``DIR/latents``) and the DiT trains on them (``data=latents``);
3. sample the prompts with one ``sora-sample prompts=`` call into ``DIR/samples/000.mp4``, ...;
4. ``sora-eval`` on held-out world shards (``DIR/heldout``): the autoencoders' reconstructions
   (``DIR/eval_<name>``) and the DiT's samples (``DIR/eval``; ``task=v2a`` into ``DIR/eval_v2a``);
5. ``DIR/report.md``: the ``targets`` table (met or not, beside real and shuffled clips), loss
   plots, contact sheets (the samples; real and generated side by side), time and metrics per
   stage, and each stage's command, which is also printed as the stage starts.

``steps=N`` sets every stage's training steps (tests: ``steps=3``); ``stages.<name>.steps`` one;
``preset=long`` (``make demo-long``) and ``preset=gpu`` are ``sora/configs/preset/*.yaml``.
"""

from __future__ import annotations

import json
import logging
import os
import re
import shlex
import shutil
import subprocess
import sys
import time
from itertools import islice
from pathlib import Path

import hydra
import numpy as np
from hydra.utils import instantiate
from omegaconf import DictConfig, OmegaConf
from tqdm import tqdm

from sora.cli.overrides import CONFIGS, check_overrides
from sora.data.pipeline import ClipBatch
from sora.evaluation.report import (contact_sheet, first_last, plot_losses, read_metrics, sample_sheet, target_rows,
                                    write_report)
from sora.evaluation.sync import match_errors, onset_times
from sora.media import probe_av, write_av, write_image

log = logging.getLogger("sora.demo")


def frames_of(video) -> np.ndarray:
    """A loader's uint8 video [3, T, H, W] -> [T, H, W, 3]."""
    return video.permute(1, 2, 3, 0).numpy()


def impact_times(meta: dict, start: float) -> list[float]:
    """A world clip's audible impacts in the window cut at ``start`` (seconds); a multi-shot clip's from the scene
    each of its (windowed) shots shows, over that shot's seconds."""
    world = meta.get("world", {})
    audible = lambda scene: [i["time"] - start for i in scene.get("impacts", []) if i.get("audible", True)]  # noqa
    if "shots" not in meta or "scenes" not in world:
        return audible(world)
    return [t for r in meta["shots"] for t in audible(world["scenes"][str(r["scene"])]) if r["start"] <= t < r["end"]]


def sync_errors(batch: ClipBatch) -> np.ndarray:
    """Decoded sound onsets against the world's ground-truth impacts (seconds, signed)."""
    errors = []
    for audio, mask, start, meta in zip(batch.audio.numpy(), batch.audio_mask.numpy(), batch.start.tolist(),
                                        batch.meta):
        events = np.array(impact_times(meta, start))
        onsets = onset_times(audio, batch.sample_rate, mask=mask)
        onsets = onsets[onsets > 0.02]  # an impact before the window may ring into it
        if events.size and onsets.size:
            errors.append(-match_errors(onsets, events, max_error=0.1))
    return np.concatenate(errors) if errors else np.zeros(0)


def make_world_shards(shards: Path, clips: int, size: int, seconds: float, fps: float, sample_rate: int,
                      seed: int, shots: dict | None = None) -> None:
    """World shards for the demo; reused while the settings that made them are unchanged. ``shots``: that
    fraction of the clips multi-shot ({prob, max, cut_every, continue_prob}, sora-make-shards --world-shots)."""
    from sora.data.shards import world_jobs, write_shards
    from sora.data.world import WorldConfig

    args = ["--world", str(clips), str(shards), "--world-size", str(size), "--world-seconds", str(seconds),
            "--world-fps", str(fps), "--world-sample-rate", str(sample_rate), "--seed", str(seed)]  # as sora-make-shards
    if shots:
        shots = {k: float(v) if k != "max" else int(v) for k, v in shots.items()}
        args += ["--world-shots", str(shots["prob"]), "--world-max-shots", str(shots["max"]),
                 "--world-cut-every", str(shots["cut_every"]), "--world-continue", str(shots["continue_prob"])]
    stamp = shards / "made_with.json"
    if stamp.exists() and json.loads(stamp.read_text()) == args and sorted(shards.glob("shard-*.tar")):
        log.info("reusing world shards in %s (made with the same settings)", shards)
        return
    shards.mkdir(parents=True, exist_ok=True)
    for old in shards.glob("shard-*.tar"):
        old.unlink()
    jobs, opts = world_jobs(clips, seed, WorldConfig(width=size, height=size, fps=fps, seconds=seconds,
                                                     sample_rate=sample_rate), shots or None)
    done = write_shards(jobs, opts, shards, workers=min(4, os.cpu_count() or 1))
    if done.samples != clips:
        raise SystemExit(f"demo: making world shards in {shards}: {done.samples} of {clips} clips written "
                         f"({dict(done.skipped)})")
    stamp.write_text(json.dumps(args))


QUIET = ["trainer.enable_progress_bar=false"]  # the child's log is a file


def preview(cfg: DictConfig, out: Path) -> dict:
    """Stage 1: shards -> pipeline -> decoded batches; preview.mp4/png/json and the sync check."""
    tl = cfg.timeline
    make_world_shards(out / "shards", cfg.world.clips, cfg.world.size, cfg.world.seconds, tl.fps, tl.sample_rate,
                      cfg.seed, OmegaConf.to_container(cfg.world.shots) if cfg.world.get("shots") else None)
    datamodule = instantiate(cfg.data)
    loader = datamodule.train_dataloader()
    batches, t0 = [], time.perf_counter()
    for batch in tqdm(islice(loader, cfg.preview_batches), total=cfg.preview_batches, desc="decoding", unit="batch"):
        batches.append(batch)  # video stays uint8: written as it is
    seconds = time.perf_counter() - t0
    first = batches[0]

    clips = [frames_of(v) for b in batches for v in b.video]
    audio = np.concatenate([a.numpy() for b in batches for a in b.audio], axis=-1)
    write_av(out / "preview.mp4", np.concatenate(clips), audio, fps=first.fps, sample_rate=first.sample_rate)
    write_image(out / "preview.png", contact_sheet([frames_of(v) for v in first.video]))

    errors = np.concatenate([sync_errors(b) for b in batches])
    summary = {
        "batches": len(batches), "clips": len(clips), "seconds": round(seconds, 3),
        "video": list(first.video.shape), "audio": list(first.audio.shape),
        "fps": first.fps, "sample_rate": first.sample_rate,
        "captions": [c for b in batches for c in b.captions],
        "has_audio": [bool(h) for b in batches for h in b.has_audio],
        "sync_impacts": int(errors.size),
        "sync_error_ms_median": round(float(np.median(np.abs(errors))) * 1000, 2) if errors.size else None,
        "sync_error_ms_max": round(float(np.abs(errors).max()) * 1000, 2) if errors.size else None,
    }
    (out / "preview.json").write_text(json.dumps(summary, indent=2))
    print(f"decoded {summary['clips']} clips in {summary['batches']} batches ({seconds:.2f} s): "
          f"video {summary['video']} audio {summary['audio']} at {first.fps:g} fps / {first.sample_rate} Hz, "
          f"{sum(summary['has_audio'])}/{summary['clips']} with sound")
    print(f"audio-video sync: {summary['sync_impacts']} sound onsets vs ground-truth impacts, |error| median "
          f"{summary['sync_error_ms_median']} ms, max {summary['sync_error_ms_max']} ms "
          f"(one frame = {1000 / first.fps:.1f} ms)")
    print("captions:", *summary["captions"][:4], sep="\n  ")
    print(f"wrote {out / 'preview.mp4'}, {out / 'preview.png'}, {out / 'preview.json'}", flush=True)
    return summary


def run_logged(prog: str, module: str, args: list[str], log_path: Path) -> tuple[float, str]:
    """Print the equivalent command, run ``python -m module args`` with its output in ``log_path``."""
    command = f"{prog} {shlex.join(args)}"  # the installed command's name
    print(f"\n$ {command}", flush=True)
    log_path.parent.mkdir(parents=True, exist_ok=True)
    env = dict(os.environ, PYTHONWARNINGS=os.environ.get("PYTHONWARNINGS", "ignore"))
    t0 = time.perf_counter()
    with open(log_path, "w") as log_file:
        code = subprocess.run([sys.executable, "-m", module, *args], stdout=log_file, stderr=subprocess.STDOUT,
                              env=env).returncode
    seconds = time.perf_counter() - t0
    if code != 0:
        tail = log_path.read_text(errors="replace").strip().splitlines()[-15:]
        print(*tail, sep="\n", file=sys.stderr)
        raise SystemExit(f"sora-demo: `{command}` failed (exit {code}); its log: {log_path}")
    return seconds, command


def train_stage(cfg: DictConfig, name: str, out: Path, extra: list[str]) -> dict:
    stage = cfg.stages[name]
    steps = int(cfg.steps if cfg.steps is not None else stage.steps)
    val_every = max(1, min(int(stage.val_every), steps))
    args = [f"experiment={stage.experiment}", f"hydra.run.dir={out / name}", f"trainer.max_steps={steps}",
            f"trainer.val_check_interval={val_every}", f"callbacks.model_checkpoint.every_n_train_steps={steps}",
            *extra, *cfg.train_overrides, *stage.overrides, *QUIET]
    shutil.rmtree(out / name, ignore_errors=True)  # a fresh run: no stale last.ckpt (Lightning would write last-v1)
    seconds, command = run_logged("sora-train", "sora.cli.train", args, out / "logs" / f"{name}.log")
    return {"name": name, "steps": steps, "seconds": seconds, "command": command, "run_dir": out / name}


def cache_latents(cfg: DictConfig, out: Path, extra: list[str]) -> tuple[dict, list[str]]:
    """The DiT's clips encoded once by the frozen VAEs (``sora-cache-latents``) into ``DIR/latents``;
    returns the stage and the overrides that train the DiT on them (``data=latents``)."""
    stage, cache = cfg.stages.dit, out / "latents"
    shutil.rmtree(cache, ignore_errors=True)  # the VAEs were just retrained: never reuse old latents
    args = [str(cache), f"experiment={stage.experiment}", *extra, *cfg.train_overrides, *stage.overrides]
    seconds, command = run_logged("sora-cache-latents", "sora.cli.cache_latents", args,
                                  out / "logs" / "latents.log")
    info = json.loads((cache / "rank-000.json").read_text())
    print(f"[latents] {info['clips']} clips in {seconds:.1f} s ({info['bytes'] / 1e6:.1f} MB): video "
          f"{info['latent_shapes']['video']}, audio {info['latent_shapes']['audio']} per clip; {cache}", flush=True)
    result = {"name": "latents", "steps": f"{info['clips']} clips", "seconds": seconds, "command": command,
              "metrics": [], "plot": None}
    return result, ["data=latents", f"data.train.urls={cache / 'latents-*.tar'}"]


# (label, CSV key, window) of the numbers the report quotes per stage: start -> end
STAGE_METRICS = {
    "video_vae": [("train loss", "train/loss", 10), ("val PSNR (dB)", "val/psnr", 1), ("val L1", "val/l1", 1)],
    "audio_vae": [("train loss", "train/loss", 10), ("val mel L1", "val/mel_l1", 1),
                  ("val vocoder mel L1", "val/vocoder_mel_l1", 1)],
    "dit": [("train loss", "train/loss", 10), ("val loss", "val/loss", 1), ("val loss video", "val/loss_video", 1),
            ("val loss audio", "val/loss_audio", 1)],
}
PLOT_VAL = {"video_vae": ["val/psnr"], "audio_vae": ["val/mel_l1", "val/vocoder_mel_l1"],
            "dit": ["val/loss", "val/loss_video", "val/loss_audio"]}


def summarize_stage(stage: dict, plots: Path) -> None:
    """Adds the stage's plot and start -> end metrics from its CSV log, and prints its one-line result."""

    name = stage["name"]
    series = read_metrics(stage["run_dir"])
    stage["metrics"] = []
    for label, key, window in STAGE_METRICS.get(name, [("train loss", "train/loss", 10)]):
        ends = first_last(series, key, window)
        if ends:
            span = f"step {ends[0][0]} → {ends[1][0]}" + (f", mean of {window} logs" if window > 1 else "")
            stage["metrics"].append((f"{label} ({span})", ends[0][1], ends[1][1]))
    plots.mkdir(parents=True, exist_ok=True)
    stage["plot"] = plot_losses(series, name, plots / f"{name}.png", PLOT_VAL.get(name)) if series else None
    shown = ", ".join(f"{label.split(' (')[0]} {a:.4g} → {b:.4g}" for label, a, b in stage["metrics"][:2])
    print(f"[{name}] {stage['steps']} steps in {stage['seconds']:.1f} s: {shown or 'no metrics logged'}; "
          f"checkpoint {stage['run_dir'] / 'checkpoints' / 'last.ckpt'}", flush=True)


def evaluate(cfg: DictConfig, out: Path, name: str, ckpt: Path, task: str | None = None) -> dict:
    """sora-eval of a checkpoint on held-out world clips (other seeds than training's) -> its metrics.json.
    ``task``: the DiT's (t2av -> DIR/eval, others DIR/eval_<task>); None: an autoencoder (DIR/eval_<name>)."""
    e = cfg.eval
    make_world_shards(out / "heldout", e.clips, e.size, e.seconds, e.fps, cfg.timeline.sample_rate, cfg.seed + 1000)
    folder = out / ("eval" if task == "t2av" else f"eval_{task or name}")
    args = [f"ckpt={ckpt}", f"data={out / 'heldout'}", f"out={folder}", f"num_samples={e.num_samples}",
            f"seed={cfg.seed}", f"cache_dir={out / 'eval_cache'}", f"seconds={e.seconds}"]
    if task is not None:
        args += [f"task={task}", f"steps={e.steps}", f"guidance={e.guidance}"]
    if e.i3d_weights:
        args.append(f"i3d_weights={e.i3d_weights}")
    label = name if task in (None, "t2av") else f"{name} {task}"
    seconds, command = run_logged("sora-eval", "sora.cli.eval", args, out / "logs" / f"eval_{task or name}.log")
    result = json.loads((folder / "metrics.json").read_text())
    result.update(name=label, folder=folder, command=command, wall_seconds=seconds)
    real, m = result["baselines"]["real"], result["metrics"]
    shown = [f"{k} {m[k]:.4g} (real clips {real[k]:.4g})" for k in ("fvd", "fd_mel") if k in m and k in real]
    shown += [f"{k.split('/')[1]} {m[k]}/{m['physics/clips']} (real {real[k]}/{real['physics/clips']})"
              for k in ("physics/clips_tracked", "physics/clips_in_sync") if k in m and k in real]
    print(f"[eval {label}] {e.num_samples} clips in {seconds:.1f} s: {', '.join(shown)}; {folder / 'report.md'}",
          flush=True)
    return result


def sample_prompts(cfg: DictConfig, out: Path, ckpt: Path) -> list[dict]:
    """The prompts in one ``sora-sample prompts=FILE`` call (one start-up, seed + i for prompt i) into
    ``DIR/samples/000.mp4, 001.mp4, ...``; each sample's time from the line sora-sample prints for it."""
    folder = out / "samples"
    folder.mkdir(parents=True, exist_ok=True)
    prompt_file = folder / "prompts.txt"
    prompt_file.write_text("".join(f"{p}\n" for p in cfg.sample.prompts))
    args = [f"ckpt={ckpt}", f"prompts={prompt_file}", f"seconds={cfg.sample.seconds}", f"out={folder}",
            f"steps={cfg.sample.steps}", f"guidance={cfg.sample.guidance}", f"seed={cfg.seed}"]
    log_path = out / "logs" / "samples.log"
    seconds, command = run_logged("sora-sample", "sora.cli.sample", args, log_path)
    took = dict(re.findall(r"^sora-sample: wrote (\S+) .* in ([0-9.]+) s; prompt", log_path.read_text(), re.M))
    samples = []
    for i, prompt in enumerate(cfg.sample.prompts):
        path = folder / f"{i:03d}.mp4"
        info = probe_av(path)
        samples.append({"prompt": prompt, "path": path, "command": command, "call_seconds": seconds,
                        "seconds": float(took.get(str(path), 0)),
                        "duration": info.duration, "audio_duration": info.audio_duration})
        print(f"[sample {i}] {path}: {info.num_frames} frames {info.width}x{info.height}, video "
              f"{info.duration:.2f} s, audio {info.audio_duration:.2f} s ({samples[-1]['seconds']:.1f} s); {prompt!r}",
              flush=True)
    print(f"[samples] {len(samples)} in {seconds:.1f} s (one sora-sample call)", flush=True)
    return samples


@hydra.main(config_path=CONFIGS, config_name="demo", version_base="1.3")
def hydra_main(cfg: DictConfig) -> None:

    instantiate(cfg.timeline)  # a bad timing config fails here, before any work
    out = Path(cfg.run_dir)
    out.mkdir(parents=True, exist_ok=True)
    t_start = time.perf_counter()
    print(f"== 1/5 data: world shards -> pipeline -> preview ({out})", flush=True)
    summary = preview(cfg, out)
    print(f"[data] {summary['clips']} clips, sync |error| max {summary['sync_error_ms_max']} ms "
          f"({time.perf_counter() - t_start:.1f} s)", flush=True)

    print("\n== 2/5 training: video VAE, audio VAE + vocoder, DiT", flush=True)
    stages = []
    for name in ("video_vae", "audio_vae", "dit"):
        extra = []
        if name == "dit":
            extra = [f"model.video_vae_ckpt={out / 'video_vae' / 'checkpoints' / 'last.ckpt'}",
                     f"model.audio_vae_ckpt={out / 'audio_vae' / 'checkpoints' / 'last.ckpt'}"]
            if cfg.stages.dit.get("latents"):
                stage, data = cache_latents(cfg, out, extra)
                stages.append(stage)
                extra += data
        stages.append(train_stage(cfg, name, out, extra))
        summarize_stage(stages[-1], out / "plots")

    print("\n== 3/5 sampling", flush=True)
    dit = out / "dit" / "checkpoints" / "last.ckpt"
    samples = sample_prompts(cfg, out, dit)

    print("\n== 4/5 evaluation", flush=True)
    evaluations = [evaluate(cfg, out, name, out / name / "checkpoints" / "last.ckpt")
                   for name in cfg.eval.autoencoders]
    evaluations += [evaluate(cfg, out, "dit", dit, task) for task in cfg.eval.tasks]

    print("\n== 5/5 report", flush=True)
    sheet = out / "plots" / "samples.png"
    write_image(sheet, sample_sheet([s["path"] for s in samples]))
    targets = target_rows(evaluations, OmegaConf.to_container(cfg.targets))
    report = write_report(out / "report.md", preview=summary, stages=stages, samples=samples, sheet=sheet,
                          total_seconds=time.perf_counter() - t_start, evaluations=evaluations, targets=targets)
    OmegaConf.save(cfg, out / "demo_config.yaml")
    plain = lambda items: [{k: (str(v) if isinstance(v, Path) else v) for k, v in x.items()} for x in items]  # noqa: E731
    results = {"preview": summary, "seconds": round(time.perf_counter() - t_start, 1), "stages": plain(stages),
               "samples": plain(samples), "evaluations": plain(evaluations), "targets": targets}
    (out / "report.json").write_text(json.dumps(results, indent=2))
    for row in results["targets"]:
        verdict = {True: "met", False: "NOT met", None: "no target"}[row["met"]]
        print(f"[target] {row['what']}: {row['measured']} (real clips {row['real']}; target {row['target']}) "
              f"{verdict}")
    plots = sum(s.get("plot") is not None for s in stages)
    print(f"[report] {report} ({plots} loss plots, {sheet.name}, {len(samples)} samples); "
          f"whole quickstart {time.perf_counter() - t_start:.0f} s", flush=True)


def main() -> None:
    sys.argv[1:] = check_overrides(sys.argv[1:], config="demo", prog="sora-demo")
    hydra_main()


if __name__ == "__main__":
    main()
