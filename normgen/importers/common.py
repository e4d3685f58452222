"""What every importer shares: C identifiers from framework names, the format of a layer that
normalizes a tensor's trailing dimensions, and the checks a user's format must pass.

Frameworks lay tensors out as row-major arrays whose first dimension is the batch: PyTorch's
and ONNX's batch, instance and group norms have the channel next (NCHW: ``"BCSS"``), their
layer norms and RMS norms normalize the *last* k dimensions. These helpers turn that into
normgen's letters (DESIGN.md §2, §3a) without changing the order of the data: a format here
only names the dimensions of the array the framework already has.
"""

from __future__ import annotations

import re
from collections.abc import Iterable, Sequence

from ..description.formats import parse_format
from ..description.kinds import REDUCED_LETTERS
from ..description.layers import _RESERVED
from ..errors import NormgenError

#: layer norm's operation dimensions, in the order they are tried for a given format.
OPERATION_DIMENSIONS = ("channel-only", "spatial-channel", "batch-excluded")


def c_identifier(text: str, prefix: str) -> str:
    """A framework's name (``layer1.0.bn1``, ``/0/InstanceNormalization``) as a C identifier:
    other characters become ``_``; ``prefix`` goes in front of one that would start with a digit
    or be empty; a C/C++ keyword gets a trailing ``_``."""
    ident = re.sub(r"[^A-Za-z0-9_]+", "_", text).strip("_")
    ident = re.sub(r"__+", "_", ident)
    if not ident or ident[0].isdigit():
        ident = f"{prefix}_{ident}" if ident else prefix
    if ident in _RESERVED:
        ident += "_"
    return ident


def distinct(names: Iterable[str]) -> list[str]:
    """The names made distinct, in order: a repeated name gets ``_2``, ``_3``, …"""
    out: list[str] = []
    seen: set[str] = set()
    for name in names:
        candidate, n = name, 1
        while candidate in seen:
            n += 1
            candidate = f"{name}_{n}"
        seen.add(candidate)
        out.append(candidate)
    return out


def channels_first_format(rank: int, *, time: bool = False) -> str:
    """``"BC"`` and one letter per further dimension of an (N, C, D1, …) tensor: one ``T`` for a
    single one when ``time`` (BatchNorm1d's (N, C, L)), else ``S``."""
    if rank < 2:
        raise NormgenError(f"a tensor of rank {rank} has no channel dimension (it needs (N, C, ...))")
    rest = rank - 2
    return "BC" + ("T" if time and rest == 1 else "S" * rest)


def check_channels_format(fmt: str, nonbatch: int, where: str) -> str:
    """A user's format for a batch, instance or group norm: any letters (they reduce S, T and U
    alike), one per non-batch size."""
    parse_format(fmt)
    if len(fmt.replace("B", "")) != nonbatch:
        raise NormgenError(
            f"{where}: format {fmt!r} has {len(fmt.replace('B', ''))} non-B letters but the input has {nonbatch}"
            " non-batch dimensions"
        )
    return fmt


def trailing_layout(nonbatch_shape: Sequence[int], k: int, fmt: str | None, where: str,
                    *, batch: bool = True) -> tuple[str, str]:
    """(format, operation_dimension) of a layer or RMS norm over the last ``k`` dimensions of a
    tensor whose sizes after the batch are ``nonbatch_shape`` (PyTorch's ``normalized_shape``,
    ONNX's ``axis``).

    Without ``fmt`` the normalized dimensions are ``C`` (k = 1) or ``C`` then ``S``s, after a
    ``T`` for a single leading dimension (``"BTC"``, a sequence) or ``S``s for more (``"BSSC"``,
    channels-last images), so that ``channel-only`` or ``spatial-channel`` reduces exactly them.
    A given ``fmt`` names the tensor's dimensions as they are, B included; the operation
    dimension whose reduced letters are exactly its last k is chosen, or it is an error.
    """
    n = len(nonbatch_shape)
    if not 1 <= k <= n:
        raise NormgenError(f"{where}: it normalizes the last {k} dimensions of an input with {n} non-batch dimensions")
    if fmt is None:
        lead = n - k
        if k == 1:
            letters = ("T" if lead == 1 else "S" * lead) + "C"
        elif lead == 0:
            letters = "C" + "S" * (k - 1)
        elif lead == 1:
            letters = "TC" + "S" * (k - 1)
        else:
            raise NormgenError(
                f"{where}: it normalizes the last {k} of {n} non-batch dimensions; normgen keeps one statistic per"
                f" (batch, time) at most, so {lead} leading dimensions besides the batch cannot stay apart: merge"
                f" them into the batch (reshape the input to (-1, {', '.join(map(str, nonbatch_shape[lead:]))})),"
                " or into one dimension"
            )
        fmt = ("B" if batch else "") + letters
    parse_format(fmt)
    nonbatch = fmt.replace("B", "")
    if len(nonbatch) != n:
        raise NormgenError(
            f"{where}: format {fmt!r} has {len(nonbatch)} non-B letters but the input has {n} non-batch dimensions"
        )
    if "B" in fmt[len(fmt) - k:]:
        raise NormgenError(f"{where}: format {fmt!r} puts B among the last {k} (normalized) dimensions")
    tail = set(range(n - k, n))
    for od in OPERATION_DIMENSIONS:
        reduced = REDUCED_LETTERS[("layernorm", od)]
        if {i for i, ch in enumerate(nonbatch) if ch in reduced} == tail:
            return fmt, od
    raise NormgenError(
        f"{where}: with format {fmt!r} no operation dimension of normgen's layer norm reduces exactly the last {k}"
        f" dimensions {nonbatch[n - k:]!r}: name them C and S (channel-only reduces C; spatial-channel C, S and U;"
        " batch-excluded everything but B)"
    )


def parse_assignments(items: Sequence[str] | None, what: str, convert=str) -> dict[str, object]:
    """``["seq=128", "n=4"]`` or ``["seq=128,n=4"]`` → ``{"seq": 128, "n": 4}``."""
    out: dict[str, object] = {}
    for item in items or ():
        for part in item.split(","):
            key, sep, value = part.partition("=")
            if not sep or not key.strip() or not value.strip():
                raise NormgenError(f"{what} {part!r} is not NAME=VALUE")
            try:
                out[key.strip()] = convert(value.strip())
            except ValueError:
                raise NormgenError(f"{what} {part!r}: {value.strip()!r} is not a valid value") from None
    return out
