"""Helpers for adpo's own tests, the demo and the benchmarks: not part of the training API.

``adpo.testing.tiny`` builds tiny, randomly initialised models offline (they ship with the package so ``make demo``
and the benchmarks run without a model hub).
"""
