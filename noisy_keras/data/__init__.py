"""Data sets by name and their deterministic, shardable, streamable input pipelines."""
