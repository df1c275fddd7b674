"""Data: the sample schema, the synthetic world, shard writing and loading."""
