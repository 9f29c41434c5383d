"""Shard workers: single-threaded owners of stream logs, consumer groups and cache partitions."""
