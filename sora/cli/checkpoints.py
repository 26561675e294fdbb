"""The checkpoint reader of every command (sora-sample, sora-eval): any checkpoint a ``sora-train`` run wrote
(a Lightning ``.ckpt``, a DeepSpeed ZeRO or FSDP2 folder, a ``.safetensors`` export), as one dict on CPU, read
without running code from it (:func:`sora.checkpoints.export.read_training_checkpoint`); anything else is one
line naming the file."""

from __future__ import annotations

from sora.checkpoints.export import ExportError, read_training_checkpoint


def read_checkpoint(path, prog: str) -> dict:
    try:
        return read_training_checkpoint(path)
    except ExportError as e:  # refused (pickled code), truncated, not a checkpoint, no such file
        raise SystemExit(f"{prog}: {e}") from None
