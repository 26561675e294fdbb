"""Reliability callbacks: a clean stop on preemption signals, and a guard against non-finite steps.

:class:`Preemption` (``callbacks.preemption``): SIGTERM or SIGUSR1 only sets a flag; at the next
training batch end (after the optimizer step, a consistent state) all ranks agree, the run writes
``checkpoints/last.ckpt`` (through the ModelCheckpoint callback, so ``ckpt_path=last`` resumes exactly),
logs one line and stops; ``sora-train`` exits with code 0. On SLURM the requeue signal (SIGUSR1,
``#SBATCH --signal=USR1@120``) also runs ``scontrol requeue <job>`` on rank 0, after the save.

It replaces Lightning's own handlers for these signals while training (Lightning restores the
earlier ones when ``fit`` ends): on SIGTERM Lightning would raise ``SIGTERMException`` at the batch
end without saving (and abort a running validation), and under SLURM its SIGUSR1 handler saves an
``hpc_ckpt_N.ckpt`` from inside the handler, in the middle of a step, before requeueing.

:class:`NonFiniteGuard` (``callbacks.nonfinite``): after the backward, before gradient clipping and
the optimizer step, it checks the loss and every gradient (the local shards under FSDP2); all ranks
agree. A non-finite step is skipped exactly: every gradient is set to None, so AdamW leaves weights,
moments and step counts untouched. Lightning still counts the step: ``global_step``, the LR schedule
and the data stream move on by one, and the EMA averages in the unchanged weights. Skipped steps are
logged (``train/nonfinite_steps``, cumulative); after ``max_consecutive`` in a row the run saves
``checkpoints/nonfinite-step=N.ckpt`` (the last good weights) and stops with one error line naming
the step, the non-finite loss term (e.g. ``train/loss_audio``) and the first non-finite gradient.
With a GradScaler (``16-mixed``) gradient overflows are the scaler's to skip: only the loss is checked.
DeepSpeed keeps gradients inside its engine: the guard checks the loss and counts the steps the
engine itself skipped (its overflow check: bf16 ``check_grad_overflow``, and a non-finite gradient
norm in fp32), so it stops after ``max_consecutive`` with the same message, without a parameter name.

Both move themselves after the other callbacks (before the checkpoint ones): what they save holds the
other callbacks' updates of that batch, as a periodic checkpoint does.
"""

from __future__ import annotations

import logging
import math
import os
import signal
import subprocess
import threading
from pathlib import Path

import torch
from lightning.pytorch.callbacks import Callback, ModelCheckpoint

log = logging.getLogger(__name__)


def checkpoint_dir(trainer) -> Path:
    """The ModelCheckpoint callback's folder, else ``<default_root_dir>/checkpoints`` (what ``ckpt_path=last`` reads)."""
    dirpath = getattr(trainer.checkpoint_callback, "dirpath", None)
    return Path(dirpath) if dirpath else Path(trainer.default_root_dir) / "checkpoints"


def run_last(trainer, callback) -> None:
    """Move ``callback`` after every other callback but the checkpoint ones (which Lightning keeps last), so a
    checkpoint it writes at a batch end holds the other callbacks' updates for that batch (EMA, counters), as
    a periodic one would. A new list: a hook loop under way keeps iterating the old one."""
    from lightning.pytorch.callbacks import Checkpoint

    others = [c for c in trainer.callbacks if c is not callback]
    cut = next((i for i, c in enumerate(others) if isinstance(c, Checkpoint)), len(others))
    trainer.callbacks = others[:cut] + [callback] + others[cut:]


def _slurm_requeue_signal(trainer) -> int | None:
    from lightning.fabric.plugins.environments import SLURMEnvironment

    env = getattr(trainer._accelerator_connector, "cluster_environment", None)
    return env.requeue_signal if isinstance(env, SLURMEnvironment) and env.auto_requeue else None


class Preemption(Callback):
    """On any of ``signals``: a checkpoint at the next batch end, then a clean stop (see the module doc).
    ``requeue``: on SLURM, requeue the job after the save when the signal was SLURM's requeue signal."""

    def __init__(self, signals=("SIGTERM", "SIGUSR1"), requeue: bool = True):
        self.signals = [signal.Signals[s if str(s).startswith("SIG") else f"SIG{s}"] if isinstance(s, str)
                        else signal.Signals(s) for s in signals]
        self.requeue = bool(requeue)
        self.received: list[int] = []
        self.saved: str | None = None

    def handler(self, signum, frame) -> None:
        self.received.append(signum)  # nothing else here: mid-step is no state to save

    def setup(self, trainer, pl_module, stage) -> None:
        run_last(trainer, self)

    def on_train_start(self, trainer, pl_module) -> None:
        self.received, self.saved = [], None
        if threading.current_thread() is not threading.main_thread():
            log.warning("Preemption: not in the main thread, no signal handlers installed")
            return
        for s in self.signals:  # after Lightning's own (registered when fit starts), which it restores at the end
            signal.signal(s, self.handler)

    def on_train_batch_end(self, trainer, pl_module, outputs, batch, batch_idx) -> None:
        epoch_loop = trainer.fit_loop.epoch_loop
        if self.saved or (hasattr(epoch_loop, "_should_accumulate") and epoch_loop._should_accumulate()):
            return  # only where an optimizer step just ended: no half-accumulated gradients to lose
        connector = getattr(trainer, "_signal_connector", None)
        early = bool(getattr(connector, "received_sigterm", False))  # a SIGTERM before our handlers were in place
        if not trainer.strategy.reduce_boolean_decision(bool(self.received) or early, all=False):
            return
        if early:
            connector.received_sigterm = False  # we stop cleanly; Lightning would raise SIGTERMException
        requeue_signal = _slurm_requeue_signal(trainer) if self.requeue else None
        requeue = requeue_signal is not None and trainer.strategy.reduce_boolean_decision(
            requeue_signal in self.received, all=False)
        self.saved = self.save(trainer)
        names = ", ".join(dict.fromkeys(signal.Signals(s).name for s in self.received)) or (
            "SIGTERM" if early else "a signal to another rank")
        if trainer.is_global_zero:
            log.warning("sora-train: %s at step %d: saved %s; stopping%s", names, trainer.global_step, self.saved,
                        " and requeueing the SLURM job" if requeue else " (resume with ckpt_path=last)")
            if requeue:
                self.requeue_job()
        trainer.should_stop = True
        if hasattr(epoch_loop, "_skip_next_val"):  # no validation run on the way out (should_stop would start one)
            epoch_loop._skip_next_val = True

    @staticmethod
    def save(trainer) -> str:
        """``last.ckpt`` through the ModelCheckpoint callback (its bookkeeping stays right: it does not save the
        same step again, and a periodic checkpoint due at this step is written too), else directly."""
        mc = trainer.checkpoint_callback
        if isinstance(mc, ModelCheckpoint) and mc.save_last and hasattr(mc, "_save_last_checkpoint"):
            candidates = mc._monitor_candidates(trainer)
            every, step = mc._every_n_train_steps, trainer.global_step
            if (every >= 1 and step % every == 0 or mc.save_last == "link") and mc._last_global_step_saved != step:
                mc._save_topk_checkpoint(trainer, candidates)  # due now (or what a linked last.ckpt points to)
            mc._save_last_checkpoint(trainer, candidates)
            return mc.last_model_path
        path = str(checkpoint_dir(trainer) / "last.ckpt")
        trainer.save_checkpoint(path)
        return path

    @staticmethod
    def requeue_job() -> None:
        array = os.environ.get("SLURM_ARRAY_JOB_ID")
        job = f"{array}_{os.environ['SLURM_ARRAY_TASK_ID']}" if array else os.environ["SLURM_JOB_ID"]
        try:
            code = subprocess.call(["scontrol", "requeue", job])
        except FileNotFoundError:
            code = "no scontrol"
        if code != 0:
            log.error("Preemption: requeueing SLURM job %s failed (%s)", job, code)


class NonFiniteStop(SystemExit):
    """``max_consecutive`` non-finite steps in a row: the run stops (exit code 1) with this message."""


class NonFiniteGuard(Callback):
    """Skips non-finite steps, stops after ``max_consecutive`` in a row (0: never); see the module doc."""

    def __init__(self, max_consecutive: int = 3):
        self.max_consecutive = int(max_consecutive or 0)
        self.skipped, self.in_a_row = 0, 0
        self._loss_bad: torch.Tensor | None = None
        self._step: tuple[bool, str] | None = None  # (bad, what) of the optimizer step of this batch
        self._ds_skipped: int | None = None

    @staticmethod
    def _deepspeed(trainer) -> bool:
        from lightning.pytorch.strategies import DeepSpeedStrategy

        return isinstance(trainer.strategy, DeepSpeedStrategy)

    def setup(self, trainer, pl_module, stage) -> None:
        run_last(trainer, self)

    def on_before_backward(self, trainer, pl_module, loss) -> None:
        bad = ~torch.isfinite(loss.detach()).all()  # on the device: no sync per micro-batch
        self._loss_bad = bad if self._loss_bad is None else self._loss_bad | bad

    def on_train_start(self, trainer, pl_module) -> None:
        self._ds_skipped = getattr(trainer.model, "skipped_steps", None) if self._deepspeed(trainer) else None

    def on_before_optimizer_step(self, trainer, pl_module, optimizer) -> None:
        params = [p for group in optimizer.param_groups for p in group["params"]]
        grads = [g.to_local() if hasattr(g, "to_local") else g for g in (p.grad for p in params) if g is not None]
        flags = [] if self._loss_bad is None else [self._loss_bad.reshape(1)]
        if grads and getattr(trainer.precision_plugin, "scaler", None) is None:
            norms = torch._foreach_norm(grads, 2, dtype=torch.float32)  # NaN/Inf when a gradient holds one
            flags.append((~torch.isfinite(torch.stack([n.to(norms[0].device) for n in norms]))).any().reshape(1))
        self._loss_bad = None
        device = trainer.strategy.root_device
        local = torch.cat([f.to(device) for f in flags]).any() if flags else torch.zeros((), dtype=torch.bool,
                                                                                          device=device)
        bad = bool(trainer.strategy.reduce(local.float(), reduce_op="sum") > 0)
        self._step = (bad, self.describe(trainer, pl_module) if bad else "")
        if bad and not self._deepspeed(trainer):
            for p in params:  # torch optimizers skip parameters without a gradient: weights and state untouched
                p.grad = None

    @staticmethod
    def describe(trainer, pl_module) -> str:
        """Which logged loss terms (``train/*``) and which parameter's gradient are non-finite: the first
        rank's view that names a loss term (under DDP only the rank with a bad batch sees its loss terms)."""
        terms = [k for k, v in trainer.callback_metrics.items() if k.startswith("train/")
                 and getattr(v, "numel", lambda: 0)() == 1 and not math.isfinite(float(v))]
        specific = [k for k in terms if k != "train/loss"]
        what = f"non-finite {', '.join(sorted(specific or terms))}" if terms else "non-finite gradients"
        for name, p in pl_module.named_parameters():
            g = p.grad.to_local() if hasattr(p.grad, "to_local") else p.grad
            if g is not None and not bool(torch.isfinite(g).all()):
                what = f"{what}; first non-finite gradient: {name}"
                break
        dist = torch.distributed
        if trainer.world_size > 1 and dist.is_available() and dist.is_initialized():  # a bad step: every rank is here
            views = [None] * dist.get_world_size()
            dist.all_gather_object(views, what)
            what = next((v for v in views if v.startswith("non-finite train/")), views[0])
        return what

    def on_train_batch_end(self, trainer, pl_module, outputs, batch, batch_idx) -> None:
        if self._step is None:  # accumulating: no optimizer step in this batch
            return
        (bad, what), self._step = self._step, None
        step = trainer.global_step - 1  # the step just taken (as the loggers number it)
        engine = trainer.model
        skipped = getattr(engine, "skipped_steps", None) if self._deepspeed(trainer) else None
        if skipped is not None and self._ds_skipped is not None and not engine.fp16_enabled():  # not fp16 scaling
            if skipped > self._ds_skipped and not bad:  # the engine's own overflow check skipped the update
                bad, what = True, "non-finite gradients"
            elif bad and skipped == self._ds_skipped:
                what += " (DeepSpeed did not skip the update: the weights may be non-finite)"
            self._ds_skipped = skipped
        if bad:
            self.skipped += 1
            self.in_a_row += 1
            if trainer.is_global_zero:
                log.warning("sora-train: step %d: %s; step skipped (%d in a row, %d in all)", step, what,
                            self.in_a_row, self.skipped)
        else:
            self.in_a_row = 0
        pl_module.log("train/nonfinite_steps", float(self.skipped), on_step=True, on_epoch=False, batch_size=1)
        if bad and self.max_consecutive and self.in_a_row >= self.max_consecutive:
            path = checkpoint_dir(trainer) / f"nonfinite-step={trainer.global_step}.ckpt"
            trainer.save_checkpoint(path)
            message = (f"sora-train: error in training: step {step}: {what} ({self.in_a_row} steps in a row, "
                       f"{self.skipped} skipped in all); the last good weights are in {path}; lower model.lr, train in "
                       f"trainer.precision=bf16-mixed rather than 16-mixed, or clip gradients "
                       f"(trainer.gradient_clip_val), then resume with ckpt_path={path}")
            raise NonFiniteStop(message if trainer.is_global_zero else 1)  # one line on stderr, from rank 0

    def state_dict(self) -> dict:
        return {"skipped": self.skipped, "in_a_row": self.in_a_row}

    def load_state_dict(self, state: dict) -> None:
        self.skipped = int(state.get("skipped", 0))
        in_a_row = int(state.get("in_a_row", 0))  # resumed from the guard's own stop: count afresh
        self.in_a_row = 0 if self.max_consecutive and in_a_row >= self.max_consecutive else in_a_row
