"""`sora-train`: train any stage (video VAE, audio VAE + vocoder, joint DiT) with Lightning.

    sora-train experiment=quickstart/video_vae                       # tiny, CPU
    sora-train experiment=quickstart/video_vae ckpt_path=last hydra.run.dir=outputs/train/vvae
    sora-train model=video_vae data=shards data.train.urls='data/world/shard-*.tar' logger=wandb

Everything goes into the Hydra run dir (``hydra.run.dir=DIR``): ``checkpoints/last.ckpt`` (and
periodic ones), the logs (``csv/version_N/metrics.csv`` by default), ``.hydra/`` (the composed
config). ``ckpt_path``: null (start), a path, or ``last`` (this run dir's ``checkpoints/last.ckpt``):
resume is exact (weights, optimizer, schedule, EMA, data stream position).
"""

from __future__ import annotations

import logging
import sys
import time
import warnings
from pathlib import Path

import hydra
from hydra.core.hydra_config import HydraConfig
from hydra.errors import InstantiationException
from hydra.utils import instantiate
from omegaconf import DictConfig, OmegaConf

log = logging.getLogger("sora.train")

CONFIGS = str(Path(__file__).resolve().parents[2] / "configs")  # absolute: works from any directory


def fail(what: str, error: BaseException) -> SystemExit:
    """One line on stderr naming the config part (and the key, in the message) that is wrong."""
    cause = error
    while isinstance(cause, InstantiationException) and cause.__cause__ is not None:
        cause = cause.__cause__
    text = " ".join(str(cause).split()) or type(cause).__name__
    return SystemExit(f"sora-train: error in {what}: {type(cause).__name__}: {text}")


def build(cfg: DictConfig, what: str, **kwargs):
    try:
        return instantiate(cfg, **kwargs)
    except Exception as e:  # noqa: BLE001 - any construction error becomes one line naming the part
        raise fail(what, e) from e


def named(cfg: DictConfig | None, what: str) -> list:
    """A dict of named ``_target_`` configs (callbacks, loggers) -> built objects; null entries skipped."""
    return [build(c, f"{what}.{name}") for name, c in (cfg or {}).items() if c is not None and "_target_" in c]


def resolve_ckpt(ckpt_path, run_dir: Path) -> str | None:
    if ckpt_path in (None, ""):
        return None
    path = run_dir / "checkpoints" / "last.ckpt" if str(ckpt_path) == "last" else Path(str(ckpt_path))
    if not path.is_file():
        raise SystemExit(f"sora-train: error in ckpt_path={ckpt_path}: no checkpoint at {path}")
    return str(path)


def train(cfg: DictConfig) -> dict:
    run_dir = Path(HydraConfig.get().runtime.output_dir)
    ckpt = resolve_ckpt(cfg.get("ckpt_path"), run_dir)  # before the heavy imports: fails fast

    import lightning as L

    from sora.training.callbacks import ConfigInCheckpoint

    if logging.getLogger().handlers:  # Hydra's console + train.log handlers: no second copy of each line
        logging.getLogger("lightning").handlers.clear()
    L.seed_everything(cfg.seed, workers=True)
    build(cfg.timeline, "timeline")  # a bad timing config fails first, with its own message
    datamodule = build(cfg.data, "data")
    model = build(cfg.model, "model")
    callbacks = named(cfg.get("callbacks"), "callbacks")
    callbacks.append(ConfigInCheckpoint(OmegaConf.to_container(cfg, resolve=True)))
    if cfg.trainer.get("enable_progress_bar", True):
        from lightning.pytorch.callbacks import RichProgressBar

        callbacks.append(RichProgressBar())
    loggers = named(cfg.get("logger"), "logger")
    trainer = build(cfg.trainer, "trainer", callbacks=callbacks, logger=loggers or False)
    t0 = time.perf_counter()
    trainer.fit(model, datamodule=datamodule, ckpt_path=ckpt)
    seconds = time.perf_counter() - t0
    metrics = {k: float(v) for k, v in trainer.callback_metrics.items() if getattr(v, "numel", lambda: 1)() == 1}
    last = run_dir / "checkpoints" / "last.ckpt"
    print(f"sora-train: step {trainer.global_step} in {seconds:.1f} s; "
          + " ".join(f"{k}={v:.4g}" for k, v in sorted(metrics.items()) if k.startswith(("train/loss", "val/"))))
    print(f"sora-train: checkpoint {last if last.exists() else 'none'}; run dir {run_dir}")
    return metrics


def check_overrides(args: list[str], config: str = "train", prog: str = "sora-train", configs: str = CONFIGS) -> None:
    """Compose the config once before Hydra's main so that a bad key or value is one line."""
    if any(a.startswith("-") for a in args):  # Hydra's own flags (--multirun, --cfg, ...): Hydra reports
        return
    from hydra import compose, initialize_config_dir
    from hydra.errors import HydraException
    from omegaconf.errors import OmegaConfBaseException

    try:
        with initialize_config_dir(configs, version_base="1.3"):
            compose(config, overrides=list(args))
    except (HydraException, OmegaConfBaseException) as e:
        text = str(e) or str(e.__cause__ or "") or type(e).__name__
        lines = [x.strip() for x in text.splitlines() if x.strip() and not x.strip().startswith(
            ("full_key:", "object_type=", "reference_type="))]
        raise SystemExit(f"{prog}: error in the config: " + " ".join(lines)) from None


@hydra.main(config_path=CONFIGS, config_name="train", version_base="1.3")
def hydra_main(cfg: DictConfig) -> None:
    warnings.filterwarnings("ignore", message=r".*module\(s\) in eval mode")  # frozen VAEs in the DiT stage
    warnings.filterwarnings("ignore", message=r".*isinstance\(treespec, LeafSpec\)")
    train(cfg)


def main() -> None:
    check_overrides(sys.argv[1:])
    hydra_main()


if __name__ == "__main__":
    main()
