"""Benchmarks of lamb_kernels' optimizer steps."""
