"""AVDiT: an MM-DiT (SD3-style) over video patches, audio latent steps and text tokens.

Layout (the style of facebookresearch/DiT ``models.py``: constructor kwargs are the config, a
Hydra ``_target_`` maps one-to-one; ``initialize_weights`` is the one place weights are set):

* Streams. Each modality (``video``, ``audio``, ``text``) has its own input projection and, in
  every block, its own AdaLN-Zero modulation, qkv/out projections, QK RMS-norm and MLP.
* Conditioning. ``c_video = emb_video(t_video) + pooled_text``, ``c_audio = emb_audio(t_audio)
  + pooled_text`` (sinusoidal timestep features of ``1000 t`` -> MLP, one MLP per modality;
  pooled text = masked mean of the text tokens -> MLP). The text stream is modulated by
  ``(c_video + c_audio) / 2``: it serves both modalities and has no timestep of its own.
  Timesteps are per sample ``[B]`` or per token ``[B, T']`` / ``[B, L]`` (one per latent time
  step; 0 marks a clean condition token: a continued prefix, the kept part of a retake, first and
  last frames): then the AdaLN modulation is computed once per latent step and broadcast over the
  step's tokens (packed: gathered per token from the (sample, step) rows), and the text stream
  takes the mean over steps.
* Positions. Rotary, from the timing contract: video tokens ``(time s, row, col)``, audio tokens
  ``(time s, 0, 0)``, text tokens get no rotation (Flux-style zero positions). See
  :mod:`sora.models.attention` for the frequencies.
* ``fusion="joint"``: one attention over ``[video, audio, text]`` with the text padding mask.
* ``fusion="dual_stream"``: two joint attentions, ``[video, text]`` and ``[audio, text]``; the
  text stream's update is the mean of its two outputs (so all three streams stay MM-DiT and
  every parameter is used). Then bidirectional cross-attention video<->audio (video queries
  audio and audio queries video, each with its own projections, AdaLN-Zero gate and
  time-only rotary positions, so the two streams see each other by time offset only).
* The last block's text stream is "pre-only" (SD3 ``context_pre_only``): it only supplies keys
  and values, since its output would be discarded.
* Final layer per modality: AdaLN + linear, zero-initialised, so the initial output is 0.
* Sequence packing (:meth:`AVDiT.forward_packed`): samples of different sizes and durations run as
  one sequence ``[1, total, D]`` per stream through the same blocks. ``masks`` then hold integer
  segment ids (the sample of each token) instead of key-padding bools: the per-sample AdaLN
  modulation is gathered per token, and every attention is block-diagonal (a token sees only the
  tokens of its own sample: SDPA with a block mask, or flash-attn varlen with ``cu_seqlens``).

Activation checkpointing: ``blocks`` is an ``nn.ModuleList`` so an outside transform (the
training strategy) can wrap them; ``checkpoint_activations=True`` is the minimal built-in switch.
"""

from __future__ import annotations

import math

import torch
from einops import rearrange
from torch import nn
from torch.utils.checkpoint import checkpoint

from sora.models.attention import (ROPE_SCALE, ROPE_THETA, RMSNorm, apply_rope, attention, rope_frequencies,
                                   shot_attention_mask)
from sora.models.dtypes import as_weights

MODALITIES = ("video", "audio", "text")


def along(v, x):
    """``(x', v')`` that broadcast, ``x'`` a view of ``x`` [B, L, D], for a modulation ``v``: per sample ``[B, D]``
    -> ``v[:, None]``; per token ``[B, L, D]`` (packed, or sharded) as is; per latent step ``[B, T', D]``
    (per-token timesteps) -> ``x`` seen as ``[B, T', L / T', D]`` (tokens in (time, row, col) order) and
    ``v[:, :, None]``, so each step's row reaches its tokens without a copy."""
    if v.dim() == 2:
        return x, v[:, None]
    if v.shape[1] == x.shape[1]:
        return x, v
    return x.unflatten(1, (v.shape[1], -1)), v[:, :, None]


def expand_steps(v, length: int):
    """A per-latent-step modulation or conditioning ``[B, T', D]`` -> one row per token ``[B, length, D]``."""
    return v if v.dim() == 2 or v.shape[1] == length else v.repeat_interleave(length // v.shape[1], dim=1)


def modulate(x, shift, scale):
    xs, sh = along(shift, x)
    return (xs * (1 + along(scale, x)[1]) + sh).reshape(x.shape)


def gate(g, y):
    """``g * y`` for a gate per sample, token or latent step (see :func:`along`)."""
    ys, gs = along(g, y)
    return (ys * gs).reshape(y.shape)


def gather_segments(per_sample: torch.Tensor, segments: torch.Tensor) -> torch.Tensor:
    """Rows [S, ...] of each sample -> one per token [B, L, ...], for segment ids [B, L]."""
    return per_sample[segments]  # (its backward, an accumulating index_put, beats index_select's on CPU)


def is_packed(masks: dict) -> bool:
    """Whether ``masks`` hold segment ids (a packed sequence) rather than key-padding bools (or None)."""
    return masks["video"] is not None and masks["video"].dtype != torch.bool


def key_mask(masks: dict, keys, lengths: dict):
    """The key-padding mask of ``keys`` concatenated: None when none of them is padded (so SDPA may
    take its flash kernel); otherwise the streams without a mask count as all kept."""
    if all(masks[m] is None for m in keys):
        return None
    ref = next(masks[m] for m in keys if masks[m] is not None)
    return torch.cat([masks[m] if masks[m] is not None else ref.new_ones(ref.shape[0], lengths[m])
                      for m in keys], dim=1)


class TimestepEmbedder(nn.Module):
    """t in [0, 1] -> sinusoidal features of 1000 t (the DiT scale) -> MLP."""

    def __init__(self, dim: int, freq_dim: int = 256):
        super().__init__()
        self.freq_dim = freq_dim
        self.mlp = nn.Sequential(nn.Linear(freq_dim, dim), nn.SiLU(), nn.Linear(dim, dim))

    def forward(self, t):
        half = self.freq_dim // 2
        freqs = torch.exp(-math.log(10000.0) * torch.arange(half, device=t.device, dtype=torch.float32) / half)
        args = 1000.0 * t.float()[:, None] * freqs[None]
        emb = torch.cat([torch.cos(args), torch.sin(args)], dim=-1)
        return self.mlp(emb.to(self.mlp[0].weight.dtype))


def mlp(dim: int, mlp_ratio: float) -> nn.Sequential:
    hidden = int(dim * mlp_ratio)
    return nn.Sequential(nn.Linear(dim, hidden), nn.GELU(approximate="tanh"), nn.Linear(hidden, dim))


class Stream(nn.Module):
    """One modality's weights in one block. ``pre_only``: keys/values only (no output)."""

    def __init__(self, dim, heads, mlp_ratio, qk_norm=True, pre_only=False, cross=False):
        super().__init__()
        self.heads, self.pre_only, self.cross = heads, pre_only, cross
        self.n_mod = 2 if pre_only else 6 + (3 if cross else 0)  # (shift, scale, gate) x (attn, mlp, cross)
        self.adaLN_modulation = nn.Sequential(nn.SiLU(), nn.Linear(dim, self.n_mod * dim))
        self.norm1 = nn.LayerNorm(dim, elementwise_affine=False, eps=1e-6)
        self.qkv = nn.Linear(dim, (2 if pre_only else 3) * dim)  # pre-only: no queries
        head_dim = dim // heads
        self.q_norm = RMSNorm(head_dim) if qk_norm and not pre_only else nn.Identity()
        self.k_norm = RMSNorm(head_dim) if qk_norm else nn.Identity()
        if not pre_only:
            self.proj = nn.Linear(dim, dim)
            self.norm2 = nn.LayerNorm(dim, elementwise_affine=False, eps=1e-6)
            self.mlp = mlp(dim, mlp_ratio)
        if cross:  # queries when this stream asks, keys/values when it is asked
            self.norm_cross = nn.LayerNorm(dim, elementwise_affine=False, eps=1e-6)
            self.cross_q = nn.Linear(dim, dim)
            self.cross_kv = nn.Linear(dim, 2 * dim)
            self.cross_q_norm = RMSNorm(head_dim) if qk_norm else nn.Identity()
            self.cross_k_norm = RMSNorm(head_dim) if qk_norm else nn.Identity()
            self.cross_proj = nn.Linear(dim, dim)

    def heads_of(self, x):
        return rearrange(x, "b l (h d) -> b h l d", h=self.heads)

    def qkv_heads(self, x, mods, freqs):
        qkv = self.qkv(modulate(self.norm1(x), mods[0], mods[1]))
        q, k, v = (None, *qkv.chunk(2, dim=-1)) if self.pre_only else qkv.chunk(3, dim=-1)
        k, v = self.k_norm(self.heads_of(k)), self.heads_of(v)
        q = None if q is None else self.q_norm(self.heads_of(q))
        if freqs is not None:
            k = apply_rope(k, freqs)
            q = None if q is None else apply_rope(q, freqs)
        return q, k, v


class MMDiTBlock(nn.Module):
    def __init__(self, dim, heads, mlp_ratio=4.0, fusion="joint", qk_norm=True, last=False,
                 attn_backend="auto"):
        super().__init__()
        self.fusion, self.attn_backend = fusion, attn_backend
        # every attention of the block goes through this attribute, so that a parallelism can wrap
        # it from outside (sora.training.sequence_parallel); the model itself never changes it
        self.attention_fn = attention
        cross = fusion == "dual_stream"
        self.streams = nn.ModuleDict({
            "video": Stream(dim, heads, mlp_ratio, qk_norm, cross=cross),
            "audio": Stream(dim, heads, mlp_ratio, qk_norm, cross=cross),
            "text": Stream(dim, heads, mlp_ratio, qk_norm, pre_only=last),
        })

    def _attend(self, qkv, queries, keys, masks):
        q = torch.cat([qkv[m][0] for m in queries], dim=2)
        k = torch.cat([qkv[m][1] for m in keys], dim=2)
        v = torch.cat([qkv[m][2] for m in keys], dim=2)
        mask = key_mask(masks, keys, {m: qkv[m][1].shape[2] for m in keys})
        if masks.get("shots") is not None:  # a script: video/audio queries see the text of their own shot
            mask = shot_attention_mask(masks["shots"], queries, keys, mask)
        if is_packed(masks):  # block-diagonal: the queries' segments too
            q_seg = torch.cat([masks[m] for m in queries], dim=1)
            o = self.attention_fn(q, k, v, mask, backend=self.attn_backend, q_mask=q_seg)
        else:
            o = self.attention_fn(q, k, v, mask, backend=self.attn_backend)
        o = rearrange(o, "b h l d -> b l (h d)")
        return dict(zip(queries, o.split([qkv[m][0].shape[2] for m in queries], dim=1)))

    def _cross(self, src, dst, x, mods, freqs, mask=None, q_mask=None):
        """Stream ``src`` queries stream ``dst`` (key mask ``mask``; packed: key and query segment ids
        ``mask``, ``q_mask``); returns the (ungated) update for ``src``."""
        s, d = self.streams[src], self.streams[dst]
        q = s.cross_q_norm(s.heads_of(s.cross_q(modulate(s.norm_cross(x[src]), *mods[src][6:8]))))
        k, v = d.cross_kv(modulate(d.norm_cross(x[dst]), *mods[dst][6:8])).chunk(2, dim=-1)
        k, v = d.cross_k_norm(d.heads_of(k)), d.heads_of(v)
        q, k = apply_rope(q, freqs[src]), apply_rope(k, freqs[dst])
        if q_mask is None:
            o = self.attention_fn(q, k, v, mask, backend=self.attn_backend)
        else:
            o = self.attention_fn(q, k, v, mask, backend=self.attn_backend, q_mask=q_mask)
        return s.cross_proj(rearrange(o, "b h l d -> b l (h d)"))

    def forward(self, x: dict, c: dict, rope: dict, masks: dict, rope_time: dict | None = None):
        packed = is_packed(masks)
        mods = {}
        for m in MODALITIES:
            mod = self.streams[m].adaLN_modulation(c[m])
            if packed:  # c has a row per sample [S, D] (or per (sample, latent step)): each token takes its row
                mod = gather_segments(mod, masks.get("rows", {}).get(m, masks[m]))
            mods[m] = mod.chunk(self.streams[m].n_mod, dim=-1)
        qkv = {m: self.streams[m].qkv_heads(x[m], mods[m], rope.get(m)) for m in MODALITIES}
        out_names = [m for m in MODALITIES if not self.streams[m].pre_only]
        if self.fusion == "joint":
            o = self._attend(qkv, out_names, MODALITIES, masks)
        else:
            text_q = ["text"] if "text" in out_names else []
            ov = self._attend(qkv, ["video"] + text_q, ["video", "text"], masks)
            oa = self._attend(qkv, ["audio"] + text_q, ["audio", "text"], masks)
            o = {"video": ov["video"], "audio": oa["audio"]}
            if text_q:
                o["text"] = 0.5 * (ov["text"] + oa["text"])
        x = dict(x)
        for m in out_names:
            x[m] = x[m] + gate(mods[m][2], self.streams[m].proj(o[m]))
        if self.fusion == "dual_stream":
            qv, qa = (masks["video"], masks["audio"]) if packed else (None, None)
            dv = self._cross("video", "audio", x, mods, rope_time, masks["audio"], qv)
            da = self._cross("audio", "video", x, mods, rope_time, masks["video"], qa)
            x["video"] = x["video"] + gate(mods["video"][8], dv)
            x["audio"] = x["audio"] + gate(mods["audio"][8], da)
        for m in out_names:
            s, (sh, sc, g) = self.streams[m], mods[m][3:6]
            x[m] = x[m] + gate(g, s.mlp(modulate(s.norm2(x[m]), sh, sc)))
        return x


class FinalLayer(nn.Module):
    def __init__(self, dim, out_dim):
        super().__init__()
        self.norm = nn.LayerNorm(dim, elementwise_affine=False, eps=1e-6)
        self.adaLN_modulation = nn.Sequential(nn.SiLU(), nn.Linear(dim, 2 * dim))
        self.linear = nn.Linear(dim, out_dim)

    def forward(self, x, c, segments=None):
        """``c`` per sample [B, D] or per latent step [B, T', D]; packed: ``x`` [1, L, D] and ``segments``
        [1, L] (each token's sample)."""
        mod = self.adaLN_modulation(c)
        shift, scale = (mod if segments is None else gather_segments(mod, segments)).chunk(2, dim=-1)
        return self.linear(modulate(self.norm(x), shift, scale))


class AVDiT(nn.Module):
    def __init__(self, video_channels=16, audio_channels=8, text_dim=64, dim=256, depth=4, heads=4,
                 mlp_ratio=4.0, patch_size=2, fusion="joint", qk_norm=True, rope_theta=ROPE_THETA,
                 rope_scale=ROPE_SCALE, checkpoint_activations=False, attn_backend="auto"):
        super().__init__()
        if fusion not in ("joint", "dual_stream"):
            raise ValueError(f"fusion={fusion!r}: expected 'joint' or 'dual_stream'")
        if dim % heads:
            raise ValueError(f"dim={dim} is not divisible by heads={heads}")
        self.video_channels, self.audio_channels, self.patch_size = video_channels, audio_channels, patch_size
        self.dim, self.depth, self.heads, self.fusion = dim, depth, heads, fusion
        self.rope_theta, self.rope_scale = tuple(rope_theta), tuple(rope_scale)
        self.checkpoint_activations = checkpoint_activations
        # drop a text mask with nothing padded (host check, CPU only): SDPA then needs no mask. A
        # compiled model keeps it, so that its blocks always see one input structure (no recompile)
        self.drop_full_text_mask = True
        patch_dim = video_channels * patch_size * patch_size
        self.video_embed = nn.Linear(patch_dim, dim)
        self.audio_embed = nn.Linear(audio_channels, dim)
        self.text_embed = nn.Linear(text_dim, dim)
        self.t_embed_video = TimestepEmbedder(dim)
        self.t_embed_audio = TimestepEmbedder(dim)
        self.text_pool = nn.Sequential(nn.Linear(text_dim, dim), nn.SiLU(), nn.Linear(dim, dim))
        self.blocks = nn.ModuleList([
            MMDiTBlock(dim, heads, mlp_ratio, fusion, qk_norm, last=(i == depth - 1), attn_backend=attn_backend)
            for i in range(depth)])
        self.final_video = FinalLayer(dim, patch_dim)
        self.final_audio = FinalLayer(dim, audio_channels)
        self.initialize_weights()

    def initialize_weights(self):
        def _basic_init(module):
            if isinstance(module, nn.Linear):
                nn.init.xavier_uniform_(module.weight)
                if module.bias is not None:
                    nn.init.zeros_(module.bias)
        self.apply(_basic_init)
        for emb in (self.t_embed_video, self.t_embed_audio):
            nn.init.normal_(emb.mlp[0].weight, std=0.02)
            nn.init.normal_(emb.mlp[2].weight, std=0.02)
        for block in self.blocks:  # AdaLN-Zero: every residual gate starts at 0
            for stream in block.streams.values():
                nn.init.zeros_(stream.adaLN_modulation[-1].weight)
                nn.init.zeros_(stream.adaLN_modulation[-1].bias)
        for final in (self.final_video, self.final_audio):
            for lin in (final.adaLN_modulation[-1], final.linear):
                nn.init.zeros_(lin.weight)
                nn.init.zeros_(lin.bias)

    # -- positions -------------------------------------------------------------------------
    def _rope(self, positions):
        return rope_frequencies(self.dim // self.heads, positions, self.rope_theta, self.rope_scale)

    def rope_positions(self, video_times, audio_times, h, w):
        """(video [T'*h*w, 3], audio [L, 3]) float64 positions: (seconds, row, col)."""
        vt = video_times.double()
        grid = torch.meshgrid(vt, torch.arange(h, dtype=torch.float64, device=vt.device),
                              torch.arange(w, dtype=torch.float64, device=vt.device), indexing="ij")
        video = torch.stack(grid, dim=-1).reshape(-1, 3)
        at = audio_times.double().to(vt.device)
        audio = torch.stack([at, torch.zeros_like(at), torch.zeros_like(at)], dim=-1)
        return video, audio

    # -- forward ---------------------------------------------------------------------------
    def _check_latents(self, frames, height, width, audio_steps, video_times, audio_times):
        p = self.patch_size
        if height % p or width % p:
            raise ValueError(f"video latent {height}x{width} is not divisible by patch_size={p}")
        if video_times.shape[-1] != frames or audio_times.shape[-1] != audio_steps:
            raise ValueError(f"video_times {tuple(video_times.shape)} / audio_times {tuple(audio_times.shape)} "
                             f"do not match {frames} video and {audio_steps} audio latent steps")
        return height // p, width // p

    def _conditioning(self, text, text_mask, t_video, t_audio, shots=None) -> dict:
        """Timestep embedding per modality + pooled real text tokens: per sample [B, D] for a timestep
        per sample [B], per latent step [B, T', D] for per-token timesteps [B, T'] (a clean condition
        token has t = 0). The text stream takes the mean over the steps of both. A script: see
        :meth:`_script_conditioning`."""
        if shots is not None:
            return self._script_conditioning(text, text_mask, t_video, t_audio, shots)
        if text_mask is None:  # nothing padded
            pooled = self.text_pool(text.mean(1))
        else:
            weights = text_mask.to(text.dtype)[..., None]
            pooled = self.text_pool((text * weights).sum(1) / weights.sum(1).clamp(min=1.0))

        def embed(emb, t):
            if t.dim() == 1:
                return emb(t) + pooled
            return emb(t.reshape(-1)).reshape(*t.shape, -1) + pooled[:, None]

        c_video, c_audio = embed(self.t_embed_video, t_video), embed(self.t_embed_audio, t_audio)
        mean = {m: c if c.dim() == 2 else c.mean(1) for m, c in (("video", c_video), ("audio", c_audio))}
        return {"video": c_video, "audio": c_audio, "text": 0.5 * (mean["video"] + mean["audio"])}

    def _script_conditioning(self, text, text_mask, t_video, t_audio, shots) -> dict:
        """A timed script's conditioning, so that a shot's caption reaches only its own steps: a video/audio latent
        step gets its timestep embedding + the pooled tokens of its shot and of the global caption; a text token of
        shot s the mean embedding of s's steps + that pooling; a global text token the mean over all steps + the
        pooled global caption. -> video [B, T', D], audio [B, L, D], text [B, Lt, D]."""
        tid = shots["text"]  # [B, Lt], -1: the global caption
        keep = torch.ones_like(tid, dtype=torch.bool) if text_mask is None else text_mask
        glob = tid == -1

        def pool(member):  # [B, N, Lt] bool: the tokens each of N rows sees -> [B, N, D]
            w = (member & keep[:, None, :]).to(text.dtype)
            return self.text_pool(torch.einsum("bnl,bld->bnd", w, text) / w.sum(-1, keepdim=True).clamp(min=1.0))

        def of_shot(shot):  # [B, N] shot ids -> [B, N, Lt]: that shot's tokens and the global caption's
            return (tid[:, None, :] == shot[:, :, None]) | glob[:, None, :]

        e, c = {}, {}
        for m, emb, t in (("video", self.t_embed_video, t_video), ("audio", self.t_embed_audio, t_audio)):
            steps = shots[f"{m}_steps"]  # [B, T]
            t = t[:, None].expand_as(steps) if t.dim() == 1 else t
            e[m] = emb(t.reshape(-1)).reshape(*t.shape, -1)
            c[m] = e[m] + pool(of_shot(steps))
        by_shot = 0  # per text token: the mean embedding of its shot's steps (no enumeration of the shots: no host read)
        for m in ("video", "audio"):
            w = (tid[:, :, None] == shots[f"{m}_steps"][:, None, :]).to(e[m].dtype)  # [B, Lt, T]
            by_shot = by_shot + 0.5 * torch.einsum("blt,btd->bld", w, e[m]) / w.sum(-1, keepdim=True).clamp(min=1.0)
        text_c = by_shot + pool(of_shot(tid))
        glob_c = 0.5 * (e["video"].mean(1) + e["audio"].mean(1)) + pool(glob[:, None, :])[:, 0]
        c["text"] = torch.where(glob[..., None], glob_c[:, None], text_c)
        return c

    def _rotary(self, pos_v, pos_a):
        rope = {"video": self._rope(pos_v), "audio": self._rope(pos_a)}
        rope_time = None
        if self.fusion == "dual_stream":  # cross-attention sees time offsets only
            rope_time = {"video": self._rope(pos_v * pos_v.new_tensor([1.0, 0.0, 0.0])), "audio": rope["audio"]}
        return rope, rope_time

    def _run_blocks(self, x, c, rope, masks, rope_time):
        for block in self.blocks:
            if self.checkpoint_activations and torch.is_grad_enabled():
                x = checkpoint(block, x, c, rope, masks, rope_time, use_reentrant=False)
            else:
                x = block(x, c, rope, masks, rope_time)
        return x

    def forward(self, video, audio, text, text_mask, t_video, t_audio, video_times, audio_times, shots=None):
        """video [B, Cv, T', H, W], audio [B, Ca, L], text [B, Lt, text_dim], text_mask bool [B, Lt]
        (None: nothing padded), t_video/t_audio [B] in [0, 1] or per token [B, T'] / [B, L] (0 at a clean condition
        token: continuation, retake, first/last frames), video_times [T'] / audio_times [L] seconds (float64 keeps
        phase precision on long clips) -> (v_video, v_audio). ``shots`` (a timed script, :mod:`sora.script`): int
        shot ids, ``text`` [B, Lt] per text token (-1: the global caption), ``video`` [B, T'] / ``audio`` [B, L]
        per latent step; video and audio tokens then attend to the text of their own shot (and the global one)
        and pool it into their conditioning. Lists of per-sample video / audio / times: the
        packed mode, :meth:`forward_packed` (through ``forward`` so that wrappers' hooks run)."""
        if isinstance(video, (list, tuple)):
            if shots is not None:
                raise ValueError("timed scripts (shots) are not supported in packed sequences yet")
            return self.forward_packed(video, audio, text, text_mask, t_video, t_audio, video_times, audio_times)
        b, _, frames, height, width = video.shape
        p = self.patch_size
        h, w = self._check_latents(frames, height, width, audio.shape[-1], video_times, audio_times)
        for name, t, n in (("t_video", t_video, frames), ("t_audio", t_audio, audio.shape[-1])):
            if tuple(t.shape) not in ((b,), (b, n)):
                raise ValueError(f"{name} has shape {tuple(t.shape)}: need [{b}] or per token [{b}, {n}]")
        if text_mask is not None:
            text_mask = text_mask.to(torch.bool)
            if self.drop_full_text_mask and not text_mask.is_cuda and bool(text_mask.all()):  # a free check on the host; CUDA: varlen kernels
                text_mask = None
        video, audio, text = (as_weights(self, x) for x in (video, audio, text))
        x = {
            "video": self.video_embed(rearrange(video, "b c t (h p) (w q) -> b (t h w) (c p q)", p=p, q=p)),
            "audio": self.audio_embed(rearrange(audio, "b c l -> b l c")),
            "text": self.text_embed(text),
        }
        if shots is not None:
            shots = {"text": shots["text"], "video_steps": shots["video"], "audio_steps": shots["audio"],
                     "video": shots["video"].repeat_interleave(h * w, dim=1), "audio": shots["audio"]}
        c = self._conditioning(text, text_mask, t_video, t_audio, shots)
        rope, rope_time = self._rotary(*self.rope_positions(video_times, audio_times, h, w))
        masks = {"video": None, "audio": None, "text": text_mask}  # None: nothing padded
        if shots is not None:
            masks["shots"] = {m: shots[m] for m in MODALITIES}
        x = self._run_blocks(x, c, rope, masks, rope_time)
        v_video = self.final_video(x["video"], c["video"])
        v_video = rearrange(v_video, "b (t h w) (c p q) -> b c t (h p) (w q)", t=frames, h=h, w=w, p=p, q=p)
        v_audio = rearrange(self.final_audio(x["audio"], c["audio"]), "b l c -> b c l")
        return v_video, v_audio

    def forward_packed(self, video, audio, text, text_mask, t_video, t_audio, video_times, audio_times):
        """Samples of different sizes and durations as ONE packed sequence, without padding.

        ``video`` / ``audio`` / ``video_times`` / ``audio_times``: lists over the S samples of
        [Cv, T'_i, H_i, W_i] / [Ca, L_i] / [T'_i] / [L_i] (seconds); ``text`` [S, Lt, text_dim] with
        ``text_mask`` [S, Lt] (only real tokens are packed); ``t_video`` / ``t_audio`` [S], or per token [S, T'] /
        [S, L] (the samples of a pack share a duration).
        -> (list of v_video_i [Cv, T'_i, H_i, W_i], list of v_audio_i [Ca, L_i]).

        Equal to :meth:`forward` on each sample alone: every token keeps its sample's AdaLN
        modulation, timesteps, pooled text and rotary positions, and attends only to the video,
        audio and text tokens of its own sample (``masks`` carry segment ids; see the module doc).
        """
        n = len(video)
        if not n or not len(audio) == len(video_times) == len(audio_times) == text.shape[0] == n:
            raise ValueError(f"forward_packed: {n} video, {len(audio)} audio, {len(video_times)}/"
                             f"{len(audio_times)} times and {text.shape[0]} texts: need one of each per sample")
        p, dev = self.patch_size, text.device
        video, audio, text = [as_weights(self, v) for v in video], [as_weights(self, a) for a in audio], \
            as_weights(self, text)
        grids, tokens_v, tokens_a, pos_v, pos_a = [], [], [], [], []
        for v, a, vt, at in zip(video, audio, video_times, audio_times):
            h, w = self._check_latents(v.shape[1], v.shape[2], v.shape[3], a.shape[-1], vt, at)
            grids.append((v.shape[1], h, w))
            tokens_v.append(rearrange(v, "c t (h p) (w q) -> (t h w) (c p q)", p=p, q=p))
            tokens_a.append(a.transpose(0, 1))
            positions = self.rope_positions(vt, at, h, w)
            pos_v.append(positions[0])
            pos_a.append(positions[1])
        text_mask = text_mask.to(torch.bool)
        lengths = {"video": [len(t) for t in tokens_v], "audio": [len(t) for t in tokens_a],
                   "text": text_mask.sum(1).tolist()}
        x = {"video": self.video_embed(torch.cat(tokens_v)[None]),
             "audio": self.audio_embed(torch.cat(tokens_a)[None]),
             "text": self.text_embed(text[text_mask][None])}  # real tokens, sample after sample
        ids = torch.arange(n, device=dev)
        masks = {m: torch.repeat_interleave(ids, torch.tensor(lengths[m], device=dev))[None] for m in MODALITIES}
        c = self._conditioning(text, text_mask, t_video, t_audio)
        rows = {}  # per-token timesteps [S, T]: conditioning rows per (sample, step) -> each token's row
        for m, t, per_step in (("video", t_video, [h * w for _, h, w in grids]), ("audio", t_audio, None)):
            if t.dim() == 2:
                steps = torch.arange(t.shape[1], device=dev)
                rows[m] = torch.cat([i * t.shape[1] + (steps if k is None else steps.repeat_interleave(k))
                                     for i, k in enumerate(per_step or [None] * n)])[None]
                c[m] = c[m].flatten(0, 1)
        if rows:
            masks["rows"] = rows
        rope, rope_time = self._rotary(torch.cat(pos_v), torch.cat(pos_a))
        x = self._run_blocks(x, c, rope, masks, rope_time)
        index = {m: rows.get(m, masks[m]) for m in ("video", "audio")}  # each token's conditioning row
        v_video = self.final_video(x["video"], c["video"], index["video"])[0].split(lengths["video"])
        v_audio = self.final_audio(x["audio"], c["audio"], index["audio"])[0].split(lengths["audio"])
        v_video = [rearrange(o, "(t h w) (c p q) -> c t (h p) (w q)", t=t, h=h, w=w, p=p, q=p)
                   for o, (t, h, w) in zip(v_video, grids)]
        return v_video, [o.transpose(0, 1) for o in v_audio]

    # -- accounting (nanoGPT style) ----------------------------------------------------------
    def num_params(self) -> int:
        return sum(p.numel() for p in self.parameters())

    def estimate_flops_per_token(self, video_tokens: int, audio_tokens: int, text_tokens: int) -> float:
        """Training FLOPs (forward + backward) per video/audio token of a sample with these token
        counts (the tokens ``perf/tokens_per_s`` counts; text is context). The formulas are in
        :mod:`sora.models.flops`, checked against torch's FLOP counter."""
        from sora.models.flops import dit_training_flops

        return dit_training_flops(self, video_tokens, audio_tokens, text_tokens) / max(video_tokens + audio_tokens, 1)
