"""``sora-eval``'s report.md: the protocol, every metric beside its baselines, contact sheets of
the evaluated and the reference clips, and (for a folder of checkpoints) each metric over steps."""

from __future__ import annotations

from pathlib import Path

from sora.evaluation.report import contact_sheet, fmt
from sora.media import write_image

EXPLAIN = {
    "fvd": "Frechet distance of I3D Kinetics-400 logits (unscaled; lower is better)",
    "kvd": "kernel (MMD^2, cubic polynomial) distance of the same I3D features",
    "fd_mel": "Frechet distance of log-mel band statistics (weight-free; not VGGish FAD)",
    "sync/offset_abs_ms_mean": "mean |audio-video offset| in ms (model-free cross-correlation)",
    "sync/within_frame": "fraction of clips whose offset is within one frame",
    "val/loss": "flow loss at fixed timesteps and noise, on the references",
    "recon/psnr": "reconstruction PSNR (dB) of the video VAE",
    "recon/psnr_still": "PSNR of each clip's temporal median frame shown throughout (trivial baseline)",
    "recon/psnr_mean_frame": "PSNR of one mean frame shown for every clip (trivial baseline)",
    "recon/ssim": "reconstruction SSIM of the video VAE",
    "recon/mel_distance": "log-mel L1 between the audio VAE + vocoder's waveform and the input",
    "recon/si_sdr_db": "scale-invariant SDR (dB) of that waveform",
    "physics/clips_tracked": "clips where the probe tracks a ball over at least half of the frames",
    "physics/clips_in_sync": "clips whose visual impacts and sound onsets match one-to-one within a frame (F1 >= 2/3)",
    "physics/clips_gravity_ok": "clips whose fitted gravity is within 20% of the world's",
    "physics/clips_colour_match": "clips where every ball colour the caption names is a tracked ball's",
}


def plot_over_steps(rows: list[dict], key: str, path: Path) -> Path:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    points = [(r["step"], r["metrics"][key]) for r in rows if isinstance(r["metrics"].get(key), (int, float))]
    fig, ax = plt.subplots(figsize=(4.5, 3))
    ax.plot([p[0] for p in points], [p[1] for p in points], marker="o")
    ax.set_xlabel("training step")
    ax.set_title(key)
    ax.grid(alpha=0.3)
    fig.tight_layout()
    path.parent.mkdir(parents=True, exist_ok=True)
    fig.savefig(path, dpi=100)
    plt.close(fig)
    return path


def write_eval_report(out: Path, result: dict, clips: list, refs: list) -> Path:
    out = Path(out)
    lines = [f"# sora-eval: {result['what']}", "", "```bash", result["command"], "```", "",
             f"Evaluated in {result['seconds']:.1f} s. Every number is also in [metrics.json](metrics.json).", "",
             "## Protocol", "", "| | |", "|---|---|"]
    for key, value in result["protocol"].items():
        lines.append(f"| {key} | `{value}` |")
    metrics, base = result["metrics"], result["baselines"]
    keys = sorted(set(metrics) | set(base["real"]) | set(base["shuffled"]))
    lines += ["", "## Metrics", "",
              "*real held-out*: real clips scored the same way (the floor); *shuffled pairs*: those clips with "
              "their sound swapped between clips (sync should break).", "",
              "| metric | evaluated | real held-out | shuffled pairs | meaning |", "|---|---|---|---|---|"]
    for key in keys:
        lines.append(f"| {key} | {fmt(metrics.get(key))} | {fmt(base['real'].get(key))} | "
                     f"{fmt(base['shuffled'].get(key))} | {EXPLAIN.get(key, '')} |")
    if result.get("checkpoints"):
        rows = result["checkpoints"]
        shown = [k for k in ("fvd", "kvd", "fd_mel", "val/loss", "val/loss_video", "val/loss_audio", "recon/psnr",
                             "recon/ssim", "recon/mel_distance", "recon/si_sdr_db", "sync/offset_abs_ms_mean",
                             "physics/gravity_rel_error") if any(k in r["metrics"] for r in rows)]
        lines += ["", "## Over training steps", "", "| step | " + " | ".join(shown) + " |",
                  "|---" * (len(shown) + 1) + "|"]
        for r in rows:
            lines.append(f"| {r['step']} | " + " | ".join(fmt(r["metrics"].get(k)) for k in shown) + " |")
        lines.append("")
        for key in shown:
            path = plot_over_steps(rows, key, out / "plots" / f"{key.replace('/', '_')}.png")
            lines.append(f"![{key}](plots/{path.name})")
    if clips:
        write_image(out / "evaluated.png", contact_sheet([c.frames for c in clips[:16]], 8, 4))
        write_image(out / "references.png", contact_sheet([c.frames for c in refs[:16]], 8, 4))
        pairs = [frames for r, c in zip(refs[:8], clips[:8]) for frames in (r.frames, c.frames)]
        write_image(out / "side_by_side.png", contact_sheet(pairs, 8, 4))
        lines += ["", "## Clips", "", "Each reference (upper) and the evaluated clip for it (lower), in pairs:", "",
                  "![side by side](side_by_side.png)", "",
                  "Evaluated (one row per clip, 8 frames evenly spaced, upscaled 4x):", "",
                  "![evaluated](evaluated.png)", "", "References:", "", "![references](references.png)", ""]
        if (out / "samples").is_dir():
            lines += ["Sampled mp4s (with sound): " + ", ".join(
                f"[{p.name}](samples/{p.name})" for p in sorted((out / "samples").glob("*.mp4"))[:16]), ""]
    path = out / "report.md"
    path.write_text("\n".join(lines) + "\n")
    return path
