"""The cross-paradigm study: stages, runner, summary and report."""
