"""`sora-demo` / `make demo`: the quickstart.

Until the models land this runs the data half of the pipeline on the procedural world:
world clips -> webdataset shards -> the streaming pipeline -> decoded batches, and writes a
preview a person can check: ``preview.mp4`` (the batch's clips one after another, with their
sound) and ``preview.png`` (a contact sheet), plus the measured audio-video sync of the decoded
clips against the world's ground-truth impact times.
"""

from __future__ import annotations

import json
import logging
import time
from itertools import islice
from pathlib import Path

import hydra
import numpy as np
from hydra.utils import instantiate
from omegaconf import DictConfig
from tqdm import tqdm

from sora.data.pipeline import ClipBatch
from sora.evaluation.sync import match_errors, onset_times
from sora.media import write_av, write_image

log = logging.getLogger("sora.demo")


def to_uint8(video) -> np.ndarray:
    """[C,T,H,W] float in [-1,1] -> [T,H,W,3] uint8."""
    return ((video.permute(1, 2, 3, 0).numpy() + 1) * 127.5).round().clip(0, 255).astype(np.uint8)


def contact_sheet(batch: ClipBatch, columns: int = 8) -> np.ndarray:
    """One row per clip, ``columns`` frames evenly spaced in time."""
    rows = []
    for video in batch.video:
        frames = to_uint8(video)
        idx = np.linspace(0, len(frames) - 1, columns).round().astype(int)
        rows.append(np.concatenate(list(frames[idx]), axis=1))
    return np.concatenate(rows, axis=0)


def sync_errors(batch: ClipBatch) -> np.ndarray:
    """Decoded sound onsets against the world's ground-truth impacts (seconds, signed)."""
    errors = []
    for audio, mask, start, meta in zip(batch.audio.numpy(), batch.audio_mask.numpy(), batch.start.tolist(),
                                        batch.meta):
        world = meta.get("world", {})
        events = np.array([i["time"] - start for i in world.get("impacts", []) if i.get("audible", True)])
        onsets = onset_times(audio, batch.sample_rate, mask=mask)
        onsets = onsets[onsets > 0.02]  # an impact before the window may ring into it
        if events.size and onsets.size:
            errors.append(-match_errors(onsets, events, max_error=0.1))
    return np.concatenate(errors) if errors else np.zeros(0)


def make_world_shards(cfg: DictConfig, shards: Path) -> None:
    """World shards for the demo; reused while the settings that made them are unchanged."""
    from tools.make_shards import main as make_shards

    tl = cfg.timeline
    args = ["--world", str(cfg.world.clips), str(shards), "--world-size", str(cfg.world.size),
            "--world-seconds", str(cfg.world.seconds), "--world-fps", str(tl.fps),
            "--world-sample-rate", str(tl.sample_rate), "--seed", str(cfg.seed)]
    stamp = shards / "made_with.json"
    if stamp.exists() and json.loads(stamp.read_text()) == args and sorted(shards.glob("shard-*.tar")):
        log.info("reusing world shards in %s (made with the same settings)", shards)
        return
    code = make_shards([*args, "--overwrite"])
    if code != 0:
        raise SystemExit(f"demo: making world shards in {shards} failed (exit {code})")
    stamp.write_text(json.dumps(args))


CONFIGS = str(Path(__file__).resolve().parents[2] / "configs")  # absolute: works from any directory


@hydra.main(config_path=CONFIGS, config_name="demo", version_base="1.3")
def main(cfg: DictConfig) -> None:
    instantiate(cfg.timeline)  # a bad timing config fails here, before any work
    out = Path(cfg.out_dir)
    out.mkdir(parents=True, exist_ok=True)
    make_world_shards(cfg, out / "shards")

    datamodule = instantiate(cfg.data)
    loader = datamodule.train_dataloader()
    batches, t0 = [], time.perf_counter()
    for batch in tqdm(islice(loader, cfg.preview_batches), total=cfg.preview_batches, desc="decoding", unit="batch"):
        batches.append(batch.normalize())
    seconds = time.perf_counter() - t0
    first = batches[0]

    clips = [to_uint8(v) for b in batches for v in b.video]
    audio = np.concatenate([a.numpy() for b in batches for a in b.audio], axis=-1)
    write_av(out / "preview.mp4", np.concatenate(clips), audio, fps=first.fps, sample_rate=first.sample_rate)
    write_image(out / "preview.png", contact_sheet(first))

    errors = np.concatenate([sync_errors(b) for b in batches])
    summary = {
        "batches": len(batches), "clips": len(clips), "seconds": round(seconds, 3),
        "video": list(first.video.shape), "audio": list(first.audio.shape),
        "fps": first.fps, "sample_rate": first.sample_rate,
        "captions": [c for b in batches for c in b.captions],
        "has_audio": [bool(h) for b in batches for h in b.has_audio],
        "sync_impacts": int(errors.size),
        "sync_error_ms_median": round(float(np.median(np.abs(errors))) * 1000, 2) if errors.size else None,
        "sync_error_ms_max": round(float(np.abs(errors).max()) * 1000, 2) if errors.size else None,
    }
    (out / "preview.json").write_text(json.dumps(summary, indent=2))
    print(f"decoded {summary['clips']} clips in {summary['batches']} batches ({seconds:.2f} s): "
          f"video {summary['video']} audio {summary['audio']} at {first.fps:g} fps / {first.sample_rate} Hz, "
          f"{sum(summary['has_audio'])}/{summary['clips']} with sound")
    print(f"audio-video sync: {summary['sync_impacts']} sound onsets vs ground-truth impacts, |error| median "
          f"{summary['sync_error_ms_median']} ms, max {summary['sync_error_ms_max']} ms "
          f"(one frame = {1000 / first.fps:.1f} ms)")
    print("captions:", *summary["captions"][:4], sep="\n  ")
    print(f"wrote {out / 'preview.mp4'}, {out / 'preview.png'}, {out / 'preview.json'}")


if __name__ == "__main__":
    main()
