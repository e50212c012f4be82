"""Reference servers and sockserve handlers for the benchmark suite."""
