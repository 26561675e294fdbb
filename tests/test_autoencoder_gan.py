"""Adversarial and perceptual losses of the autoencoder stages: each loss trains only its own
network, the discriminator joins at its start step, LPIPS loads from a local file and stays out
of checkpoints; the GAN experiments run through the real CLI."""

from __future__ import annotations

import pytest
import torch
from safetensors.torch import save_file

from sora.models.audio_vae import AudioVAE, Vocoder
from sora.models.gan import (MultiPeriodDiscriminator, PatchDiscriminator3D, discriminator_loss,
                             feature_matching_loss, generator_adversarial_loss, hinge_d_loss, hinge_g_loss)
from sora.models.perceptual import LPIPS
from sora.models.video_vae import TINY_CONFIG, VideoVAE
from sora.training.autoencoders import AudioVAEModule, VideoVAEModule, frozen
from tests.test_train_cli import _ckpt, _metrics, _ok, _train
from tests.test_training import _batch

pytestmark = pytest.mark.filterwarnings("ignore:You are trying to `self.log\\(\\)`")


def _grads(module):
    return {n: None if p.grad is None else p.grad.clone() for n, p in module.named_parameters()}


def test_frozen_passes_gradients_to_the_inputs_only():
    torch.manual_seed(0)
    net = torch.nn.Linear(3, 2)
    x = torch.randn(4, 3, requires_grad=True)
    frozen(net)(x).sum().backward()
    assert net.weight.grad is None and net.bias.grad is None
    torch.testing.assert_close(x.grad, net.weight.detach().sum(0).expand(4, 3))


def _lpips_file(tmp_path, seed=0):
    torch.manual_seed(seed)
    net = LPIPS()
    for p in net.parameters():  # random VGG weights with positive lin weights: a valid LPIPS
        p.data = p.data.abs() if p.ndim == 4 and p.shape[0] == 1 else p.data
    path = tmp_path / "lpips.safetensors"
    save_file({k: v.contiguous() for k, v in net.state_dict().items()}, str(path))
    return path, net


def test_lpips_loads_from_a_local_file_and_is_a_distance(tmp_path):
    path, ref = _lpips_file(tmp_path)
    net = LPIPS.from_file(str(path))
    assert not any(p.requires_grad for p in net.parameters())
    g = torch.Generator().manual_seed(1)
    x = torch.rand(2, 3, 32, 32, generator=g) * 2 - 1
    near = (x + 0.05 * torch.randn(x.shape, generator=g)).clamp(-1, 1)
    far = (x + 0.5 * torch.randn(x.shape, generator=g)).clamp(-1, 1)
    torch.testing.assert_close(net(x, near), ref(x, near))  # the file holds the whole network
    assert torch.all(net(x, x) == 0)
    torch.testing.assert_close(net(x, far), net(far, x))
    assert torch.all(net(x, near) < net(x, far))
    y = far.clone().requires_grad_(True)
    net(x, y).sum().backward()
    assert y.grad is not None and y.grad.abs().sum() > 0


def test_lpips_bad_files_fail_in_one_line_naming_the_file(tmp_path):
    with pytest.raises(FileNotFoundError, match="nope.safetensors.*convert_lpips"):
        LPIPS.from_file(str(tmp_path / "nope.safetensors"))
    bad = tmp_path / "bad.safetensors"
    save_file({"features.0.weight": torch.zeros(64, 3, 3, 3)}, str(bad))
    with pytest.raises(ValueError, match="bad.safetensors: not an LPIPS-VGG16 file"):
        LPIPS.from_file(str(bad))


def test_video_gan_step_trains_each_network_with_its_own_loss_only(tmp_path):
    torch.manual_seed(0)
    path, _ = _lpips_file(tmp_path)
    module = VideoVAEModule(VideoVAE(**TINY_CONFIG), sample_posterior=False, kl_weight=1e-3,
                            discriminator=PatchDiscriminator3D(8, 2), gan_weight=0.5, perceptual_weights=str(path),
                            gan_adaptive=False)
    x = _batch().video
    module.training_step(_batch(), 0).backward()
    got_vae, got_disc = _grads(module.vae), _grads(module.discriminator)

    # the same losses written out: the VAE's from l1 + kl + lpips + gan, the discriminator's from hinge only
    module.zero_grad()
    recon, post = module.vae(x, sample=False)
    idx = torch.linspace(0, x.shape[2] - 1, 4).round().long().unique()
    frames = lambda v: v.index_select(2, idx).transpose(1, 2).flatten(0, 1)  # noqa: E731
    g_loss = ((x - recon).abs().mean() + 1e-3 * post.kl().mean() + module.perceptual(frames(recon), frames(x)).mean()
              + 0.5 * hinge_g_loss(module.discriminator(recon)))
    g_loss.backward(inputs=list(module.vae.parameters()))
    hinge_d_loss(module.discriminator(x), module.discriminator(recon.detach())).backward(
        inputs=list(module.discriminator.parameters()))
    for want, got in ((_grads(module.vae), got_vae), (_grads(module.discriminator), got_disc)):
        for name in want:
            torch.testing.assert_close(got[name], want[name], rtol=1e-4, atol=1e-6, msg=name)


def test_adaptive_weight_balances_the_gradients_at_the_last_layer():
    torch.manual_seed(0)
    vae, disc = VideoVAE(**TINY_CONFIG), PatchDiscriminator3D(8, 2)
    x = _batch().video
    recon, post = vae(x, sample=False)
    terms = VideoVAE.loss(x, recon, post, discriminator=frozen(disc), gan_weight=1.0,
                          last_layer=vae.decoder.conv_out.weight)
    w = vae.decoder.conv_out.weight
    rec = terms["l1"] + 1e-6 * terms["kl"]
    g_rec = torch.autograd.grad(rec, w, retain_graph=True)[0]
    g_adv = torch.autograd.grad(terms["gan_scale"] * terms["gan"], w, retain_graph=True)[0]
    torch.testing.assert_close(g_adv.norm(), g_rec.norm(), rtol=1e-2, atol=0)  # up to the 1e-4 guard
    torch.testing.assert_close(terms["loss"], rec + terms["gan_scale"] * terms["gan"])
    assert not terms["gan_scale"].requires_grad


def test_video_discriminator_waits_for_its_start_step():
    module = VideoVAEModule(VideoVAE(**TINY_CONFIG), discriminator=PatchDiscriminator3D(8, 2), gan_start_step=10,
                            total_steps=100)
    module.training_step(_batch(), 0).backward()  # global_step 0 < 10: no GAN terms yet
    assert all(p.grad is None for p in module.discriminator.parameters())
    groups = module.configure_optimizers()["optimizer"].param_groups
    assert sum(len(g["params"]) for g in groups) == len([p for p in module.parameters() if p.requires_grad])


def test_audio_gan_step_trains_vocoder_and_discriminator_with_their_own_losses():
    torch.manual_seed(0)
    module = AudioVAEModule(AudioVAE(channels=32, num_blocks=1), Vocoder(channels=32), vocoder_segment=None,
                            sample_posterior=False, discriminator=MultiPeriodDiscriminator(channels=4, num_layers=2),
                            gan_weight=0.7, feature_matching_weight=3.0, disc_lr=5e-5,
                            total_steps=100)
    batch = _batch()
    module.training_step(batch, 0).backward()
    got_voc, got_disc = _grads(module.vocoder), _grads(module.discriminator)

    module.zero_grad()
    wave = batch.audio.mean(1)
    mel = module.vae.mel(wave)
    mel, wave = module.vocoder_pairs(mel, wave)
    voc = module.vocoder.loss(mel, wave)
    real_outs, fake_outs = module.discriminator(wave[:, None]), module.discriminator(voc["pred"])
    g_loss = voc["loss"] + 0.7 * generator_adversarial_loss(fake_outs) + 3.0 * feature_matching_loss(real_outs, fake_outs)
    g_loss.backward(inputs=list(module.vocoder.parameters()))
    discriminator_loss(module.discriminator(wave[:, None]), module.discriminator(voc["pred"].detach())).backward(
        inputs=list(module.discriminator.parameters()))
    for want, got in ((_grads(module.vocoder), got_voc), (_grads(module.discriminator), got_disc)):
        for name in want:
            torch.testing.assert_close(got[name], want[name], rtol=1e-4, atol=1e-6, msg=name)
    lrs = {g["initial_lr"] for g in module.configure_optimizers()["optimizer"].param_groups}
    assert lrs == {module.lr, 5e-5}


def test_audio_gan_needs_a_vocoder():
    with pytest.raises(ValueError, match="model.vocoder is null"):
        AudioVAEModule(AudioVAE(channels=32, num_blocks=1), None, discriminator=MultiPeriodDiscriminator())


@pytest.mark.parametrize("name", ["video_vae_gan", "audio_vae_gan"])
def test_gan_experiments_train_through_the_cli(tmp_path, name):
    run = tmp_path / name
    _ok(_train(run, f"experiment=quickstart/{name}", "trainer.max_steps=3", "model.gan_start_step=1",
               "trainer.val_check_interval=3", "data.num_workers=0"))
    rows = _metrics(run)
    disc = [float(r["train/disc"]) for r in rows if r.get("train/disc")]
    assert len(disc) == 2  # steps 1 and 2 (0-based), not step 0
    ckpt = _ckpt(run)
    assert ckpt["global_step"] == 3  # one optimizer step per batch, GAN or not
    assert any(k.startswith("discriminator.") for k in ckpt["state_dict"])


def test_lpips_weights_stay_out_of_checkpoints(tmp_path):
    path, _ = _lpips_file(tmp_path)
    module = VideoVAEModule(VideoVAE(**TINY_CONFIG), perceptual_weights=str(path))
    checkpoint = {"state_dict": module.state_dict()}
    module.on_save_checkpoint(checkpoint)
    assert checkpoint["state_dict"] and not any(k.startswith("perceptual.") for k in checkpoint["state_dict"])
    fresh = VideoVAEModule(VideoVAE(**TINY_CONFIG), perceptual_weights=str(path))
    fresh.on_load_checkpoint(checkpoint)  # the file's weights put back: a strict load passes
    fresh.load_state_dict(checkpoint["state_dict"])
    for k, v in module.state_dict().items():
        assert torch.equal(fresh.state_dict()[k], v), k


def test_convert_lpips_from_the_public_file_layouts(tmp_path):
    from tools.convert_lpips import main

    _, ref = _lpips_file(tmp_path)
    state = ref.state_dict()
    vgg = {k: v for k, v in state.items() if k.startswith("features.")}
    vgg["classifier.0.weight"] = torch.zeros(2, 2)  # torchvision's file also has the classifier
    torch.save(vgg, tmp_path / "vgg16.pth")
    torch.save({f"lin{i}.model.1.weight": state[f"lins.{i}.weight"] for i in range(5)}, tmp_path / "vgg.pth")
    out = tmp_path / "out.safetensors"
    assert main(["--vgg", str(tmp_path / "vgg16.pth"), "--lin", str(tmp_path / "vgg.pth"), "--out", str(out)]) == 0
    x, y = torch.rand(2, 1, 3, 16, 16).unbind(0)
    torch.testing.assert_close(LPIPS.from_file(str(out))(x, y), ref(x, y))
    with pytest.raises(SystemExit, match="inputs lack .*lins"):
        main(["--vgg", str(tmp_path / "vgg16.pth"), "--lin", str(tmp_path / "vgg16.pth"), "--out", str(out)])
