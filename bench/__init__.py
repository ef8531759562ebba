"""Benchmarks: scenarios, the engines' usual paths as baselines, the copy floor, the runner."""
