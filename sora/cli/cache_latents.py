"""Encode a DiT run's clips once: video latents, audio latents, text embeddings -> webdataset shards.

    sora-cache-latents OUT [OVERRIDES...] [--rank R --world-size N] [--workers W] [--device D]
    sora-cache-latents cache/ experiment=quickstart/dit
    torchrun --nproc-per-node 8 -m sora.cli.cache_latents cache/ experiment=my_dit    # 8 ranks, 8 GPUs

OVERRIDES compose the DiT run config exactly as ``sora-train`` does (``sora/configs/train.yaml``): its
``model`` gives the frozen encoders (video VAE, audio VAE, text encoder, built and seeded as the
training run builds them; :meth:`DiTModule.encode` computes the latents, so they are the raw run's),
its ``data.train`` the raw clips: one pass over them in order (no shuffle, each clip once, at the
window the raw run's first epoch would cut). Each rank encodes its share (the stream's own split
over ranks and workers) into ``OUT/latents-r<RANK>-<N>.tar``; every rank writes the same
``OUT/manifest.json`` (encoder/timeline hashes, buckets, the raw stream config) and
``OUT/rank-<RANK>.json`` (its counts and times). Rank and world size come from ``--rank``/
``--world-size``, else torchrun's ``RANK``/``WORLD_SIZE``, else SLURM's.

Text: embeddings are cached only when the run's text encoder is frozen (``model.train_text_encoder=
false``, or a Hugging Face encoder); with the embedding of ``""`` (``OUT/text_empty.npy``) for
caption dropout. A text encoder that trains is run on the cached captions at training time. A
multi-shot clip (timed captions: ``meta["shots"]``) caches its shots' caption tokens one after the other,
each shot row noting its ``text_tokens``; the shots are the window the clip was cut at.

Train from the cache with the same overrides plus ``data=latents data.train.urls='OUT/latents-*.tar'``.
"""

from __future__ import annotations

import argparse
import contextlib
import json
import os
import sys
import time
from pathlib import Path

import numpy as np
import torch

PROG = "sora-cache-latents"


def fail(message: str) -> SystemExit:
    return SystemExit(f"{PROG}: error: {' '.join(str(message).split())}")


def env_rank() -> tuple[int, int]:
    """(rank, world size) from torchrun's or SLURM's environment; (0, 1) without either."""
    for rank, world in (("RANK", "WORLD_SIZE"), ("SLURM_PROCID", "SLURM_NTASKS")):
        if rank in os.environ and world in os.environ:
            return int(os.environ[rank]), int(os.environ[world])
    return 0, 1


def parse(argv=None) -> argparse.Namespace:
    p = argparse.ArgumentParser(prog=PROG, description=__doc__.split("\n\n")[0],
                                formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("out", type=Path, help="folder for latents-r<RANK>-<N>.tar, manifest.json")
    p.add_argument("overrides", nargs="*", help="Hydra overrides of the DiT run (e.g. experiment=quickstart/dit)")
    p.add_argument("--rank", type=int, help="this process's rank (default: $RANK / $SLURM_PROCID / 0)")
    p.add_argument("--world-size", type=int, help="number of ranks (default: $WORLD_SIZE / $SLURM_NTASKS / 1)")
    p.add_argument("--workers", type=int, help="DataLoader workers decoding clips (default: data.num_workers)")
    p.add_argument("--batch-size", type=int, help="clips per encoder call (default: data.train.batch_size)")
    p.add_argument("--device", help="default: cuda:$LOCAL_RANK when CUDA is there, else cpu")
    p.add_argument("--shard-size", type=int, default=1000, help="clips per shard (default 1000)")
    p.add_argument("--max-clips", type=int, help="stop after this many clips on this rank")
    p.add_argument("--no-text", action="store_true", help="never cache text embeddings (captions only)")
    p.add_argument("--overwrite", action="store_true", help="replace this rank's shards and a stale manifest")
    args = p.parse_args(argv)
    env = env_rank()
    args.rank = env[0] if args.rank is None else args.rank
    args.world_size = env[1] if args.world_size is None else args.world_size
    if not 0 <= args.rank < args.world_size:
        raise fail(f"--rank {args.rank} is not in [0, --world-size {args.world_size})")
    return args


def compose(overrides: list[str]):
    from hydra import compose as hydra_compose
    from hydra import initialize_config_dir

    from sora.cli.overrides import CONFIGS, check_overrides

    overrides = check_overrides(overrides, prog=PROG)
    with initialize_config_dir(CONFIGS, version_base="1.3"):
        cfg = hydra_compose("train", overrides=list(overrides))
    if not str(cfg.model.get("_target_", "")).endswith("DiTModule"):
        raise fail(f"model._target_={cfg.model.get('_target_')}: not the DiT stage; pass its config "
                   f"(e.g. experiment=quickstart/dit or model=dit)")
    if str(cfg.data.train.get("_target_", "")).endswith("LatentClipStream"):
        raise fail("data=latents: give the raw clips' data config (the one the cache is made from)")
    return cfg


def build(cfg):
    """The raw stream and the DiT module, built (and seeded) in sora-train's order."""
    import lightning as L

    from sora.cli.overrides import build as build_part

    L.seed_everything(cfg.seed, workers=True, verbose=False)
    build_part(cfg.timeline, "timeline", PROG)
    datamodule = build_part(cfg.data, "data", PROG)
    module = build_part(cfg.model, "model", PROG)
    return datamodule.train_stream, module


def own_shards(out: Path, rank: int, overwrite: bool) -> str:
    """This rank's shard pattern in OUT; its existing shards are refused, or removed with ``overwrite``."""
    out.mkdir(parents=True, exist_ok=True)
    mine = sorted(out.glob(f"latents-r{rank:03d}-*.tar"))
    if mine and not overwrite:
        raise fail(f"{out} already has rank {rank}'s shards ({mine[0].name} ...): pass --overwrite to replace them")
    for path in mine:
        path.unlink()
    return str(out / f"latents-r{rank:03d}-%06d.tar")


def check_manifest(out: Path, manifest: dict, overwrite: bool) -> None:
    """Other ranks' shards in OUT must come from the same encoders and timeline."""
    from sora.data.latents import MANIFEST

    old = out / MANIFEST
    if old.is_file() and json.loads(old.read_text()).get("hashes") != manifest["hashes"] and not overwrite:
        raise fail(f"{out} holds a latent cache of other encoders or another timeline ({old}); use an empty "
                   f"folder, or --overwrite")


def write_atomic(path: Path, data: bytes) -> None:
    """Every rank writes the same manifest: a rename keeps readers from seeing half of one."""
    tmp = path.with_name(f".{path.name}.{os.getpid()}")
    tmp.write_bytes(data)
    os.replace(tmp, path)


def expected_clips(stream, rank: int, world: int, workers: int) -> int | None:
    """This rank's share of a world stream (None for shard streams: unknown before reading)."""
    clips = getattr(stream, "clips", None)
    if clips is None:
        return None
    n = world * max(workers, 1)
    return sum(len(range(g, clips, n)) for g in range(rank * max(workers, 1), (rank + 1) * max(workers, 1)))


def autocast(precision, device: torch.device):
    """The training run's mixed precision, so that the cached latents are the ones it would compute."""
    p = str(precision)
    if "mixed" in p:
        return torch.autocast(device.type, dtype=torch.bfloat16 if p.startswith("bf16") else torch.float16)
    return contextlib.nullcontext()


def _json_default(x):
    if isinstance(x, np.generic):
        return x.item()
    if isinstance(x, np.ndarray):
        return x.tolist()
    raise TypeError(f"not JSON serializable: {type(x).__name__}")


def clip_batches(loader):
    """``(ClipBatch, samples skipped)`` from the loader; a pack (``data.train.pack``) gives one batch per
    bucket: the cache holds clips, batching them again is the training run's business."""
    for loaded in loader:
        for i, batch in enumerate(getattr(loaded, "parts", [loaded])):
            yield batch, loaded.skipped if i == 0 else 0


def text_of(module, batch) -> tuple[torch.Tensor, torch.Tensor]:
    """The text embeddings the DiT reads for the batch: its captions, or for multi-shot clips (timed captions)
    each shot's caption's tokens one after the other (:meth:`DiTModule.encode_script_text`); each shot row
    of ``batch.meta`` gets its token count as ``text_tokens``, so training splits them again."""
    script = module.encode_script_text(batch)
    if script is None:
        return module.text_encoder(list(batch.captions))
    tokens, mask, shots = script
    for i, m in enumerate(batch.meta):
        ids = shots["text"][i][mask[i]]
        for k, row in enumerate(m.get("shots", ())):
            row["text_tokens"] = int((ids == k).sum())
    return tokens, mask


def sample_of(batch, i: int, z: dict, bucket: int, text=None) -> dict:
    """Clip ``i`` of an encoded batch as a webdataset sample: tensors as .npy bytes, no pickle."""
    from sora.data.latents import npy_bytes

    info = {"bucket": bucket, "start": float(batch.start[i]), "has_audio": bool(batch.has_audio[i]),
            "meta": batch.meta[i]}
    sample = {"__key__": batch.keys[i], "video.npy": npy_bytes(z["video"][i]), "audio.npy": npy_bytes(z["audio"][i]),
              "txt": batch.captions[i], "json": json.dumps(info, default=_json_default)}
    if text is not None:
        tokens, mask = text
        n = int(mask.sum())
        if not bool(mask[:n].all()):
            raise fail("the text encoder's mask is not a prefix of real tokens: its embeddings cannot be cached")
        sample["text.npy"] = npy_bytes(tokens[:n])
    return sample


def main(argv=None) -> int:
    args = parse(argv)
    cfg = compose(args.overrides)
    pattern = own_shards(args.out, args.rank, args.overwrite)  # before the slow part: fails fast

    import webdataset as wds
    from omegaconf import OmegaConf
    from torch.utils.data import DataLoader
    from tqdm import tqdm

    from sora.data.latents import FORMAT, MANIFEST, TEXT_EMPTY, encoder_hashes, npy_bytes, text_is_frozen, \
        timeline_fields

    stream, module = build(cfg)
    device = torch.device(args.device or (f"cuda:{os.environ.get('LOCAL_RANK', 0)}" if torch.cuda.is_available()
                                          else "cpu"))
    for part in (module.video_vae, module.audio_vae, module.text_encoder):
        part.to(device).eval()
    text = not args.no_text and text_is_frozen(module)
    hashes = encoder_hashes(module, text=text)
    manifest = {
        "format": FORMAT, "hashes": hashes, "timeline": timeline_fields(module.timeline),
        "buckets": [[b.height, b.width] for b in stream.buckets], "channels": stream.channels, "text": text,
        "precision": str(cfg.trainer.get("precision", "32-true")), "seed": int(cfg.seed),
        "source": OmegaConf.to_container(cfg.data.train, resolve=True),
        "encoders": {k: OmegaConf.to_container(cfg.model, resolve=True).get(k)
                     for k in ("video_vae_ckpt", "audio_vae_ckpt", "use_ema", "train_text_encoder")},
    }
    check_manifest(args.out, manifest, args.overwrite)
    write_atomic(args.out / MANIFEST, json.dumps(manifest, indent=1, default=_json_default).encode())
    with torch.no_grad(), autocast(manifest["precision"], device):
        if text:
            empty, mask = module.text_encoder([""])
            write_atomic(args.out / TEXT_EMPTY, npy_bytes(empty[0, : int(mask[0].sum())]))

    stream.shuffle, stream.infinite = False, False  # one pass, every clip once, in order
    stream.rank, stream.world_size = args.rank, args.world_size
    if args.batch_size:
        stream.batch_size = args.batch_size
    workers = cfg.data.get("num_workers", "auto") if args.workers is None else args.workers
    if workers == "auto":  # as sora-train's data module counts them (this process is one rank)
        from sora.data.datamodule import auto_workers

        workers = auto_workers()
    loader = DataLoader(stream, batch_size=None, num_workers=workers)
    buckets = {(b.height, b.width): i for i, b in enumerate(stream.buckets)}
    total = expected_clips(stream, args.rank, args.world_size, workers)
    if args.max_clips is not None:
        total = args.max_clips if total is None else min(total, args.max_clips)

    clips = skipped = nbytes = 0
    encode_s, shapes = 0.0, {}
    t0 = time.perf_counter()
    bar = tqdm(total=total, unit="clip", desc=f"{PROG} rank {args.rank}/{args.world_size}", file=sys.stderr)
    with wds.ShardWriter(pattern, maxcount=args.shard_size, verbose=0) as sink:
        for batch, lost in clip_batches(loader):
            skipped += lost
            keep = len(batch) if args.max_clips is None else min(len(batch), args.max_clips - clips)
            batch.video, batch.audio = batch.video.to(device), batch.audio.to(device)
            batch.normalize()
            t1 = time.perf_counter()
            with torch.no_grad(), autocast(manifest["precision"], device):
                z = module.encode(batch)
                tokens, mask = text_of(module, batch) if text else (None, None)
            manifest["latent_dtype"] = {m: str(x.dtype).removeprefix("torch.") for m, x in z.items()}
            z = {m: x.float().cpu() for m, x in z.items()}  # one copy per batch (waits for the device)
            tokens, mask = (None, None) if tokens is None else (tokens.float().cpu(), mask.cpu())
            encode_s += time.perf_counter() - t1
            bucket = buckets[tuple(batch.video.shape[-2:])]
            for i in range(keep):
                sample = sample_of(batch, i, z, bucket, None if tokens is None else (tokens[i], mask[i]))
                nbytes += sum(len(v) for k, v in sample.items() if k.endswith(".npy"))
                sink.write(sample)
            shapes = {m: list(x.shape[1:]) for m, x in z.items()}
            clips += keep
            bar.update(keep)
            if args.max_clips is not None and clips >= args.max_clips:
                break
        shards = sink.shard
    bar.close()
    seconds = time.perf_counter() - t0
    if clips:  # now with the latents' dtype under the run's precision (the stream restores it)
        write_atomic(args.out / MANIFEST, json.dumps(manifest, indent=1, default=_json_default).encode())

    stats = {"rank": args.rank, "world_size": args.world_size, "clips": clips, "skipped": skipped, "shards": shards,
             "bytes": nbytes, "seconds": round(seconds, 3), "encode_seconds": round(encode_s, 3),
             "clips_per_s": round(clips / seconds, 3) if seconds else None,
             "encode_clips_per_s": round(clips / encode_s, 3) if encode_s else None, "device": str(device),
             "latent_shapes": shapes}
    write_atomic(args.out / f"rank-{args.rank:03d}.json", json.dumps(stats, indent=1).encode())
    rate = f"{clips / seconds:.2f} clips/s end to end, {clips / max(encode_s, 1e-9):.2f} clips/s in the encoders"
    print(f"{PROG}: rank {args.rank}/{args.world_size}: {clips} clips ({skipped} skipped) in {shards} shard(s), "
          f"{nbytes / 1e6:.1f} MB of tensors, in {seconds:.1f} s on {device} ({rate})")
    print(f"{PROG}: latents per clip: " + ", ".join(f"{m} {s}" for m, s in shapes.items())
          + ("; text embeddings cached (frozen text encoder), with the empty caption's" if text
             else "; text: captions only (" + ("--no-text" if args.no_text else "the run trains its text encoder")
             + ")"))
    print(f"{PROG}: key " + " ".join(f"{k}={v}" for k, v in hashes.items() if k != "format"))
    if clips == 0:
        print(f"{PROG}: warning: rank {args.rank} wrote no clips (fewer clips than ranks x workers?)", file=sys.stderr)
    train = " ".join(args.overrides + ["data=latents", f"data.train.urls='{args.out}/latents-*.tar'"])
    print(f"{PROG}: train from it: sora-train {train}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
