"""Small pieces shared by tests and the scripts they run in subprocesses."""

import tarfile
from pathlib import Path

import lightning as L
import torch


def read_shards(out: Path) -> dict[str, dict]:
    """key -> {ext: bytes} for every member of every ``shard-*.tar`` in ``out``, in order."""
    samples = {}
    for shard in sorted(Path(out).glob("shard-*.tar")):
        with tarfile.open(shard) as tar:
            for m in tar.getmembers():
                key, ext = m.name.split(".", 1)
                samples.setdefault(key, {})[ext] = tar.extractfile(m).read()
    return samples


class KeyRecorder(L.LightningModule):
    """Records the sample keys of every training step; the loss touches the batch."""

    def __init__(self):
        super().__init__()
        self.w = torch.nn.Parameter(torch.zeros(1))
        self.seen = []

    def training_step(self, batch, batch_idx):
        assert batch.video.dtype == torch.float32  # normalized on the device by the datamodule
        self.seen.append(list(batch.keys))
        return (self.w * batch.video.mean()) ** 2 + self.w.sum() ** 2

    def configure_optimizers(self):
        return torch.optim.SGD(self.parameters(), lr=0.1)


class StepRecorder(L.Callback):
    """Appends one json line per training step to ``path``: the optimizer step it ended on, the sample
    keys and the loss (as a float's exact repr). For subprocess runs: ``+callbacks.record._target_=...``."""

    def __init__(self, path: str):
        self.path = path

    def on_train_batch_end(self, trainer, pl_module, outputs, batch, batch_idx):
        import json

        loss = outputs["loss"] if isinstance(outputs, dict) else outputs
        with open(self.path, "a") as f:
            f.write(json.dumps({"step": trainer.global_step, "keys": list(batch.keys), "loss": float(loss)}) + "\n")
