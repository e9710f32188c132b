"""Benchmarks of dropcut (not tests): ``python -m bench.run_all`` or ``python -m bench.<name>``.

See ``bench/README.md``.
"""
