"""A regression guard that the DiT stage can learn at all: the quickstart DiT overfits one batch of 4
clips (text -> video + audio), its flow loss at fixed timesteps and noise falling far below the start.

At the start the model predicts ~0 velocity, so each modality's loss is E|noise - z|^2 = 2 for unit
latents; anything that breaks learning (a detached loss, a frozen or mis-wired DiT, conditioning
that does not reach it, latents that are not normalised) leaves it there."""

from __future__ import annotations

import lightning as L
import torch
from hydra import compose, initialize_config_dir
from hydra.utils import instantiate

from sora.cli.train import CONFIGS
from sora.diffusion.flow import timesteps_for_tasks

OVERFIT = ["experiment=quickstart/dit", "model.video_vae_ckpt=null", "model.audio_vae_ckpt=null",
           "data.train.clips=4", "data.train.batch_size=4", "data.num_workers=0", "timeline.seconds=1",
           "model.task_probs={t2av: 1.0}", "model.text_drop_prob=0"]


def fixed_loss(module, z, text, mask) -> float:
    """The flow loss (video + audio) at t = 0.25 / 0.5 / 0.75 with fixed noise."""
    g, total = torch.Generator().manual_seed(1), 0.0
    b = z["video"].shape[0]
    with torch.no_grad():
        for t in (0.25, 0.5, 0.75):
            noise = {m: torch.randn(x.shape, generator=g) for m, x in z.items()}
            tv = torch.full((b,), t)
            tt = timesteps_for_tasks(torch.zeros(b, dtype=torch.long), tv, tv, z["video"].shape[2], z["audio"].shape[2])
            total += float(module.losses(z, noise, tt, text, mask)["loss"]) / 3
    return total


def test_the_quickstart_dit_overfits_one_batch():
    with initialize_config_dir(CONFIGS, version_base="1.3"):
        cfg = compose("train", overrides=OVERFIT)
    L.seed_everything(0, verbose=False)
    module = instantiate(cfg.model)
    batch = next(iter(instantiate(cfg.data).train_stream)).normalize()
    z = module.normalize(module.encode(batch))
    params = [p for p in module.parameters() if p.requires_grad]
    opt = torch.optim.AdamW(params, lr=1e-3, betas=tuple(cfg.model.betas))
    module.train()
    text, mask = module.text_encoder(list(batch.captions))
    start = fixed_loss(module, z, text, mask)
    assert 3.0 < start < 5.0, start  # ~2 per modality: the untrained model predicts ~0
    for _ in range(120):
        text, mask = module.text_encoder(list(batch.captions))
        tt = module.sample_timesteps(4, z["video"].shape[2], z["audio"].shape[2], "cpu")
        loss = module.losses(z, {m: torch.randn_like(x) for m, x in z.items()}, tt, text, mask)["loss"]
        opt.zero_grad()
        loss.backward()
        torch.nn.utils.clip_grad_norm_(params, 1.0)
        opt.step()
    text, mask = module.text_encoder(list(batch.captions))
    end = fixed_loss(module, z, text, mask)
    assert end < 0.35 * start, (start, end)
