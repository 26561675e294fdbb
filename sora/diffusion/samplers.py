"""Rectified-flow ODE samplers, k-diffusion style: every sampler is one function, one signature.

    x = sample_xxx(model_fn, noise, timesteps, cond=None, callback=None)

- ``noise``: a tensor, or a dict of tensors, one per modality (``{"video": ..., "audio": ...}``).
  The result has the same structure.
- ``timesteps``: 1-D, decreasing from 1 (noise) to 0 (data), e.g. :func:`make_schedule`.
- ``model_fn(x, t, cond) -> v``: the velocity (``noise - x0``, see :mod:`sora.diffusion.flow`),
  same structure as ``x``. ``t`` has the structure of ``x`` too: a ``[B]`` tensor for a tensor
  ``x``, a dict of ``[B]`` tensors (one per modality) for a dict ``x``. A modality given clean
  gets ``t = 0``; a modality with a clean *prefix* (continuation) gets a per-token ``[B, T]``
  t, 0 on the clean tokens (the same ``video_token_t`` the DiT sees in training).
- ``cond``: passed to ``model_fn`` untouched (text tokens, masks, ...). Two keys are also read
  by the sampler:

  - ``cond["clean"] = {"video": x_video}``: that modality is a fixed clean condition (v2a /
    a2v): it stays at the given value for the whole run, with ``t = 0``, and is returned as is.
  - ``cond["clean_mask"] = {"video": mask [B, T]}``: with it, only the masked tokens of that
    modality are clean (continuation: the first latent steps); the rest is generated.

  For a tensor ``noise`` the single modality's key is ``"x"``.
- ``callback({"i", "t", "t_next", "x", "denoised"})`` once per step, before the update;
  ``denoised`` is the model's ``x0`` estimate ``x - t v``.

Samplers run under ``torch.no_grad()``.
"""

from __future__ import annotations

from typing import Any, Callable, Mapping

import torch

from sora.diffusion.flow import _expand_mask, _expand_t, shift_timesteps

ModelFn = Callable[[Any, Any, Any], Any]
SINGLE = "x"


def make_schedule(
    steps: int, shift: float = 1.0, device: torch.device | str | None = None
) -> torch.Tensor:
    """``steps + 1`` timesteps from 1 to 0, uniform then shifted by :func:`shift_timesteps`."""
    if steps < 1:
        raise ValueError("steps must be >= 1")
    t = torch.linspace(1.0, 0.0, steps + 1, device=device, dtype=torch.float64)
    return shift_timesteps(t, shift).float()


class _State:
    """Normalizes tensor-or-dict noise and applies the clean conditions of ``cond``."""

    def __init__(self, noise: torch.Tensor | Mapping[str, torch.Tensor], cond: Any):
        self.is_dict = isinstance(noise, Mapping)
        x = dict(noise) if self.is_dict else {SINGLE: noise}
        clean = dict((cond or {}).get("clean") or {}) if isinstance(cond, Mapping) else {}
        masks = dict((cond or {}).get("clean_mask") or {}) if isinstance(cond, Mapping) else {}
        unknown = (set(clean) | set(masks)) - set(x)
        if unknown:
            raise KeyError(f"clean conditions for unknown modalities {sorted(unknown)}; have {sorted(x)}")
        self.clean = clean
        self.masks = {k: _expand_mask(m.bool(), x[k]) for k, m in masks.items()}
        self.raw_masks = {k: m.bool() for k, m in masks.items()}
        self.batch = next(iter(x.values())).shape[0]
        self.x0 = self.impose(x)

    def impose(self, x: dict[str, torch.Tensor]) -> dict[str, torch.Tensor]:
        out = dict(x)
        for k, c in self.clean.items():
            if k in self.masks:
                out[k] = torch.where(self.masks[k], c.to(x[k].dtype), x[k])
            else:
                out[k] = c
        return out

    def t_for(self, t: torch.Tensor) -> dict[str, torch.Tensor]:
        """The model's t for each modality at schedule time ``t`` (0-d)."""
        out = {}
        for k, v in self.x0.items():
            tb = t.to(v.device, torch.float32).expand(self.batch).clone()
            if k in self.clean and k in self.raw_masks:
                m = self.raw_masks[k].to(v.device)
                out[k] = torch.where(m, torch.zeros((), device=v.device), tb[:, None].expand_as(m))
            elif k in self.clean:
                out[k] = torch.zeros_like(tb)
            else:
                out[k] = tb
        return out

    def wrap(self, x: dict[str, torch.Tensor]) -> Any:
        return x if self.is_dict else x[SINGLE]

    def unwrap(self, v: Any) -> dict[str, torch.Tensor]:
        return dict(v) if self.is_dict else {SINGLE: v}


def _velocity(model_fn: ModelFn, st: _State, x: dict, t: torch.Tensor, cond: Any) -> dict:
    return st.unwrap(model_fn(st.wrap(x), st.wrap(st.t_for(t)), cond))


def _denoised(st: _State, x: dict, v: dict, t: torch.Tensor) -> dict:
    tt = st.t_for(t)
    return st.impose({k: x[k] - _expand_t(tt[k], x[k]) * v[k] for k in x})


def _step(st: _State, x: dict, v: dict, dt: torch.Tensor) -> dict:
    return st.impose({k: x[k] + dt.to(x[k].dtype) * v[k] if k not in st.clean or k in st.masks else x[k]
                      for k in x})


def _check(timesteps: torch.Tensor) -> torch.Tensor:
    timesteps = torch.as_tensor(timesteps)
    if timesteps.ndim != 1 or timesteps.numel() < 2:
        raise ValueError("timesteps must be 1-D with at least 2 entries")
    if not bool((timesteps[1:] < timesteps[:-1]).all()):
        raise ValueError("timesteps must be strictly decreasing")
    return timesteps


@torch.no_grad()
def sample_euler(
    model_fn: ModelFn,
    noise: torch.Tensor | Mapping[str, torch.Tensor],
    timesteps: torch.Tensor,
    cond: Any = None,
    callback: Callable[[dict], None] | None = None,
):
    """First-order Euler: ``x <- x + (t_next - t) v(x, t)``; one model call per step."""
    timesteps = _check(timesteps)
    st = _State(noise, cond)
    x = st.x0
    for i in range(len(timesteps) - 1):
        t, t_next = timesteps[i], timesteps[i + 1]
        v = _velocity(model_fn, st, x, t, cond)
        if callback is not None:
            callback({"i": i, "t": float(t), "t_next": float(t_next), "x": st.wrap(x),
                      "denoised": st.wrap(_denoised(st, x, v, t))})
        x = _step(st, x, v, t_next - t)
    return st.wrap(x)


@torch.no_grad()
def sample_heun(
    model_fn: ModelFn,
    noise: torch.Tensor | Mapping[str, torch.Tensor],
    timesteps: torch.Tensor,
    cond: Any = None,
    callback: Callable[[dict], None] | None = None,
):
    """Second-order Heun: Euler predictor, trapezoidal corrector ``x + dt (v1 + v2) / 2``.

    Two model calls per step, except the last step to ``t = 0`` which is plain Euler (the
    velocity at ``t = 0`` is not needed and the data end is where fields are sharpest).
    """
    timesteps = _check(timesteps)
    st = _State(noise, cond)
    x = st.x0
    for i in range(len(timesteps) - 1):
        t, t_next = timesteps[i], timesteps[i + 1]
        dt = t_next - t
        v1 = _velocity(model_fn, st, x, t, cond)
        if callback is not None:
            callback({"i": i, "t": float(t), "t_next": float(t_next), "x": st.wrap(x),
                      "denoised": st.wrap(_denoised(st, x, v1, t))})
        x_pred = _step(st, x, v1, dt)
        if float(t_next) <= 0.0:
            x = x_pred
            continue
        v2 = _velocity(model_fn, st, x_pred, t_next, cond)
        x = _step(st, x, {k: (v1[k] + v2[k]) / 2 for k in v1}, dt)
    return st.wrap(x)


SAMPLERS: dict[str, Callable] = {"euler": sample_euler, "heun": sample_heun}
