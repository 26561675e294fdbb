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
the optimizer step, it checks the loss and every gradient (the local shards under FSDP2) on the device;
all ranks agree (a sum over them). A non-finite step is skipped exactly: weights, moments and step counts
stay untouched. Lightning still counts the step: ``global_step``, the LR schedule and the data stream move
on by one, and the EMA averages in the unchanged weights. How it is skipped:

* a fused optimizer (torch's fused AdamW, :func:`sora.training.optim.adamw_with_schedule`'s default): the
  verdict goes to the optimizer as a device flag (``found_inf``, which its kernel reads as under a
  GradScaler), with no host sync; the counters, the last bad step and its evidence (which ``train/*``
  terms, which parameter's gradient came first) stay on the device and are read at the logger's steps
  (``trainer.log_every_n_steps``) and when training ends;
* any other optimizer: the verdict is read on the host at every step and the gradients are set to None
  (torch optimizers skip parameters without one).

Skipped steps are logged (``train/nonfinite_steps``, cumulative) and named in a warning; after
``max_consecutive`` in a row the run saves ``checkpoints/nonfinite-step=N.ckpt`` and stops with one
error line naming the step, the non-finite loss term (e.g. ``train/loss_audio``) and the first
non-finite gradient (on the device path at the next logging step: the weights are those of the last
good step, or of the good steps after the run of bad ones).
With a GradScaler (``16-mixed``) gradient overflows are the scaler's to skip: only the loss is checked.
DeepSpeed keeps gradients inside its engine: the guard checks the loss and counts the steps the
engine itself skipped (its overflow check: bf16 ``check_grad_overflow``, and a non-finite gradient
norm in fp32), so it stops after ``max_consecutive`` with the same message, without a parameter name.

Both move themselves after the other callbacks (before the checkpoint ones): what they save holds the
other callbacks' updates of that batch, as a periodic checkpoint does.
"""

from __future__ import annotations

import logging
import os
import signal
import subprocess
import threading
from pathlib import Path

import torch
from lightning.pytorch.callbacks import Callback, ModelCheckpoint

from sora.training.callbacks import logger_writes

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
        self.skipped, self.in_a_row = 0, 0     # as of the last check (the host's view)
        self._loss_bad: torch.Tensor | None = None
        self._bad: torch.Tensor | bool | None = None  # this optimizer step's verdict (a device flag, or read)
        self._host = True                       # the verdict is read on the host at every step
        self._ds_skipped: int | None = None
        self._names: dict[int, str] = {}
        self._grad_names: list[str] = []        # the parameters of the gradients checked, in their order
        self._terms: list[str] = []             # the loss terms checked (train/*), in their order
        self._dev: dict[str, torch.Tensor] | None = None  # counters and the last bad step's evidence, on the device
        self._checked_step = 0

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
        self._names = {id(p): n for n, p in pl_module.named_parameters()}  # the strategy's (sharded) parameters
        device = trainer.strategy.root_device
        f = dict(dtype=torch.float32, device=device)
        self._dev = {"skipped": torch.tensor(float(self.skipped), **f), "in_a_row": torch.tensor(float(self.in_a_row), **f),
                     "hit": torch.tensor(-1.0, **f), "last": torch.tensor(-1.0, **f), "param": torch.tensor(-1.0, **f),
                     "terms": torch.zeros(0, dtype=torch.bool, device=device)}
        self._checked_step = trainer.global_step

    @staticmethod
    def _device_skip(trainer, optimizer) -> bool:
        """The optimizer skips a step on its own device flag (torch's fused AdamW/Adam/SGD read ``found_inf``, as
        under a GradScaler): no host sync. Not with a GradScaler (it sets the flag itself) nor DeepSpeed."""
        opt = getattr(optimizer, "optimizer", optimizer)  # Lightning's wrapper
        return bool(getattr(opt, "defaults", {}).get("fused")) and getattr(opt, "_step_supports_amp_scaling", False) \
            and getattr(trainer.precision_plugin, "scaler", None) is None and not NonFiniteGuard._deepspeed(trainer)

    def on_before_optimizer_step(self, trainer, pl_module, optimizer) -> None:
        params = [p for group in optimizer.param_groups for p in group["params"]]
        with_grad = [p for p in params if p.grad is not None]
        grads = [g.to_local() if hasattr(g, "to_local") else g for g in (p.grad for p in with_grad)]
        device = trainer.strategy.root_device
        flags = [] if self._loss_bad is None else [self._loss_bad.reshape(1).to(device)]
        self._loss_bad = None
        nonfinite = None
        if grads and getattr(trainer.precision_plugin, "scaler", None) is None:
            norms = torch._foreach_norm(grads, 2, dtype=torch.float32)  # NaN/Inf when a gradient holds one
            nonfinite = ~torch.isfinite(torch.stack([n.to(device) for n in norms]))
            flags.append(nonfinite.any().reshape(1))
        local = torch.cat(flags).any() if flags else torch.zeros((), dtype=torch.bool, device=device)
        bad = trainer.strategy.reduce(local.float(), reduce_op="sum") > 0  # every rank skips together
        self._evidence(trainer, bad, with_grad, nonfinite)
        self._host = not self._device_skip(trainer, optimizer)
        if self._host:
            self._bad = bool(bad)  # a host sync: this optimizer cannot skip on a device flag
            if self._bad and not self._deepspeed(trainer):
                for p in params:  # torch optimizers skip parameters without a gradient: weights and state untouched
                    p.grad = None
        else:
            self._bad = bad
            getattr(optimizer, "optimizer", optimizer).found_inf = bad.float()  # the fused kernel skips every update

    def _evidence(self, trainer, bad, with_grad, nonfinite) -> None:
        """Keeps, on the device, which loss terms (``train/*``) and which parameter's gradient (first in order) were
        non-finite at the last bad step, for the message at the next check."""
        dev = self._dev
        if nonfinite is not None:
            names = [self._names.get(id(p), "?") for p in with_grad]
            if names != self._grad_names:
                self._grad_names, dev["param"] = names, torch.full_like(dev["param"], -1.0)
            first = torch.where(nonfinite.any(), torch.argmax(nonfinite.int()).float(), -1.0)
            dev["param"] = torch.where(bad, first, dev["param"])
        terms = {k: v for k, v in trainer.callback_metrics.items() if k.startswith("train/") and isinstance(
            v, torch.Tensor) and v.numel() == 1 and k != "train/nonfinite_steps"}
        if list(terms) != self._terms:
            self._terms, dev["terms"] = list(terms), torch.zeros(len(terms), dtype=torch.bool, device=dev["last"].device)
        if terms:
            now = ~torch.isfinite(torch.stack([v.detach().float().reshape(()).to(dev["last"].device)
                                               for v in terms.values()]))
            dev["terms"] = torch.where(bad, now, dev["terms"])

    def describe(self, trainer) -> str:
        """Which logged loss terms (``train/*``) and which parameter's gradient were non-finite at the last bad step:
        the first rank's view that names a loss term (under DDP only the rank with a bad batch sees its terms)."""
        dev = self._dev
        flags = dev["terms"].tolist()
        terms = [k for k, bad in zip(self._terms, flags) if bad]
        specific = [k for k in terms if k != "train/loss"]
        what = f"non-finite {', '.join(sorted(specific or terms))}" if terms else "non-finite gradients"
        param = int(dev["param"])
        if 0 <= param < len(self._grad_names):
            what = f"{what}; first non-finite gradient: {self._grad_names[param]}"
        dist = torch.distributed
        if trainer.world_size > 1 and dist.is_available() and dist.is_initialized():  # every rank checks here
            views = [None] * dist.get_world_size()
            dist.all_gather_object(views, what)
            what = next((v for v in views if v.startswith("non-finite train/")), views[0])
        return what

    def on_train_batch_end(self, trainer, pl_module, outputs, batch, batch_idx) -> None:
        if self._bad is None:  # accumulating: no optimizer step in this batch
            return
        bad, self._bad = self._bad, None
        step = trainer.global_step - 1  # the step just taken (as the loggers number it)
        dev, note = self._dev, ""
        engine = trainer.model
        skipped = getattr(engine, "skipped_steps", None) if self._deepspeed(trainer) else None
        if skipped is not None and self._ds_skipped is not None and not engine.fp16_enabled():  # not fp16 scaling
            if skipped > self._ds_skipped and not bad:  # the engine's own overflow check skipped the update
                bad = True
            elif bad and skipped == self._ds_skipped:
                note = " (DeepSpeed did not skip the update: the weights may be non-finite)"
            self._ds_skipped = skipped
        flag = torch.as_tensor(bad, dtype=torch.float32, device=dev["last"].device)
        dev["skipped"] = dev["skipped"] + flag
        dev["in_a_row"] = (dev["in_a_row"] + 1) * flag
        dev["last"] = torch.where(flag > 0, float(step), dev["last"])
        if self.max_consecutive:
            reached = (dev["in_a_row"] >= self.max_consecutive) & (dev["hit"] < 0)
            dev["hit"] = torch.where(reached, float(step), dev["hit"])
        pl_module.log("train/nonfinite_steps", dev["skipped"], on_step=True, on_epoch=False, batch_size=1)
        if self._host or logger_writes(trainer):  # the device path: read at the logger's steps only
            self.check(trainer, note)

    def on_train_end(self, trainer, pl_module) -> None:
        if self._dev is not None:  # steps skipped since the last logging step: reported before the run ends
            self.check(trainer)

    def check(self, trainer, note: str = "") -> None:
        """Reads the counters (a host sync): warns about the steps skipped since the last check, and stops the run
        when ``max_consecutive`` bad steps came in a row."""
        dev = self._dev
        skipped, in_a_row, hit, last = (int(v) for v in torch.stack(
            [dev["skipped"], dev["in_a_row"], dev["hit"], dev["last"]]).tolist())
        new, since = skipped - self.skipped, self._checked_step
        self.skipped, self.in_a_row, self._checked_step = skipped, in_a_row, trainer.global_step
        if not new and hit < 0:
            return
        what = self.describe(trainer) + note
        if new and trainer.is_global_zero:
            if new == 1 and last == trainer.global_step - 1:  # the step just taken (read at every step)
                log.warning("sora-train: step %d: %s; step skipped (%d in a row, %d in all)", last, what, in_a_row,
                            skipped)
            else:
                log.warning("sora-train: steps %d-%d: %d non-finite step%s skipped (%d in all); the last, step %d: %s",
                            since, trainer.global_step - 1, new, "s" if new > 1 else "", skipped, last, what)
        if hit >= 0:
            run = max(in_a_row, self.max_consecutive)
            path = checkpoint_dir(trainer) / f"nonfinite-step={trainer.global_step}.ckpt"
            trainer.save_checkpoint(path)
            message = (f"sora-train: error in training: step {hit}: {what} ({run} steps in a row, "
                       f"{skipped} skipped in all); the last good weights are in {path}; lower model.lr, train in "
                       f"trainer.precision=bf16-mixed rather than 16-mixed, or clip gradients "
                       f"(trainer.gradient_clip_val), then resume with ckpt_path={path}")
            raise NonFiniteStop(message if trainer.is_global_zero else 1)  # one line on stderr, from rank 0

    def state_dict(self) -> dict:
        if self._dev is not None:
            return {"skipped": int(self._dev["skipped"]), "in_a_row": int(self._dev["in_a_row"])}
        return {"skipped": self.skipped, "in_a_row": self.in_a_row}

    def load_state_dict(self, state: dict) -> None:
        self.skipped = int(state.get("skipped", 0))
        in_a_row = int(state.get("in_a_row", 0))  # resumed from the guard's own stop: count afresh
        self.in_a_row = 0 if self.max_consecutive and in_a_row >= self.max_consecutive else in_a_row
