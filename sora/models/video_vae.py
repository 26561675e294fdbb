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
:class:`sora.models.perceptual.LPIPS`) and an optional hinge GAN generator term from a
discriminator (:class:`sora.models.gan.PatchDiscriminator3D`), active from ``gan_start_step`` on.
"""

from __future__ import annotations

import contextlib

import torch
import torch.nn.functional as F
from einops import rearrange
from torch import nn

from sora.models.attention import RMSNorm
from sora.models.distributions import DiagonalGaussian  # re-exported
from sora.models.dtypes import as_weights
from sora.models.gan import adaptive_weight, hinge_g_loss

TINY_CONFIG = dict(latent_channels=16, base_channels=8, channel_mult=(1, 2, 4), num_res_blocks=1)


def make_norm(kind: str, channels: int) -> nn.Module:
    """``"rms"``: :class:`RMSNorm` over the channels at each (t, h, w); ``"none"``: identity. Without centring, an RMS norm lets a large
    constant (the learnt background) set every position's scale, which squashes what the latent
    adds: on the 32x32 quickstart world a decoder with it learnt the mean frame for 1000 steps,
    without it the balls (experiments/quickstart/README.md)."""
    if kind not in ("rms", "none"):
        raise ValueError(f"norm={kind!r}: choose rms or none")
    return RMSNorm(channels, dim=1) if kind == "rms" else nn.Identity()


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
    def __init__(self, cin: int, cout: int, norm: str = "rms"):
        super().__init__()
        self.norm1, self.conv1 = make_norm(norm, cin), CausalConv3d(cin, cout, 3)
        self.norm2, self.conv2 = make_norm(norm, cout), CausalConv3d(cout, cout, 3)
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


class TimeFold(nn.Module):
    """Causal 4x time compression inside the network: every ``stride`` frames of features fold into
    channels, then a 1x1 conv. With ``first`` the past is padded with copies of frame 0, so latent 0
    stands for frame 0 alone (as the stem does when it folds time itself)."""

    def __init__(self, ch: int, stride: int):
        super().__init__()
        self.stride, self.proj = stride, nn.Conv3d(ch * stride, ch, 1)

    def forward(self, x, first: bool):
        if first:
            x = torch.cat([x[:, :, :1].expand(-1, -1, self.stride - 1, -1, -1), x], dim=2)
        return self.proj(rearrange(x, "b c (t s) h w -> b (c s) t h w", s=self.stride))


class TimeUnfold(nn.Module):
    """The decoder's mirror of :class:`TimeFold`: a 1x1 conv to ``stride`` frames of features per
    latent step; with ``first`` the padding frames before frame 0 are dropped."""

    def __init__(self, ch: int, stride: int):
        super().__init__()
        self.stride, self.proj = stride, nn.Conv3d(ch, ch * stride, 1)

    def forward(self, x, first: bool):
        x = rearrange(self.proj(x), "b (c s) t h w -> b c (t s) h w", s=self.stride)
        return x[:, :, self.stride - 1:] if first else x


class Encoder(nn.Module):
    """Stem (space patches; time too when ``time_fold == 0``), residual blocks with a spatial 2x down
    between levels; with ``time_fold = k > 0`` the first k levels run per frame and time folds into
    channels (:class:`TimeFold`) where level k starts."""

    def __init__(self, latent_channels, base_channels, channel_mult, num_res_blocks, spatial_patch, temporal_stride,
                 time_fold=0, norm="rms"):
        super().__init__()
        self.pt, self.ps = temporal_stride, spatial_patch
        chans = [base_channels * m for m in channel_mult]
        stem_t = temporal_stride if time_fold == 0 else 1
        self.stem_t, self.stem = stem_t, nn.Conv3d(3 * stem_t * spatial_patch**2, chans[0], 1)
        levels, ch = [[]], chans[0]  # levels[0]: per frame (before the fold); levels[1]: per latent step
        for i, c in enumerate(chans):
            if i == time_fold and i > 0:
                self.fold = TimeFold(ch, temporal_stride)
                levels.append([])
            for _ in range(num_res_blocks):
                levels[-1].append(ResBlock(ch, c, norm))
                ch = c
            if i < len(chans) - 1:  # spatial 2x down
                levels[-1].append(CausalConv3d(ch, ch, 3, stride=(1, 2, 2)))
        levels[-1].append(ResBlock(ch, ch, norm))  # middle
        self.frame_blocks = nn.Sequential(*levels[0]) if len(levels) == 2 else None
        self.blocks = nn.Sequential(*levels[-1])
        self.norm_out, self.conv_out = make_norm(norm, ch), CausalConv3d(ch, 2 * latent_channels, 3)

    def forward(self, x, first: bool = True):
        x = as_weights(self, x)
        if first and self.stem_t > 1:  # frame 0 alone: pad the past with copies of it to fill the first group
            x = torch.cat([x[:, :, :1].expand(-1, -1, self.stem_t - 1, -1, -1), x], dim=2)
        x = rearrange(x, "b c (t pt) (h ph) (w pw) -> b (c pt ph pw) t h w", pt=self.stem_t, ph=self.ps, pw=self.ps)
        x = self.stem(x)
        if self.frame_blocks is not None:
            x = self.fold(self.frame_blocks(x), first)
        x = self.blocks(x)
        return self.conv_out(F.silu(self.norm_out(x)))


class Decoder(nn.Module):
    """Mirror of :class:`Encoder`: with ``time_fold = k > 0`` time unfolds (:class:`TimeUnfold`) before the
    last k levels, which run per frame, and the output conv writes space patches only."""

    def __init__(self, latent_channels, base_channels, channel_mult, num_res_blocks, spatial_patch, temporal_stride,
                 time_fold=0, norm="rms"):
        super().__init__()
        self.pt, self.ps = temporal_stride, spatial_patch
        chans = [base_channels * m for m in channel_mult]
        ch = chans[-1]
        self.conv_in = CausalConv3d(latent_channels, ch, 3)
        levels = [[ResBlock(ch, ch, norm)]]  # middle; levels[1] (with a fold): per frame
        for i, c in reversed(list(enumerate(chans))):
            for _ in range(num_res_blocks):
                levels[-1].append(ResBlock(ch, c, norm))
                ch = c
            if i > 0:
                levels[-1].append(Upsample(ch))
                if i == time_fold:
                    self.unfold = TimeUnfold(ch, temporal_stride)
                    levels.append([])
        self.blocks = nn.Sequential(*levels[0])
        self.frame_blocks = nn.Sequential(*levels[1]) if len(levels) == 2 else None
        self.out_t = temporal_stride if time_fold == 0 else 1
        self.norm_out, self.conv_out = make_norm(norm, ch), nn.Conv3d(ch, 3 * self.out_t * spatial_patch**2, 1)

    def forward(self, z, first: bool = True):
        x = self.blocks(self.conv_in(as_weights(self, z)))
        if self.frame_blocks is not None:
            x = self.frame_blocks(self.unfold(x, first))
        x = self.conv_out(F.silu(self.norm_out(x)))
        x = rearrange(x, "b (c pt ph pw) t h w -> b c (t pt) (h ph) (w pw)", pt=self.out_t, ph=self.ps, pw=self.ps)
        return x[:, :, self.out_t - 1:] if first else x  # latent 0 stands for frame 0 alone


class VideoVAE(nn.Module):
    """Causal spatiotemporal patch VAE: [B, 3, 1+4k, H, W] in [-1, 1] <-> [B, C, 1+k, H/8, W/8]."""

    def __init__(self, latent_channels: int = 16, base_channels: int = 64, channel_mult=(1, 2, 4),
                 num_res_blocks: int = 1, spatial_patch: int = 2, temporal_stride: int = 4,
                 spatial_stride: int = 8, time_fold: int = 0, norm: str = "rms"):
        super().__init__()
        channel_mult = tuple(channel_mult)
        if not 0 <= time_fold < len(channel_mult):
            raise ValueError(f"time_fold={time_fold}: the level where time folds must be in 0..{len(channel_mult) - 1}")
        if spatial_patch * 2 ** (len(channel_mult) - 1) != spatial_stride:
            raise ValueError(
                f"spatial_patch={spatial_patch} * 2**(len(channel_mult)-1)={2 ** (len(channel_mult) - 1)} "
                f"must equal spatial_stride={spatial_stride}")
        self.latent_channels, self.temporal_stride = latent_channels, temporal_stride
        self.spatial_stride = spatial_stride
        args = (latent_channels, base_channels, channel_mult, num_res_blocks, spatial_patch, temporal_stride, time_fold,
                norm)
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
             motion_weight: float = 0.0, perceptual: nn.Module | None = None, perceptual_weight: float = 1.0,
             perceptual_frames: int = 4,
             discriminator: nn.Module | None = None, gan_weight: float = 0.1, step: int = 0,
             gan_start_step: int = 0, last_layer: torch.Tensor | None = None) -> dict:
        """dict(loss, l1, kl[, perceptual][, gan]).

        l1 = mean |x - recon|, weighted per pixel by :func:`pixel_weights` when ``motion_weight`` > 0
        (L1 alone seeks each pixel's median, which for small moving things on a still background is
        the background); kl = posterior.kl().mean() (summed over latent elements, mean over the batch);
        loss = l1 + kl_weight * kl (+ perceptual_weight * perceptual on up to
        ``perceptual_frames`` evenly spaced frames) (+ gan_weight * hinge generator loss once
        ``step >= gan_start_step``). The discriminator's own loss is :func:`sora.models.gan.hinge_d_loss`.
        ``last_layer`` (the decoder's output weight): the GAN term is scaled by
        :func:`sora.models.gan.adaptive_weight` too (logged as ``gan_scale``), so its gradient there is
        ``gan_weight`` times the reconstruction terms' whatever the discriminator's state.
        """
        err = (x - recon).abs()
        w = pixel_weights(x, motion_weight) if motion_weight else None
        out = dict(l1=err.mean() if w is None else (err * w).mean() / w.mean(), kl=posterior.kl().mean())
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


def pixel_weights(x: torch.Tensor, motion_weight: float) -> torch.Tensor:
    """Per-pixel loss weights ``[B, 1, T, H, W]``: ``1 + motion_weight * |x - median_t x|`` (largest over
    channels), i.e. pixels that differ from the clip's still background (moving things) count more."""
    still = x.median(dim=2, keepdim=True).values
    return 1 + motion_weight * (x - still).abs().amax(dim=1, keepdim=True).detach()


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


__all__ = ["VideoVAE", "DiagonalGaussian", "CausalConv3d", "tiled", "TINY_CONFIG"]
