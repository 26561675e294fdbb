"""`sora-train`: train any stage (video VAE, audio VAE + vocoder, joint DiT) with Lightning.

    sora-train experiment=quickstart/video_vae                       # tiny, CPU
    sora-train experiment=quickstart/video_vae ckpt_path=last hydra.run.dir=outputs/train/vvae
    sora-train model=video_vae data=shards data.train.urls='data/world/shard-*.tar' logger=wandb

Everything goes into the Hydra run dir (``hydra.run.dir=DIR``): ``checkpoints/last.ckpt`` (and
periodic ones), the logs (``csv/version_N/metrics.csv`` by default), ``.hydra/`` (the composed
config). ``ckpt_path``: null (start), a path, ``last`` (this run dir's newest intact checkpoint) or
``auto`` (``last`` if there is one, else a start): resume is exact (weights, optimizer, schedule, EMA,
RNG, data stream position).
"""

from __future__ import annotations

import json
import logging
import os
import sys
import time
import warnings
from pathlib import Path

import hydra
from hydra.core.hydra_config import HydraConfig
from hydra.types import RunMode
from omegaconf import DictConfig, OmegaConf

from sora.cli.overrides import CONFIGS, build, check_overrides, fail, named

log = logging.getLogger("sora.train")


def resolve_ckpt(ckpt_path, run_dir: Path) -> str | None:
    """``last``: the newest intact checkpoint of the run dir (``checkpoints/last.ckpt``, else the periodic
    ones, newest first; a warning names each damaged one skipped); ``auto``: the same, or a fresh start
    when there is none yet. A path (a file, or a DeepSpeed /
    distributed-checkpoint folder) must be intact: a truncated or corrupt one fails here, in one line."""
    from sora.checkpoints.io import CheckpointError, problem, resolve_last

    if ckpt_path in (None, ""):
        return None
    if str(ckpt_path) in ("last", "auto"):
        try:
            path = resolve_last(run_dir / "checkpoints")
        except CheckpointError as e:
            raise SystemExit(f"sora-train: error in ckpt_path={ckpt_path}: {e}") from None
        if path is None and str(ckpt_path) == "auto":  # a first start (e.g. of a job SLURM may requeue)
            log.info("ckpt_path=auto: no checkpoint in %s yet, starting fresh", run_dir / "checkpoints")
            return None
        if path is None:
            raise SystemExit(f"sora-train: error in ckpt_path=last: no checkpoint at {run_dir / 'checkpoints'}")
        return str(path)
    path = Path(str(ckpt_path))
    if not path.exists():
        raise SystemExit(f"sora-train: error in ckpt_path={ckpt_path}: no checkpoint at {path}")
    reason = problem(path)
    if reason:
        raise SystemExit(f"sora-train: error in ckpt_path={ckpt_path}: {path}: {reason}")
    return str(path)


def checked(cfg: DictConfig, files: bool = True) -> None:
    """:func:`sora.training.config_checks.check`: a config that cannot work is one line naming the key."""
    from sora.training.config_checks import ConfigError, check

    try:
        check(cfg, files=files)
    except ConfigError as e:
        raise SystemExit(f"sora-train: error in {e}") from None


def submitit_local_ranks() -> None:
    """A job of submitit's local executor with several tasks (``hydra/launcher=local``: one task per device):
    export submitit's own rank, world size and main address/port as torch's env:// variables, so that
    Lightning joins these processes (its LightningEnvironment sees ``LOCAL_RANK``) instead of starting more.
    On SLURM nothing is needed: Lightning's SLURMEnvironment reads srun's variables, torchrun's its own."""
    if int(os.environ.get("SUBMITIT_LOCAL_NTASKS", "1")) > 1 and "LOCAL_RANK" not in os.environ:
        from submitit.helpers import TorchDistributedEnvironment

        TorchDistributedEnvironment().export(set_cuda_visible_devices=False)


def check_launch(trainer) -> None:
    """A multirun (``-m``) job with several processes needs them started by the sweep's launcher, one
    submitit task per device. Lightning's own launcher would re-run this command, i.e. the whole sweep, in
    each extra rank (lightning-hydra-template #393: duplicated sweep dirs, ranks on different trials, hangs),
    and torchrun/srun around ``-m`` would run one sweep per rank."""
    hydra_cfg = HydraConfig.get()
    processes = trainer.num_devices * trainer.num_nodes
    if hydra_cfg.mode != RunMode.MULTIRUN or processes == 1:
        return
    env = getattr(trainer.strategy, "cluster_environment", None)
    by_submitit = "submitit" in str(hydra_cfg.launcher.get("_target_", ""))
    if by_submitit and env is not None and env.creates_processes_externally:
        return
    raise SystemExit(
        f"sora-train: error in trainer: a multirun (-m) job with {processes} processes (trainer.devices x "
        "trainer.num_nodes) needs one process per rank from the sweep's launcher: add hydra/launcher=local (this "
        "machine) or hydra/launcher=slurm, or run without -m (see the README, Multi-node)")


def objective(metrics: dict, name: str | None) -> float | None:
    """The number a sweeper optimizes (``optimized_metric``, e.g. ``val/loss``), or None when not set."""
    if not name:
        return None
    if name not in metrics:
        raise SystemExit(f"sora-train: error in optimized_metric={name}: this run logged no such metric; "
                         f"it logged {', '.join(sorted(metrics)) or 'none'}")
    return metrics[name]


def train(cfg: DictConfig) -> dict:
    run_dir = Path(HydraConfig.get().runtime.output_dir)
    ckpt = resolve_ckpt(cfg.get("ckpt_path"), run_dir)  # before the heavy imports: fails fast

    import lightning as L

    from sora.checkpoints.io import CheckpointError
    from sora.training.callbacks import ConfigInCheckpoint
    from sora.training.strategies import use_atomic_checkpoints

    if logging.getLogger().handlers:  # Hydra's console + train.log handlers: no second copy of each line
        logging.getLogger("lightning").handlers.clear()
    L.seed_everything(cfg.seed, workers=True)
    build(cfg.timeline, "timeline")  # a bad timing config fails first, with its own message
    checked(cfg, files=False)  # sizes vs strides, heads: one line before anything heavy
    if cfg.get("dry_run"):  # dry_run=true or any dry_run.* key: parameters, FLOPs, memory per bucket; no training
        from sora.training.dry_run import dry_run

        try:
            if dry_run(cfg) is not None:  # None: every dry_run key null
                return {}
        except Exception as e:  # noqa: BLE001 - one line naming the part
            raise fail("dry_run", e) from e
    checked(cfg)  # and the files it names (a dry run reads none)
    datamodule = build(cfg.data, "data")
    model = build(cfg.model, "model")
    callbacks = named(cfg.get("callbacks"), "callbacks")
    callbacks.append(ConfigInCheckpoint(OmegaConf.to_container(cfg, resolve=True)))
    if cfg.trainer.get("enable_progress_bar", True):
        from sora.training.callbacks import ProgressBar

        callbacks.append(ProgressBar())
    loggers = named(cfg.get("logger"), "logger")
    submitit_local_ranks()
    strategy = {"strategy": build(cfg.strategy, "strategy")} if "_target_" in (cfg.get("strategy") or {}) else {}
    trainer = build(cfg.trainer, "trainer", callbacks=callbacks, logger=loggers or False, **strategy)
    use_atomic_checkpoints(trainer.strategy)  # atomic writes, weights_only reads (DeepSpeed/FSDP2: their own)
    check_launch(trainer)
    t0 = time.perf_counter()
    try:
        trainer.fit(model, datamodule=datamodule, ckpt_path=ckpt, weights_only=True)
    except CheckpointError as e:  # a full disk, a refused or damaged checkpoint: one line
        raise SystemExit(f"sora-train: {e}") from None
    seconds = time.perf_counter() - t0
    metrics = {k: float(v) for k, v in trainer.callback_metrics.items() if getattr(v, "numel", lambda: 1)() == 1}
    if trainer.global_rank == 0:  # the run's final metrics, for sweep summaries (sora.cli.sweep_summary)
        (run_dir / "metrics.json").write_text(json.dumps(metrics, indent=1, sort_keys=True) + "\n")
    last = run_dir / "checkpoints" / "last.ckpt"
    print(f"sora-train: step {trainer.global_step} in {seconds:.1f} s; "
          + " ".join(f"{k}={v:.4g}" for k, v in sorted(metrics.items()) if k.startswith(("train/loss", "val/"))))
    print(f"sora-train: checkpoint {last if last.exists() else 'none'}; run dir {run_dir}")
    return metrics


@hydra.main(config_path=CONFIGS, config_name="train", version_base="1.3")
def hydra_main(cfg: DictConfig) -> float | None:
    warnings.filterwarnings("ignore", message=r".*module\(s\) in eval mode")  # frozen VAEs in the DiT stage
    warnings.filterwarnings("ignore", message=r".*isinstance\(treespec, LeafSpec\)")
    return objective(train(cfg), cfg.get("optimized_metric"))  # what a sweeper (hparams_search=) minimizes


def main() -> None:
    sys.argv[1:] = check_overrides(sys.argv[1:])
    hydra_main()


if __name__ == "__main__":
    main()
