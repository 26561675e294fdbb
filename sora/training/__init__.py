"""Lightning training: one LightningModule per stage, callbacks, optimizer schedules.

Modules here take plain arguments (models, numbers); ``sora.cli.train`` builds them from the
Hydra configs. Models never import this package.
"""
