"""`python -m ops.testing.fake_backend --port 0`: see the package's docstring."""

from ops.testing.fake_backend.cli import main

main()
