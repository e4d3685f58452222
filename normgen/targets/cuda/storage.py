"""Device storage of each CUDA element type as NumPy sees it: normgen/description/dtypes.py."""

from __future__ import annotations

from ...description.dtypes import from_storage, round_to, storage_dtype, to_storage

__all__ = ["from_storage", "round_to", "storage_dtype", "to_storage"]
