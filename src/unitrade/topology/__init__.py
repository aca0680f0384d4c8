"""Topology: configuration, the rule, pure routing functions and order IDs.

Depends on nothing else of unitrade (docs/architecture.md).
"""
