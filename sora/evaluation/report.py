"""The quickstart report: loss plots from a run's CSV metrics, a contact sheet of sampled clips, report.md.

Plain functions over files (CSV logs, mp4s); ``sora.cli.demo`` calls them after its stages ran.
"""

from __future__ import annotations

import csv
import math
import os
from pathlib import Path

import numpy as np


def read_metrics(run_dir: str | Path) -> dict[str, list[tuple[int, float]]]:
    """All scalar columns of a Lightning CSV log (the newest ``csv/version_N``): name -> [(step, value)]."""
    versions = sorted(Path(run_dir).glob("csv/version_*/metrics.csv"), key=lambda p: int(p.parent.name[8:]))
    if not versions:
        return {}
    series: dict[str, list[tuple[int, float]]] = {}
    with open(versions[-1], newline="") as f:
        for row in csv.DictReader(f):
            step = int(float(row.get("step") or 0))
            for key, value in row.items():
                if key in ("step", "epoch") or value in (None, ""):
                    continue
                try:
                    series.setdefault(key, []).append((step, float(value)))
                except ValueError:
                    continue
    return series


def first_last(series: dict, key: str, window: int = 1) -> tuple[tuple[int, float], tuple[int, float]] | None:
    """(step, value) at the start and the end of a metric; ``window`` > 1 averages the first / last values."""
    points = series.get(key)
    if not points:
        return None
    head, tail = points[:window], points[-window:]
    return ((head[0][0], float(np.mean([v for _, v in head]))), (tail[-1][0], float(np.mean([v for _, v in tail]))))


def plot_losses(series: dict, title: str, path: str | Path, val_keys: list[str] | None = None) -> Path:
    """Train losses (left, log scale) and validation metrics (right) against the step, as a PNG."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    train = [k for k in sorted(series) if k.startswith("train/")]
    val = val_keys if val_keys is not None else [k for k in sorted(series) if k.startswith("val/")]
    val = [k for k in val if k in series]
    fig, axes = plt.subplots(1, 2, figsize=(10, 3.6))
    for key in train:
        steps, values = zip(*series[key])
        axes[0].plot(steps, values, label=key[6:], lw=2 if key == "train/loss" else 1)
    if train and all(v > 0 for k in train for _, v in series[k]):
        axes[0].set_yscale("log")
    axes[0].set(title=f"{title}: training", xlabel="step")
    for key in val:
        steps, values = zip(*series[key])
        axes[1].plot(steps, values, "o-", label=key[4:], ms=4)
    axes[1].set(title=f"{title}: validation", xlabel="step")
    for ax in axes:
        ax.grid(alpha=0.3)
        if ax.get_legend_handles_labels()[0]:
            ax.legend(fontsize=7)
    fig.tight_layout()
    fig.savefig(path, dpi=90)
    plt.close(fig)
    return Path(path)


def contact_sheet(clips: list[np.ndarray], columns: int = 8, scale: int = 1) -> np.ndarray:
    """One row per clip ([T, H, W, 3] uint8), ``columns`` frames evenly spaced in time, each upscaled
    ``scale``x (nearest); rows separated by a white line."""
    rows = []
    for frames in clips:
        idx = np.linspace(0, len(frames) - 1, columns).round().astype(int)
        row = np.concatenate(list(frames[idx]), axis=1)
        rows.append(row.repeat(scale, axis=0).repeat(scale, axis=1))
    width = max(r.shape[1] for r in rows)
    rows = [np.pad(r, ((0, 2), (0, width - r.shape[1]), (0, 0)), constant_values=255) for r in rows]
    return np.concatenate(rows, axis=0)


def sample_sheet(paths: list[Path], columns: int = 8, scale: int = 4) -> np.ndarray:
    """The contact sheet of sampled mp4s."""
    from sora.media import read_av

    return contact_sheet([read_av(path).frames for path in paths], columns, scale)


def fmt(value, digits: int = 4) -> str:
    if value is None or (isinstance(value, float) and math.isnan(value)):
        return "–"
    return f"{value:.{digits}g}" if isinstance(value, float) else str(value)


EVAL_KEYS = ("fvd", "kvd", "fd_mel", "recon/psnr", "recon/psnr_still", "recon/psnr_mean_frame", "recon/ssim",
             "recon/mel_distance", "recon/si_sdr_db", "val/loss", "val/loss_video", "val/loss_audio",
             "sync/offset_abs_ms_mean", "sync/within_frame", "physics/clips_tracked", "physics/clips_in_sync",
             "physics/sync_f1_mean", "physics/clips_gravity_ok", "physics/clips_colour_match",
             "physics/gravity_rel_error", "physics/impacts_per_clip")

# (key in demo.yaml's targets, what is counted, evaluation, metric, its denominator; None: a ratio to the real floor)
TARGETS = [
    ("recon_tracked", "video VAE reconstructions: clips where the probe tracks the balls", "video_vae",
     "physics/clips_tracked", "physics/clips"),
    ("tracked", "DiT samples (text → video + audio): clips where the probe tracks the balls", "dit",
     "physics/clips_tracked", "physics/clips"),
    ("gravity_ok", "samples whose fitted gravity is within 20% of the world's", "dit", "physics/clips_gravity_ok",
     "physics/clips"),
    ("in_sync", "samples whose impacts' sounds are within one video frame (F1 ≥ 2/3)", "dit",
     "physics/clips_in_sync", "physics/clips"),
    ("v2a_in_sync", "video-to-audio (the held-out clip's picture): impacts' sounds within one frame", "dit v2a",
     "physics/clips_in_sync", "physics/clips"),
    ("colour_match", "prompt adherence: every ball colour named in the prompt is a tracked ball's", "dit",
     "physics/clips_colour_match", "physics/clips_naming_colour"),
    ("fvd_ratio", "FVD against the real held-out clips' FVD (the floor), same clip count", "dit", "fvd", None),
]


def fraction(text) -> float:
    """A target "7/8" (or 0.875) as a number."""
    a, _, b = str(text).partition("/")
    return float(a) / float(b) if b else float(a)


def target_rows(evaluations: list[dict], targets: dict) -> list[dict]:
    """One row per target whose evaluation ran: measured / real held-out / shuffled, the target, met or not
    (a null target: measured, not judged). Counts are "k/n" of clips; FVD a ratio to the real clips'."""
    by_name = {e["name"]: e for e in evaluations}
    rows = []
    for key, what, name, metric, total in TARGETS:
        e, target = by_name.get(name), targets.get(key)
        if e is None or metric not in e["metrics"]:
            continue
        real, shuffled = e["baselines"]["real"], e["baselines"]["shuffled"]
        if total is None:  # FVD: a ratio to the real clips' (the floor)
            value = e["metrics"][metric] / real[metric] if real.get(metric) else float("nan")
            row = {"measured": f"{value:.2f}x", "real": "1x", "shuffled": "–",
                   "target": "–" if target is None else f"≤ {float(target):g}x",
                   "met": None if target is None else bool(value <= float(target))}
        else:
            count = lambda m: f"{m[metric]}/{m[total]}" if metric in m and total in m else "–"  # noqa: E731
            n = e["metrics"][total]
            row = {"measured": count(e["metrics"]), "real": count(real),
                   "shuffled": count(shuffled) if "sync" in key else "–",  # the same pictures: only sync moves
                   "target": "–" if target is None else f"≥ {target}",
                   "met": None if target is None else bool(n and e["metrics"][metric] / n >= fraction(target) - 1e-9)}
        rows.append({"key": key, "what": what, "evaluation": name, **row})
    return rows


def write_report(path: str | Path, *, preview: dict, stages: list[dict], samples: list[dict],
                 sheet: Path | None, total_seconds: float, evaluations: list[dict] = (),
                 targets: list[dict] = ()) -> Path:
    """report.md: the targets met or not; per stage its command, time, plot and start -> end metrics; the
    samples; the data check; each evaluation (``sora-eval``'s metrics.json plus its ``name``, ``folder``,
    ``command``) beside its baselines, with real and generated clips side by side.

    ``targets``: :func:`target_rows` of the evaluations.
    ``stages``: dicts with name, command, seconds, plot (Path or None), metrics (list of (label, start, end)).
    ``samples``: dicts with prompt, path, command, call_seconds (the command's wall time; one command may
    write several samples), seconds (this sample's), duration, audio_duration.
    """
    path = Path(path)
    root = path.parent

    def rel(p) -> str:
        return os.path.relpath(p, root)

    lines = ["# sora quickstart report", "",
             f"Whole run: {total_seconds:.0f} s. Every stage below can be re-run alone with its command.", ""]
    rows = list(targets)
    if rows:
        mark = {True: "**met**", False: "**not met**", None: "–"}
        lines += ["## Targets", "",
                  "Counted by `sora-eval` on held-out world clips (seeds never trained on); *real*: held-out real "
                  "clips scored the same way, *shuffled*: those clips with each one's sound moved to another.", "",
                  "| target | measured | real clips | shuffled pairs | target | |", "|---|---|---|---|---|---|"]
        for r in rows:
            lines.append(f"| {r['what']} | {r['measured']} | {r['real']} | {r['shuffled']} | {r['target']} | "
                         f"{mark[r['met']]} |")
        lines.append("")
    lines += ["## Data check", "",
              f"{preview['clips']} world clips decoded through the shard pipeline in {preview['seconds']} s: "
              f"video {preview['video']}, audio {preview['audio']} at {preview['fps']:g} fps / "
              f"{preview['sample_rate']} Hz. Audio-video sync of decoded sound onsets against the world's "
              f"ground-truth impacts: {preview['sync_impacts']} impacts, |error| median "
              f"{preview['sync_error_ms_median']} ms, max {preview['sync_error_ms_max']} ms "
              f"(one frame = {1000 / preview['fps']:.1f} ms). [preview.mp4](preview.mp4), "
              "![preview](preview.png)", "",
              "## Stages", "",
              "| stage | steps | time | metric | start | end |", "|---|---|---|---|---|---|"]
    for stage in stages:
        for i, (label, start, end) in enumerate(stage["metrics"] or [("–", None, None)]):
            head = (f"| {stage['name']} | {stage.get('steps', '–')} | {stage['seconds']:.1f} s" if i == 0
                    else "| | |")
            lines.append(f"{head} | {label} | {fmt(start)} | {fmt(end)} |")
    calls = {s["command"]: s["call_seconds"] for s in samples}  # one call may write several
    sample_seconds = sum(calls.values())
    lines += [f"| samples | {len(samples)} | {sample_seconds:.1f} s | | | |", ""]
    for stage in stages:
        lines += [f"### {stage['name']}", "", "```bash", stage["command"], "```", "",
                  f"![{stage['name']} losses]({rel(stage['plot'])})" if stage.get("plot") else "", ""]
    lines += ["## Samples", ""]
    if sheet is not None:
        lines += [f"![sampled frames]({rel(sheet)})", "",
                  "One row per prompt, 8 frames evenly spaced in time (upscaled 4x).", ""]
    lines += ["| prompt | file | video | audio | time |", "|---|---|---|---|---|"]
    for s in samples:
        lines.append(f"| {s['prompt']} | [{Path(s['path']).name}]({rel(s['path'])}) | {s['duration']:.2f} s | "
                     f"{s['audio_duration']:.2f} s | {s['seconds']:.1f} s |")
    lines += ["", "```bash", *calls, "```", ""]
    for e in evaluations:
        m, real, shuffled = e["metrics"], e["baselines"]["real"], e["baselines"]["shuffled"]
        proto, folder = e["protocol"], Path(e["folder"])
        lines += [f"## Evaluation: {e['name']}", "",
                  f"`sora-eval` on {proto['references']} held-out world clips ({proto['frames']} frames "
                  f"{proto['size'][0]}x{proto['size'][1]} at {proto['fps']:g} fps): {e['what']}, beside real "
                  f"held-out clips (the floor) and those clips with their sound swapped (sync should break). "
                  f"Full report: [{rel(folder / 'report.md')}]({rel(folder / 'report.md')}).", "",
                  f"| metric | {e['name']} | real clips | shuffled pairs |", "|---|---|---|---|"]
        for key in EVAL_KEYS:
            if key in m or key in real:
                lines.append(f"| {key} | {fmt(m.get(key))} | {fmt(real.get(key))} | {fmt(shuffled.get(key))} |")
        if (folder / "side_by_side.png").is_file():
            lines += ["", "Real held-out clip (upper) and the evaluated clip for its caption (lower), in pairs:", "",
                      f"![real and evaluated]({rel(folder / 'side_by_side.png')})"]
        lines += ["", "```bash", e["command"], "```", ""]
    path.write_text("\n".join(lines))
    return path
