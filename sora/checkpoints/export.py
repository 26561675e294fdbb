"""Exported checkpoints: one safetensors file with a run's full weights, their EMA and its config.

Format (``sora-export/1``), read by ``sora-sample``, ``sora-eval`` and :func:`read_export`:

* tensors ``<name>``: the LightningModule's whole ``state_dict`` (for the DiT stage: the DiT, the
  text encoder, the frozen VAEs and vocoder, the latent statistics), full (never sharded);
* tensors ``ema.<name>``: the EMA of each trainable weight, when the run kept one;
* metadata (strings): ``format``, ``sora_config`` (the run's resolved config as JSON: enough to
  rebuild the model), ``global_step``, ``source`` (the kind of checkpoint it came from).

Loading it never unpickles anything: safetensors tensors and JSON. :func:`read_training_checkpoint`
reads the three kinds of training checkpoints, never running code from them (``torch.load(weights_only=True)``,
see :mod:`sora.checkpoints.io`): a Lightning ``.ckpt`` file, a DeepSpeed ZeRO checkpoint
folder (weights consolidated from the shards by DeepSpeed's ``zero_to_fp32``, its loads forced to
``weights_only``), and a torch distributed-checkpoint folder (FSDP2, ``strategy=fsdp``; its pickled
``.metadata`` checked by a restricted unpickler first), which are all turned into the same dict:
``state_dict``, ``callbacks.EMA.shadow``, ``sora_config``, ``global_step``.
"""

from __future__ import annotations

import json
import logging
from pathlib import Path

import torch

FORMAT = "sora-export/1"
EMA_PREFIX = "ema."
SUFFIX = ".safetensors"
log = logging.getLogger(__name__)


class ExportError(ValueError):
    """A checkpoint that cannot be read or exported; the message is one line."""


# -- the exported file ---------------------------------------------------------------------------
def _owned(t: torch.Tensor) -> torch.Tensor:
    """A CPU tensor with its own storage (safetensors refuses tensors that share memory)."""
    t = t.detach().cpu().contiguous()
    return t if t.untyped_storage().nbytes() == t.numel() * t.element_size() else t.clone()


def write_export(path, ckpt: dict, source: str = "") -> dict:
    """Write checkpoint dict ``ckpt`` (:func:`read_training_checkpoint`'s shape) to ``path``; returns
    a summary (tensors, EMA tensors, bytes, step)."""
    from safetensors.torch import save_file

    state = ckpt.get("state_dict") or {}
    if not state:
        raise ExportError("the checkpoint holds no weights (state_dict is empty)")
    if not ckpt.get("sora_config"):
        raise ExportError("the checkpoint has no sora_config (not written by sora-train); nothing could rebuild it")
    ema = ((ckpt.get("callbacks") or {}).get("EMA") or {}).get("shadow") or {}
    clash = sorted(k for k in state if k.startswith(EMA_PREFIX))
    if clash:
        raise ExportError(f"weight names start with {EMA_PREFIX!r} (e.g. {clash[0]}), the EMA prefix of the format")
    tensors = {k: _owned(v) for k, v in state.items() if isinstance(v, torch.Tensor)}
    tensors.update({EMA_PREFIX + k: _owned(v) for k, v in ema.items()})
    meta = {"format": FORMAT, "sora_config": json.dumps(ckpt["sora_config"]),
            "global_step": str(int(ckpt.get("global_step", -1))), "source": source}
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    save_file(tensors, str(path), metadata=meta)
    return {"tensors": len(tensors) - len(ema), "ema": len(ema), "bytes": path.stat().st_size,
            "global_step": int(meta["global_step"])}


def is_export(path) -> bool:
    path = Path(path)
    return path.is_file() and path.suffix == SUFFIX


def read_export(path) -> dict:
    """An exported file as a checkpoint dict: ``sora_config``, ``state_dict``, ``callbacks.EMA.shadow``
    (when it has an EMA), ``global_step``. Safetensors and JSON only: nothing is unpickled."""
    from safetensors import safe_open

    try:
        with safe_open(str(path), framework="pt") as f:
            meta = f.metadata() or {}
            if meta.get("format") != FORMAT:
                raise ExportError(f"{path}: not a sora export (format {meta.get('format')!r}, expected {FORMAT!r}); "
                                  f"make one with tools/export_checkpoint.py")
            tensors = {k: f.get_tensor(k) for k in f.keys()}
    except ExportError:
        raise
    except Exception as e:  # noqa: BLE001 - a broken or foreign file is one line
        raise ExportError(f"{path}: not a safetensors file ({' '.join(str(e).split())[:200]})") from None
    state = {k: v for k, v in tensors.items() if not k.startswith(EMA_PREFIX)}
    ema = {k[len(EMA_PREFIX):]: v for k, v in tensors.items() if k.startswith(EMA_PREFIX)}
    ckpt = {"sora_config": json.loads(meta["sora_config"]), "state_dict": state,
            "global_step": int(meta.get("global_step", -1)), "callbacks": {}}
    if ema:
        ckpt["callbacks"]["EMA"] = {"shadow": ema}
    return ckpt


# -- training checkpoints ----------------------------------------------------------------------
def model_weights(ckpt: dict, use_ema: bool = True, prefix: str = "") -> dict[str, torch.Tensor]:
    """The weights to load from a checkpoint dict (any reader's): its ``state_dict`` with the EMA average in
    place of each trained weight (``use_ema``, when the run kept one); ``prefix``: only the keys under it,
    the prefix removed (an earlier stage's ``"vae."``). The one EMA merge: sampling, evaluation, frozen stages."""
    state = dict(ckpt.get("state_dict", ckpt))
    if use_ema:
        state.update(((ckpt.get("callbacks") or {}).get("EMA") or {}).get("shadow") or {})
    return {k[len(prefix):]: v for k, v in state.items() if k.startswith(prefix)} if prefix else state


def is_checkpoint(path) -> bool:
    """A checkpoint file, or a DeepSpeed / torch distributed checkpoint folder (not a folder of checkpoints)."""
    path = Path(path)
    return path.is_file() or (path.is_dir() and ((path / "latest").is_file() or (path / "checkpoint").is_dir()
                                                 or (path / ".metadata").is_file()))


def checkpoint_kind(path) -> str:
    """``lightning`` (a file), ``deepspeed`` (a ZeRO folder) or ``distributed`` (a torch DCP folder)."""
    path = Path(path)
    if path.is_file():
        return "export" if path.suffix == SUFFIX else "lightning"
    if path.is_dir() and ((path / "latest").is_file() or (path / "checkpoint").is_dir()):
        return "deepspeed"
    if path.is_dir() and (path / ".metadata").is_file():
        return "distributed"
    if path.is_dir():
        raise ExportError(f"{path}: a folder that is neither a DeepSpeed checkpoint ('latest', 'checkpoint/') nor a "
                          f"torch distributed checkpoint ('.metadata')")
    raise ExportError(f"{path}: no such checkpoint")


def _read_deepspeed(path: Path) -> dict:
    from deepspeed.utils.zero_to_fp32 import (get_fp32_state_dict_from_zero_checkpoint, get_model_state_file,
                                              get_optim_files)

    from sora.checkpoints.io import deepspeed_globals, safe_loading

    tag = (path / "latest").read_text().strip() if (path / "latest").is_file() else "checkpoint"
    folder = path / tag
    with safe_loading(path, deepspeed_globals()):  # zero_to_fp32's own torch.load calls too
        optim = torch.load(get_optim_files(str(folder))[0], map_location="cpu", weights_only=True)
        stage = optim["optimizer_state_dict"]["zero_stage"]
        del optim
        client = torch.load(get_model_state_file(str(folder), stage), map_location="cpu", weights_only=True)
        state = get_fp32_state_dict_from_zero_checkpoint(str(path), tag=tag)
    engine_keys = ("module", "optimizer", "lr_scheduler", "csr_tensor_module_names", "skipped_steps",
                   "global_steps", "dp_world_size", "mp_world_size", "buffer_names", "param_shapes",
                   "frozen_param_shapes", "frozen_param_fragments", "shared_params", "ds_config", "ds_version")
    ckpt = {k: v for k, v in client.items() if k not in engine_keys}
    ckpt["state_dict"] = {k.removeprefix("_forward_module."): v for k, v in state.items()}
    return ckpt


def _read_distributed(path: Path) -> dict:
    from torch.distributed.checkpoint import FileSystemReader
    from torch.distributed.checkpoint.default_planner import _EmptyStateDictLoadPlanner
    from torch.distributed.checkpoint.state_dict_loader import _load_state_dict

    from sora.checkpoints.io import check_dcp_metadata, load_checkpoint_file

    check_dcp_metadata(path)  # torch unpickles .metadata with pickle.load: only its own classes pass
    state: dict = {}
    _load_state_dict(state, storage_reader=FileSystemReader(str(path)),
                     planner=_EmptyStateDictLoadPlanner(keys={"state_dict"}), no_dist=True)
    ckpt = load_checkpoint_file(path / "meta.pt") if (path / "meta.pt").is_file() else {}
    ckpt["state_dict"] = state["state_dict"]
    return ckpt


def read_training_checkpoint(path) -> dict:
    """Any checkpoint ``sora-train`` writes (or an export) as one full checkpoint dict on CPU."""
    from sora.checkpoints.io import CheckpointError, load_checkpoint_file
    from sora.checkpoints.renames import upgrade_targets

    path = Path(path)
    kind = checkpoint_kind(path)
    try:
        if kind == "export":
            return read_export(path)
        if kind == "lightning":
            ckpt = load_checkpoint_file(path)
        elif kind == "deepspeed":
            ckpt = _read_deepspeed(path)
        else:
            ckpt = _read_distributed(path)
    except ExportError:
        raise
    except CheckpointError as e:  # refused (pickled code), truncated or corrupt
        raise ExportError(str(e)) from None
    except Exception as e:  # noqa: BLE001 - unreadable: one line naming the file and the reason
        raise ExportError(f"{path}: cannot read this {kind} checkpoint: {type(e).__name__}: "
                          f"{' '.join(str(e).split())[:300]}") from e
    if not isinstance(ckpt, dict) or "state_dict" not in ckpt:
        raise ExportError(f"{path}: not a checkpoint of a sora-train run (no state_dict)")
    if ckpt.get("sora_config") is not None:  # a run from before a class moved: today's import paths
        ckpt["sora_config"] = upgrade_targets(ckpt["sora_config"])
    return ckpt


# -- an earlier stage's weights, frozen into a later one ----------------------------------------
def stage_weights(path, prefix: str, use_ema: bool = True) -> dict[str, torch.Tensor]:
    """Weights under ``prefix`` (e.g. ``"vae."``) from any checkpoint of an earlier stage (a file, a DeepSpeed
    or FSDP2 folder, an export), with the prefix removed; its EMA weights when present and ``use_ema``. Never
    unpickles code (:func:`read_training_checkpoint`): a checkpoint with pickled code is refused."""
    sub = model_weights(read_training_checkpoint(path), use_ema, prefix)
    if not sub:
        raise ValueError(f"{path}: no weights under {prefix!r}; is it a checkpoint of the right stage?")
    return sub


def load_frozen(module: torch.nn.Module, path, prefix: str, what: str, use_ema: bool = True) -> torch.nn.Module:
    """``module`` with the weights of ``path`` under ``prefix`` (:func:`stage_weights`), in eval mode and without
    gradients; ``path`` None: left randomly initialised (tests only, logged). ``what`` names it in errors."""
    if path is None:
        log.warning("%s: no checkpoint given, randomly initialised (only meaningful in tests)", what)
    else:
        try:
            module.load_state_dict(stage_weights(path, prefix, use_ema))
        except RuntimeError as e:
            raise ValueError(f"{what}: the checkpoint {path} does not fit the configured architecture: "
                             f"{' '.join(str(e).split())[:400]}") from e
    return module.eval().requires_grad_(False)


def export_checkpoint(src, out) -> dict:
    """Read training checkpoint ``src`` (any kind) and write the safetensors export ``out``."""
    kind = checkpoint_kind(src)
    summary = write_export(out, read_training_checkpoint(src), source=kind)
    return {"kind": kind, **summary}
