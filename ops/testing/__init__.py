"""What the test suite (`tests/`) and the benchmarks (`bench/`) share, importable from the package.

- `ops.testing.fake_backend`: a deterministic OpenAI-compatible server that stands in for vLLM
  (``python -m ops.testing.fake_backend --port 0``);
- `ops.testing.stack`: hotq's own processes (an API, workers, agents) for one config, started
  and stopped through `ops.processes`, and the generous deadlines the suite waits with.

Nothing here runs in a deployment; it lives in `ops/` because it is part of operating hotq's
code (checking and measuring it) and because `tests/` is not an installed package.
"""
