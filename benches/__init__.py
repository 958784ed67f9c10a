"""Benchmarks of pipeflow: pytest-benchmark suites (``test_*.py``) and ``benches.compare``.

They measure speed only; ``make test`` never collects them (its ``testpaths`` is ``tests``).
"""
