"""Guidance wraps the model function, not the sampler.

Each function here takes a ``model_fn(x, t, cond) -> v`` (see :mod:`sora.diffusion.samplers`)
and returns a new one with the same signature, so any sampler runs guided::

    guided = cfg(model_fn, scale=5.0, uncond=replace_cond(text=empty_tokens, text_mask=empty_mask))
    x = sample_euler(guided, noise, make_schedule(30), cond)

The conditional and unconditional evaluations are batched into one model call (``x``, ``t``
and ``cond`` concatenated along the batch, dicts recursively) whenever every tensor leaf of
the two conds has matching shapes and every other leaf is equal; otherwise it falls back to
separate calls. Make the unconditional cond the same shape (e.g. empty text padded to the
conditional text length with a False mask) to get the single call.
"""

from __future__ import annotations

from typing import Any, Callable, Mapping, Sequence

import torch

ModelFn = Callable[[Any, Any, Any], Any]
XTCond = tuple[Any, Any, Any]


# ----------------------------------------------------------------------------- batching utils


def _cat(items: Sequence[Any]) -> Any:
    """Concatenate structures along dim 0; raises ValueError if they cannot be batched."""
    first = items[0]
    if isinstance(first, torch.Tensor):
        if not all(isinstance(i, torch.Tensor) for i in items):
            raise ValueError("mixed tensor / non-tensor leaves")
        if first.ndim == 0 or any(i.shape != first.shape for i in items):
            raise ValueError("tensor leaves of different shapes")
        return torch.cat(list(items), dim=0)
    if isinstance(first, Mapping):
        if any(not isinstance(i, Mapping) or set(i) != set(first) for i in items):
            raise ValueError("dicts with different keys")
        return {k: _cat([i[k] for i in items]) for k in first}
    if isinstance(first, (list, tuple)) and any(isinstance(e, torch.Tensor) for e in first):
        if any(not isinstance(i, (list, tuple)) or len(i) != len(first) for i in items):
            raise ValueError("sequences of different lengths")
        return type(first)(_cat([i[j] for i in items]) for j in range(len(first)))
    if any(i is not first and i != first for i in items[1:]):
        raise ValueError("non-tensor leaves differ")
    return first


def _split(y: Any, n: int) -> list[Any]:
    """Inverse of :func:`_cat` for ``n`` equal parts."""
    if isinstance(y, torch.Tensor):
        return list(y.chunk(n, dim=0))
    if isinstance(y, Mapping):
        parts = {k: _split(v, n) for k, v in y.items()}
        return [{k: parts[k][i] for k in y} for i in range(n)]
    raise TypeError(f"cannot split model output of type {type(y).__name__}")


def _evaluate(model_fn: ModelFn, calls: Sequence[XTCond], batch: bool) -> list[Any]:
    """Evaluate ``model_fn`` on several ``(x, t, cond)``, in one batched call when possible."""
    if batch and len(calls) > 1:
        try:
            x, t, c = (_cat([call[j] for call in calls]) for j in range(3))
        except ValueError:
            pass
        else:
            return _split(model_fn(x, t, c), len(calls))
    return [model_fn(*call) for call in calls]


def _combine(outs: Sequence[Any], fn: Callable[[Sequence[torch.Tensor], str | None], torch.Tensor]) -> Any:
    """Apply ``fn(list of tensors, key)`` leafwise over tensor-or-dict outputs."""
    if isinstance(outs[0], Mapping):
        return {k: fn([o[k] for o in outs], k) for k in outs[0]}
    return fn(list(outs), None)


def _scale_for(scale: float | Mapping[str, float], key: str | None) -> float:
    if isinstance(scale, Mapping):
        if key is None:
            raise ValueError("per-modality scales need dict outputs")
        return float(scale.get(key, 1.0))
    return float(scale)


# ----------------------------------------------------------------------------- helpers


def replace_cond(**values: Any) -> Callable[[Any], Any]:
    """A ``cond -> uncond`` that replaces keys of the cond dict.

    A value may be a tensor with batch 1 (broadcast to the batch of the first tensor of
    ``cond``), any other value (used as is), or a callable ``cond -> value``.
    """

    def uncond(cond: Mapping[str, Any]) -> dict[str, Any]:
        out = dict(cond)
        batch = next((v.shape[0] for v in cond.values() if isinstance(v, torch.Tensor)), None)
        for k, v in values.items():
            if callable(v):
                v = v(cond)
            elif isinstance(v, torch.Tensor) and batch is not None and v.shape[0] == 1 and batch != 1:
                v = v.expand(batch, *v.shape[1:])
            out[k] = v
        return out

    return uncond



# ----------------------------------------------------------------------------- guidance


def cfg(
    model_fn: ModelFn,
    scale: float | Mapping[str, float],
    uncond: Callable[[Any], Any],
    batch: bool = True,
) -> ModelFn:
    """Classifier-free guidance: ``v = v_uncond + scale * (v_cond - v_uncond)``.

    ``uncond(cond) -> cond`` builds the unconditional cond (e.g. :func:`replace_cond` with the
    empty caption's tokens). ``scale`` is a float or a per-modality dict (dict outputs; a missing
    modality gets 1, i.e. no guidance). ``scale == 1`` calls the conditional model only,
    ``scale == 0`` the unconditional model only.
    """
    scales = list(scale.values()) if isinstance(scale, Mapping) else [scale]
    if all(float(s) == 1.0 for s in scales):
        return model_fn
    if all(float(s) == 0.0 for s in scales):
        return lambda x, t, cond: model_fn(x, t, uncond(cond))

    def guided(x, t, cond):
        v_c, v_u = _evaluate(model_fn, [(x, t, cond), (x, t, uncond(cond))], batch)
        return _combine([v_c, v_u], lambda vs, k: vs[1] + _scale_for(scale, k) * (vs[0] - vs[1]))

    return guided
