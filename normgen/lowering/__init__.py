"""The lowering stage: a layer description → a target-independent plan (forward and training).

:func:`lower` is the entry point; :mod:`.plan` holds the plan's types and the forward lowering,
:mod:`.train` the training half built on it.
"""

from .lower import lower

__all__ = ["lower"]
