"""Benchmarks of merge cost, inference latency and adapter quality; see bench/README.md."""
