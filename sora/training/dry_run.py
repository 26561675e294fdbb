"""Dry run of a training config: parameters, FLOPs and predicted peak memory per bucket; no data, no training.

    sora-train experiment=quickstart/dit dry_run=true
    sora-train experiment=... dry_run.memory_gb=80 trainer.precision=bf16-mixed strategy=fsdp trainer.devices=8

The LightningModule is built from the config on fake tensors (``FakeTensorMode``: shapes and
dtypes, no memory, no arithmetic) and one training step runs as Lightning runs it, in the state
of a run under way (last step's gradients, AdamW's moments, the EMA copy alive): ``training_step``
under the precision's autocast, ``zero_grad`` (after the forward: Lightning's order), backward,
gradient clipping, the optimizer step, the EMA update. :class:`sora.training.memory.MemoryTracker`
sees every tensor made and when each is freed: live bytes by category over time and their peak.

Strategies divide categories by the world size (:func:`sharding`). DeepSpeed's bf16 (bf16 weights
and an fp32 master copy) is counted as autocast over fp32 weights: the same 16 bytes per parameter
unsharded, more than DeepSpeed's own once sharded. Not seen: memory inside kernels (cuDNN/cuBLAS
workspaces, oneDNN's reordered operands on CPU), the allocator's held and fragmented memory, the
CUDA context; ``headroom`` keeps that share of the budget free. Checked against real Lightning
steps on CPU by ``tools/check_dry_run.py``: experiments/benchmarks/README.md.
"""

from __future__ import annotations

import logging
import warnings
from contextlib import contextmanager, nullcontext
from dataclasses import dataclass, field

import torch
from torch._subclasses.fake_tensor import FakeTensor
from torch.utils.flop_counter import FlopCounterMode, sdpa_backward_flop_count, sdpa_flop_count

from sora.training.memory import CATEGORIES, MemoryTracker

GIB = 2 ** 30
PRECISIONS = {"32": "32", "32-true": "32", "bf16-mixed": "bf16-mixed", "bf16": "bf16-mixed",  # Lightning's names
              "16-mixed": "16-mixed", "16": "16-mixed", "bf16-true": "bf16-true", "16-true": "16-true"}
CPU_ATTENTION_FLOPS = {  # torch's FLOP counter knows the CUDA attention kernels only
    torch.ops.aten._scaled_dot_product_flash_attention_for_cpu:
        lambda q, k, v, *args, out_shape=None, **kwargs: sdpa_flop_count(q, k, v),
    torch.ops.aten._scaled_dot_product_flash_attention_for_cpu_backward:
        lambda grad, q, k, v, *args, out_shape=None, **kwargs: sdpa_backward_flop_count(grad, q, k, v)}



# -- how the run trains --------------------------------------------------------------------------
@dataclass
class Plan:
    """How the run trains, as far as memory goes (:func:`plan_of` reads it from the config)."""

    precision: str = "32"
    factors: dict[str, float] = field(default_factory=dict)  # per category (sharding)
    gathered_blocks: int = 0           # ZeRO-3 / FSDP: blocks whose full weights are gathered at once
    ema: object = None                 # a factory of the EMA callback, or None
    gradient_clip_val: float | None = None
    max_steps: int = -1                # for the LR schedule
    foreach: bool = False              # the optimizer's multi-tensor kernels (the default on CUDA)

    @property
    def autocast(self):
        dtype = {"bf16-mixed": torch.bfloat16, "16-mixed": torch.float16}.get(self.precision)
        return torch.autocast("cpu", dtype=dtype or torch.bfloat16, enabled=dtype is not None)


def sharding(kind: str, world: int, stage: int = 0, offload_optimizer: bool = False,
             offload_parameters: bool = False) -> tuple[dict[str, float], int]:
    """(factor per category, gathered blocks) of a strategy: single | ddp (its all-reduce buckets: a
    second copy of the gradients) | deepspeed (ZeRO-1 shards the optimizer states, 2 also the
    gradients, 3 also weights and EMA; offloads: 0 on the device) | fsdp (all but frozen weights)."""
    f, n = {}, 1.0 / world
    if kind == "ddp" and world > 1:
        f["gradients"] = 2.0
    if kind == "deepspeed":
        f.update({"optimizer": n} if stage >= 1 else {}, **({"gradients": n} if stage >= 2 else {}))
        f.update(dict.fromkeys(("weights", "frozen", "ema"), 0.0 if offload_parameters else n) if stage >= 3 else {})
        f.update({"optimizer": 0.0} if offload_optimizer else {})
    if kind == "fsdp":
        f.update(dict.fromkeys(("weights", "gradients", "optimizer", "ema"), n))
    sharded = kind == "fsdp" or (kind == "deepspeed" and stage >= 3)
    return f, 2 if sharded and world > 1 else 0


def strategy_of(cfg) -> tuple[str, int, dict]:
    """(kind, world size, DeepSpeed settings) from ``strategy=`` or ``trainer.strategy``, and devices."""
    tr, s = cfg.trainer, cfg.get("strategy") or {}
    devices = tr.get("devices", 1)
    devices = len(devices) if not isinstance(devices, (int, str)) else int(devices) if str(devices).isdigit() else 1
    name = str(s.get("_target_") if "_target_" in s else tr.get("strategy", "auto")).lower()
    ds = {"stage": int(s.get("stage", name[-1] if name[-1].isdigit() else 2)),
          "offload_optimizer": bool(s.get("offload_optimizer", False)),
          "offload_parameters": bool(s.get("offload_parameters", False))}
    kind = next((k for k in ("deepspeed", "fsdp", "ddp") if k in name), "single")
    return kind, devices * int(tr.get("num_nodes", 1)), ds if kind == "deepspeed" else {}


def plan_of(cfg) -> Plan:
    from hydra.utils import instantiate

    precision = str(cfg.trainer.get("precision", "32"))
    if precision not in PRECISIONS:
        raise ValueError(f"dry_run: trainer.precision={precision} is not one of {', '.join(PRECISIONS)}")
    kind, world, ds = strategy_of(cfg)
    factors, gathered = sharding(kind, world, **ds)
    ema_cfg = (cfg.get("callbacks") or {}).get("ema")
    return Plan(precision=PRECISIONS[precision], factors=factors, gathered_blocks=gathered,
                ema=(lambda: instantiate(ema_cfg)) if ema_cfg and "_target_" in ema_cfg else None,
                gradient_clip_val=cfg.trainer.get("gradient_clip_val"), max_steps=int(cfg.trainer.get("max_steps", -1)),
                foreach=str(cfg.trainer.get("accelerator", "auto")) != "cpu")


# -- one simulated step --------------------------------------------------------------------------
def simulate_step(module, batch, plan: Plan, tracker: MemoryTracker, count_flops: bool = False) -> dict:
    """One training step of ``module`` on ``batch`` inside ``tracker``, in a run's steady state ->
    {peak (bytes, weighted), at_peak (per category), flops (forward + backward when ``count_flops``)}."""
    if not module.automatic_optimization:
        raise ValueError(f"dry_run: {type(module).__name__} optimizes manually; only automatic optimization is run")
    params = [p for p in module.parameters() if p.requires_grad]
    hooks = [p.register_post_accumulate_grad_hook(lambda p: tracker.add(p.grad, "gradients")) for p in params]
    optimizer = module.configure_optimizers()
    while not isinstance(optimizer, torch.optim.Optimizer):  # the first of any of Lightning's forms
        optimizer = optimizer["optimizer"] if isinstance(optimizer, dict) else optimizer[0]
    tracker.category = "gradients"
    for p in params:  # last step's gradients; then a first optimizer step makes AdamW's states
        p.grad = torch.zeros_like(p)
    tracker.category = "optimizer"
    for group in optimizer.param_groups:
        group["foreach"] = True  # multi-tensor kernels for this first step: fewer ops to simulate
    optimizer.step()
    for group in optimizer.param_groups:
        group["foreach"] = plan.foreach
    tracker.category = "ema"
    ema = plan.ema() if plan.ema else None
    if ema is not None:
        ema.setup_shadow(module)
    tracker.category = "activations"
    tracker.reset_peak()
    counter = FlopCounterMode(display=False, custom_mapping=CPU_ATTENTION_FLOPS) if count_flops else nullcontext()
    with counter as flops, torch.random.fork_rng([]):
        torch.manual_seed(0)  # the same tasks and timesteps at every call
        with plan.autocast, warnings.catch_warnings():
            warnings.simplefilter("ignore")
            loss = module.training_step(batch, 0)
        loss = loss["loss"] if isinstance(loss, dict) else loss
        optimizer.zero_grad(set_to_none=True)  # Lightning: after the forward, before the backward
        loss.backward()
    del loss
    if plan.gradient_clip_val:
        torch.nn.utils.clip_grad_norm_(params, plan.gradient_clip_val, foreach=plan.foreach)
    optimizer.step()
    if ema is not None:
        ema.update(module)
    dit = getattr(module, "dit", None)
    blocks = list(dit.blocks) if hasattr(dit, "blocks") else list(module.children())
    gathered = plan.gathered_blocks * max((sum(p.nbytes for p in b.parameters()) for b in blocks), default=0)
    for h in hooks:
        h.remove()
    for p in params:
        p.grad = None
    at_peak = {k: v * tracker.factors[k] for k, v in tracker.at_peak.items()}
    return {"peak": tracker.peak + gathered, "at_peak": dict(at_peak, gathered=gathered),
            "flops": float(flops.get_total_flops()) if count_flops else None}


def clip_batch(timeline, height: int, width: int, batch: int, caption_chars: int = 512):
    """A batch as the data streams make it (float video in [-1, 1], mono audio), with long captions:
    the text encoders cut them at their ``max_len``, the most text tokens a run sees."""
    from sora.data.pipeline import ClipBatch

    n = timeline.num_samples
    return ClipBatch(video=torch.rand(batch, 3, timeline.num_frames, height, width) * 2 - 1,
                     audio=torch.randn(batch, 1, n) * 0.1, audio_mask=torch.ones(batch, n, dtype=torch.bool),
                     has_audio=torch.ones(batch, dtype=torch.bool), captions=["a ball " * (caption_chars // 7)] * batch,
                     keys=[str(i) for i in range(batch)], start=torch.zeros(batch, dtype=torch.float64),
                     fps=float(timeline.fps), sample_rate=timeline.sample_rate)


# -- from the config ---------------------------------------------------------------------------------
@dataclass
class Options:
    """``dry_run`` keys (null: the default): the budget per device in GiB, the share of it kept free,
    durations (the timeline's) and frame sizes [[H, W], ..] (the data config's) to plan."""

    memory_gb: float = 80.0
    headroom: float = 0.1
    seconds: list | None = None
    sizes: list | None = None


def options(value) -> Options | None:
    """The config's ``dry_run``: true, or a dict with any key set -> :class:`Options`; else None."""
    if value is None or value is False or value is True:
        return Options() if value is True else None
    from omegaconf import OmegaConf

    given = {k: v for k, v in OmegaConf.to_container(value).items() if v is not None}
    unknown = sorted(set(given) - set(Options.__dataclass_fields__))
    if unknown:
        raise ValueError(f"dry_run: unknown key {unknown[0]!r}; known: {', '.join(Options.__dataclass_fields__)}")
    return Options(**given) if given else None


def frame_sizes(data_cfg) -> list[tuple[int, int]]:
    """[(H, W)] the run trains on: the data config's aspect-ratio buckets, ``size``, or world size."""
    from sora.training.config_checks import frame_sizes as stream_sizes

    sizes = [(h, w) for _, h, w in stream_sizes(data_cfg.train, "data.train")]
    if not sizes:
        raise ValueError("dry_run: data.train has no size, buckets or world; give dry_run.sizes=[[H,W]]")
    return sizes


@contextmanager
def quiet():
    """No log lines below ERROR (random-init warnings of the frozen encoders, Lightning's banners)."""
    logging.disable(logging.WARNING)
    try:
        yield
    finally:
        logging.disable(logging.NOTSET)


def model_config(cfg):
    """``cfg.model`` without earlier stages' checkpoints (they only set weights' values) and compile (eager)."""
    from omegaconf import open_dict

    model_cfg = cfg.model.copy()
    with open_dict(model_cfg):
        for key in ("video_vae_ckpt", "audio_vae_ckpt", "compile"):
            if model_cfg.get(key):
                model_cfg[key] = False if key == "compile" else None
    return model_cfg


@contextmanager
def simulation(build, plan: Plan, fake: bool = True):
    """(module, tracker): the LightningModule ``build()`` makes, made inside an entered
    :class:`MemoryTracker` (``fake``: on fake weights) that counts its weights and buffers."""
    import lightning as L

    tracker = MemoryTracker(plan.factors, fake=fake)
    with tracker:
        with quiet():
            module = build()
            module.trainer = L.Trainer(accelerator="cpu", devices=1, max_steps=plan.max_steps, logger=False,
                                       enable_checkpointing=False, enable_progress_bar=False)
        memo: dict[int, torch.nn.Parameter] = {}
        for m in module.modules() if fake else ():  # every weight fake (small ones were made real)
            for name, p in m._parameters.items():
                if p is not None and not isinstance(p, FakeTensor):
                    m._parameters[name] = memo.setdefault(id(p), torch.nn.Parameter(
                        tracker.fake.from_tensor(p.detach()), p.requires_grad))
        module.log = module.log_dict = lambda *args, **kwargs: None  # logged scalars hold no memory
        if hasattr(module, "gan_start_step"):
            module.gan_start_step = 0  # the steady state: the discriminator in
        if hasattr(module, "text_drop_prob"):
            module.text_drop_prob = 0.0  # every caption at full length: the most text tokens
        if plan.precision in ("bf16-true", "16-true"):
            module.to(torch.bfloat16 if plan.precision == "bf16-true" else torch.float16)
        for p in module.parameters():
            tracker.add(p, "weights" if p.requires_grad else "frozen")
        for b in module.buffers():
            tracker.add(b, "buffers")
        yield module.train(), tracker


def analytic_flops(cfg, tokens, timeline, height: int, width: int) -> float | None:
    """Training FLOPs per sample from :mod:`sora.models.flops`: the DiT's (3x forward at ``tokens``)
    plus its frozen video encoder's forward, or the video VAE's (3x encoder + decoder); else None."""
    from hydra.utils import instantiate

    from sora.models.flops import dit_training_flops, video_vae_flops

    vae_cfg = cfg.model.get("video_vae") or cfg.model.get("vae")
    if vae_cfg is None or not str(vae_cfg.get("_target_", "")).endswith("VideoVAE"):
        return None
    with torch.device("meta"):  # shapes only
        vae, dit = instantiate(vae_cfg), instantiate(cfg.model.dit) if "dit" in cfg.model else None
    vae_flops = video_vae_flops(vae, (3, timeline.num_frames, height, width))
    return 3 * sum(vae_flops.values()) if dit is None else dit_training_flops(dit, *tokens) + vae_flops["encoder"]


def largest_batch(peak, budget: float, cap: int = 4096, known=()) -> int:
    """The largest batch whose ``peak(batch)`` fits ``budget`` (0: none; ``cap``: at least that):
    secants through the nearest batches tried (first 1 and ``known``; exact when memory is linear in
    the batch), and a bisection step after any secant that did not halve the interval."""
    if peak(1) > budget:
        return 0
    fits, hi, bisect = [1], None, False
    for b in sorted(b for b in set(known) if 1 < b <= cap):
        if hi is None:
            fits, hi = (fits + [b], hi) if peak(b) <= budget else (fits, b)
    while (hi or cap + 1) - fits[-1] > 1:
        lo, width = fits[-1], (hi or cap + 1) - fits[-1]
        if bisect and hi:
            guess = (lo + hi) // 2
        else:  # interpolate between lo and hi, or extrapolate from the two largest batches that fit
            a, b = (lo, hi) if hi else (fits[-2], lo) if len(fits) > 1 else (1, 2)
            slope = (peak(b) - peak(a)) / (b - a)
            guess = lo + width - 1 if slope <= 0 else lo + int((budget - peak(lo)) // slope)
            guess = min(max(guess, lo + 1), lo + width - 1)
        fits, hi = (fits + [guess], hi) if peak(guess) <= budget else (fits, guess)
        bisect = (hi or cap + 1) - fits[-1] > width // 2
    return fits[-1]


def dry_run(cfg) -> dict | None:
    """Print parameters, FLOPs and predicted peak memory per bucket of the config's run and return
    them; None when the config asks for no dry run (``dry_run`` null, false, or every key null)."""
    from functools import lru_cache

    from hydra.utils import instantiate
    from omegaconf import open_dict

    opts = options(cfg.get("dry_run"))
    if opts is None:
        return None
    plan = plan_of(cfg)
    kind, world, _ = strategy_of(cfg)
    sizes = [tuple(s) for s in opts.sizes] if opts.sizes else frame_sizes(cfg.data)
    batch_size, budget = int(cfg.data.train.get("batch_size", 1)), opts.memory_gb * (1 - opts.headroom) * GIB
    rows = []
    for seconds in opts.seconds or [cfg.timeline.seconds]:
        sub = cfg.copy()
        with open_dict(sub):
            sub.timeline.seconds = seconds
        timeline = instantiate(sub.timeline)
        with simulation(lambda: instantiate(model_config(sub)), plan) as (module, tracker), quiet():  # no data: the
            # first-batch latent statistics, measured on fake latents, would log as "shift nan, scale nan"
            counts = [sum(p.numel() for p in module.parameters() if p.requires_grad in wanted)
                      for wanted in ((True, False), (True,))]
            for h, w in sizes:
                step = lru_cache(lambda b, h=h, w=w: simulate_step(module, clip_batch(timeline, h, w, b), plan,
                                                                   tracker, count_flops=b == 1))
                one, tokens, at = step(1), getattr(module, "_tokens", None), step(batch_size)
                rows.append({"size": [h, w], "seconds": float(seconds), "batch": batch_size, "tokens": tokens,
                             "peak_gib": at["peak"] / GIB,
                             "at_peak_gib": {k: v / GIB for k, v in at["at_peak"].items() if v},
                             "per_sample_gib": (step(2)["peak"] - one["peak"]) / GIB, "flops_per_sample": one["flops"],
                             "largest_batch": largest_batch(lambda b: step(b)["peak"], budget, known=(2, batch_size))})
        for row in rows[-len(sizes):]:
            row["analytic_flops_per_sample"] = analytic_flops(sub, row["tokens"], timeline, *row["size"])
    result = {"model": cfg.model._target_, "precision": plan.precision, "strategy": kind, "world_size": world,
              "parameters": counts[0], "trainable": counts[1], "memory_gb": opts.memory_gb,
              "headroom": opts.headroom, "buckets": rows}
    print(report(result))
    return result


def report(r: dict) -> str:
    """The printed table: one row per (frame size, duration) bucket; FLOPs per step at the batch."""
    tflop = lambda x, b: "-" if x is None else f"{x * b['batch'] / 1e12:.4g}"  # noqa: E731
    lines = [f"sora-train dry run (no data, no training): {r['model']}",
             f"  parameters {r['parameters']:,} ({r['trainable']:,} trainable, "
             f"{r['parameters'] - r['trainable']:,} frozen)",
             f"  precision {r['precision']}, strategy {r['strategy']} x {r['world_size']} devices; memory per device; "
             f"largest batch within {r['memory_gb']:g} GiB less {r['headroom']:.0%} headroom",
             f"  {'bucket':>10} {'seconds':>7} {'tokens v/a/t':>14} {'TFLOP/step':>10} {'(analytic)':>10} {'batch':>5} "
             f"{'peak GiB':>8} {'GiB/sample':>10} {'largest batch':>13}"]
    for b in r["buckets"]:
        tokens = "/".join(map(str, b["tokens"])) if b["tokens"] else "-"
        largest = f"{b['largest_batch']}{'+' if b['largest_batch'] >= 4096 else ''}"
        lines.append(f"  {b['size'][0]:>4}x{b['size'][1]:<5} {b['seconds']:>7g} {tokens:>14} "
                     f"{tflop(b['flops_per_sample'], b):>10} {tflop(b['analytic_flops_per_sample'], b):>10} "
                     f"{b['batch']:>5} {b['peak_gib']:>8.3f} {b['per_sample_gib']:>10.4f} {largest:>13}")
    parts = ", ".join(f"{k} {v:.3f}" for k, v in r["buckets"][-1]["at_peak_gib"].items())
    return "\n".join(lines + [f"  at the last bucket's peak (GiB): {parts}"])
