"""Evaluation: metrics by scoring and by generation, by target length, with confidence intervals.

- :mod:`~dlmedit.evaluate.metrics`, :mod:`~dlmedit.evaluate.stats` — pure definitions
  (numbers and strings in, numbers out); they never import a model.
- :mod:`~dlmedit.evaluate.measure` — asks a model for those numbers through its paradigm
  (``measure_records``), batched over many records.
- :mod:`~dlmedit.evaluate.runner` — protocols (single / batch / sequential), resumable
  JSONL results, ``summary.json`` (``run_evaluation``); used by ``dlmedit eval``.

Import from the submodules; nothing is re-exported here so that importing the pure
metrics never pulls in torch-facing code.
"""
