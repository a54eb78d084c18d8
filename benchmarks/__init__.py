"""Benchmarks: scripts that measure fedmq side by side with baselines and print the ratios."""
