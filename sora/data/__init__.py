"""Data: shards, streaming pipeline, buckets, the bouncing-ball world."""

import warnings

# torchdata 0.11's StatefulDataLoader calls torch.set_vital, deprecated in recent torch: harmless
warnings.filterwarnings("ignore", message="'set_vital' is deprecated", category=UserWarning)
