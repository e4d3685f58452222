"""What each kind computes: the one place kind semantics live (DESIGN.md §3).

Both :mod:`normgen.reference` and the lowering read them from here: which statistic a kind
takes, over which dimension letters, whether the channel axis is split into groups, and whether
the layer keeps trained (running) statistics that inference uses.
"""

from __future__ import annotations

from dataclasses import dataclass

#: The statistics a kind normalizes with.
#: ``mean_variance``: y = (x − μ)/√(σ² + ε), μ and σ² the mean and biased variance of the set;
#: ``mean_square``: y = x/√(mean(x²) + ε), no mean subtracted (RMSNorm).
STATISTICS = ("mean_variance", "mean_square")

#: Letters each statistic reduces over, per kind (and layer norm's operation dimension, which
#: RMSNorm shares).
REDUCED_LETTERS = {
    "batchnorm": "BSTU",
    "groupnorm": "STU",
    "instancenorm": "STU",
    ("layernorm", "channel-only"): "C",
    ("layernorm", "spatial-channel"): "SUC",
    ("layernorm", "batch-excluded"): "SCTU",
}


@dataclass(frozen=True)
class Semantics:
    """What one layer computes, independent of any target."""

    statistic: str  # one of STATISTICS
    reduced: str  # dimension letters whose positions share a statistic
    grouped: bool  # C splits into (groups, C/groups) and C/groups is reduced too
    trained_statistics: bool  # inference normalizes with trained statistics (batch norm)
    element_affine: bool  # affine = "element" is allowed (a statistic covers whole normalized dimensions)

    @property
    def centered(self) -> bool:
        """Whether the mean is subtracted (and is a statistic)."""
        return self.statistic == "mean_variance"


def semantics(layer) -> Semantics:
    """The semantics of a layer description (any object with ``kind`` and, for layer norm,
    ``resolved_dimension``)."""
    kind = layer.kind
    per_instance = kind in ("layernorm", "rmsnorm")
    if per_instance:
        reduced = REDUCED_LETTERS[("layernorm", layer.resolved_dimension)]
    else:
        reduced = REDUCED_LETTERS[kind]
    return Semantics(
        statistic="mean_square" if kind == "rmsnorm" else "mean_variance",
        reduced=reduced,
        grouped=kind == "groupnorm",
        trained_statistics=kind == "batchnorm",
        element_affine=per_instance,
    )


def reduced_letters(layer) -> str:
    """The dimension letters whose positions share one statistic."""
    return semantics(layer).reduced
