"""normgen: a code generator for neural-network normalization layers."""

__version__ = "0.1.0"
