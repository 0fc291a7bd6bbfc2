"""Sampling from trained checkpoints: decoding strategies over a key/value cache."""
