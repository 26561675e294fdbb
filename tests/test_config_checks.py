"""Configs that cannot work fail before anything is built, in one line naming the key and the fix."""

from __future__ import annotations

import pytest
from hydra import compose, initialize_config_dir

from sora.cli.train import CONFIGS, checked
from sora.training.config_checks import ConfigError, check


def config(*overrides: str):
    with initialize_config_dir(CONFIGS, version_base="1.3"):
        return compose("train", overrides=list(overrides))


def error(*overrides: str, files: bool = True) -> str:
    with pytest.raises(ConfigError) as e:
        check(config(*overrides), files=files)
    assert "\n" not in str(e.value)
    return str(e.value)


DIT = ("experiment=quickstart/dit", "model.video_vae_ckpt=null", "model.audio_vae_ckpt=null")


def test_good_configs_pass():
    for overrides in (DIT, ("experiment=quickstart/video_vae",), ("experiment=quickstart/audio_vae",),
                      (*DIT, "data.train.buckets={area: 1024, ratios: ['1:1', '2:1'], multiple: 16}")):
        check(config(*overrides))


def test_frame_sizes_must_divide_by_the_vae_stride_times_the_patch():
    text = error(*DIT, "data.train.world.width=36")
    assert text.startswith("data.train.world.height/width: frames 32x36 are not divisible by 8")
    assert "model.video_vae.spatial_stride=4 x model.dit.patch_size=2" in text and "use e.g. 32x32" in text
    assert error("experiment=quickstart/video_vae", "data.val.world={height: 34, width: 32}").startswith(
        "data.val.world.height/width: frames 34x32 are not divisible by 4 (model.vae.spatial_stride=4)")
    text = error(*DIT, "data.train.buckets={area: 1024, ratios: ['1:1', '2:1'], multiple: 4}")
    assert text.startswith("data.train.buckets.multiple: frames") and "buckets.multiple=8" in text
    check(config("experiment=quickstart/audio_vae", "data.train.world.width=40"))  # no video model: no constraint


def test_heads_must_divide_the_width_and_split_over_sequence_parallel_ranks():
    assert error(*DIT, "model.dit.dim=64", "model.dit.heads=3") == (
        "model.dit.heads=3: model.dit.dim=64 does not split into 3 heads; use one of "
        "[1, 2, 4, 8, 16, 32, 64] or change model.dit.dim")
    assert error(*DIT, "model.sequence_parallel=3").startswith(
        "model.sequence_parallel=3: the DiT's heads=4 do not split over 3 ranks; use one of [1, 2, 4]")


def test_named_files_must_exist(tmp_path):
    assert error(*DIT, f"model.video_vae_ckpt={tmp_path}/none.ckpt").startswith(
        f"model.video_vae_ckpt={tmp_path}/none.ckpt: no such file")
    check(config(*DIT, f"model.video_vae_ckpt={tmp_path}/none.ckpt"), files=False)  # a dry run reads no file
    assert error("experiment=quickstart/video_vae", f"model.perceptual_weights={tmp_path}/lpips.safetensors"
                 ).startswith("model.perceptual_weights=")
    (tmp_path / "lpips.safetensors").write_bytes(b"")
    check(config("experiment=quickstart/video_vae", f"model.perceptual_weights={tmp_path}/lpips.safetensors"))


def test_the_cli_says_it_in_one_line():
    with pytest.raises(SystemExit) as e:
        checked(config(*DIT, "model.dit.heads=3"))
    assert str(e.value).startswith("sora-train: error in model.dit.heads=3: ")


def test_a_sweep_objective_needs_a_validation_within_max_steps():
    says = error(*DIT, "optimized_metric=val/loss", "trainer.max_steps=50", "trainer.val_check_interval=100")
    assert says == ("optimized_metric=val/loss: this run never validates (trainer.max_steps=50 < "
                    "trainer.val_check_interval=100); set trainer.val_check_interval=50 or less")
    check(config(*DIT, "optimized_metric=val/loss", "trainer.max_steps=100", "trainer.val_check_interval=100"))
    check(config(*DIT, "trainer.max_steps=50", "trainer.val_check_interval=100"))  # no objective: no validation needed
