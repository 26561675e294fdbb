"""Training callbacks: EMA weights, RNG state, throughput, samples, the run's config in each checkpoint, the progress
bar."""

from __future__ import annotations

import logging
import random
import time
from collections import deque

import lightning as L
import numpy as np
import torch
from lightning.pytorch.callbacks import Callback, ModelCheckpoint, RichProgressBar


def logger_writes(trainer, step: int | None = None) -> bool:
    """Whether the logger writes after optimizer step ``step`` (default: the one just taken, ``trainer.global_step``),
    every ``trainer.log_every_n_steps``: where Lightning reads the logged values anyway, and where the callbacks
    that avoid a per-step host sync read or reduce theirs."""
    step = getattr(trainer, "global_step", 0) if step is None else step
    return step % max(1, getattr(trainer, "log_every_n_steps", 1) or 1) == 0


class EMA(Callback):
    """An exponential moving average of the trainable weights, used for validation.

    After every ``every_n_steps``-th optimizer step (once per step under gradient accumulation):
    ``ema <- d * ema + (1 - d) * weight`` with ``d = decay``, or with ``warmup`` ``d = min(decay, (1 + n) / (10 + n))`` after ``n`` updates
    (the average forgets its random start quickly). The average lives on the weights' device,
    is saved in checkpoints (``checkpoint["callbacks"]["EMA"]``: ``decay``, ``num_updates`` and
    ``shadow``, a dict keyed by the LightningModule's parameter names) and restored on resume.
    During validation the EMA weights are swapped into the model and swapped back afterwards.

    Sharded weights (DeepSpeed ZeRO-3, FSDP2): each rank averages the part of each weight it holds
    (``sora.training.strategies.local_shard``), so the average is sharded like the weights and
    costs no communication per step. Checkpoints hold the full weights' average (gathered from
    every rank when saving), the same at any world size and under any strategy, and each rank
    takes its own part back on resume.
    """

    def __init__(self, decay: float = 0.999, every_n_steps: int = 1, warmup: bool = True,
                 validate_with_ema: bool = True):
        if not 0.0 <= decay < 1.0:
            raise ValueError(f"EMA decay={decay}: must be in [0, 1)")
        self.decay, self.every_n_steps, self.warmup = float(decay), int(every_n_steps), bool(warmup)
        self.validate_with_ema = validate_with_ema
        self.shadow: dict[str, torch.Tensor] | None = None  # per parameter: the average of its local part
        self.num_updates = 0
        self._params: dict[str, torch.nn.Parameter] = {}
        self._loaded: dict | None = None
        self._swapped = False
        self._last_step: int | None = None

    @staticmethod
    def trainable(pl_module: torch.nn.Module) -> dict[str, torch.nn.Parameter]:
        return {n: p for n, p in pl_module.named_parameters() if p.requires_grad}

    def current_decay(self) -> float:
        if not self.warmup:
            return self.decay
        n = self.num_updates
        return min(self.decay, (1.0 + n) / (10.0 + n))

    # -- lifecycle ------------------------------------------------------------------------
    def setup_shadow(self, pl_module: torch.nn.Module) -> None:
        from sora.training.strategies import local_shard, shard_like

        params = self.trainable(pl_module)
        self._params = params
        if self._loaded is not None:
            saved = self._loaded["shadow"]
            missing, extra = sorted(set(params) - set(saved)), sorted(set(saved) - set(params))
            if missing or extra:
                raise RuntimeError(f"EMA: checkpoint weights do not match the model (missing {missing[:3]}, "
                                   f"unexpected {extra[:3]})")
            self.shadow = {}
            for n, p in params.items():
                local = local_shard(p)
                self.shadow[n] = shard_like(saved[n].to(device=local.device, dtype=local.dtype), p)
            self._loaded = None
        else:
            self.shadow = {n: local_shard(p).detach().clone() for n, p in params.items()}

    def on_fit_start(self, trainer: L.Trainer, pl_module: L.LightningModule) -> None:
        self.setup_shadow(pl_module)

    def on_train_start(self, trainer: L.Trainer, pl_module: L.LightningModule) -> None:
        if self._loaded is not None:  # DeepSpeed / FSDP2 restore checkpoints after on_fit_start
            self.setup_shadow(pl_module)

    @torch.no_grad()
    def update(self, pl_module: torch.nn.Module) -> None:
        from sora.training.strategies import local_shard

        params = self._params or self.trainable(pl_module)  # found once at setup (a walk per step cost ~2 ms)
        d = self.current_decay()
        shadow = [self.shadow[n] for n in params]
        torch._foreach_lerp_(shadow, [local_shard(p) for p in params.values()], 1.0 - d)
        self.num_updates += 1

    def on_train_batch_end(self, trainer, pl_module, outputs, batch, batch_idx) -> None:
        step = trainer.global_step  # optimizer steps: unchanged between accumulated micro-batches
        if self.shadow is None or step == self._last_step or step % self.every_n_steps:
            return
        self._last_step = step
        self.update(pl_module)

    # -- swapping for validation ------------------------------------------------------------
    @torch.no_grad()
    def swap(self, pl_module: torch.nn.Module) -> None:
        """Exchange the model's trainable weights with the EMA copy (call twice to undo)."""
        from sora.training.strategies import gather_full, is_available, local_shard

        for n, p in self.trainable(pl_module).items():
            local = local_shard(p)
            tmp = local.clone()
            local.copy_(self.shadow[n])
            self.shadow[n].copy_(tmp)
            if is_available(p):  # ZeRO-3 keeps small weights gathered too: refresh that copy
                p.data.copy_(gather_full(local, p))
        self._swapped = not self._swapped

    def on_validation_start(self, trainer, pl_module) -> None:
        if self._loaded is not None and self.shadow is not None:
            self.setup_shadow(pl_module)
        if self.validate_with_ema and self.shadow is not None and not self._swapped:
            self.swap(pl_module)

    def on_validation_end(self, trainer, pl_module) -> None:
        if self._swapped:
            self.swap(pl_module)

    # -- checkpoint ---------------------------------------------------------------------------
    def state_dict(self) -> dict:
        """The full weights' average (a collective under ZeRO-3 / FSDP2: every rank saves)."""
        from sora.training.strategies import gather_full

        if self.shadow is None:
            return {}
        if self._swapped:  # saved mid-validation: the shadow holds the live weights right now
            raise RuntimeError("EMA: checkpoint requested while the EMA weights are swapped in")
        shadow = {n: gather_full(s, self._params[n]) if n in self._params else s for n, s in self.shadow.items()}
        return {"decay": self.decay, "num_updates": self.num_updates, "shadow": shadow}

    def load_state_dict(self, state: dict) -> None:
        if not state:
            return
        self.num_updates = int(state["num_updates"])
        self._loaded = state


log = logging.getLogger(__name__)


def _dist() -> tuple[int, int]:
    d = torch.distributed
    return (d.get_rank(), d.get_world_size()) if d.is_available() and d.is_initialized() else (0, 1)


class RNGState(Callback):
    """Saves every rank's global RNGs (torch CPU and CUDA, numpy, python) in checkpoints and puts
    them back before the first training batch of a resumed run, so that it draws the same tasks,
    timesteps and noise as an uninterrupted run would have (the data stream resumes on its own).

    Restoring at the first batch rather than at load time skips the draws Lightning and the
    DataLoader make while starting up (e.g. the loader's base seed).

    ``seed``: a fresh run seeds them at its first batch from (``seed``, data-parallel rank), so
    every data-parallel rank draws its own noise and timesteps, the ranks of a sequence-parallel
    group the same ones, and none depends on what a strategy drew while starting up.

    Validation does not move training's random stream: the states at the end of the last training
    batch are put back when a validation run ends. Otherwise the draws of validation (its loader's
    seed, sampling in callbacks) would sit between a checkpoint and the next step of an uninterrupted
    run but not of a run resumed from that checkpoint.
    """

    def __init__(self, seed: int | None = None):
        self._pending: dict | None = None
        self._before_validation: dict | None = None
        self.seed, self._started = seed, False

    @staticmethod
    def capture() -> dict:
        cuda = torch.cuda.get_rng_state_all() if torch.cuda.is_available() else []
        name, keys, pos, has_gauss, cached = np.random.get_state()  # plain types: weights_only loads work
        numpy = (name, torch.from_numpy(keys.astype(np.int64)), int(pos), int(has_gauss), float(cached))
        return {"torch": torch.get_rng_state(), "cuda": cuda, "numpy": numpy, "python": random.getstate()}

    @staticmethod
    def restore(state: dict) -> None:
        torch.set_rng_state(state["torch"])
        if state["cuda"] and torch.cuda.is_available() and len(state["cuda"]) == torch.cuda.device_count():
            torch.cuda.set_rng_state_all(state["cuda"])
        name, keys, pos, has_gauss, cached = state["numpy"]
        np.random.set_state((name, keys.numpy().astype(np.uint32), pos, has_gauss, cached))
        random.setstate(state["python"])

    def state_dict(self) -> dict:
        rank, world = _dist()
        states = [self.capture()]
        if world > 1:  # Lightning writes rank 0's copy: it carries every rank's state
            states = [None] * world
            torch.distributed.all_gather_object(states, self.capture())
        return {"world_size": world, "ranks": states}

    def load_state_dict(self, state: dict) -> None:
        rank, world = _dist()
        if state.get("world_size") != world:
            log.warning("RNGState: the checkpoint has RNG states for %s ranks, this run has %d: not restored",
                        state.get("world_size"), world)
            return
        self._pending = state["ranks"][rank]

    def on_train_batch_start(self, trainer, pl_module, batch, batch_idx) -> None:
        if self._pending is not None:
            self.restore(self._pending)
            self._pending = None
        elif self.seed is not None and not self._started:
            dp_rank = trainer.global_rank // max(1, getattr(pl_module, "sequence_parallel", 1))
            seed = (int(self.seed) * 1_000_003 + dp_rank) % 2**32
            torch.manual_seed(seed)
            np.random.seed(seed)
            random.seed(seed)
        self._started = True

    def on_train_batch_end(self, trainer, pl_module, outputs, batch, batch_idx) -> None:
        self._before_validation = self.capture()  # what a checkpoint saved now holds: validation may follow

    def on_validation_end(self, trainer, pl_module) -> None:
        if self._before_validation is not None and not trainer.sanity_checking:
            self.restore(self._before_validation)


class Throughput(Callback):
    """Logs ``perf/samples_per_s``, ``perf/step_s`` and ``perf/tokens_per_s`` (mean over the last ``window`` steps),
    timed from batch start to batch end with no device synchronisation of its own (Lightning's
    ``ThroughputMonitor`` adds a ``torch.cuda.synchronize()`` to every step, which this one avoids).

    Tokens per batch come from ``pl_module.batch_tokens(batch)`` when the module defines it (latent positions for
    the autoencoders, video + audio tokens for the DiT). When the module also has ``flops_per_token()``,
    ``perf/mfu`` against ``peak_flops``: FLOP/s of one device, or ``auto`` (Lightning's ``get_available_flops``
    for the device and precision: known GPUs and TPUs; none on a CPU), or null (no MFU).
    """

    def __init__(self, window: int = 20, peak_flops: float | str | None = "auto"):
        if isinstance(peak_flops, str) and peak_flops != "auto":
            raise ValueError(f"Throughput: peak_flops={peak_flops!r}: give FLOP/s of one device, auto or null")
        self.window, self.peak_flops = int(window), peak_flops
        self._times: deque = deque(maxlen=self.window)
        self._t0 = None

    def setup(self, trainer, pl_module, stage: str) -> None:
        if self.peak_flops == "auto":
            from lightning.fabric.utilities.throughput import get_available_flops
            from lightning.pytorch.callbacks.throughput_monitor import _plugin_to_compute_dtype

            dtype = _plugin_to_compute_dtype(trainer.precision_plugin)
            self.peak_flops = get_available_flops(trainer.strategy.root_device, dtype)

    def on_train_batch_start(self, trainer, pl_module, batch, batch_idx) -> None:
        self._t0 = time.perf_counter()

    def on_train_batch_end(self, trainer, pl_module, outputs, batch, batch_idx) -> None:
        if self._t0 is None:
            return
        dt = time.perf_counter() - self._t0
        tokens = pl_module.batch_tokens(batch) if hasattr(pl_module, "batch_tokens") else 0
        self._times.append((dt, len(batch), tokens))
        if not logger_writes(trainer):  # logged only when the logger writes
            return
        seconds = sum(t for t, _, _ in self._times)
        samples = sum(n for _, n, _ in self._times) / seconds
        logs = {"perf/samples_per_s": samples, "perf/step_s": seconds / len(self._times)}
        if tokens:
            tps = sum(k for _, _, k in self._times) / seconds
            logs["perf/tokens_per_s"] = tps
            if self.peak_flops and hasattr(pl_module, "flops_per_token"):
                logs["perf/mfu"] = pl_module.flops_per_token() * tps / self.peak_flops
        pl_module.log_dict(logs, on_step=True, on_epoch=False, batch_size=len(batch))


class Samples(Callback):
    """Writes ``<dirpath>/step=<N>-<i>.mp4`` (video with sound) for each prompt at the end of a
    validation run (with the EMA weights when the EMA callback swaps them in), every
    ``every_n_steps`` optimizer steps, on rank 0 (every rank samples when the weights are sharded:
    ZeRO-3, FSDP2); also to Weights & Biases when that logger is on.
    Only for modules that generate (``velocity``: the DiT stage); others are left alone.
    """

    def __init__(self, prompts: list[str], dirpath: str, every_n_steps: int = 1, steps: int = 20,
                 guidance: float = 4.0, sampler: str = "euler", shift: float = 1.0, seed: int = 0,
                 size: list[int] | None = None):
        self.prompts, self.dirpath, self.every_n_steps = list(prompts), dirpath, int(every_n_steps)
        self.steps, self.guidance, self.sampler, self.shift = steps, guidance, sampler, shift
        self.seed, self.size = seed, size

    def on_validation_epoch_end(self, trainer, pl_module) -> None:
        from sora.training.strategies import shards_parameters

        step = trainer.global_step
        if trainer.sanity_checking or not hasattr(pl_module, "velocity") or step % self.every_n_steps:
            return
        write = trainer.is_global_zero
        if not write and not shards_parameters(trainer):  # sharded weights: every rank joins the forwards
            return
        from pathlib import Path

        from sora.inference import AVPipeline

        size = self.size or getattr(self, "_size", None)
        if size is None:
            raise ValueError("Samples: give size=[H, W] (the frame size to generate)")
        pipe = AVPipeline(pl_module, pl_module.timeline, size)
        out = Path(self.dirpath)
        out.mkdir(parents=True, exist_ok=True)
        was_training = pl_module.training
        pl_module.eval()
        paths = []
        for i, prompt in enumerate(self.prompts):
            clip = pipe.generate(prompt, steps=self.steps, guidance=self.guidance, sampler=self.sampler,
                                 shift=self.shift, seed=self.seed + i)
            paths.append(out / f"step={step}-{i}.mp4")
            if write:
                clip.write(paths[-1])
        pl_module.train(was_training)
        if not write:
            return
        for logger in trainer.loggers:
            if type(logger).__name__ == "WandbLogger":
                import wandb

                videos = [wandb.Video(str(p), caption=c) for p, c in zip(paths, self.prompts)]
                logger.experiment.log({"samples": videos, "trainer/global_step": step})

    def on_train_batch_start(self, trainer, pl_module, batch, batch_idx) -> None:
        if self.size is None and hasattr(batch, "video"):
            self._size = list(batch.video.shape[-2:])  # the training frame size


class Checkpoint(ModelCheckpoint):
    """Lightning's ``ModelCheckpoint`` whose ``last.ckpt`` always ends at the run's last step.

    Lightning 2.6 writes ``last.ckpt`` when training ends only if it saved nothing before: a run whose
    ``max_steps`` is not a multiple of ``every_n_train_steps`` ended with ``last.ckpt`` at the last
    periodic step, and ``ckpt_path=last`` (or a later stage reading it) silently lost the steps after it.
    """

    def on_train_end(self, trainer, pl_module) -> None:
        if self.save_last and self._last_global_step_saved != trainer.global_step:
            self._save_last_checkpoint(trainer, self._monitor_candidates(trainer))
        super().on_train_end(trainer, pl_module)


class ConfigInCheckpoint(Callback):
    """Stores the run's resolved config (a plain dict) in every checkpoint as ``checkpoint["sora_config"]``,
    so a checkpoint alone is enough to rebuild its model (``sora-sample``)."""

    def __init__(self, config: dict):
        self.config = config

    def on_save_checkpoint(self, trainer, pl_module, checkpoint: dict) -> None:
        checkpoint["sora_config"] = self.config


class ProgressBar(RichProgressBar):
    """Lightning's rich progress bar, showing ``keys`` (``train/loss``) as of the logger's last step.

    Lightning turns every metric logged with ``prog_bar=True`` into a Python number at every training step, a
    host sync per step on a GPU; so the modules log their training loss without it, and this bar reads
    ``keys`` only at the steps where the logger writes (which read every logged value anyway).
    """

    def __init__(self, keys: tuple[str, ...] = ("train/loss",), **kwargs):
        super().__init__(**kwargs)
        self.keys, self._shown, self._read_at = tuple(keys), {}, None

    def get_metrics(self, trainer, pl_module) -> dict:
        items = super().get_metrics(trainer, pl_module)
        step = trainer.global_step
        if trainer.training and step != self._read_at and logger_writes(trainer):
            metrics = trainer.callback_metrics
            self._shown = {k: float(metrics[k]) for k in self.keys if k in metrics}
            self._read_at = step
        return {**items, **self._shown}
