"""Compile a layer for a target and load it into the test bench."""

from __future__ import annotations

from ..description.layers import Layer
from ..errors import NormgenError


def build(layer: Layer, target: str = "c", **options):
    """Compile a layer for a target and load it: an object with ``.predict(x)`` and, for batch
    norm, ``.train_forward(x)``, on NumPy arrays shaped in the layer's format."""
    if layer.dtype == "int8" and target != "c":
        raise NormgenError(f"layer {layer.name!r}: dtype 'int8' is generated for the c target only, not {target}")
    if target == "c":
        from .c.build import CompiledLayer

        return CompiledLayer(layer, **options)
    if target == "cuda":
        from .cuda.module import CudaLayer

        return CudaLayer(layer, **options)
    raise NormgenError(f"target {target!r} is not one of c, cuda")
