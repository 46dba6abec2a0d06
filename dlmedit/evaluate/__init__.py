"""Evaluation: metrics by scoring and by generation, by target length, with confidence intervals.

`metrics` and `stats` are pure (numbers and strings in, numbers out); the modules that
run models import them, never the other way round.
"""
