"""Benchmarks: the proxy measured against its workers reached directly (see bench/README.md)."""
