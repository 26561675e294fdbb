"""Two CPU ranks (DDP, gloo) stream world-clip shards; each rank records the sample keys it saw.

    python tests/distributed/ddp_resume.py SHARDS OUT MAX_STEPS [CKPT]

Three shards over two ranks: one rank reads two shards, the other one, so their epochs have
different lengths and their stream positions differ. Lightning starts rank 1 by re-running this
script. Without CKPT a checkpoint is saved every 3 steps; with CKPT the run resumes from it.
Each rank writes OUT/rank{r}.json.
"""

import json
import sys
from pathlib import Path

import lightning as L
from lightning.pytorch.callbacks import ModelCheckpoint

from sora.data.datamodule import AVDataModule
from sora.data.streams import ShardClipStream
from sora.timeline import Timeline

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))
from helpers import KeyRecorder  # noqa: E402


def main(shards: str, out: str, max_steps: int, ckpt: str | None = None) -> None:
    out = Path(out)
    tl = Timeline(seconds=1.0, fps=24, sample_rate=16000)
    stream = ShardClipStream(shards, tl, batch_size=2, size=(32, 32), seed=3, shuffle_buffer=3)
    dm = AVDataModule(train=stream, num_workers=1)
    model = KeyRecorder()
    trainer = L.Trainer(max_steps=max_steps, accelerator="cpu", devices=2, strategy="ddp", logger=False,
                        callbacks=[ModelCheckpoint(dirpath=out / "ckpt", every_n_train_steps=3, save_top_k=-1)],
                        enable_progress_bar=False, enable_model_summary=False, default_root_dir=out)
    trainer.fit(model, datamodule=dm, ckpt_path=ckpt)
    (out / f"rank{trainer.global_rank}.json").write_text(json.dumps(model.seen))


if __name__ == "__main__":
    main(sys.argv[1], sys.argv[2], int(sys.argv[3]), sys.argv[4] if len(sys.argv) > 4 else None)
