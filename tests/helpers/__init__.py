"""What the tests share: the built-in policy (``policy``), loopback ports (``net``), learner and edge
processes (``cluster``), deployment helpers (``deploy``) and the metric names of the rules (``promql``).
Fixtures built on them are in tests/conftest.py."""
