"""Per-block ``torch.compile`` (``model.compile=true``): one warm-up suffices.

Dynamo's ``eager`` backend builds the same graphs and guards as inductor without the C++ build,
so the test is quick; ``tools/bench_compile.py`` measures inductor's cold start and speed-up.
Warm-up = a training step with one timestep per sample and one with per-token timesteps (the two
input structures of the task mix), the same two on multi-shot clips (shot masks: the quickstart trains
on 30 % of them), one validation step and one sample (the Lightning loop's three kinds of call); after
it, more steps of the default task mix and clip stream (batches with and without multi-shot clips)
with other captions (other padded lengths, no padding at all), another validation and another sample
must add no graph.
"""

from __future__ import annotations

from pathlib import Path

import torch
from hydra import compose, initialize_config_dir
from hydra.utils import instantiate
from torch._dynamo.utils import counters

from sora.cli.overrides import CONFIGS
from sora.inference import AVPipeline
from sora.training.strategies import parallelize_dit

REPO = Path(__file__).resolve().parents[1]


def graphs() -> int:
    return counters["stats"]["unique_graphs"]


def test_compiled_blocks_need_one_warm_up(tmp_path):
    torch._dynamo.reset()
    with initialize_config_dir(CONFIGS, version_base="1.3"):
        cfg = compose("train", overrides=["experiment=quickstart/dit", "model.video_vae_ckpt=null",
                                          "model.audio_vae_ckpt=null", "data.train.clips=48", "data.num_workers=0",
                                          "model.dit.depth=2", "data.train.batch_size=4"])
    torch.manual_seed(0)
    dm, module = instantiate(cfg.data), instantiate(cfg.model)
    assert 0 < cfg.data.train.shots.prob < 1  # the default stream mixes single- and multi-shot batches
    streams = {}
    for name, prob in (("plain", 0.0), ("multi", 1.0)):  # the warm-up's: no clip / every clip multi-shot
        cfg.data.train.shots.prob = prob
        streams[name] = iter(instantiate(cfg.data).train_dataloader())
    module.log = module.log_dict = lambda *args, **kwargs: None
    module.configure_model()
    parallelize_dit(module.dit, compile=True, compile_backend="eager")
    train = iter(dm.train_dataloader())
    val = dm.on_after_batch_transfer(next(iter(dm.val_dataloader())), 0)

    def step(i, captions=None, tasks=None, stream=None):
        module.task_probs = tasks  # None: the default mix
        batch = dm.on_after_batch_transfer(next(stream or train), 0)
        if captions is not None:
            batch.captions = captions
        module.train()
        module.training_step(batch, i).backward()
        module.eval()

    def validate_and_sample(prompt):
        with torch.no_grad():
            module.validation_step(val, 0)
        AVPipeline(module, module.timeline, (32, 32)).generate(prompt, steps=2, guidance=4.0)

    for stream in streams.values():
        step(0, tasks={"t2av": 1.0}, stream=stream)
        step(0, tasks={"retake": 1.0}, stream=stream)
    validate_and_sample("a red ball")
    warm = graphs()
    assert warm > 0
    for i in range(1, 7):  # 30 % multi-shot clips, batches of 4: with and without shot masks
        step(i)
    step(2, ["x" * 200] * 4)  # nothing padded: the mask is kept (not dropped) under compile
    step(3, ["a", "a much longer caption than the others", "b", "c"])
    validate_and_sample("two balls, a blue one and a yellow one, bounce on a green floor")
    assert graphs() == warm, f"{graphs() - warm} graphs built after the warm-up"
