"""Inference: :class:`AVPipeline`, the one path that generates (sora-sample, sora-eval, the Samples callback)."""

from sora.inference.pipeline import AVPipeline, Generated, PipelineError

__all__ = ["AVPipeline", "Generated", "PipelineError"]
