"""Importers: trained layers from PyTorch, ONNX and Keras as normgen layer descriptions.

``matlab`` reads trained parameters from MAT-files (``params = "bn.mat"``, ``normgen.load_params``).

A stage of its own beside :mod:`normgen.description`: importers read a framework's modules or
files and build :class:`~normgen.Layer` objects; the description never imports them. The
framework packages (torch, onnx, onnxruntime, h5py) are optional extras imported only when an
importer runs.
"""

from . import matlab  # noqa: F401  (adds the .mat reader of parameter files)
from .keras_file import from_keras
from .onnx_model import from_onnx, read_onnx
from .pytorch import from_torch

__all__ = ["from_keras", "from_onnx", "from_torch", "read_onnx"]
