"""`sora-sample`: a prompt in, an mp4 with synchronized sound out, from a DiT checkpoint.

    sora-sample ckpt=outputs/quickstart/dit/checkpoints/last.ckpt prompt="a red ball bounces" \
        seconds=1 out=ball.mp4 steps=30 guidance=4 seed=0

The checkpoint holds the run's config (``sora_config``) and every weight the pipeline needs: the
DiT, the text encoder, the frozen video / audio VAEs, the vocoder and the latent statistics. The
sampler runs rectified flow from noise (``sora.diffusion.samplers``) with text classifier-free
guidance (``sora.diffusion.guidance.cfg``); latents are decoded by the VAEs, audio by the vocoder
(or Griffin-Lim), and ``sora.media.write_av`` writes the file.
"""

from __future__ import annotations

import logging
import sys
import time
from pathlib import Path

import hydra
from omegaconf import DictConfig, OmegaConf

log = logging.getLogger("sora.sample")
CONFIGS = str(Path(__file__).resolve().parents[2] / "configs")


def load_module(ckpt_path: str, seconds: float | None, use_ema: bool, device):
    """The DiTModule of a checkpoint (rebuilt from its stored config) and that config."""
    import torch
    from hydra.utils import instantiate

    ckpt = torch.load(ckpt_path, map_location="cpu", weights_only=False)
    if "sora_config" not in ckpt or not str(ckpt["sora_config"]["model"].get("_target_", "")).endswith("DiTModule"):
        raise SystemExit(f"sora-sample: {ckpt_path} is not a checkpoint of a DiT run (sora-train model=dit)")
    cfg = OmegaConf.create(ckpt["sora_config"])
    if seconds is not None:
        cfg.timeline.seconds = float(seconds)
    try:
        timeline = instantiate(cfg.timeline)
    except Exception as e:  # noqa: BLE001 - a timing error is one line naming the field
        raise SystemExit(f"sora-sample: {' '.join(str(getattr(e, '__cause__', None) or e).split())}") from None
    cfg.model.timeline = cfg.timeline
    cfg.model.video_vae_ckpt = cfg.model.audio_vae_ckpt = None  # the weights come from this checkpoint
    dit_log = logging.getLogger("sora.training.dit")
    level, dit_log.level = dit_log.level, logging.ERROR  # no "randomly initialised" warnings: loaded below
    try:
        module = instantiate(cfg.model)
    finally:
        dit_log.setLevel(level)
    state = dict(ckpt["state_dict"])
    ema = (ckpt.get("callbacks") or {}).get("EMA") or {}
    if use_ema and ema.get("shadow"):
        state.update(ema["shadow"])
    module.load_state_dict(state)
    return module.to(device).eval(), cfg, timeline


def default_size(cfg) -> list[int]:
    train = cfg.data.train
    if train.get("size"):
        return list(train.size)
    if train.get("world"):
        return [train.world.height, train.world.width]
    raise SystemExit("sora-sample: the checkpoint's data config has no fixed frame size; give size=[H,W]")


@hydra.main(config_path=CONFIGS, config_name="sample", version_base="1.3")
def hydra_main(cfg: DictConfig) -> None:
    import torch

    from sora.media import write_av
    from sora.training.sampling import generate

    if not Path(cfg.ckpt).is_file():
        raise SystemExit(f"sora-sample: no checkpoint at {cfg.ckpt}")
    device = ("cuda" if torch.cuda.is_available() else "cpu") if cfg.device == "auto" else cfg.device
    t0 = time.perf_counter()
    module, run_cfg, timeline = load_module(cfg.ckpt, cfg.seconds, cfg.use_ema, device)
    size = list(cfg.size) if cfg.size is not None else default_size(run_cfg)
    try:
        frames, audio, _ = generate(module, timeline, cfg.prompt, cfg.negative_prompt, size, cfg.steps, cfg.guidance,
                                    cfg.sampler, cfg.shift, cfg.seed, cfg.audio_decoder)
    except ValueError as e:
        raise SystemExit(f"sora-sample: {e}") from None
    out = Path(cfg.out)
    out.parent.mkdir(parents=True, exist_ok=True)
    write_av(out, frames, audio, fps=float(timeline.fps_q), sample_rate=timeline.sample_rate)
    print(f"sora-sample: wrote {out} ({len(frames)} frames {frames.shape[1]}x{frames.shape[2]} "
          f"at {timeline.fps:g} fps, "
          f"{audio.shape[-1] / timeline.sample_rate:.2f} s of sound) in {time.perf_counter() - t0:.1f} s; "
          f"prompt {cfg.prompt!r}, {cfg.steps} {cfg.sampler} steps, guidance {cfg.guidance}")


def main() -> None:
    from sora.cli.train import check_overrides

    check_overrides(sys.argv[1:], config="sample", prog="sora-sample")
    hydra_main()


if __name__ == "__main__":
    main()
