"""Axon: 4D-parallel LLM training."""
