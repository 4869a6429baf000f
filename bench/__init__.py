"""Benchmarks: each script is a command (python bench/<name>.py --help); tests/test_bench.py runs them small."""
