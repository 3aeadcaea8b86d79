"""Benchmark suite: `python -m bench` runs the same workloads through several job engines.

Kept import-free: the Celery venv imports `bench.celery_app` and has none of the project's
packages.
"""
