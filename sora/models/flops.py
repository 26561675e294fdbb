"""Analytic FLOPs of the DiT (per modality: attention, projections, MLP) and of the video VAE.

Counts are multiply-adds x 2 of the matrix products (linear layers, attention scores and
values, convolutions), the convention of ``torch.utils.flop_counter.FlopCounterMode`` and of
MFU; element-wise work (norms, activations, RoPE, softmax) is left out. A training step costs
3x the forward (the backward computes gradients of inputs and of weights, each as much as the
forward): :func:`dit_training_flops`. ``tests/test_flops.py`` checks every formula against
the counter on the real modules.

Token counts per sample: video ``T' * (h / p) * (w / p)`` patches, audio latent steps, text
tokens (padding included: the kernels compute on it).
"""

from __future__ import annotations

from dataclasses import dataclass, field

MODALITIES = ("video", "audio", "text")


@dataclass
class DiTFlops:
    """Forward FLOPs of one sample, by modality and kind; ``sample`` for the per-sample parts
    (timestep embedders, text pooling, AdaLN modulation)."""

    by_modality: dict[str, dict[str, float]] = field(default_factory=dict)
    sample: float = 0.0

    def add(self, modality: str, kind: str, flops: float) -> None:
        d = self.by_modality.setdefault(modality, {})
        d[kind] = d.get(kind, 0.0) + flops

    @property
    def total(self) -> float:
        return self.sample + sum(sum(d.values()) for d in self.by_modality.values())

    def kind(self, kind: str) -> float:
        return sum(d.get(kind, 0.0) for d in self.by_modality.values())

    def as_dict(self) -> dict[str, float]:
        out = {f"{m}/{k}": v for m, d in self.by_modality.items() for k, v in d.items()}
        out.update(sample=self.sample, total=self.total)
        return out


def dit_forward_flops(dit, video_tokens: int, audio_tokens: int, text_tokens: int) -> DiTFlops:
    """Forward FLOPs of one sample through ``dit`` (a :class:`sora.models.dit.AVDiT`).

    Per block and stream: qkv (3 D^2 per token; 2 D^2 for the last block's key/value-only text
    stream), output projection (D^2), MLP (2 D F); attention 4 D x queries x keys (scores and
    weighted values) over the joint sequence, or per pair for ``dual_stream`` (plus its
    bidirectional cross-attention). Plus patch/token embeddings, final layers, and the
    per-sample timestep embedders, text pooling and AdaLN modulations.
    """
    d, depth = dit.dim, dit.depth
    hidden = dit.blocks[0].streams["video"].mlp[0].out_features
    n = {"video": video_tokens, "audio": audio_tokens, "text": text_tokens}
    f = DiTFlops()
    patch_dim = dit.video_channels * dit.patch_size ** 2
    text_dim = dit.text_embed.in_features
    f.add("video", "embed", 2 * n["video"] * patch_dim * d + 2 * n["video"] * d * patch_dim)  # in + final
    f.add("audio", "embed", 2 * n["audio"] * dit.audio_channels * d * 2)
    f.add("text", "embed", 2 * n["text"] * text_dim * d)
    freq = dit.t_embed_video.freq_dim
    f.sample += 2 * 2 * (freq * d + d * d)                      # two timestep embedders
    f.sample += 2 * (text_dim * d + d * d)                      # text pooling MLP
    f.sample += 2 * 2 * d * 2 * d                               # the two final layers' modulation
    for i, block in enumerate(dit.blocks):
        last = i == depth - 1
        for m in MODALITIES:
            s = block.streams[m]
            f.sample += 2 * d * s.n_mod * d                     # AdaLN modulation
            if s.pre_only:
                f.add(m, "qkv", 2 * n[m] * d * 2 * d)
                continue
            f.add(m, "qkv", 2 * n[m] * d * 3 * d)
            f.add(m, "proj", 2 * n[m] * d * d)
            f.add(m, "mlp", 2 * n[m] * d * hidden * 2)
        text_q = 0 if last else n["text"]
        if dit.fusion == "joint":
            keys = sum(n.values())
            for m in ("video", "audio"):
                f.add(m, "attention", 4 * n[m] * keys * d)
            f.add("text", "attention", 4 * text_q * keys * d)
        else:
            for m in ("video", "audio"):
                f.add(m, "attention", 4 * n[m] * (n[m] + n["text"]) * d)
                f.add("text", "attention", 4 * text_q * (n[m] + n["text"]) * d)
                other = n["audio" if m == "video" else "video"]
                f.add(m, "cross", 2 * n[m] * d * d * 2 + 2 * other * d * 2 * d + 4 * n[m] * other * d)
    return f


def dit_training_flops(dit, video_tokens: int, audio_tokens: int, text_tokens: int) -> float:
    """FLOPs of one sample's training step (forward + backward = 3x forward); activation
    checkpointing adds one more forward of the blocks, which MFU conventionally does not count."""
    return 3.0 * dit_forward_flops(dit, video_tokens, audio_tokens, text_tokens).total


def video_vae_flops(vae, video_shape) -> dict[str, float]:
    """Forward FLOPs of the video VAE's encoder and decoder for one clip ``[3, T, H, W]``
    (or ``[B, 3, T, H, W]``: per sample), from each convolution's output size x its kernel
    volume x input channels (per group), shapes propagated on the meta device."""
    import copy

    import torch
    from torch import nn

    if len(video_shape) == 5:
        video_shape = video_shape[1:]
    out = {"encoder": 0.0, "decoder": 0.0}
    part = ["encoder"]

    def hook(module, inputs, output):
        w = module.weight
        if isinstance(module, nn.ConvTranspose3d):  # every input element meets the kernel once per output channel
            out[part[0]] += 2.0 * inputs[0][0].numel() * w.shape[1] * w.shape[2:].numel()
        else:  # every output element: kernel volume x input channels per group
            out[part[0]] += 2.0 * output[0].numel() * w.shape[1] * w.shape[2:].numel()

    meta = copy.deepcopy(vae).to("meta")
    for m in meta.modules():
        if isinstance(m, (nn.Conv1d, nn.Conv2d, nn.Conv3d, nn.ConvTranspose3d)):
            m.register_forward_hook(hook)
    with torch.no_grad():
        z = meta.encode(torch.empty(1, *video_shape, device="meta")).mode()
        part[0] = "decoder"
        meta.decode(z)
    return out
