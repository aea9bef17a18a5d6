"""Benchmarks of rnndsl against torch.nn and hand-written baselines: see bench/benchmark.py."""
