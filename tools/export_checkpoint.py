"""Export any ``sora-train`` checkpoint to one safetensors file: full weights, EMA weights, config.

    python tools/export_checkpoint.py outputs/dit/checkpoints/last.ckpt dit.safetensors
    sora-sample ckpt=dit.safetensors prompt="a red ball bounces" out=ball.mp4

The input is any of:

* a Lightning checkpoint file (``strategy=ddp`` or none; ``fsdp`` with ``save_distributed_checkpoint=false``);
* a DeepSpeed ZeRO-2/3 checkpoint folder (``strategy=deepspeed_*``: ``last.ckpt/`` with ``latest``
  and per-rank shards), consolidated to full fp32 weights by DeepSpeed's ``zero_to_fp32``;
* a torch distributed-checkpoint folder (``strategy=fsdp``: ``.metadata``, ``*.distcp``, ``meta.pt``).

The output (format in :mod:`sora.checkpoints.export`) holds the LightningModule's weights under their
own names, the EMA under ``ema.<name>``, and the run's config as JSON in the file's metadata;
``sora-sample`` and ``sora-eval`` load it without unpickling anything. The input is read with
``torch.load(weights_only=True)`` (tensors and plain data only; DeepSpeed's loads forced to it, a
distributed checkpoint's ``.metadata`` checked first): a checkpoint holding pickled code is refused.
"""

from __future__ import annotations

import argparse
import sys
import time

from sora.checkpoints.export import SUFFIX, ExportError, export_checkpoint


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="export_checkpoint", description=__doc__.splitlines()[0])
    parser.add_argument("checkpoint", help="a .ckpt file, a DeepSpeed checkpoint folder or a distributed "
                                           "checkpoint folder")
    parser.add_argument("out", help=f"the {SUFFIX} file to write")
    args = parser.parse_args(argv)
    if not args.out.endswith(SUFFIX):
        raise SystemExit(f"export_checkpoint: out={args.out}: the file name must end with {SUFFIX}")
    t0 = time.perf_counter()
    try:
        s = export_checkpoint(args.checkpoint, args.out)
    except ExportError as e:
        raise SystemExit(f"export_checkpoint: {e}") from None
    print(f"export_checkpoint: {args.checkpoint} ({s['kind']}, step {s['global_step']}) -> {args.out}: "
          f"{s['tensors']} weights, {s['ema']} EMA weights, {s['bytes'] / 2**20:.1f} MiB "
          f"in {time.perf_counter() - t0:.1f} s")
    return 0


if __name__ == "__main__":
    sys.exit(main())
