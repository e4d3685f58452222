"""The targets: each turns a plan into source (its plan extension and templates) and compiles
and loads that source for the test bench. ``c/`` and ``cuda/``; templates in templates/<target>/."""
