"""Chinchilla-style scaling: estimator, planner, sweeps, fits and plots."""
