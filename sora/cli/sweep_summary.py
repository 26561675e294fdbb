"""A table of a sweep's runs, best first: ``summary.md`` and ``summary.csv`` in the sweep dir.

    python -m sora.cli.sweep_summary outputs/sweeps/2026-01-01_12-00-00              # objective from the sweep
    python -m sora.cli.sweep_summary SWEEP_DIR --metric val/psnr --direction maximize

``sora-train -m`` writes it by itself when the sweep ends (the ``SweepSummary`` Hydra callback in
sora/configs/train.yaml). Each run dir of the sweep holds ``.hydra/overrides.yaml`` (its overrides) and,
once trained, ``metrics.json`` (its final metrics, written by sora-train). The objective is the sweep's
``optimized_metric`` (``val/loss`` when unset), minimized unless the sweeper says ``maximize``. Runs
without the metric (failed, or still running) are listed last. The table shows the overrides that
differ between runs; those shared by all are named once above it.
"""

from __future__ import annotations

import argparse
import csv
import json
import math
from dataclasses import dataclass, field
from pathlib import Path

import yaml
from hydra.experimental.callback import Callback
from omegaconf import ListConfig

DEFAULT_METRIC = "val/loss"


@dataclass
class Run:
    """One run of a sweep: its dir (relative to the sweep dir), overrides and final metrics."""

    name: str
    overrides: list[str]
    metrics: dict[str, float] = field(default_factory=dict)


def read_runs(sweep_dir: Path) -> list[Run]:
    """Every run dir under ``sweep_dir`` (any depth), in job order when the dirs are numbers."""
    runs = []
    for path in sweep_dir.glob("**/.hydra/overrides.yaml"):
        run_dir = path.parent.parent
        metrics_file = run_dir / "metrics.json"
        metrics = json.loads(metrics_file.read_text()) if metrics_file.is_file() else {}
        runs.append(Run(str(run_dir.relative_to(sweep_dir)), list(yaml.safe_load(path.read_text()) or []), metrics))
    return sorted(runs, key=lambda r: (0, int(r.name), "") if r.name.isdigit() else (1, 0, r.name))


def sweep_settings(sweep_dir: Path) -> tuple[str, str]:
    """(metric, direction) of the sweep, from its config (``multirun.yaml``, else a run's ``.hydra/``)."""
    candidates = [(sweep_dir / "multirun.yaml", None)] + [
        (p / "config.yaml", p / "hydra.yaml") for p in sorted(sweep_dir.glob("**/.hydra"))[:1]]
    for main, hydra_file in candidates:
        if not main.is_file():
            continue
        cfg = yaml.safe_load(main.read_text()) or {}
        hydra_cfg = yaml.safe_load(hydra_file.read_text())["hydra"] if hydra_file else cfg.get("hydra", {})
        return cfg.get("optimized_metric") or DEFAULT_METRIC, direction_of(hydra_cfg.get("sweeper"))
    return DEFAULT_METRIC, "minimize"


def direction_of(sweeper) -> str:
    """The sweeper's direction as ``minimize``/``maximize`` (an Optuna enum, its name, or the first of a list)."""
    value = (sweeper or {}).get("direction") or "minimize"
    value = value[0] if isinstance(value, (list, tuple, ListConfig)) else value
    return str(getattr(value, "name", value)).split(".")[-1]


def rank(runs: list[Run], metric: str, direction: str = "minimize") -> list[Run]:
    """Best first; runs without a finite ``metric`` last, in their order."""
    if direction not in ("minimize", "maximize"):
        raise ValueError(f"direction={direction!r}: use minimize or maximize")
    sign = -1.0 if direction == "maximize" else 1.0
    done = [r for r in runs if math.isfinite(r.metrics.get(metric, math.nan))]
    return sorted(done, key=lambda r: sign * r.metrics[metric]) + [r for r in runs if r not in done]


def write_summary(sweep_dir: str | Path, metric: str | None = None, direction: str | None = None) -> Path:
    """Write ``summary.md`` and ``summary.csv`` into ``sweep_dir``; returns the markdown file."""
    sweep_dir = Path(sweep_dir)
    runs = read_runs(sweep_dir)
    if not runs:
        raise SystemExit(f"sweep_summary: no runs under {sweep_dir} (no */.hydra/overrides.yaml)")
    found_metric, found_direction = sweep_settings(sweep_dir)
    metric, direction = metric or found_metric, direction or found_direction
    ranked = rank(runs, metric, direction)
    shared = [o for o in runs[0].overrides if all(o in r.overrides for r in runs)] if len(runs) > 1 else []
    varying = {r.name: " ".join(o for o in r.overrides if o not in shared) for r in runs}
    keys = sorted({k for r in runs for k in r.metrics})

    with open(sweep_dir / "summary.csv", "w", newline="") as f:
        out = csv.writer(f)
        out.writerow(["rank", "run", "overrides", metric] + [k for k in keys if k != metric])
        for i, r in enumerate(ranked, 1):
            out.writerow([i, r.name, varying[r.name], r.metrics.get(metric, "")]
                         + [r.metrics.get(k, "") for k in keys if k != metric])

    done = sum(metric in r.metrics for r in runs)
    lines = [f"# Sweep {sweep_dir.name}: {len(runs)} runs, {done} with {metric} ({direction}, best first)", ""]
    if shared:
        lines += ["Shared by every run: `" + " ".join(shared) + "`", ""]
    lines += [f"| rank | run | overrides | {metric} |", "|---|---|---|---|"]
    for i, r in enumerate(ranked, 1):
        value = f"{r.metrics[metric]:.6g}" if metric in r.metrics else "no result"
        lines.append(f"| {i} | {r.name} | `{varying[r.name] or '(none)'}` | {value} |")
    md = sweep_dir / "summary.md"
    md.write_text("\n".join(lines) + "\n")
    return md


class SweepSummary(Callback):
    """Hydra callback: writes the summary when a multirun ends (``hydra.callbacks`` in sora/configs/train.yaml)."""

    def on_multirun_end(self, config, **kwargs) -> None:
        sweep_dir = Path(str(config.hydra.sweep.dir))
        if any(sweep_dir.glob("**/.hydra/overrides.yaml")):
            md = write_summary(sweep_dir, config.get("optimized_metric") or DEFAULT_METRIC,
                               direction_of(config.hydra.get("sweeper")))
            print(f"sora-train: sweep summary {md}")


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("sweep_dir", type=Path, help="the sweep's dir (hydra.sweep.dir)")
    parser.add_argument("--metric", help=f"default: the sweep's optimized_metric, else {DEFAULT_METRIC}")
    parser.add_argument("--direction", choices=["minimize", "maximize"], help="default: the sweeper's, else minimize")
    args = parser.parse_args(argv)
    print((md := write_summary(args.sweep_dir, args.metric, args.direction)).read_text(), end="")
    print(f"written: {md} and {md.with_suffix('.csv')}")


if __name__ == "__main__":
    main()
