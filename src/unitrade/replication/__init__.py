"""Replication: every cell's owner streams its changelog to every other region's copy
(docs/architecture.md)."""
