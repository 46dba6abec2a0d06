"""Knowledge editing: shared, model-independent primitives and the methods built on them.

The primitives live in submodules that work on plain tensors / ``nn.Module`` parameter
names, so ROME, MEMIT and AlphaEdit share one implementation of each:

- :mod:`dlmedit.edit.solves` — rank-one, ridge (MEMIT) and null-space (AlphaEdit) solves;
- :mod:`dlmedit.edit.delta` — :class:`~dlmedit.edit.delta.EditDelta`, the applyable,
  bit-exactly revertable, saveable result of every weight edit;
- :mod:`dlmedit.edit.covariance` — streaming second-moment statistics and their cache;
- :mod:`dlmedit.edit.errors` — the exception types above raise.

Import from the submodules; this package deliberately re-exports nothing so that the
method modules added on top can import the primitives without import cycles.
"""
