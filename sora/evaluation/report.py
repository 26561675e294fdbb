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


EVAL_KEYS = ("fvd", "kvd", "fd_mel", "val/loss", "val/loss_video", "val/loss_audio", "sync/offset_abs_ms_mean",
             "sync/within_frame", "physics/gravity_rel_error", "physics/sync_error_ms_mean",
             "physics/impacts_per_clip")


def write_report(path: str | Path, *, preview: dict, stages: list[dict], samples: list[dict],
                 sheet: Path | None, total_seconds: float, evaluation: dict | None = None) -> Path:
    """report.md: per stage its command, time, plot and start -> end metrics; the samples; the data check;
    the evaluation (``sora-eval``'s metrics.json plus its ``command``) beside its baselines.

    ``stages``: dicts with name, command, seconds, plot (Path), metrics (list of (label, start, end)).
    ``samples``: dicts with prompt, path, command, seconds, duration, audio_duration.
    """
    path = Path(path)
    root = path.parent

    def rel(p) -> str:
        return os.path.relpath(p, root)

    lines = ["# sora quickstart report", "",
             f"Whole run: {total_seconds:.0f} s. Every stage below can be re-run alone with its command.", "",
             "## Data check", "",
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
    sample_seconds = sum(s["seconds"] for s in samples)
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
    lines += ["", "```bash", *[s["command"] for s in samples], "```", ""]
    if evaluation is not None:
        m, real, shuffled = evaluation["metrics"], evaluation["baselines"]["real"], evaluation["baselines"]["shuffled"]
        proto = evaluation["protocol"]
        lines += ["## Evaluation", "",
                  f"`sora-eval` on {proto['references']} held-out world clips ({proto['frames']} frames "
                  f"{proto['size'][0]}x{proto['size'][1]} at {proto['fps']:g} fps): "
                  f"the DiT's samples for their captions against the references, beside real held-out clips "
                  f"(the floor) and those clips with their sound swapped (sync should break). "
                  f"Full report: [eval/report.md](eval/report.md).", "",
                  "| metric | DiT samples | real clips | shuffled pairs |", "|---|---|---|---|"]
        for key in EVAL_KEYS:
            if key in m or key in real:
                lines.append(f"| {key} | {fmt(m.get(key))} | {fmt(real.get(key))} | {fmt(shuffled.get(key))} |")
        lines += ["", "```bash", evaluation["command"], "```", ""]
    path.write_text("\n".join(lines))
    return path
