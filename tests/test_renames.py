"""A checkpoint written before a class moved (its stored config naming the old ``_target_``) still loads."""

from __future__ import annotations

import copy

import pytest
import torch
from hydra.errors import InstantiationException
from hydra.utils import get_class, instantiate
from omegaconf import OmegaConf

from sora.cli.eval import load_autoencoder
from sora.models.gan import MultiPeriodDiscriminator, PatchDiscriminator3D
from sora.checkpoints.export import read_training_checkpoint
from sora.checkpoints.renames import MOVED_TARGETS, upgrade_targets
from sora.models.video_vae import TINY_CONFIG, VideoVAE

OLD_VIDEO_DISC = "sora.models.video_vae.PatchDiscriminator3D"
OLD_AUDIO_DISC = "sora.models.audio_vae.MultiPeriodDiscriminator"


def test_upgrade_targets_renames_moved_targets_anywhere_and_nothing_else():
    stored = {"model": {"_target_": "sora.training.autoencoders.VideoVAEModule", "lr": 1e-4,
                        "discriminator": {"_target_": OLD_VIDEO_DISC, "base_channels": 8},
                        "nets": [{"_target_": OLD_AUDIO_DISC}, {"name": OLD_AUDIO_DISC}, 3]},
              "timeline": {"_target_": "sora.timeline.Timeline", "seconds": 1.0}}
    before = copy.deepcopy(stored)
    new = upgrade_targets(stored)
    assert stored == before  # a copy: the checkpoint dict is left as it was
    assert new["model"]["discriminator"] == {"_target_": "sora.models.gan.PatchDiscriminator3D", "base_channels": 8}
    assert new["model"]["nets"] == [{"_target_": "sora.models.gan.MultiPeriodDiscriminator"},
                                    {"name": OLD_AUDIO_DISC}, 3]  # only `_target_` values change
    assert new["model"]["_target_"] == before["model"]["_target_"] and new["timeline"] == before["timeline"]
    for old, now in MOVED_TARGETS.items():  # every new path names the same class, and it exists
        assert get_class(now).__name__ == old.rsplit(".", 1)[-1]


@pytest.mark.parametrize("old, cls, kwargs", [(OLD_VIDEO_DISC, PatchDiscriminator3D, {"base_channels": 8}),
                                              (OLD_AUDIO_DISC, MultiPeriodDiscriminator, {"channels": 4})])
def test_a_stored_config_with_the_old_target_instantiates_the_new_class(old, cls, kwargs):
    stored = {"_target_": old, **kwargs}
    with pytest.raises(InstantiationException):  # what an old checkpoint's config would do unchanged
        instantiate(OmegaConf.create(stored))
    assert isinstance(instantiate(OmegaConf.create(upgrade_targets(stored))), cls)


def test_sora_eval_loads_an_old_video_vae_gan_checkpoint(tmp_path):
    config = {"model": {"_target_": "sora.training.autoencoders.VideoVAEModule",
                        "vae": {"_target_": "sora.models.video_vae.VideoVAE", **TINY_CONFIG},
                        "discriminator": {"_target_": OLD_VIDEO_DISC, "base_channels": 8, "num_layers": 2}},
              "data": {"train": {"_target_": "sora.data.pipeline.WorldClipStream"}}}
    torch.manual_seed(0)
    module = instantiate(OmegaConf.create(upgrade_targets(config))["model"])
    torch.save({"sora_config": config, "state_dict": module.state_dict()}, tmp_path / "old.ckpt")
    ckpt = read_training_checkpoint(tmp_path / "old.ckpt")  # every reader: sampling, evaluation, export
    assert ckpt["sora_config"]["data"]["train"]["_target_"] == "sora.data.streams.WorldClipStream"
    loaded, cfg = load_autoencoder(ckpt, use_ema=False, device="cpu")
    assert isinstance(loaded.discriminator, PatchDiscriminator3D) and isinstance(loaded.vae, VideoVAE)
    assert cfg.model.discriminator._target_ == "sora.models.gan.PatchDiscriminator3D"
    for k, v in module.state_dict().items():
        torch.testing.assert_close(loaded.state_dict()[k], v)
