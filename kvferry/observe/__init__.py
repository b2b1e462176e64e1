"""Observability: counters and histograms readable from Python (exporters build on these)."""
