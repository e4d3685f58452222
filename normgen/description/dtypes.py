"""How each element type holds a value, as NumPy sees it (no pycuda needed): bfloat16 has no
NumPy dtype and is kept as its uint16 bits. The reference rounds what a layer stores between its
stages (a fused layer's h = x + residual) with :func:`round_to`; the CUDA bench stores tensors so."""

from __future__ import annotations

import numpy as np


def storage_dtype(dtype: str) -> np.dtype:
    """The NumPy dtype of a layer dtype's storage (bfloat16: its uint16 bits)."""
    return np.dtype({"float32": "float32", "float64": "float64", "float16": "float16", "bfloat16": "uint16"}[dtype])


def to_storage(x: np.ndarray, dtype: str) -> np.ndarray:
    """Values → the storage of ``dtype`` (bfloat16: uint16 bits, round to nearest even)."""
    x = np.asarray(x)
    if dtype != "bfloat16":
        return np.ascontiguousarray(x, dtype=storage_dtype(dtype))
    f = np.ascontiguousarray(x, dtype=np.float32)
    bits = f.view(np.uint32).astype(np.uint64)
    rounded = ((bits + 0x7FFF + ((bits >> 16) & 1)) >> 16).astype(np.uint16)
    nan = np.isnan(f)
    if nan.any():
        rounded[nan] = ((bits[nan] >> 16) | 0x40).astype(np.uint16)  # stay a (quiet) NaN
    return rounded


def from_storage(a: np.ndarray, dtype: str) -> np.ndarray:
    """Storage of ``dtype`` → NumPy values (bfloat16 → float32)."""
    a = np.asarray(a)
    if dtype != "bfloat16":
        return a
    return (a.astype(np.uint32) << 16).view(np.float32)


def round_to(x: np.ndarray, dtype: str) -> np.ndarray:
    """x rounded to ``dtype``'s precision, as float64 (what the generated code actually reads)."""
    return from_storage(to_storage(x, dtype), dtype).astype(np.float64)
