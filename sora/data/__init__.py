"""Data: shards, streaming pipeline, buckets, the bouncing-ball world."""
