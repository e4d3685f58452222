"""normgen: a code generator for neural-network normalization layers.

Describe a layer, then ``emit`` its C or CUDA source or ``build`` it into a callable
test bench checked against :mod:`normgen.reference`.
"""

__version__ = "0.1.0"

from . import reference  # noqa: E402
from .description.fold import fold  # noqa: E402
from .description.layers import BatchNorm, GroupNorm, InstanceNorm, Layer, LayerNorm, RMSNorm  # noqa: E402
from .description.spec import load_params, load_spec  # noqa: E402
from .errors import NormgenError  # noqa: E402
from .importers import from_keras, from_onnx, from_torch  # noqa: E402
from .targets.load import build  # noqa: E402
from .targets.render import emit  # noqa: E402

__all__ = [
    "BatchNorm", "GroupNorm", "InstanceNorm", "Layer", "LayerNorm", "NormgenError", "RMSNorm",
    "build", "emit", "fold", "from_keras", "from_onnx", "from_torch", "load_params", "load_spec", "reference",
    "__version__",
]
