"""Training of the built-in twin models (see ``dlmedit.train.twins``)."""
