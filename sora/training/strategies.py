"""Transforms applied to a model from outside, in torchtitan's order (``parallelize.py``):
activation checkpointing -> compile -> sharding. Model files stay parallelism-agnostic.

Today: activation checkpointing (the DiT's own per-block switch, so checkpoint keys do not
change) and per-block ``torch.compile``. The sharding strategies (DDP, DeepSpeed ZeRO, FSDP2)
come with the scale-out issue.
"""

from __future__ import annotations

from torch import nn


def parallelize_dit(dit: nn.Module, activation_checkpointing: bool = False, compile: bool = False) -> nn.Module:
    """Apply the switches to an ``AVDiT`` in place and return it.

    ``compile`` compiles each transformer block in place (``nn.Module.compile``): the blocks
    share one structure, so the graph is built once per block shape, and ``state_dict`` keys are
    unchanged (checkpoints load with or without it).
    """
    if activation_checkpointing:
        dit.checkpoint_activations = True
    if compile:
        for block in dit.blocks:
            block.compile()
    return dit
