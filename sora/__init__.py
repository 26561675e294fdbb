"""sora: joint audio-video diffusion research framework."""

__version__ = "0.1.0"
