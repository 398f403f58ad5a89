"""Benchmarks: wsroom against its peers (see benchmarks/README.md)."""
