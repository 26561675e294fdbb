"""Parallelism applied to a model from outside, in torchtitan's order (``parallelize.py``):
activation checkpointing -> compile -> sharding. Model files stay parallelism-agnostic.

* :func:`parallelize_dit`: activation checkpointing (the DiT's own per-block switch, so checkpoint
  keys do not change) and per-block ``torch.compile``; the DiT stage applies it when it is built.
* Sharding, chosen with ``strategy=`` (``sora/configs/strategy/``) and built here:

  - ``ddp``: Lightning's ``DDPStrategy`` (replicated weights, all-reduced gradients);
  - ``deepspeed_stage_2`` / ``deepspeed_stage_3`` / ``deepspeed_stage_3_offload``: :class:`DeepSpeed`,
    Lightning's ``DeepSpeedStrategy`` that also runs on CPU (gloo), where Lightning refuses it;
  - ``fsdp``: :class:`FSDP2`, Lightning's ``ModelParallelStrategy`` as a data-parallel-only mesh;
    the LightningModule's ``configure_model`` hook calls :func:`configure_sharding`, which applies
    ``fully_shard`` to each DiT block, then the DiT and the text encoder.

  On CUDA these are Lightning's own code paths; on CPU the same sharded code runs on gloo, so
  that the tests exercise it with 2 CPU processes.
* :func:`local_shard` / :func:`gather_full` / :func:`shard_like`: the part of a (possibly sharded)
  parameter this rank holds, and the way between it and the full tensor. The EMA callback keeps
  its average in the parameters' own layout with them (``sora.training.callbacks.EMA``).
* Checkpoints: :class:`AtomicCheckpointIO` (files) and the DeepSpeed / FSDP2 ``save_checkpoint``
  (folders) write atomically and read with ``weights_only=True`` (:mod:`sora.checkpoints.io`).
"""

from __future__ import annotations

import logging
from pathlib import Path

import torch
from lightning.fabric.plugins import TorchCheckpointIO
from lightning.fabric.utilities.cloud_io import _is_local_file_protocol
from lightning.pytorch.accelerators import CUDAAccelerator
from lightning.pytorch.strategies import DDPStrategy, DeepSpeedStrategy, ModelParallelStrategy
from torch import nn

from sora.checkpoints.io import CheckpointError

log = logging.getLogger(__name__)


def parallelize_dit(dit: nn.Module, activation_checkpointing: bool = False, compile: bool = False,
                    compile_backend: str = "inductor") -> nn.Module:
    """Apply the switches to an ``AVDiT`` in place and return it.

    ``compile`` compiles each transformer block in place (``nn.Module.compile``): the blocks
    share one structure, so a graph is built once per block kind (the last block's text stream has
    no output) and grad mode (training, validation/sampling), and ``state_dict`` keys are unchanged
    (checkpoints load with or without it). The text mask is then always passed, even with nothing
    padded, so that a batch without padding does not change the blocks' inputs (a recompile).
    ``compile_backend``: torch.compile's backend (``"eager"``: dynamo's graphs and guards only, for tests).
    """
    if activation_checkpointing:
        dit.checkpoint_activations = True
    if compile:
        dit.drop_full_text_mask = False
        for block in dit.blocks:
            block.compile(backend=compile_backend, dynamic=True)
    return dit


# -- DeepSpeed ---------------------------------------------------------------------------------
def _deepspeed_on_cpu() -> None:
    """DeepSpeed's CPU accelerator, without the shared-memory all-reduce op: DeepSpeed would
    JIT-compile it (a C++ build, minutes) at its first ``init_distributed``; gloo does the same job."""
    import deepspeed
    from deepspeed.accelerator import get_accelerator, set_accelerator
    from deepspeed.accelerator.cpu_accelerator import CPU_Accelerator

    if get_accelerator().device_name() != "cpu":
        set_accelerator(CPU_Accelerator())
    deepspeed.ops.__compatible_ops__["deepspeed_shm_comm"] = False  # a cached dict: edits persist


class AtomicCheckpointIO(TorchCheckpointIO):
    """Lightning's ``TorchCheckpointIO`` with atomic local writes (:func:`sora.checkpoints.io.save_file`)
    and ``weights_only=True`` reads (:func:`~sora.checkpoints.io.load_checkpoint_file`); remote
    paths (fsspec) as Lightning's."""

    def save_checkpoint(self, checkpoint, path, storage_options=None) -> None:
        from sora.checkpoints.io import save_file

        if storage_options is not None or not _is_local_file_protocol(path):
            return super().save_checkpoint(checkpoint, path, storage_options)
        save_file(checkpoint, path)

    def load_checkpoint(self, path, map_location=lambda storage, loc: storage, weights_only=None) -> dict:
        """Always ``weights_only=True``, whatever is asked."""
        from sora.checkpoints.io import load_checkpoint_file

        if not _is_local_file_protocol(path):
            return super().load_checkpoint(path, map_location, weights_only=True)
        if not Path(path).exists():
            raise FileNotFoundError(f"Checkpoint file not found: {path}")
        return load_checkpoint_file(path, map_location)


def use_atomic_checkpoints(strategy) -> None:
    """Give ``strategy`` an :class:`AtomicCheckpointIO`, unless it has a CheckpointIO of its own (``plugins=``).
    DeepSpeed and FSDP2 write folders in their own ``save_checkpoint`` (below)."""
    if type(strategy.checkpoint_io) is TorchCheckpointIO:
        strategy.checkpoint_io = AtomicCheckpointIO()


class DeepSpeed(DeepSpeedStrategy):
    """Lightning's ``DeepSpeedStrategy`` (ZeRO ``stage`` 1-3, ``offload_optimizer``,
    ``offload_parameters``; any of its arguments), unchanged on CUDA. On CPU, where Lightning
    refuses it, it runs the same ZeRO code on gloo: DeepSpeed's CPU accelerator, no shm op build,
    and DeepSpeed allowed to offload the optimizer of ``configure_optimizers`` (not only its own
    C++ ``DeepSpeedCPUAdam``)."""

    def __init__(self, *args, zero_options: dict | None = None, logging_batch_size_per_gpu: int | str = 1,
                 **kwargs):
        """``zero_options``: more keys of DeepSpeed's ``zero_optimization`` config (e.g.
        ``stage3_param_persistence_threshold``), over Lightning's. ``logging_batch_size_per_gpu``:
        only labels DeepSpeed's throughput logs (our streams batch themselves: Lightning's ``auto``
        finds no batch size on the loader)."""
        super().__init__(*args, logging_batch_size_per_gpu=logging_batch_size_per_gpu, **kwargs)
        self.zero_options = dict(zero_options or {})

    @property
    def on_cpu(self) -> bool:
        return not isinstance(self.accelerator, CUDAAccelerator)

    @property
    def root_device(self) -> torch.device:
        device = super().root_device
        # DeepSpeed's engine takes its local rank from the device's index, which CPU devices lack
        return torch.device("cpu", self.local_rank) if device.type == "cpu" and device.index is None else device

    def setup_environment(self) -> None:
        if not self.on_cpu:
            return super().setup_environment()
        _deepspeed_on_cpu()
        self._process_group_backend = self._process_group_backend or "gloo"
        DDPStrategy.setup_environment(self)  # what DeepSpeedStrategy does after its CUDA check

    def setup_distributed(self) -> None:
        if not self.on_cpu:
            return super().setup_distributed()
        from lightning.fabric.utilities.seed import reset_seed

        reset_seed()  # DeepSpeedStrategy's own steps, without its check of CUDA device indices
        self.set_world_ranks()
        self._init_deepspeed_distributed()

    def save_checkpoint(self, checkpoint, filepath, storage_options=None) -> None:
        """DeepSpeed's folder of shards, written to ``<filepath>.tmp`` and renamed when whole."""
        from sora.checkpoints.io import atomic_folder

        with atomic_folder(self, self.broadcast(str(filepath))) as tmp:
            super().save_checkpoint(checkpoint, str(tmp), storage_options)

    def load_checkpoint(self, checkpoint_path, weights_only=None):
        """DeepSpeed's own loads (``weights_only=False``) forced to ``weights_only=True``, allowing only
        the data classes DeepSpeed pickles into its optimizer shards (:func:`deepspeed_globals`)."""
        from sora.checkpoints.io import deepspeed_globals, safe_loading

        check_zero_world_size(checkpoint_path, self.world_size)
        with safe_loading(checkpoint_path, deepspeed_globals()):
            return super().load_checkpoint(checkpoint_path, weights_only=True)

    def _init_config_if_needed(self) -> None:
        first = not self._config_initialized
        super()._init_config_if_needed()
        if first:
            self.config.setdefault("zero_optimization", {}).update(self.zero_options)
        if first and self.on_cpu:
            self.config.setdefault("zero_force_ds_cpu_optimizer", False)


def check_zero_world_size(path, world_size: int) -> None:
    """Refuse, in one line, a ZeRO checkpoint folder written by another number of ranks.

    Its optimizer states (and under ZeRO-3 its weights) are partitioned per rank. DeepSpeed's own
    way across world sizes, the universal checkpoint, restores only the weights the optimizer
    trains: the frozen autoencoders and the buffers (the latent statistics) would not come back,
    and ZeRO-3's frozen weight partitions do not reshard at all.
    """
    from pathlib import Path

    latest = Path(str(path), "latest")
    if not latest.is_file():
        return
    saved = len(list((latest.parent / latest.read_text().strip()).glob("*optim_states.pt")))
    if saved and saved != world_size:
        raise CheckpointError(
            f"ckpt_path={path}", f"a DeepSpeed ZeRO checkpoint written by {saved} ranks cannot "
            f"resume on {world_size}: its optimizer states (and ZeRO-3 weights) are partitioned per rank, and "
            f"DeepSpeed's universal checkpoint, its way across world sizes, restores the trained weights but not the "
            f"frozen ones nor the buffers; resume with trainer.devices x trainer.num_nodes = {saved}, or train with "
            f"strategy=fsdp or strategy=ddp, whose checkpoints load at any world size")


# -- FSDP2 ---------------------------------------------------------------------------------------
class FSDP2(ModelParallelStrategy):
    """FSDP2 (``torch.distributed.fsdp.fully_shard``) through Lightning's ``ModelParallelStrategy``
    on a data-parallel mesh of every rank (no tensor parallelism). The module shards itself in its
    ``configure_model`` hook (:func:`configure_sharding`). Checkpoints are torch distributed
    checkpoint folders (``save_distributed_checkpoint``), which load at any world size.
    ``reshard_after_forward``: free the gathered weights after each block's forward (ZeRO-3 like;
    ``false``: keep them until the backward, ZeRO-2 like, more memory, less communication)."""

    def __init__(self, reshard_after_forward: bool = True, save_distributed_checkpoint: bool = True, **kwargs):
        kwargs.setdefault("tensor_parallel_size", 1)
        super().__init__(save_distributed_checkpoint=save_distributed_checkpoint, **kwargs)
        self.reshard_after_forward = bool(reshard_after_forward)

    def setup_environment(self) -> None:
        if self._data_parallel_size == "auto":
            self._data_parallel_size = self.num_nodes * self.num_processes // int(self._tensor_parallel_size)
        super().setup_environment()

    def setup(self, trainer) -> None:
        from lightning.pytorch.utilities.model_helpers import is_overridden

        if not is_overridden("configure_model", self.lightning_module):
            raise TypeError(f"strategy=fsdp: {type(self.lightning_module).__name__} does not shard itself (no "
                            f"configure_model hook); train the DiT stage (model=dit) with it, or use strategy=ddp or "
                            f"strategy=deepspeed_stage_2 for this stage")
        super().setup(trainer)

    def save_checkpoint(self, checkpoint, filepath, storage_options=None) -> None:
        """A distributed-checkpoint folder is written to ``<filepath>.tmp`` and renamed when whole (a
        full checkpoint file: the CheckpointIO's atomic write)."""
        if not self._save_distributed_checkpoint:
            return super().save_checkpoint(checkpoint, filepath, storage_options)
        from sora.checkpoints.io import atomic_folder

        with atomic_folder(self, self.broadcast(str(filepath))) as tmp:
            super().save_checkpoint(checkpoint, tmp, storage_options)

    def load_checkpoint(self, checkpoint_path, weights_only=None):
        """``weights_only=True``; a folder's ``.metadata`` (which torch unpickles) checked first."""
        from sora.checkpoints.io import check_dcp_metadata

        check_dcp_metadata(checkpoint_path)
        return super().load_checkpoint(checkpoint_path, weights_only=True)


def configure_sequence_parallel(module) -> None:
    """Ulysses sequence parallelism of the DiT over groups of ``model.sequence_parallel`` ranks
    (:mod:`sora.training.sequence_parallel`), before any sharding; each group shares one
    data-parallel rank (the datamodule splits the data by it). Every rank must call it."""
    from sora.training.sequence_parallel import (apply_sequence_parallel, new_sequence_parallel_group,
                                                 sequence_parallel_size)

    n = getattr(module, "sequence_parallel", 1)
    if n > 1 and sequence_parallel_size(module.dit) == 1:  # configure_model runs once per fit/validate
        apply_sequence_parallel(module.dit, new_sequence_parallel_group(n))


def configure_sharding(module) -> None:
    """Sequence parallelism when configured (:func:`configure_sequence_parallel`), then FSDP2 for a
    DiT-stage LightningModule, from its ``configure_model`` hook; no FSDP2 unless the
    trainer's strategy is :class:`FSDP2`. Each DiT block is its own unit, then the DiT (its
    embeddings and final layers) and the text encoder. The frozen autoencoders stay replicated:
    they are not trained, and the stage calls their ``encode``/``decode`` methods rather than
    ``forward``, which is where FSDP gathers weights."""
    configure_sequence_parallel(module)
    trainer = getattr(module, "_trainer", None)
    strategy = trainer.strategy if trainer is not None else None
    if not isinstance(strategy, FSDP2):
        return
    from torch.distributed.fsdp import FSDPModule, fully_shard

    if isinstance(module.dit, FSDPModule):
        return  # configure_model runs again for each fit/validate call: shard once
    mesh = module.device_mesh["data_parallel"]
    reshard = strategy.reshard_after_forward
    for block in module.dit.blocks:
        fully_shard(block, mesh=mesh, reshard_after_forward=reshard)
    fully_shard(module.dit, mesh=mesh, reshard_after_forward=reshard)
    if any(True for _ in module.text_encoder.parameters()):
        fully_shard(module.text_encoder, mesh=mesh, reshard_after_forward=reshard)


def shards_parameters(trainer) -> bool:
    """Whether every rank must take part in a forward pass (ZeRO-3 or FSDP2 gather weights then;
    sequence parallelism splits every forward's tokens over ranks)."""
    from sora.training.sequence_parallel import sequence_parallel_size

    strategy = getattr(trainer, "strategy", None)
    dit = getattr(getattr(trainer, "lightning_module", None), "dit", None)
    if isinstance(strategy, FSDP2) or (dit is not None and sequence_parallel_size(dit) > 1):
        return True
    return isinstance(strategy, DeepSpeedStrategy) and strategy.world_size > 1 and strategy.zero_stage_3


# -- the local part of a parameter ------------------------------------------------------------
def _dtensor(p) -> bool:
    from torch.distributed.tensor import DTensor

    return isinstance(p, DTensor)


@torch.no_grad()
def local_shard(p: torch.Tensor) -> torch.Tensor:
    """The tensor this rank holds of parameter ``p``, in place (writes change ``p``): ZeRO-3's
    flat partition (``ds_tensor``), a DTensor's local shard, or ``p`` itself."""
    if hasattr(p, "ds_tensor"):
        return p.ds_tensor
    if _dtensor(p):
        return p.to_local()  # under no_grad: the local shard itself, not a copy
    return p.data


@torch.no_grad()
def gather_full(shard: torch.Tensor, p: torch.Tensor) -> torch.Tensor:
    """The full tensor of ``p``'s shape from every rank's ``shard`` laid out like :func:`local_shard`
    of ``p`` (a collective when ``p`` is sharded: every rank calls it)."""
    if hasattr(p, "ds_tensor"):
        group = p.ds_process_group
        parts = [torch.empty_like(shard) for _ in range(torch.distributed.get_world_size(group))]
        torch.distributed.all_gather(parts, shard.contiguous(), group=group)
        return torch.cat(parts)[:p.ds_numel].view(p.ds_shape)
    if _dtensor(p):
        from torch.distributed.tensor import DTensor

        return DTensor.from_local(shard, p.device_mesh, p.placements, shape=p.shape, stride=p.stride()).full_tensor()
    return shard


@torch.no_grad()
def shard_like(full: torch.Tensor, p: torch.Tensor) -> torch.Tensor:
    """This rank's part of ``full`` (``p``'s full shape), laid out like :func:`local_shard` of ``p``
    (no communication: every rank holds ``full``)."""
    if hasattr(p, "ds_tensor"):
        n, rank = p.ds_tensor.numel(), torch.distributed.get_rank(p.ds_process_group)
        flat = full.reshape(-1)
        flat = torch.cat([flat, flat.new_zeros(max(0, n * (rank + 1) - flat.numel()))])
        return flat[n * rank:n * (rank + 1)].clone()
    if _dtensor(p):
        from torch.distributed.tensor import distribute_tensor

        return distribute_tensor(full, p.device_mesh, p.placements, src_data_rank=None).to_local().clone()
    return full.clone()


def is_available(p: torch.Tensor) -> bool:
    """Whether ZeRO-3 currently holds ``p`` gathered in ``p.data`` (persistent small parameters,
    or inside a forward) besides its partition; always False for other parameters."""
    if not hasattr(p, "ds_tensor"):
        return False
    from deepspeed.runtime.zero.partition_parameters import ZeroParamStatus

    return p.ds_status == ZeroParamStatus.AVAILABLE and p.data.numel() == p.ds_numel
