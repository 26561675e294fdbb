"""Thin entry points: the only place that reads Hydra configs and instantiates."""
