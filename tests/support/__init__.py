"""Helpers shared by the tests and the benchmarks (imported as ``tests.support``;
pytest's ``pythonpath`` puts the repository's root on ``sys.path``)."""

import pathlib

ROOT = pathlib.Path(__file__).resolve().parents[2]   # the repository
