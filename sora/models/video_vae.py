"""Spatiotemporal patch VAE for video: causal in time, 4x time and 8x space compression.

Timing contract (``sora.timeline``): a clip of ``1 + 4k`` frames maps to ``1 + k`` latent
steps. The stem replicates frame 0 three times on the past side and folds every 4 frames
into channels, so latent 0 sees frame 0 alone and latent ``j >= 1`` sees frames
``4j-3 .. 4j`` (plus, through the causal convolutions, everything before). An image is a
one-frame video. Every layer after the stem is causal in time: convolutions pad only the
past side, norms are per position (RMS over channels), so latent ``j`` depends only on
frames ``0 .. 4j``, and the decoder's frames ``4j-3 .. 4j`` only on latents ``0 .. j``.

Streaming: inside :meth:`VideoVAE.streaming` every :class:`CausalConv3d` keeps the last
``kernel_t - 1`` frames of its input and uses them as its past padding on the next call, so
``encode(x, chunk=n)`` / ``decode(z, chunk=n)`` run ``n`` latent steps at a time with memory
bounded by the chunk, and match the whole-clip result to float rounding. ``tile=(th, tw)``
also splits space into overlapping tiles blended linearly (approximate at tile borders).

Losses: :meth:`VideoVAE.loss` gives L1 + ``kl_weight`` * KL, plus an optional perceptual term
(any module mapping two [N, 3, H, W] image batches in [-1, 1] to distances, e.g.
:class:`sora.models.perceptual.LPIPS`) and an optional hinge GAN generator term from
:class:`PatchDiscriminator3D`, active from ``gan_start_step`` on.
"""

from __future__ import annotations

import contextlib

import torch
import torch.nn.functional as F
from einops import rearrange
from torch import nn

from sora.models.distributions import DiagonalGaussian  # re-exported

TINY_CONFIG = dict(latent_channels=16, base_channels=8, channel_mult=(1, 2, 4), num_res_blocks=1)


class RMSNorm(nn.Module):
    """RMS norm over channels at each (t, h, w): causal and tile-friendly, unlike GroupNorm."""

    def __init__(self, channels: int, eps: float = 1e-6):
        super().__init__()
        self.eps, self.weight = eps, nn.Parameter(torch.ones(channels, 1, 1, 1))

    def forward(self, x):
        return x * torch.rsqrt(x.pow(2).mean(1, keepdim=True) + self.eps) * self.weight


class CausalConv3d(nn.Module):
    """3D conv padded only on the past side in time (frame 0 replicated), 'same' in space.

    In streaming mode (``self.streaming = True``) the last ``kernel_t - 1`` input frames are
    kept in ``self.cache`` and replace the replicate padding on the next call.
    """

    def __init__(self, cin: int, cout: int, kernel: int | tuple = 3, stride: tuple = (1, 1, 1)):
        super().__init__()
        kt, kh, kw = (kernel,) * 3 if isinstance(kernel, int) else kernel
        self.kt, self.conv = kt, nn.Conv3d(cin, cout, (kt, kh, kw), stride=stride, padding=(0, kh // 2, kw // 2))
        self.streaming, self.cache = False, None

    def forward(self, x):
        if self.kt > 1:
            cached = self.streaming and self.cache is not None
            x = torch.cat([self.cache if cached else x[:, :, :1].expand(-1, -1, self.kt - 1, -1, -1), x], dim=2)
            if self.streaming:
                self.cache = x[:, :, -(self.kt - 1):]
        return self.conv(x)


class ResBlock(nn.Module):
    def __init__(self, cin: int, cout: int):
        super().__init__()
        self.norm1, self.conv1 = RMSNorm(cin), CausalConv3d(cin, cout, 3)
        self.norm2, self.conv2 = RMSNorm(cout), CausalConv3d(cout, cout, 3)
        self.skip = nn.Conv3d(cin, cout, 1) if cin != cout else nn.Identity()

    def forward(self, x):
        h = self.conv1(F.silu(self.norm1(x)))
        h = self.conv2(F.silu(self.norm2(h)))
        return self.skip(x) + h


class Upsample(nn.Module):
    """Nearest 2x in space, then a causal 3x3x3 conv."""

    def __init__(self, ch: int):
        super().__init__()
        self.conv = CausalConv3d(ch, ch, 3)

    def forward(self, x):
        return self.conv(F.interpolate(x, scale_factor=(1, 2, 2), mode="nearest"))


class Encoder(nn.Module):
    def __init__(self, latent_channels, base_channels, channel_mult, num_res_blocks, spatial_patch, temporal_stride):
        super().__init__()
        self.pt, self.ps = temporal_stride, spatial_patch
        chans = [base_channels * m for m in channel_mult]
        self.stem = nn.Conv3d(3 * temporal_stride * spatial_patch**2, chans[0], 1)
        blocks, ch = [], chans[0]
        for i, c in enumerate(chans):
            for _ in range(num_res_blocks):
                blocks.append(ResBlock(ch, c))
                ch = c
            if i < len(chans) - 1:  # spatial 2x down
                blocks.append(CausalConv3d(ch, ch, 3, stride=(1, 2, 2)))
        blocks.append(ResBlock(ch, ch))  # middle
        self.blocks = nn.Sequential(*blocks)
        self.norm_out, self.conv_out = RMSNorm(ch), CausalConv3d(ch, 2 * latent_channels, 3)

    def forward(self, x, first: bool = True):
        if first:  # frame 0 alone: pad the past with copies of it to fill the first group
            x = torch.cat([x[:, :, :1].expand(-1, -1, self.pt - 1, -1, -1), x], dim=2)
        x = rearrange(x, "b c (t pt) (h ph) (w pw) -> b (c pt ph pw) t h w", pt=self.pt, ph=self.ps, pw=self.ps)
        x = self.blocks(self.stem(x))
        return self.conv_out(F.silu(self.norm_out(x)))


class Decoder(nn.Module):
    def __init__(self, latent_channels, base_channels, channel_mult, num_res_blocks, spatial_patch, temporal_stride):
        super().__init__()
        self.pt, self.ps = temporal_stride, spatial_patch
        chans = [base_channels * m for m in channel_mult]
        ch = chans[-1]
        self.conv_in = CausalConv3d(latent_channels, ch, 3)
        blocks = [ResBlock(ch, ch)]  # middle
        for i, c in reversed(list(enumerate(chans))):
            for _ in range(num_res_blocks):
                blocks.append(ResBlock(ch, c))
                ch = c
            if i > 0:
                blocks.append(Upsample(ch))
        self.blocks = nn.Sequential(*blocks)
        self.norm_out, self.conv_out = RMSNorm(ch), nn.Conv3d(ch, 3 * temporal_stride * spatial_patch**2, 1)

    def forward(self, z, first: bool = True):
        x = self.conv_out(F.silu(self.norm_out(self.blocks(self.conv_in(z)))))
        x = rearrange(x, "b (c pt ph pw) t h w -> b c (t pt) (h ph) (w pw)", pt=self.pt, ph=self.ps, pw=self.ps)
        return x[:, :, self.pt - 1:] if first else x  # latent 0 stands for frame 0 alone


class VideoVAE(nn.Module):
    """Causal spatiotemporal patch VAE: [B, 3, 1+4k, H, W] in [-1, 1] <-> [B, C, 1+k, H/8, W/8]."""

    def __init__(self, latent_channels: int = 16, base_channels: int = 64, channel_mult=(1, 2, 4),
                 num_res_blocks: int = 1, spatial_patch: int = 2, temporal_stride: int = 4,
                 spatial_stride: int = 8):
        super().__init__()
        channel_mult = tuple(channel_mult)
        if spatial_patch * 2 ** (len(channel_mult) - 1) != spatial_stride:
            raise ValueError(
                f"spatial_patch={spatial_patch} * 2**(len(channel_mult)-1)={2 ** (len(channel_mult) - 1)} "
                f"must equal spatial_stride={spatial_stride}")
        self.latent_channels, self.temporal_stride = latent_channels, temporal_stride
        self.spatial_stride = spatial_stride
        args = (latent_channels, base_channels, channel_mult, num_res_blocks, spatial_patch, temporal_stride)
        self.encoder, self.decoder = Encoder(*args), Decoder(*args)
        self.apply(self._init_weights)
        for m in self.modules():  # residual branches start at zero: every block is the identity at init
            if isinstance(m, ResBlock):
                nn.init.zeros_(m.conv2.conv.weight)

    @staticmethod
    def _init_weights(m):
        if isinstance(m, nn.Conv3d):
            nn.init.kaiming_normal_(m.weight, nonlinearity="linear")
            nn.init.zeros_(m.bias)

    # -- shapes ---------------------------------------------------------------------------
    def check_video(self, x: torch.Tensor) -> None:
        s, p = self.temporal_stride, self.spatial_stride
        if x.ndim != 5 or x.shape[1] != 3:
            raise ValueError(f"video shape {tuple(x.shape)}: expected [B, 3, T, H, W]")
        t, h, w = x.shape[2:]
        if (t - 1) % s:
            raise ValueError(f"video shape {tuple(x.shape)}: T={t} frames must be 1 + {s}k (timing contract)")
        if h % p or w % p:
            raise ValueError(f"video shape {tuple(x.shape)}: H={h}, W={w} must be divisible by {p}")

    def latent_shape(self, video_shape) -> tuple:
        b, _, t, h, w = video_shape
        s, p = self.temporal_stride, self.spatial_stride
        return (b, self.latent_channels, (t - 1) // s + 1, h // p, w // p)

    def num_params(self) -> int:
        return sum(p.numel() for p in self.parameters())

    # -- streaming ------------------------------------------------------------------------
    @contextlib.contextmanager
    def streaming(self):
        """Within: causal convs carry their last input frames across calls; cleared on exit."""
        convs = [m for m in self.modules() if isinstance(m, CausalConv3d)]
        for m in convs:
            m.streaming, m.cache = True, None
        try:
            yield
        finally:
            for m in convs:
                m.streaming, m.cache = False, None

    def _check_args(self, chunk, tile, overlap):
        if chunk is not None and (isinstance(chunk, bool) or not isinstance(chunk, int) or chunk < 1):
            raise ValueError(f"chunk={chunk!r}: must be a positive number of latent steps or None")
        if tile is None:
            return None, None
        p = self.spatial_stride
        tile = (tile, tile) if isinstance(tile, int) else tuple(tile)
        overlap = tuple(t // 4 // p * p for t in tile) if overlap is None else (
            (overlap, overlap) if isinstance(overlap, int) else tuple(overlap))
        if any(t < p or t % p or o < 0 or o % p or o >= t for t, o in zip(tile, overlap)):
            raise ValueError(f"tile={tile}, overlap={overlap}: tiles must be positive multiples of {p} pixels "
                             f"and overlaps multiples of {p} smaller than the tile")
        return tile, overlap

    # -- encode / decode ------------------------------------------------------------------
    def _encode(self, x, chunk):
        if chunk is None:
            return self.encoder(x)
        s, moments = self.temporal_stride, []
        bounds = [0] + list(range(1 + s * (chunk - 1), x.shape[2], s * chunk)) + [x.shape[2]]
        with self.streaming():
            for i, (a, b) in enumerate(zip(bounds[:-1], bounds[1:])):
                moments.append(self.encoder(x[:, :, a:b], first=i == 0))
        return torch.cat(moments, dim=2)

    def _decode(self, z, chunk):
        if chunk is None:
            return self.decoder(z)
        with self.streaming():
            return torch.cat([self.decoder(z[:, :, a:a + chunk], first=a == 0)
                              for a in range(0, z.shape[2], chunk)], dim=2)

    def encode(self, x: torch.Tensor, chunk: int | None = None, tile=None, overlap=None) -> DiagonalGaussian:
        """Video [B, 3, 1+4k, H, W] -> posterior over [B, C, 1+k, H/8, W/8].

        ``chunk=n``: n latent steps (4n frames; 1+4(n-1) for the first) per call, exact.
        ``tile=(th, tw)`` pixels (``overlap`` pixels, default tile/4): spatial tiles blended
        linearly in the overlaps; approximate (the convs see less context at tile borders).
        """
        self.check_video(x)
        tile, overlap = self._check_args(chunk, tile, overlap)
        if tile is None:
            return DiagonalGaussian(self._encode(x, chunk))
        return DiagonalGaussian(tiled(lambda v: self._encode(v, chunk), x, tile, overlap, 1, self.spatial_stride))

    def decode(self, z: torch.Tensor, chunk: int | None = None, tile=None, overlap=None) -> torch.Tensor:
        """Latents [B, C, 1+k, h, w] -> video [B, 3, 1+4k, 8h, 8w]; ``chunk``, ``tile`` as in :meth:`encode`."""
        if z.ndim != 5 or z.shape[1] != self.latent_channels:
            raise ValueError(f"latent shape {tuple(z.shape)}: expected [B, {self.latent_channels}, t, h, w]")
        tile, overlap = self._check_args(chunk, tile, overlap)
        if tile is None:
            return self._decode(z, chunk)
        p = self.spatial_stride
        return tiled(lambda v: self._decode(v, chunk), z, [t // p for t in tile], [o // p for o in overlap], p, 1)

    def forward(self, x: torch.Tensor, sample: bool = True, chunk: int | None = None, tile=None, overlap=None):
        """Returns (reconstruction, posterior)."""
        posterior = self.encode(x, chunk=chunk, tile=tile, overlap=overlap)
        z = posterior.sample() if sample else posterior.mode()
        return self.decode(z, chunk=chunk, tile=tile, overlap=overlap), posterior

    # -- loss -----------------------------------------------------------------------------
    @staticmethod
    def loss(x: torch.Tensor, recon: torch.Tensor, posterior: DiagonalGaussian, kl_weight: float = 1e-6,
             perceptual: nn.Module | None = None, perceptual_weight: float = 1.0, perceptual_frames: int = 4,
             discriminator: nn.Module | None = None, gan_weight: float = 0.1, step: int = 0,
             gan_start_step: int = 0, last_layer: torch.Tensor | None = None) -> dict:
        """dict(loss, l1, kl[, perceptual][, gan]).

        l1 = mean |x - recon|; kl = posterior.kl().mean() (summed over latent elements, mean over
        the batch); loss = l1 + kl_weight * kl (+ perceptual_weight * perceptual on up to
        ``perceptual_frames`` evenly spaced frames) (+ gan_weight * hinge generator loss once
        ``step >= gan_start_step``). The discriminator's own loss is :func:`hinge_d_loss`.
        ``last_layer`` (the decoder's output weight): the GAN term is scaled by
        :func:`adaptive_weight` too (logged as ``gan_scale``), so its gradient there is
        ``gan_weight`` times the reconstruction terms' whatever the discriminator's state.
        """
        out = dict(l1=(x - recon).abs().mean(), kl=posterior.kl().mean())
        loss = out["l1"] + kl_weight * out["kl"]
        if perceptual is not None:
            t = x.shape[2]
            idx = torch.linspace(0, t - 1, min(perceptual_frames, t)).round().long().unique().to(x.device)
            frames = lambda v: rearrange(v.index_select(2, idx), "b c t h w -> (b t) c h w")  # noqa: E731
            out["perceptual"] = perceptual(frames(recon), frames(x)).mean()
            loss = loss + perceptual_weight * out["perceptual"]
        if discriminator is not None and step >= gan_start_step:
            out["gan"] = hinge_g_loss(discriminator(recon))
            if last_layer is not None:
                out["gan_scale"] = adaptive_weight(loss, out["gan"], last_layer)
                loss = loss + gan_weight * out["gan_scale"] * out["gan"]
            else:
                loss = loss + gan_weight * out["gan"]
        out["loss"] = loss
        return out


def _ramp(n: int, ramp: int, device) -> torch.Tensor:
    """Blend weights along one tile axis: rising linearly over ``ramp`` at both ends, 1 inside."""
    i = torch.arange(n, device=device, dtype=torch.float32) + 0.5
    return torch.minimum(i, n - i).div(max(ramp, 1)).clamp(max=1.0)


def tiled(fn, x: torch.Tensor, tile, overlap, num: int, den: int) -> torch.Tensor:
    """Apply ``fn`` to overlapping spatial tiles of ``x`` [..., H, W] and blend the outputs.

    ``fn`` scales space by ``num/den``; tile and overlap are in input units. Each output pixel
    is the weighted mean of the tiles covering it, weights ramping over the overlap.
    """
    def starts(n, t, o):
        t = min(t, n)
        s = list(range(0, n - t + 1, max(t - o, 1)))
        return (s + [n - t] if s[-1] + t < n else s), t

    (ys, th), (xs, tw) = starts(x.shape[-2], tile[0], overlap[0]), starts(x.shape[-1], tile[1], overlap[1])
    out = weight = None
    for y in ys:
        for x0 in xs:
            part = fn(x[..., y:y + th, x0:x0 + tw])
            if out is None:
                size = (x.shape[-2] * num // den, x.shape[-1] * num // den)
                out, weight = part.new_zeros(*part.shape[:-2], *size), part.new_zeros(size)
            h, w, oy, ox = *part.shape[-2:], y * num // den, x0 * num // den
            win = (_ramp(h, overlap[0] * num // den, x.device)[:, None]
                   * _ramp(w, overlap[1] * num // den, x.device)[None]).to(part.dtype)
            out[..., oy:oy + h, ox:ox + w] += part * win
            weight[oy:oy + h, ox:ox + w] += win
    return out / weight


# -- adversarial and perceptual add-ons ----------------------------------------------------
class PatchDiscriminator3D(nn.Module):
    """Small 3D-conv PatchGAN: [B, 3, T, H, W] -> patch logits [B, 1, T', H/8, W/8]."""

    def __init__(self, base_channels: int = 32, num_layers: int = 3):
        super().__init__()
        layers, ch = [nn.Conv3d(3, base_channels, (3, 4, 4), stride=(1, 2, 2), padding=(1, 1, 1))], base_channels
        for i in range(1, num_layers):
            c = base_channels * 2 ** min(i, 3)
            layers += [nn.LeakyReLU(0.2), nn.Conv3d(ch, c, (3, 4, 4), stride=(2 if i == 1 else 1, 2, 2), padding=1),
                       nn.GroupNorm(min(32, c // 4), c)]
            ch = c
        layers += [nn.LeakyReLU(0.2), nn.Conv3d(ch, 1, 3, padding=1)]
        self.net = nn.Sequential(*layers)

    def forward(self, x):
        return self.net(x)


def hinge_d_loss(real_logits: torch.Tensor, fake_logits: torch.Tensor) -> torch.Tensor:
    return 0.5 * (F.relu(1.0 - real_logits).mean() + F.relu(1.0 + fake_logits).mean())


def hinge_g_loss(fake_logits: torch.Tensor) -> torch.Tensor:
    return -fake_logits.mean()


def adaptive_weight(rec_loss: torch.Tensor, adv_loss: torch.Tensor, last_layer: torch.Tensor,
                    max_weight: float = 1e4) -> torch.Tensor:
    """VQGAN's balance (Esser et al. 2021): ``|d rec / d W| / |d adv / d W|`` at the decoder's last
    weight ``W``, detached, so an adversarial term scaled by it pushes ``W`` as hard as the
    reconstruction does. Without a graph (validation) it is 0."""
    if not (rec_loss.requires_grad and adv_loss.requires_grad):
        return rec_loss.new_zeros(())
    g_rec = torch.autograd.grad(rec_loss, last_layer, retain_graph=True)[0]
    g_adv = torch.autograd.grad(adv_loss, last_layer, retain_graph=True)[0]
    return (g_rec.norm() / (g_adv.norm() + 1e-4)).clamp(max=max_weight).detach()


__all__ = ["VideoVAE", "DiagonalGaussian", "CausalConv3d", "PatchDiscriminator3D", "hinge_d_loss",
           "hinge_g_loss", "adaptive_weight", "tiled", "TINY_CONFIG"]
