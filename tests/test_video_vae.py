"""The causal video VAE: timing-contract shapes, causality, image = one-frame video, chunking, losses."""

import pytest
import torch

from sora.evaluation.recon import trivial_psnr
from sora.models.gan import PatchDiscriminator3D, hinge_d_loss, hinge_g_loss
from sora.models.video_vae import (
    TINY_CONFIG,
    CausalConv3d,
    DiagonalGaussian,
    VideoVAE,
    pixel_weights,
    tiled,
)
from sora.timeline import Timeline


@pytest.fixture(scope="module", params=["stem_fold", "time_fold_1"])
def vae(request):
    """Time folded into channels in the stem, or after one per-frame level without norms (the quickstart's):
    every contract below (shapes, causality, image = one frame, chunking, tiling) holds for both."""
    torch.manual_seed(0)
    extra = {} if request.param == "stem_fold" else {"time_fold": 1, "norm": "none"}
    return VideoVAE(**{**TINY_CONFIG, **extra}).eval()


def video(b=1, t=9, h=16, w=16, seed=0):
    g = torch.Generator().manual_seed(seed)
    return torch.rand(b, 3, t, h, w, generator=g) * 2 - 1


def step_of(frame: int, stride: int = 4) -> int:
    """Latent step whose span holds ``frame`` (timing contract)."""
    return -(-frame // stride)


@pytest.mark.parametrize("seconds,fps,hw", [(1, 4, (16, 16)), (1, 8, (16, 24)), (0.2, 20, (32, 16)), (2, 8, (8, 8))])
@torch.no_grad()
def test_shapes_follow_timeline(vae, seconds, fps, hw):
    tl = Timeline(seconds=seconds, fps=fps)
    x = video(2, tl.num_frames, *hw)
    post = vae.encode(x)
    assert tuple(post.mean.shape) == (2, 16, tl.video_latent_steps, hw[0] // 8, hw[1] // 8)
    assert tuple(post.mean.shape) == vae.latent_shape(x.shape)
    assert tuple(post.sample().shape) == tuple(post.mean.shape)
    assert vae.decode(post.mode()).shape == x.shape
    recon, _ = vae(x)
    assert recon.shape == x.shape


@torch.no_grad()
def test_encoder_is_causal(vae):
    x = video(1, 17)
    base = vae.encode(x).mean
    for k in (0, 1, 4, 5, 8, 13, 16):
        y = x.clone()
        y[:, :, k] = -y[:, :, k]
        z = vae.encode(y).mean
        j = step_of(k)
        torch.testing.assert_close(z[:, :, :j], base[:, :, :j], atol=1e-6, rtol=0)
        assert (z[:, :, j] - base[:, :, j]).abs().max() > 1e-4, f"frame {k} did not reach latent {j}"


@torch.no_grad()
def test_decoder_is_causal(vae):
    z = torch.randn(1, 16, 5, 2, 2)
    base = vae.decode(z)
    for j in range(5):
        y = z.clone()
        y[:, :, j] += 1.0
        out = vae.decode(y)
        first = 0 if j == 0 else 4 * j - 3  # first frame latent j covers
        torch.testing.assert_close(out[:, :, :first], base[:, :, :first], atol=1e-6, rtol=0)
        assert (out[:, :, first] - base[:, :, first]).abs().max() > 1e-4


@torch.no_grad()
def test_image_is_one_frame_video(vae):
    x = video(2, 13, 16, 32)
    img = x[:, :, :1]
    post = vae.encode(img)
    assert tuple(post.mean.shape) == (2, 16, 1, 2, 4)
    torch.testing.assert_close(post.mean, vae.encode(x).mean[:, :, :1], atol=1e-6, rtol=0)
    assert vae.decode(post.mode()).shape == img.shape


@pytest.mark.parametrize("chunk", [1, 2, 3, 5, 100])
@torch.no_grad()
def test_chunked_equals_whole(vae, chunk):
    x = video(2, 17, 16, 16, seed=1)
    whole = vae.encode(x)
    part = vae.encode(x, chunk=chunk)
    torch.testing.assert_close(part.mean, whole.mean, atol=1e-5, rtol=0)
    torch.testing.assert_close(part.logvar, whole.logvar, atol=1e-5, rtol=0)
    z = whole.mode()
    torch.testing.assert_close(vae.decode(z, chunk=chunk), vae.decode(z), atol=1e-5, rtol=0)
    # caches are cleared afterwards: the whole path is unchanged
    assert all(m.cache is None and not m.streaming for m in vae.modules() if isinstance(m, CausalConv3d))


def test_chunked_gradients_match():
    torch.manual_seed(0)
    m = VideoVAE(**TINY_CONFIG)
    x = video(1, 9)
    grads = []
    for chunk in (None, 1):
        m.zero_grad()
        recon = m.decode(m.encode(x, chunk=chunk).mode(), chunk=chunk)
        recon.square().mean().backward()
        grads.append(m.encoder.stem.weight.grad.clone())
    torch.testing.assert_close(grads[1], grads[0], atol=1e-5, rtol=1e-4)


def test_loss_math():
    torch.manual_seed(0)
    x, recon = video(2, 5), video(2, 5, seed=3)
    mean, logvar = torch.randn(2, 16, 2, 2, 2), torch.randn(2, 16, 2, 2, 2) * 0.5
    post = DiagonalGaussian(torch.cat([mean, logvar], 1))
    out = VideoVAE.loss(x, recon, post, kl_weight=1e-3)
    l1 = (x - recon).abs().mean()
    kl = (0.5 * (mean**2 + logvar.exp() - 1 - logvar)).flatten(1).sum(1).mean()
    torch.testing.assert_close(out["l1"], l1)
    torch.testing.assert_close(out["kl"], kl)
    torch.testing.assert_close(out["loss"], l1 + 1e-3 * kl)
    # against torch.distributions
    q = torch.distributions.Normal(mean, (0.5 * logvar).exp())
    ref = torch.distributions.kl_divergence(q, torch.distributions.Normal(0.0, 1.0)).flatten(1).sum(1)
    torch.testing.assert_close(post.kl(), ref)
    std_normal = DiagonalGaussian(torch.zeros(3, 32, 2, 4, 4))
    assert std_normal.kl().abs().max() == 0
    assert VideoVAE.loss(x, x, std_normal)["loss"] == 0


def test_loss_addons():
    torch.manual_seed(0)
    x, recon = video(1, 9, 32, 32), video(1, 9, 32, 32, seed=4)
    post = DiagonalGaussian(torch.zeros(1, 32, 3, 4, 4))
    seen = []

    class Perc(torch.nn.Module):
        def forward(self, a, b):
            seen.append(a.shape)
            return (a - b).square().mean()

    disc = PatchDiscriminator3D(base_channels=8)
    logits = disc(x)
    assert logits.shape[:2] == (1, 1) and logits.shape[-2:] == (4, 4)
    before = VideoVAE.loss(x, recon, post, perceptual=Perc(), discriminator=disc, step=5, gan_start_step=10)
    assert "gan" not in before and seen[0] == (4, 3, 32, 32)
    after = VideoVAE.loss(x, recon, post, perceptual=Perc(), discriminator=disc, gan_weight=0.5, step=10,
                          gan_start_step=10)
    torch.testing.assert_close(after["loss"], after["l1"] + after["perceptual"] + 0.5 * after["gan"])
    torch.testing.assert_close(hinge_d_loss(torch.tensor([2.0, 0.0]), torch.tensor([-2.0, 0.5])),
                               torch.tensor(0.5 * (0.5 + 0.75)))
    torch.testing.assert_close(hinge_g_loss(torch.tensor([1.0, 3.0])), torch.tensor(-2.0))


def smooth_video(b=2, t=5, h=16, w=16):
    tt, yy, xx = torch.meshgrid(torch.linspace(0, 1, t), torch.linspace(-1, 1, h), torch.linspace(-1, 1, w),
                                indexing="ij")
    x = torch.stack([torch.sin(3 * xx + 2 * tt + yy), torch.cos(2 * yy - tt), 0.5 * xx * yy])
    return torch.stack([x * (1 - 2 * (i % 2)) for i in range(b)])


def test_overfit_one_batch():
    torch.manual_seed(0)
    m = VideoVAE(**TINY_CONFIG)
    opt = torch.optim.Adam(m.parameters(), lr=3e-3)
    x = smooth_video()
    losses, threads = [], torch.get_num_threads()
    torch.set_num_threads(1)  # tiny convs: one thread is fastest, and robust to a busy machine
    try:
        for _ in range(80):
            recon, post = m(x)
            loss = VideoVAE.loss(x, recon, post)["loss"]
            opt.zero_grad()
            loss.backward()
            opt.step()
            losses.append(loss.item())
    finally:
        torch.set_num_threads(threads)
    assert losses[-1] < 0.75 * losses[0], losses


def test_tiled_blending_is_exact_for_local_maps():
    x = torch.randn(2, 3, 5, 40, 56)
    down = lambda v: v[..., ::8, ::8] * 2  # noqa: E731
    up = lambda v: v.repeat_interleave(8, -2).repeat_interleave(8, -1)  # noqa: E731
    for tile, ov in [((16, 16), (8, 8)), ((24, 32), (8, 16)), ((16, 24), (0, 0)), ((64, 64), (16, 16))]:
        torch.testing.assert_close(tiled(down, x, tile, ov, 1, 8), down(x))
        z = x[..., :5, :7]
        torch.testing.assert_close(tiled(up, z, [t // 8 for t in tile], [o // 8 for o in ov], 8, 1), up(z))


@torch.no_grad()
def test_tiled_vae(vae):
    x = video(1, 9, 32, 48, seed=2)
    whole = vae.encode(x)
    # one tile covering the frame is the whole-frame path
    torch.testing.assert_close(vae.encode(x, tile=(32, 48)).mean, whole.mean, atol=1e-5, rtol=0)
    post = vae.encode(x, tile=(16, 24), overlap=8)
    assert post.mean.shape == whole.mean.shape and torch.isfinite(post.mean).all()
    torch.testing.assert_close(vae.encode(x, chunk=1, tile=(16, 24), overlap=8).mean, post.mean, atol=1e-5, rtol=0)
    z = whole.mode()
    out = vae.decode(z, tile=(16, 16))  # default overlap tile // 4 rounded down to 8 px: 0 here
    assert out.shape == x.shape and torch.isfinite(out).all()
    torch.testing.assert_close(vae.decode(z, chunk=2, tile=(24, 24)), vae.decode(z, tile=(24, 24)), atol=1e-5, rtol=0)
    with pytest.raises(ValueError, match="tile"):
        vae.encode(x, tile=(12, 16))
    with pytest.raises(ValueError, match="overlap"):
        vae.encode(x, tile=16, overlap=16)


@pytest.mark.parametrize("shape,words", [
    ((1, 3, 8, 16, 16), ["T=8", "1 + 4k"]),
    ((1, 3, 10, 16, 16), ["T=10", "1 + 4k"]),
    ((1, 3, 9, 12, 16), ["H=12", "divisible by 8"]),
    ((1, 3, 9, 16, 20), ["W=20", "divisible by 8"]),
    ((1, 4, 9, 16, 16), ["[B, 3, T, H, W]"]),
])
def test_bad_shapes_raise(vae, shape, words):
    with pytest.raises(ValueError) as err:
        vae.encode(torch.zeros(shape))
    for w in words + [str(shape)]:
        assert w in str(err.value)


def test_bad_config_and_chunk(vae):
    with pytest.raises(ValueError, match="spatial_stride"):
        VideoVAE(base_channels=8, channel_mult=(1, 2), spatial_patch=2)
    with pytest.raises(ValueError, match="chunk"):
        vae.encode(video(1, 5), chunk=0)
    with pytest.raises(ValueError, match="latent shape"):
        vae.decode(torch.zeros(1, 8, 2, 2, 2))


def test_sizes():
    assert VideoVAE().num_params() > 10 * VideoVAE(**TINY_CONFIG).num_params()


def test_motion_weights_count_what_moves():
    """1 where a pixel equals the clip's temporal median (the still background), 1 + w * |x - median|
    (largest channel) where something passes; a still clip weighs every pixel 1."""
    x = torch.full((1, 3, 5, 4, 4), -1.0)
    x[0, :, 2, 1, 1] = 1.0  # a "ball" in one frame: 2 away from the background
    w = pixel_weights(x, motion_weight=10.0)
    assert w.shape == (1, 1, 5, 4, 4) and w[0, 0, 2, 1, 1] == 21 and (w.sum() - 21) == w.numel() - 1
    assert torch.equal(pixel_weights(x[:, :, :1].expand_as(x), 10.0), torch.ones_like(w))


def test_trivial_psnr_baselines():
    """A still clip is its own temporal median (PSNR at the 1e-10 MSE floor, ~106 dB); the mean frame of
    two different clips fits neither; a given mean frame that is the still clip's own frame fits it."""
    frame = torch.rand(1, 3, 1, 8, 8) * 2 - 1
    clips = torch.cat([frame.expand(1, 3, 5, 8, 8), video(1, 5, 8, 8, seed=7)])
    out = trivial_psnr(clips)
    assert out["still"][0] > 100 and out["still"][1] < 20
    assert (out["mean_frame"] < 20).all()
    assert trivial_psnr(clips, mean_frame=frame[0, :, 0])["mean_frame"][0] > 100
