"""Benchmarks of hotq (run from the repository root, e.g. ``python -m bench.core_path``)."""
