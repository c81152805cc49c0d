"""Benchmark suite for triton-adam: presets of real model shapes, an explicit byte model,
optimizer providers, timing, and reports (table, JSON, plot).

Nothing here is imported by ``triton_adam`` itself; the ``triton-adam bench`` command loads it.
"""
