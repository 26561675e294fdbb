"""Muon on a transformer's hidden matrices, AdamW on everything else, stepped as ONE optimizer (Lightning's
automatic optimization takes one).

Muon (Keller Jordan, 2024; ``torch.optim.Muon``'s algorithm and defaults): SGD momentum (Nesterov, 0.95) whose
update of each weight matrix is orthogonalised by five Newton-Schulz iterations, scaled by ``0.2 sqrt(max(A, B))``
("match_rms_adamw", Moonshot's rule) so that its learning rate reads on AdamW's scale. Written here rather than
wrapping ``torch.optim.Muon`` because that one always orthogonalises in bfloat16, which CPUs without bf16 units
run ~100x slower than float32 (0.3 GFLOP/s measured on one of our 2-core AMD hosts): :func:`orthogonalize`
uses bfloat16 on CUDA and on CPUs with bf16 units, float32 elsewhere (:func:`ns_dtype`), one batched call per
matrix shape. ``tests/test_muon.py`` checks the update equals ``torch.optim.Muon``'s when both orthogonalise in
bfloat16.

Which parameters: :func:`hidden_matrices` (the 2-D weights inside the DiT's blocks: attention and MLP
projections; not the AdaLN modulations, embeddings, final layers nor the text encoder).
"""

from __future__ import annotations

import math
from typing import Iterable

import torch

from sora.training.optim import decay_groups, fusable, scheduled

NS_COEFFICIENTS = (3.4445, -4.7750, 2.0315)  # torch.optim.Muon's (Keller Jordan's quintic)


def orthogonalize(g: torch.Tensor, steps: int = 5, eps: float = 1e-7, dtype: torch.dtype | None = None) -> torch.Tensor:
    """``U S' V^T`` with ``S'`` near 1 for ``g = U S V^T`` (Newton-Schulz, ``steps`` quintic iterations), for a
    matrix or a stack of them ``[..., A, B]``, in ``dtype`` (None: :func:`ns_dtype`), returned in ``g``'s dtype."""
    a, b, c = NS_COEFFICIENTS
    x = g.to(dtype or ns_dtype(g.device))
    tall = x.size(-2) > x.size(-1)
    if tall:
        x = x.mT
    x = x / x.norm(dim=(-2, -1), keepdim=True).clamp(min=eps)
    madd = torch.addmm if x.ndim == 2 else torch.baddbmm  # beta * first + alpha * second @ third
    for _ in range(steps):
        gram = x @ x.mT
        x = madd(x, madd(gram, gram, gram, beta=b, alpha=c), x, beta=a)
    return (x.mT if tall else x).to(g.dtype)


def ns_dtype(device: torch.device) -> torch.dtype:
    """bfloat16 on CUDA and on CPUs with bf16 units (AVX512-BF16 or AMX), else float32 (emulated bf16 there is
    ~100x slower)."""
    if device.type == "cuda":
        return torch.bfloat16
    if device.type == "cpu" and any(getattr(torch.cpu, f, lambda: False)()
                                    for f in ("_is_avx512_bf16_supported", "_is_amx_tile_supported")):
        return torch.bfloat16
    return torch.float32


class MuonAdamW(torch.optim.Optimizer):
    """Param groups with ``muon=True`` (2-D parameters only) get Muon, the others torch's AdamW (fused where it
    can be); both read each group's ``lr`` and ``weight_decay``, so one ``LambdaLR`` schedules them all.
    ``ns_dtype``: the Newton-Schulz dtype (None: :func:`ns_dtype`).

    Fused, it skips a step on a device flag as torch's fused AdamW does (``found_inf``, set by
    :class:`sora.training.guards.NonFiniteGuard`; no host sync): Muon's momentum and weights are kept where the
    flag is 1, the AdamW part gets the flag."""

    def __init__(self, groups: list[dict], lr: float, betas=(0.9, 0.95), momentum: float = 0.95,
                 nesterov: bool = True, ns_steps: int = 5, ns_dtype: torch.dtype | None = None,
                 fused: bool | None = None):
        if fused is None:
            fused = all(fusable(p) for g in groups for p in g["params"])
        super().__init__(groups, dict(lr=lr, weight_decay=0.0, muon=False, fused=bool(fused)))
        for g in self.param_groups:
            if g["muon"] and any(p.ndim != 2 for p in g["params"]):
                raise ValueError("Muon takes 2-D parameters only (matrices): put the others in a group with muon=False")
        self.momentum, self.nesterov, self.ns_steps, self.ns_dtype = momentum, nesterov, ns_steps, ns_dtype
        self._step_supports_amp_scaling = bool(fused)  # found_inf as a device flag (never under a GradScaler: unfused)
        adam = [g for g in self.param_groups if not g["muon"]]
        # AdamW holds the same group dicts: a scheduler's lr reaches it
        self.adamw = torch.optim.AdamW(adam, lr=lr, betas=tuple(betas), fused=bool(fused)) if adam else None

    @torch.no_grad()
    def step(self, closure=None):
        loss = None
        if closure is not None:
            with torch.enable_grad():
                loss = closure()
        found_inf = getattr(self, "found_inf", None)
        keep = None if found_inf is None else found_inf == 0  # a device flag: no host sync

        def assign(dst, new):
            dst.copy_(new if keep is None else torch.where(keep, new, dst))

        for group in self.param_groups:
            if not group["muon"]:
                continue
            by_shape: dict[tuple, list] = {}  # one batched Newton-Schulz per matrix shape
            for p in group["params"]:
                if p.grad is None:
                    continue
                buf = self.state[p].setdefault("momentum_buffer", torch.zeros_like(p.grad))
                new_buf = buf.lerp(p.grad, 1 - self.momentum)
                update = p.grad.lerp(new_buf, self.momentum) if self.nesterov else new_buf
                assign(buf, new_buf)
                by_shape.setdefault(tuple(p.shape), []).append((p, update))
            for shape, items in by_shape.items():
                ortho = orthogonalize(torch.stack([u for _, u in items]), self.ns_steps, dtype=self.ns_dtype)
                scale = 0.2 * math.sqrt(max(shape))  # match_rms_adamw
                for (p, _), o in zip(items, ortho):
                    assign(p, (p * (1 - group["lr"] * group["weight_decay"])).add_(o, alpha=-group["lr"] * scale))
        if self.adamw is not None:
            self.adamw.found_inf = found_inf
            self.adamw.step()
        return loss

    def state_dict(self) -> dict:
        out = super().state_dict()
        out["adamw"] = None if self.adamw is None else self.adamw.state_dict()
        return out

    def load_state_dict(self, state_dict: dict) -> None:
        state_dict = dict(state_dict)
        adam = state_dict.pop("adamw", None)
        super().load_state_dict(state_dict)  # new group dicts: hand AdamW its groups again, then its state
        if self.adamw is not None:
            self.adamw.param_groups = [g for g in self.param_groups if not g["muon"]]
            self.adamw.load_state_dict(adam)
            it = iter(self.adamw.param_groups)  # load_state_dict made AdamW's dicts anew: one set of dicts again
            self.param_groups = [g if g["muon"] else next(it) for g in self.param_groups]


def hidden_matrices(named_parameters: Iterable[tuple[str, torch.nn.Parameter]],
                    prefix: str = "dit.blocks.") -> tuple[list, list]:
    """(Muon's, AdamW's) trainable parameters: the 2-D weights whose names start with ``prefix`` (the DiT's
    blocks in a :class:`~sora.training.dit.DiTModule`) except the AdaLN modulations, and the rest."""
    muon, adam = [], []
    for name, p in named_parameters:
        if p.requires_grad:
            hidden = name.startswith(prefix) and p.ndim == 2 and "adaLN" not in name
            (muon if hidden else adam).append(p)
    return muon, adam


def muon_with_schedule(named_parameters, lr: float, muon_lr: float, weight_decay: float = 0.0,
                       betas=(0.9, 0.95), warmup_steps: int = 0, total_steps: int | None = None,
                       schedule: str = "cosine", min_lr_ratio: float = 0.0, fused: bool | None = None,
                       prefix: str = "dit.blocks.") -> dict:
    """The ``configure_optimizers`` value: :class:`MuonAdamW` (Muon at ``muon_lr`` on :func:`hidden_matrices`,
    AdamW at ``lr`` on the rest, no weight decay on 1-D parameters) and its per-step ``LambdaLR``."""
    muon, adam = hidden_matrices(named_parameters, prefix)
    if not muon:
        raise ValueError(f"optimizer=muon: no matrices named {prefix}* to give Muon")
    groups = [{"params": muon, "muon": True, "lr": muon_lr, "weight_decay": weight_decay}]
    groups += decay_groups(adam, weight_decay)
    return scheduled(MuonAdamW(groups, lr=lr, betas=betas, fused=fused), warmup_steps, total_steps, schedule,
                     min_lr_ratio)
