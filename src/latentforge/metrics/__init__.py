"""Metrics that need no Ray: Fréchet distance, the embedded classifier."""
