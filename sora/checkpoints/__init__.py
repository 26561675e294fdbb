"""Checkpoints, once: atomic writes and ``weights_only`` reads (:mod:`.io`), any checkpoint a run wrote read as
one dict, the EMA merge, and the safetensors export (:mod:`.export`). Imports nothing else of sora."""
