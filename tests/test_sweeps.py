"""Hydra sweeps of `sora-train`: the basic sweeper (``-m model.lr=a,b``), the Optuna sweeper
(``hparams_search=optuna_dit``, objective val/loss returned by sora-train) and the summary table of a
sweep's runs (sora.cli.sweep_summary, written when the sweep ends). Sweeps run in subprocesses on the
tiny DiT with random frozen VAEs, from an empty working directory."""

from __future__ import annotations

import csv
import json
from pathlib import Path

import pytest
import torch
import yaml

from sora.cli.train import objective
from tests.test_launch import run_dirs, sora_train
from sora.cli.sweep_summary import main as summary_main
from sora.cli.sweep_summary import write_summary


def trained(sweep: Path, job: str) -> tuple[list[str], dict]:
    """A run's overrides and final metrics (checking it trained 2 steps into its own checkpoint)."""
    run = sweep / job
    ckpt = torch.load(run / "checkpoints" / "last.ckpt", map_location="cpu", weights_only=True)
    assert ckpt["global_step"] == 2
    overrides = yaml.safe_load((run / ".hydra" / "overrides.yaml").read_text())
    return overrides, json.loads((run / "metrics.json").read_text())


def table(sweep: Path) -> list[dict]:
    with open(sweep / "summary.csv") as f:
        return list(csv.DictReader(f))


def test_basic_sweep_trains_each_point_and_writes_the_summary(tmp_path):
    sweep = tmp_path / "sweep"
    proc = sora_train(tmp_path, "-m", f"hydra.sweep.dir={sweep}", "model.lr=1e-3,5e-4", timeout=180)
    assert proc.returncode == 0, proc.stderr[-3000:]
    assert sorted(p.name for p in tmp_path.iterdir()) == ["sweep"] and run_dirs(sweep) == ["0", "1"]
    losses = {}
    for job, lr in (("0", 1e-3), ("1", 5e-4)):
        overrides, metrics = trained(sweep, job)
        assert f"model.lr={lr}" in overrides
        ckpt = torch.load(sweep / job / "checkpoints" / "last.ckpt", map_location="cpu", weights_only=True)
        assert ckpt["sora_config"]["model"]["lr"] == lr
        losses[job] = metrics["val/loss"]
    rows = table(sweep)
    assert [r["run"] for r in rows] == sorted(losses, key=losses.get)  # best (lowest val/loss) first
    assert [float(r["val/loss"]) for r in rows] == sorted(losses.values())
    assert {r["overrides"] for r in rows} == {"model.lr=0.001", "model.lr=0.0005"}  # only what differs
    md = (sweep / "summary.md").read_text()
    assert "2 runs, 2 with val/loss (minimize" in md and "`model.lr=0.001`" in md


@pytest.mark.filterwarnings("ignore:Deprecated API features detected")  # optuna 2 on SQLAlchemy 1.4
def test_optuna_sweep_minimizes_the_validation_loss(tmp_path):
    sweep, db = tmp_path / "sweep", tmp_path / "study.db"
    proc = sora_train(tmp_path, "hparams_search=optuna_dit", f"hydra.sweep.dir={sweep}", "hydra.sweeper.n_trials=2",
                      f"hydra.sweeper.storage=sqlite:///{db}", timeout=180)
    assert proc.returncode == 0, proc.stderr[-3000:]
    assert run_dirs(sweep) == ["0", "1"]  # hydra.mode=MULTIRUN in the search config: no -m needed
    lrs, losses = {}, {}
    for job in ("0", "1"):
        overrides, metrics = trained(sweep, job)
        params = dict(o.split("=", 1) for o in overrides if o.startswith("model."))
        assert 1e-4 <= float(params["model.lr"]) <= 3e-3  # drawn from the search space
        assert float(params["model.weight_decay"]) in (0.0, 0.01, 0.1)
        lrs[job], losses[job] = float(params["model.lr"]), metrics["val/loss"]
    assert lrs["0"] != lrs["1"]
    best = min(losses, key=losses.get)
    results = yaml.safe_load((sweep / "optimization_results.yaml").read_text())
    assert results["best_value"] == pytest.approx(losses[best], rel=1e-6)  # the objective sora-train returned
    assert results["best_params"]["model.lr"] == pytest.approx(lrs[best])
    import optuna  # here: its SQLAlchemy models warn on import

    study = optuna.load_study(study_name="optuna_dit", storage=f"sqlite:///{db}")  # kept: a study can resume
    assert sorted(t.value for t in study.trials) == sorted(losses.values())
    rows = table(sweep)
    assert [r["run"] for r in rows] == [best, "10"[int(best)]]  # the other run second
    assert "model.lr=" in rows[0]["overrides"]


def make_sweep(root: Path, runs: dict[str, tuple[list[str], dict | None]], multirun: dict | None) -> Path:
    for name, (overrides, metrics) in runs.items():
        (root / name / ".hydra").mkdir(parents=True)
        (root / name / ".hydra" / "overrides.yaml").write_text(yaml.safe_dump(overrides))
        if metrics is not None:
            (root / name / "metrics.json").write_text(json.dumps(metrics))
    if multirun is not None:
        (root / "multirun.yaml").write_text(yaml.safe_dump(multirun))
    return root


def test_summary_ranks_by_the_sweeps_metric_and_direction(tmp_path, capsys):
    runs = {"0": (["a=1", "seed=3"], {"val/psnr": 20.0, "val/loss": 1.0}),
            "1": (["a=2", "seed=3"], None),  # failed: no metrics
            "2": (["a=3", "seed=3"], {"val/psnr": 25.0, "val/loss": 2.0}),
            "10": (["a=4", "seed=3"], {"val/psnr": 22.0, "val/loss": 0.5})}
    sweep = make_sweep(tmp_path / "s", runs, {"optimized_metric": "val/psnr",
                                             "hydra": {"sweeper": {"direction": "maximize"}}})
    md = write_summary(sweep).read_text()
    assert [r["run"] for r in table(sweep)] == ["2", "10", "0", "1"]  # highest psnr first, no result last
    assert "4 runs, 3 with val/psnr (maximize" in md and "Shared by every run: `seed=3`" in md
    assert md.splitlines()[-1] == "| 4 | 1 | `a=2` | no result |"
    assert table(sweep)[0]["val/loss"] == "2.0"  # every metric in the csv

    summary_main([str(sweep), "--metric", "val/loss", "--direction", "minimize"])
    assert [r["run"] for r in table(sweep)] == ["10", "0", "2", "1"]
    assert "| 1 | 10 | `a=4` | 0.5 |" in capsys.readouterr().out

    # without multirun.yaml (the Optuna sweeper writes none): a run's .hydra/, defaulting to val/loss, minimize
    bare = make_sweep(tmp_path / "bare", {k: runs[k] for k in ("0", "2")}, None)
    write_summary(bare)
    assert [r["run"] for r in table(bare)] == ["0", "2"]
    with pytest.raises(SystemExit, match="no runs under"):
        write_summary(tmp_path / "nothing")


def test_objective_is_the_named_metric_or_a_clear_error():
    assert objective({"val/loss": 1.5, "train/loss": 2.0}, "val/loss") == 1.5
    assert objective({"val/loss": 1.5}, None) is None
    with pytest.raises(SystemExit, match=r"optimized_metric=val/lost: .* it logged train/loss, val/loss"):
        objective({"val/loss": 1.5, "train/loss": 2.0}, "val/lost")
