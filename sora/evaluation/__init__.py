"""Evaluation: metrics and report (sync offsets, physics probe, distances)."""
