"""Benchmarks: a C load generator, reference servers and the side-by-side harness."""
