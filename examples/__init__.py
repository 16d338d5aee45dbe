"""Runnable examples for memopt (also importable by the tests and benchmarks)."""
