"""Benchmarks of fused_dropout: ``python bench/run.py`` (timing) and ``bench/kernels.py``."""
