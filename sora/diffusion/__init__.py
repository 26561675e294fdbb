"""Rectified flow: timesteps, interpolation, losses; samplers; guidance."""
