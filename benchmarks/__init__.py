"""Benchmarks (not tests): run from the project root as ``python -m benchmarks.<name>``.
Shared pieces (paths, data roots, schedules, machine line, formatting) are in :mod:`benchmarks.common`."""
