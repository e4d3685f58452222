"""Batch norm folded into the convolution or linear layer before it.

A trained batch norm after a convolution or a linear layer is, at inference, one multiply-add
per channel: y = a_c·z + b_c with a_c = γ_c/√(σ²_c + ε), b_c = β_c − μ_c·a_c. Folded into the
layer before it (z = W ⊛ x + bias), the pair is that layer alone with

    W′ = W·a_c (along W's output-channel axis),   bias′ = (bias − μ_c)·a_c + β_c.

:func:`fold` computes W′ and bias′ from a :class:`~normgen.BatchNorm` description's trained
statistics, scale and offset (γ = 1 without affine, β = 0 without an offset), in float64.
:func:`read_weights` and :func:`weights_npz` are the ``normgen fold`` command's file side.
"""

from __future__ import annotations

import io
import zipfile
from pathlib import Path

import numpy as np

from ..errors import NormgenError
from .layers import Layer

WEIGHT_ARRAYS = ("weight", "bias")


def _floats(value: object, what: str) -> np.ndarray:
    arr = np.asarray(value)
    if arr.dtype.kind not in "iuf":
        raise NormgenError(f"{what} holds {arr.dtype} values; fold takes real numbers")
    bad = np.flatnonzero(~np.isfinite(arr.reshape(-1))) if arr.dtype.kind == "f" else ()
    if len(bad):
        raise NormgenError(f"{what} has a non-finite value {arr.reshape(-1)[bad[0]]} at flat index {bad[0]}")
    return arr


def fold(layer: Layer, weight: object, bias: object = None, axis: int = 0) -> tuple[np.ndarray, np.ndarray]:
    """(weight′, bias′) such that the layer before a batch norm, with them, computes what it and
    the batch norm's predict compute together.

    ``weight`` has its output channels on ``axis`` (0: PyTorch Conv and Linear, MATLAB
    fullyConnectedLayer; 1: PyTorch ConvTranspose with groups = 1; -1: Keras kernels and MATLAB
    convolution2dLayer); their count must be the layer's channels. ``bias`` has one value per
    output channel, or is None (no bias: the folded layer gets one). The fold is computed in
    float64; both results have the weight's dtype (float64 for an integer weight).
    """
    if not isinstance(layer, Layer):
        raise NormgenError(f"fold takes a normgen.BatchNorm layer, got {type(layer).__name__}")
    if layer.kind != "batchnorm":
        raise NormgenError(f"layer {layer.name!r} is a {layer.kind}; only a batchnorm (its trained statistics) folds"
                           " into the layer before it")
    w = _floats(weight, "weight")
    if w.ndim < 1:
        raise NormgenError("weight is a scalar; it needs an output-channel axis")
    if isinstance(axis, bool) or not isinstance(axis, (int, np.integer)) or not -w.ndim <= axis < w.ndim:
        raise NormgenError(f"axis {axis!r} is not an axis of the weight, shape {w.shape} (from {-w.ndim} to {w.ndim - 1})")
    axis = int(axis) % w.ndim
    c = layer.channels
    if w.shape[axis] != c:
        raise NormgenError(f"weight shape {w.shape} has {w.shape[axis]} output channels on axis {axis}, but layer"
                           f" {layer.name!r} has {c} channels")
    if bias is None:
        b = np.zeros(c)
    else:
        b = _floats(bias, "bias")
        if b.shape != (c,):
            raise NormgenError(f"bias shape {b.shape} is not ({c},): one value per channel of layer {layer.name!r}")
    out_dtype = w.dtype if w.dtype.kind == "f" else np.dtype(np.float64)
    a = layer.scale_values / np.sqrt(layer.trained_variance_values + layer.epsilon)
    shape = [1] * w.ndim
    shape[axis] = c
    w_folded = w.astype(np.float64) * a.reshape(shape)
    b_folded = (b.astype(np.float64) - layer.trained_mean_values) * a + layer.offset_values
    return w_folded.astype(out_dtype), b_folded.astype(out_dtype)


def read_weights(path: str | Path) -> tuple[np.ndarray, np.ndarray | None]:
    """``weight`` and (if present) ``bias`` of a .npz file; any other array is an error."""
    path = Path(path)
    if not path.is_file():
        raise NormgenError(f"weights file {str(path)!r} " + ("is not a file" if path.exists() else "does not exist"))
    try:
        with np.load(path, allow_pickle=False) as data:
            if not hasattr(data, "files"):
                raise ValueError("a single .npy array, not a .npz archive")
            names = list(data.files)
            for name in names:
                if name not in WEIGHT_ARRAYS:
                    raise NormgenError(f"weights file {str(path)!r} has array {name!r}; it takes 'weight' and"
                                       " optionally 'bias'")
            if "weight" not in names:
                raise NormgenError(f"weights file {str(path)!r} has no array 'weight' (it has"
                                   f" {', '.join(map(repr, names)) or 'none'})")
            weight = np.array(data["weight"])
            bias = np.array(data["bias"]) if "bias" in names else None
    except NormgenError:
        raise
    except (OSError, ValueError, zipfile.BadZipFile, EOFError) as exc:
        raise NormgenError(f"weights file {str(path)!r} is not a readable .npz file ({exc})") from None
    return weight, bias


def weights_npz(weight: np.ndarray, bias: np.ndarray) -> bytes:
    """The bytes of a .npz file holding ``weight`` and ``bias``."""
    buf = io.BytesIO()
    np.savez(buf, weight=weight, bias=bias)
    return buf.getvalue()
