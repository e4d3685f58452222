"""Layer descriptions: frozen dataclasses, validated and resolved on construction.

A description says *what* a layer computes; :mod:`normgen.lowering` decides *how*.
"""

from __future__ import annotations

import difflib
import functools
import hashlib
import math
import re
import zlib
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field, fields
from typing import Any, ClassVar

import numpy as np

from ..errors import NormgenError
from .formats import Format, from_matlab, parse_format
from .kinds import semantics

Initializer = str | Callable[[int], Any] | Sequence[float] | np.ndarray | None

DTYPES = ("float32", "float64", "float16", "bfloat16", "int8")
#: The quantization of an int8 layer's x and y (TFLite's asymmetric int8 scheme, per tensor):
#: real = scale * (q - zero_point).
QUANT_FIELDS = ("input_scale", "input_zero_point", "output_scale", "output_zero_point", "arithmetic")
#: How an int8 layer's generated C normalizes: statistics in integers and the normalize step in
#: float ("float"), or nothing in float at all ("integer": fixed point, for cores without an FPU).
ARITHMETICS = ("float", "integer")
INITIALIZERS = ("ones", "zeros", "narrownormal")
RUNNING_VARIANCE = ("unbiased", "biased")
PARAM_STORAGE = ("embedded", "runtime")
PARALLEL = ("none", "openmp")
#: The type the C target computes statistics and gradient sums in (README "Firmware").
STATISTICS = ("double", "float")
OPERATION_DIMENSIONS = ("auto", "channel-only", "spatial-channel", "batch-excluded")
#: How the learned scale (γ) and offset (β) are shaped: one per channel, one per element of a
#: statistic's normalized dimensions (PyTorch/ONNX LayerNorm), or none at all.
AFFINES = ("channel", "element", "none")
#: The fused forms (README "Fused forms"): an activation after the affine (and the modulation),
#: and a per-sample modulation y = z * (1 + scale[b, c]) + shift[b, c] (adaLN).
ACTIVATIONS = ("none", "relu", "silu", "gelu", "gelu_tanh")
MODULATIONS = ("none", "adaln")
#: Why a layer may lack a role (Layer.roles).
_MISSING_ROLE = {
    "train_forward": " (batchnorm only)",
    "backward": " (an activation or modulation needs the saved statistics: backward_saved)",
    "backward_frozen": " (batchnorm only; with an activation or modulation, backward_saved)",
    "stats_reset": " (batchnorm only)",
    "accumulate": " (batchnorm only)",
    "finalize": " (batchnorm only)",
    "update": " (it updates run-time parameters: param_storage = 'runtime' with a scale or offset)",
}
#: The generated functions, by role, in the order they are emitted (which of them a layer has:
#: :attr:`Layer.roles`; ``functions`` keeps some of them).
ROLES = ("predict", "train_forward", "train_forward_save", "backward", "backward_saved", "backward_frozen",
         "stats_reset", "accumulate", "finalize", "update", "sync")

# C99/C11 keywords and C++ keywords (the CUDA target is C++), plus identifiers the
# generated code itself declares.
_RESERVED = set(
    """auto break case char const continue default do double else enum extern float for goto if
    inline int long register restrict return short signed sizeof static struct switch typedef union
    unsigned void volatile while _Bool _Complex _Imaginary _Alignas _Alignof _Atomic _Generic
    _Noreturn _Static_assert _Thread_local bool alignas alignof and and_eq asm bitand bitor catch
    char16_t char32_t char8_t class compl concept consteval constexpr constinit const_cast co_await
    co_return co_yield decltype delete dynamic_cast explicit export false friend mutable namespace
    new noexcept not not_eq nullptr operator or or_eq private protected public reinterpret_cast
    requires static_assert static_cast template this thread_local throw true try typeid typename
    using virtual wchar_t xor xor_eq main""".split()
)
_IDENT = re.compile(r"^[A-Za-z_][A-Za-z0-9_]*$")


def _reserved_in_c(name: str) -> bool:
    """A C/C++ keyword, or an identifier C reserves (leading '__' or '_' and a capital letter)."""
    return name in _RESERVED or name.startswith("__") or (name.startswith("_") and name[1:2].isupper())


# ---- limits (README "Limits"), checked before anything is allocated ----------------------------
#: Longest layer name and run-time size name: C99 keeps 31 significant initial characters of an
#: external identifier, and the layer's name is what tells the functions of two layers apart.
MAX_NAME = 31
#: Largest fixed size: the generated functions take the batch and run-time sizes as int32_t.
MAX_SIZE = 2**31 - 1
#: Largest element count of one sample (the fixed sizes' product): its bytes (8 per double) must
#: fit a 64-bit ptrdiff_t (2^63 - 1), which pointer differences across x need.
MAX_SAMPLE_ELEMENTS = 2**60
#: Most values in one parameter array (the channels; the normalized elements of an element
#: affine): the arrays are embedded in the generated source as text (about 25 bytes a value).
MAX_PARAMS = 2**24
#: Names a run-time size may not take: the generated functions' other arguments and the locals
#: declared beside them (a size's own local is n_NAME, so no size may begin with "n_").
_SIZE_RESERVED = set(
    """x y dx dy batch nb params running_mean running_var saved_mean saved_invstd dscale doffset acc
    trained_mean trained_variance velocity_scale velocity_offset learn_rate l2 momentum scale offset
    fold_a fold_b a_r b_r at fa fb fill goffset gscale i inv line n0 r rows stream total ws workspace
    workspace_bytes residual shift local part global sums count mhi mlo dx_w dx_q dx_r inv_n""".split()
)


def _check_size_name(name: str, layer_name: str, others: list[str]) -> str:
    where = f"layer {layer_name!r}: run-time size {name!r}"
    if len(name) > MAX_NAME:
        raise NormgenError(f"{where} has {len(name)} characters; a run-time size name has at most {MAX_NAME}")
    if not _IDENT.match(name):
        raise NormgenError(f"{where} is not a C identifier (letters, digits and '_', not starting with a digit)")
    if _reserved_in_c(name):
        raise NormgenError(f"{where} is a C/C++ keyword or reserved identifier; choose another name")
    if name in _SIZE_RESERVED or name.startswith("n_"):
        raise NormgenError(
            f"{where} clashes with an argument or local of the generated functions"
            f" (reserved: {', '.join(sorted(_SIZE_RESERVED))} and names beginning with 'n_'); choose another name"
        )
    if name in others:
        raise NormgenError(f"{where} names two dimensions; give each run-time size its own name")
    return name


#: Layer names whose upper-case macros (NAME_OK, ...) a system header already defines.
_MACRO_CLASHES = {"R", "W", "X", "F"}


def check_source_name(name: str) -> None:
    """What a layer's name must also satisfy to be generated as source (a description with it is
    fine, for the reference): its header's macros must not redefine a system header's."""
    if name.upper() in _MACRO_CLASHES:
        raise NormgenError(
            f"layer name {name!r} would make the header define {name.upper()}_OK, which POSIX's <unistd.h> defines"
            " (R_OK, W_OK, X_OK, F_OK); choose another name"
        )


def _check_name(name: object) -> str:
    if isinstance(name, str) and len(name) > MAX_NAME:
        raise NormgenError(
            f"layer name {name[:MAX_NAME] + '...'!r} has {len(name)} characters; at most {MAX_NAME} (C99 keeps 31"
            " significant characters of an external identifier such as NAME_predict; the files are NAME.h, NAME.c)"
        )
    if not isinstance(name, str) or not _IDENT.match(name):
        raise NormgenError(
            f"layer name {_short(name)} is not a C identifier (letters, digits and '_', not starting with a digit)"
        )
    if name in _RESERVED:
        raise NormgenError(f"layer name {name!r} is a C/C++ keyword or reserved identifier; choose another name")
    if name.startswith("__") or (name.startswith("_") and len(name) > 1 and name[1].isupper()):
        raise NormgenError(f"layer name {name!r} is reserved in C (leading '__' or '_' + capital letter)")
    return name


def _finite_number(value: object, what: str, *, positive: bool = False, lo: float | None = None,
                   hi: float | None = None) -> float:
    if isinstance(value, bool) or not isinstance(value, (int, float, np.floating, np.integer)):
        raise NormgenError(f"{what} must be a number, got {_short(value)}")
    v = float(value)
    if not math.isfinite(v):
        raise NormgenError(f"{what} must be finite, got {_short(value)}")
    if positive and v <= 0:
        raise NormgenError(f"{what} must be > 0, got {_short(value)}")
    if lo is not None and hi is not None and not (lo <= v <= hi):
        raise NormgenError(f"{what} must be in [{lo:g}, {hi:g}], got {_short(value)}")
    if lo is not None and hi is None and v < lo:
        raise NormgenError(f"{what} must be >= {lo:g}, got {_short(value)}")
    return v


def _choice(value: object, what: str, allowed: Sequence[str]) -> str:
    if not isinstance(value, str) or value not in allowed:
        raise NormgenError(f"{what} {_short(value)} is not one of {', '.join(repr(a) for a in allowed)}")
    return str(value)


def _dtype_name(value: object) -> str:
    if isinstance(value, str):
        name = value
    else:
        try:
            name = np.dtype(value).name  # type: ignore[arg-type]
        except (TypeError, ValueError, KeyError):
            name = repr(value)
    if name not in DTYPES:
        raise NormgenError(f"dtype {_short(value)} is not one of {', '.join(DTYPES)}")
    return name


def _resolve_param(value: Initializer, default: str, shape: tuple[int, ...], what: str, layer_name: str,
                   per: str = "one per channel") -> tuple[np.ndarray, str]:
    """An initializer name, callable or array → (read-only float64 array of ``prod(shape)`` values,
    flattened row-major, and its source text). An array must have ``shape`` exactly (a 1-D shape
    also takes a list)."""
    size = int(np.prod(shape, dtype=np.int64)) if shape else 1
    if value is None:
        value = default
    if isinstance(value, str):
        if value == "ones":
            arr = np.ones(size)
        elif value == "zeros":
            arr = np.zeros(size)
        elif value == "narrownormal":
            # Deterministic per layer and parameter, so the same description emits the same bytes.
            rng = np.random.default_rng(zlib.crc32(f"{layer_name}/{what}".encode()))
            arr = rng.normal(0.0, 0.01, size)
        else:
            raise NormgenError(
                f"{what} initializer {_short(value)} is not one of {', '.join(repr(i) for i in INITIALIZERS)},"
                " a callable or an array"
            )
        source = value
    elif callable(value):
        try:
            arr = value(size)
        except Exception as exc:  # a user's callable: its failure, named
            raise NormgenError(f"{what} initializer of layer {layer_name!r} failed for size {size}: {_short(exc)}") from None
        source = f"callable {getattr(value, '__name__', type(value).__name__)}"
    else:
        arr = value
        source = "array"
    need = f"it needs {size} values, shape {tuple(shape)} ({per})"
    try:
        raw = np.asarray(arr)
        if raw.dtype.kind not in "iuf":
            raise TypeError(f"its values have type {raw.dtype}")
        arr = np.array(raw, dtype=np.float64)
    except (TypeError, ValueError) as exc:
        raise NormgenError(f"{what} of layer {layer_name!r} is not numeric ({exc}); {need}") from None
    if arr.ndim == 0 or (len(shape) == 1 and arr.ndim == 1 and arr.size == size):
        arr = arr.reshape(-1)
    if arr.shape != (size,) and arr.shape != tuple(shape):
        raise NormgenError(f"{what} of layer {layer_name!r} has shape {arr.shape} ({arr.size} values); {need}")
    arr = np.ascontiguousarray(arr.reshape(-1))
    if len(shape) > 1 and source == "array" and np.shape(value) != tuple(shape):
        raise NormgenError(f"{what} of layer {layer_name!r} has shape {np.shape(value)}; {need}")
    bad = np.flatnonzero(~np.isfinite(arr))
    if bad.size:
        raise NormgenError(f"{what} of layer {layer_name!r} has a non-finite value {float(arr[bad[0]])} at index {bad[0]}")
    arr.setflags(write=False)
    return arr, source


#: Other frameworks' names for normgen's arguments → what normgen calls them (README "From your framework").
FOREIGN_NAMES = {
    "eps": "epsilon={v}",
    "momentum": "mean_decay={v}, variance_decay={v} (normgen's decays weigh the new batch value, as PyTorch's"
                " momentum does; for Keras and ONNX, whose momentum weighs the old value, use 1 - momentum)",
    "weight": "scale=... (the values of γ)",
    "gamma": "scale=... (the values of γ)",
    "beta": "offset=... (the values of β)",
    "running_mean": "trained_mean=...",
    "running_var": "trained_variance=...",
    "moving_mean": "trained_mean=...",
    "moving_variance": "trained_variance=...",
    "num_features": "shape=[...] (the sizes of the non-B dimensions; C is taken from them, or check it with"
                    " num_channels={v})",
    "normalized_shape": "shape=[...] with operation_dimension (the normalized dimensions: channel-only for the last"
                        " one, spatial-channel or batch-excluded for more) and affine='element'",
    "elementwise_affine": "affine='element' (or 'channel', one value per channel) for True, affine='none' for False",
    "groups": "num_groups={v}",
    "num_channels_per_group": "num_groups=C / {v}",
    "track_running_stats": "BatchNorm (trained statistics) or InstanceNorm (none)",
    "channels": "num_channels={v} (or leave it 'auto': C is taken from shape)",
}


def _short(value: object) -> str:
    """A value as an error message names it: arrays by shape and type, long text cut."""
    if isinstance(value, np.ndarray):
        return f"<array of shape {value.shape}, {value.dtype}>"
    text = " ".join(repr(value).split())  # NumPy's reprs span lines
    return text if len(text) <= 80 else text[:77] + "..."


def _unknown_argument(cls: type, key: str, value: object) -> str:
    call = f"{cls.__name__}({key}={_short(value)})"
    if key in FOREIGN_NAMES:
        return f"{call}: normgen has no argument {key!r}; it is {FOREIGN_NAMES[key].format(v=_short(value))}"
    names = [f.name for f in fields(cls) if f.init]
    for kind_cls in KINDS.values():
        if kind_cls is not cls and key in {f.name for f in fields(kind_cls) if f.init}:
            return f"{call}: {key!r} is an argument of {kind_cls.__name__}, not {cls.__name__}"
    close = difflib.get_close_matches(key, names, n=1)
    hint = f"; did you mean {close[0]}=?" if close else f"; its arguments are {', '.join(names)}"
    return f"{call}: no such argument{hint}"


def _guard_arguments(cls: type) -> type:
    """Wrap a layer class's dataclass __init__ so that a bad call is a NormgenError naming the
    value (and, for another framework's name, normgen's), never a bare TypeError."""
    init = cls.__init__

    @functools.wraps(init)
    def __init__(self, *args: Any, **kwargs: Any) -> None:
        if args:
            raise NormgenError(f"{cls.__name__} takes keyword arguments only (name=..., shape=..., format=...),"
                               f" got {_short(args[0])} by position")
        names = {f.name for f in fields(cls) if f.init}
        for key, value in kwargs.items():
            if key not in names:
                raise NormgenError(_unknown_argument(cls, key, value))
        if type(self) is cls:
            if kwargs.get("affine") is True or kwargs.get("affine") is False:
                raise NormgenError(
                    f"{cls.__name__}(affine={_short(kwargs['affine'])}): normgen's affine is 'channel' (one γ, β per channel),"
                    " 'element' (layernorm, rmsnorm: per element of the normalized dimensions) or 'none'"
                    f"{'' if kwargs['affine'] else ': False is affine=' + repr('none')}"
                )
            what = {"name": "name= (the layer's C name)", "shape": "shape= (the sizes of its non-B dimensions)"}
            missing = [what[n] for n in what if n not in kwargs]
            if missing:
                raise NormgenError(f"{cls.__name__} needs {' and '.join(missing)}")
        init(self, **kwargs)

    cls.__init__ = __init__
    return cls


@dataclass(frozen=True, kw_only=True, eq=False)
class Layer:
    """Fields every kind shares. Use :class:`BatchNorm`, :class:`GroupNorm`, :class:`LayerNorm`,
    :class:`InstanceNorm` or :class:`RMSNorm`."""

    kind: ClassVar[str] = ""

    name: str
    shape: Sequence[int]
    format: str | None = None
    matlab_format: str | None = None
    num_channels: int | str = "auto"
    dtype: str = "float32"
    epsilon: float = 1e-5
    scale: Initializer = None
    offset: Initializer = None
    affine: str = "channel"
    bias: bool | None = None
    scale_learn_rate_factor: float = 1.0
    offset_learn_rate_factor: float = 1.0
    scale_l2_factor: float = 1.0
    offset_l2_factor: float = 1.0
    param_storage: str = "embedded"
    parallel: str = "none"
    #: "double" (the default) or "float": statistics, Chan merges and gradient sums of a float32
    #: layer in float, so that no double is left in the generated C (single-precision FPUs).
    statistics: str = "double"
    residual: bool = False
    residual_out: bool = False
    activation: str = "none"
    modulation: str = "none"
    #: The functions to generate, by role (None: every one the layer has, :attr:`roles`).
    functions: Sequence[str] | None = None
    #: dtype "int8": x and y are int8 with real = scale * (q - zero_point) (TFLite's asymmetric
    #: scheme, one scale and zero point per tensor). The scales are required; the zero points
    #: default to 0.
    input_scale: float | None = None
    input_zero_point: int | None = None
    output_scale: float | None = None
    output_zero_point: int | None = None
    #: dtype "int8": "float" (default) or "integer" (ARITHMETICS).
    arithmetic: str | None = None

    # Resolved on construction (not arguments).
    fmt: Format = field(init=False, repr=False)
    dims: tuple[int, ...] = field(init=False, repr=False)
    channels: int = field(init=False, repr=False)
    #: The shape of scale and offset: (C,) per channel; the normalized dimensions (format order)
    #: per element; () without affine.
    param_shape: tuple[int, ...] = field(init=False, repr=False)
    has_scale: bool = field(init=False, repr=False)
    has_offset: bool = field(init=False, repr=False)
    #: γ and β as every function applies them, flattened (ones and zeros where the layer has none).
    scale_values: np.ndarray = field(init=False, repr=False)
    offset_values: np.ndarray = field(init=False, repr=False)
    sources: dict = field(init=False, repr=False)

    def __post_init__(self) -> None:
        if type(self) is Layer:
            raise NormgenError("Layer is abstract: use BatchNorm, GroupNorm, LayerNorm, InstanceNorm or RMSNorm")
        _check_name(self.name)
        set_ = object.__setattr__
        if (self.format is None) == (self.matlab_format is None):
            raise NormgenError(f"layer {self.name!r}: give exactly one of format (row-major) or matlab_format")
        fmt = parse_format(self.format) if self.format is not None else from_matlab(self.matlab_format)
        written = self.format if self.format is not None else self.matlab_format
        shape = self.shape
        if isinstance(shape, (str, bytes)) or not isinstance(shape, Sequence) and not isinstance(shape, np.ndarray):
            raise NormgenError(f"layer {self.name!r}: shape must be a list of sizes, got {_short(shape)}")
        shape = list(shape)
        need = len(written.replace("B", ""))
        if len(shape) != need:
            raise NormgenError(
                f"layer {self.name!r}: shape {_short(shape)} has {len(shape)} sizes but format {written!r} has {need} "
                "non-B dimensions (the batch size is a run-time argument)"
            )
        names: list[str] = []
        for s in shape:
            if isinstance(s, str):
                names.append(_check_size_name(s, self.name, names))
                continue
            if isinstance(s, bool) or not isinstance(s, (int, np.integer)) or s < 1:
                raise NormgenError(
                    f"layer {self.name!r}: shape {_short(shape)} has size {_short(s)}; sizes are positive integers"
                    " (or names, for sizes given at run time)"
                )
            if s > MAX_SIZE:
                raise NormgenError(
                    f"layer {self.name!r}: shape {_short(shape)} has size {int(s)}; a size is at most {MAX_SIZE} (2^31 - 1,"
                    " int32_t, the type of the batch and run-time sizes of the generated functions)"
                )
        fixed = math.prod(int(s) for s in shape if not isinstance(s, str))
        if fixed > MAX_SAMPLE_ELEMENTS:
            raise NormgenError(
                f"layer {self.name!r}: shape {_short(shape)} has {fixed} elements per sample; at most {MAX_SAMPLE_ELEMENTS}"
                " (2^60: a sample's bytes must fit the generated code's 64-bit size_t and ptrdiff_t)"
            )
        dims = tuple(s if isinstance(s, str) else int(s) for s in (shape if self.format is not None else shape[::-1]))
        set_(self, "fmt", fmt)
        set_(self, "dims", dims)
        channels = dims[fmt.non_batch_letters().index("C")]
        if isinstance(channels, str):
            raise NormgenError(
                f"layer {self.name!r}: the channel dimension C is the run-time size {channels!r}; C is fixed when"
                " the code is generated (its parameters have one value per channel): give it a number"
            )
        if channels > MAX_PARAMS:
            raise NormgenError(
                f"layer {self.name!r}: {channels} channels; at most {MAX_PARAMS} (2^24: each parameter array holds"
                " one value per channel, embedded in the generated source)"
            )
        if not (isinstance(self.num_channels, str) and self.num_channels == "auto"):
            nc = self.num_channels
            if isinstance(nc, bool) or not isinstance(nc, (int, np.integer)):
                raise NormgenError(f"layer {self.name!r}: num_channels must be 'auto' or an integer, got {_short(nc)}")
            if int(nc) != channels:
                raise NormgenError(
                    f"layer {self.name!r}: num_channels {nc} does not match the shape, whose C dimension is {channels}"
                )
        set_(self, "channels", channels)
        set_(self, "dtype", _dtype_name(self.dtype))
        self._resolve_quantization()
        set_(self, "epsilon", _finite_number(self.epsilon, f"layer {self.name!r}: epsilon", positive=True))
        for f in ("scale_learn_rate_factor", "offset_learn_rate_factor", "scale_l2_factor", "offset_l2_factor"):
            set_(self, f, _finite_number(getattr(self, f), f"layer {self.name!r}: {f}", lo=0.0))
        _choice(self.param_storage, f"layer {self.name!r}: param_storage", PARAM_STORAGE)
        _choice(self.parallel, f"layer {self.name!r}: parallel", PARALLEL)
        _choice(self.statistics, f"layer {self.name!r}: statistics", STATISTICS)
        if self.statistics == "float" and self.dtype == "int8":
            raise NormgenError(
                f"layer {self.name!r}: statistics = 'float' is for float32 layers; an int8 layer's statistics are"
                " exact integer sums (its arithmetic = 'float' or 'integer' chooses the normalize step)"
            )
        if self.statistics == "float" and self.dtype != "float32":
            raise NormgenError(
                f"layer {self.name!r}: statistics = 'float' needs dtype float32, not {self.dtype!r} (a {self.dtype}"
                " layer keeps its statistics in double)"
            )
        set_(self, "sources", {})
        self._resolve_kind()
        self._resolve_affine()
        self._resolve_fusion()
        self._check_int8()
        if self.param_storage == "runtime" and not self.parameter_arrays():
            raise NormgenError(
                f"layer {self.name!r}: param_storage = 'runtime' passes parameters at run time, but the layer has"
                " none (affine = 'none'); use 'embedded'"
            )
        self._resolve_functions()

    @property
    def roles(self) -> tuple[str, ...]:
        """The roles of every function this layer has (``functions`` keeps some), in ROLES order:
        batch norm's train_forward, frozen backward and population statistics; no plain backwards
        behind an activation or modulation; the update step with run-time parameters to learn."""
        if self.dtype == "int8":
            return ("predict",)  # an inference format: no training functions
        bn = self.kind == "batchnorm"
        plain_out = self.activation == "none" and self.modulation == "none"
        have = {
            "predict": True,
            "train_forward": bn,
            "train_forward_save": True,
            "backward": plain_out,
            "backward_saved": True,
            "backward_frozen": bn and plain_out,
            "stats_reset": bn,
            "accumulate": bn,
            "finalize": bn,
            "update": self.param_storage == "runtime" and (self.has_scale or self.has_offset),
            # batch norm's data-parallel functions (NAME_sync_*, README "Data-parallel training")
            "sync": bn and not self.fused and self.statistics == "double",
        }
        return tuple(r for r in ROLES if have[r])

    def _resolve_functions(self) -> None:
        """``functions``: None, or role names (a list, or one comma-separated string) that the layer has."""
        if self.functions is None:
            return
        where = f"layer {self.name!r}: functions"
        names = self.functions
        if isinstance(names, str):
            names = [n.strip() for n in names.split(",")]
        if isinstance(names, (bytes, dict)) or not isinstance(names, (Sequence, np.ndarray)):
            raise NormgenError(f"{where} must be a list of function roles, got {_short(names)}")
        names = list(names)
        if not names:
            raise NormgenError(f"{where} is empty; give at least one of {', '.join(self.roles)}")
        have = self.roles
        for n in names:
            if not isinstance(n, str) or n not in have:
                if isinstance(n, str) and n in ROLES and self.dtype == "int8":
                    why = f"an int8 layer has no {n} function (int8 is an inference format)"
                elif isinstance(n, str) and n in ROLES:
                    why = f"this {self.kind} layer has no {n} function" + _MISSING_ROLE.get(n, "")
                else:
                    close = difflib.get_close_matches(str(n), ROLES, n=1) if isinstance(n, str) else []
                    why = f"{_short(n)} is no function role" + (f" (did you mean {close[0]!r}?)" if close else "")
                raise NormgenError(f"{where}: {why}; it has {', '.join(have)}")
        object.__setattr__(self, "functions", tuple(r for r in have if r in names))

    def _resolve_kind(self) -> None:  # overridden per kind
        pass

    def _resolve_quantization(self) -> None:
        """input_scale, input_zero_point, output_scale, output_zero_point, arithmetic: for dtype int8 only."""
        where = f"layer {self.name!r}"
        set_ = object.__setattr__
        if self.dtype != "int8":
            given = [f for f in QUANT_FIELDS if getattr(self, f) is not None]
            if given:
                raise NormgenError(f"{where}: {given[0]} = {_short(getattr(self, given[0]))} is for dtype 'int8'"
                                   f" (quantized x and y); this layer's dtype is {self.dtype!r}")
            return
        for side in ("input", "output"):
            scale = getattr(self, f"{side}_scale")
            if scale is None:
                raise NormgenError(f"{where}: dtype 'int8' needs {side}_scale (real = {side}_scale *"
                                   f" (q - {side}_zero_point)), a finite number > 0")
            set_(self, f"{side}_scale", _finite_number(scale, f"{where}: {side}_scale", positive=True))
            zp = getattr(self, f"{side}_zero_point")
            if zp is None:
                zp = 0
            elif isinstance(zp, (float, np.floating)) and float(zp).is_integer():
                zp = int(zp)
            if isinstance(zp, bool) or not isinstance(zp, (int, np.integer)) or not -128 <= zp <= 127:
                raise NormgenError(f"{where}: {side}_zero_point must be an integer in [-128, 127] (an int8 value),"
                                   f" got {_short(zp)}")
            set_(self, f"{side}_zero_point", int(zp))
        set_(self, "arithmetic", _choice("float" if self.arithmetic is None else self.arithmetic,
                                         f"{where}: arithmetic", ARITHMETICS))

    def _check_int8(self) -> None:
        """What an int8 layer does not have: fused forms, run-time parameters, OpenMP."""
        if self.dtype != "int8":
            return
        where = f"layer {self.name!r}: dtype 'int8'"
        if self.fused:
            raise NormgenError(f"{where} has no fused forms (residual, activation, modulation); use float32")
        if self.param_storage != "embedded":
            raise NormgenError(f"{where} embeds its parameters (folded with the quantization when the code is"
                               f" generated): param_storage must be 'embedded', got {self.param_storage!r}")
        if self.parallel != "none":
            raise NormgenError(f"{where} runs on one thread: parallel must be 'none', got {self.parallel!r}")

    def quantize(self, y: np.ndarray, side: str = "output") -> np.ndarray:
        """Real values → int8 (dtype int8): round to nearest, ties to even, plus the zero point,
        saturated to [-128, 127]."""
        scale, zp = getattr(self, f"{side}_scale"), getattr(self, f"{side}_zero_point")
        q = np.rint(np.asarray(y, dtype=np.float64) / scale) + zp
        return np.clip(q, -128, 127).astype(np.int8)

    def dequantize(self, q: np.ndarray, side: str = "input") -> np.ndarray:
        """int8 → the real values they stand for, in float64: scale * (q - zero_point)."""
        scale, zp = getattr(self, f"{side}_scale"), getattr(self, f"{side}_zero_point")
        return scale * (np.asarray(q).astype(np.float64) - zp)

    def _resolve_fusion(self) -> None:
        """residual, residual_out, activation and modulation (README "Fused forms")."""
        where = f"layer {self.name!r}"
        for f in ("residual", "residual_out"):
            value = getattr(self, f)
            if not isinstance(value, (bool, np.bool_)):
                raise NormgenError(f"{where}: {f} must be true or false, got {_short(value)}")
            object.__setattr__(self, f, bool(value))
        if self.residual_out and not self.residual:
            raise NormgenError(f"{where}: residual_out = true writes h = x + residual; it needs residual = true")
        _choice(self.activation, f"{where}: activation", ACTIVATIONS)
        _choice(self.modulation, f"{where}: modulation", MODULATIONS)

    @property
    def fused(self) -> bool:
        """Whether any fused form is on (the functions then take more arguments)."""
        return self.residual or self.activation != "none" or self.modulation != "none"

    @property
    def modulation_count(self) -> int:
        """Values of shift and scale per sample (modulation): one per channel."""
        return self.channels

    #: The default of ``bias`` (RMSNorm: False).
    default_bias: ClassVar[bool] = True

    def _resolve_affine(self) -> None:
        """affine and bias → which of scale and offset exist, their shape and values."""
        set_ = object.__setattr__
        where = f"layer {self.name!r}"
        affine = _choice(self.affine, f"{where}: affine", AFFINES)
        bias = self.bias
        if bias is not None and not isinstance(bias, (bool, np.bool_)):
            raise NormgenError(f"{where}: bias must be true or false, got {_short(bias)}"
                               + ("; the values of β go in offset=" if not isinstance(bias, str) else ""))
        if affine == "none":
            if bias:
                raise NormgenError(f"{where}: bias = true needs an affine ('channel' or 'element'), affine is 'none'")
            bias = False
        elif bias is None:
            bias = self.default_bias
        set_(self, "bias", bool(bias))
        shape: tuple[int, ...] = (self.channels,)
        per = "one per channel"
        if affine == "element":
            shape = self.normalized_shape()
            per = f"one per element of the normalized dimensions {self.normalized_letters()!r}"
            if math.prod(shape) > MAX_PARAMS:
                raise NormgenError(
                    f"{where}: affine = 'element' needs {math.prod(shape)} values per parameter array (shape"
                    f" {shape}); at most {MAX_PARAMS} (2^24: they are embedded in the generated source)"
                )
        elif affine == "none":
            shape = ()
        set_(self, "param_shape", shape)
        set_(self, "has_scale", affine != "none")
        set_(self, "has_offset", bool(bias))
        count = int(np.prod(shape, dtype=np.int64)) if shape else self.channels
        for pname, default, present in (("scale", "ones", self.has_scale), ("offset", "zeros", self.has_offset)):
            given = getattr(self, pname)
            if not present:
                if given is not None:
                    why = "affine = 'none'" if affine == "none" else "bias = false"
                    raise NormgenError(f"{where}: {why}, but {pname} values were given; remove them")
                arr = np.ones(count) if default == "ones" else np.zeros(count)
                arr.setflags(write=False)
                set_(self, f"{pname}_values", arr)
                continue
            arr, src = _resolve_param(given, default, shape, pname, self.name, per)
            set_(self, f"{pname}_values", arr)
            self.sources[pname] = src

    @property
    def sizes(self) -> tuple[str, ...]:
        """The run-time sizes, in format order."""
        return tuple(d for d in self.dims if isinstance(d, str))

    def sizes_of(self, shape: Sequence[int]) -> dict[str, int]:
        """The run-time sizes of an array shaped for the layer (B included when the format has
        it): {name: size}; {} for a layer without run-time sizes."""
        letters = self.fmt.letters
        if len(shape) != len(letters):
            return {}
        dims = [n for ch, n in zip(letters, shape, strict=True) if ch != "B"]
        return {d: int(n) for d, n in zip(self.dims, dims, strict=True) if isinstance(d, str)}

    def at_sizes(self, sizes: dict[str, int]) -> Layer:
        """The same layer with its run-time sizes fixed (what one call computes)."""
        if not self.sizes:
            return self
        missing = [n for n in self.sizes if n not in sizes]
        if missing:
            raise NormgenError(f"layer {self.name!r}: no value for run-time size {missing[0]!r}")
        for n in self.sizes:
            v = sizes[n]
            if isinstance(v, bool) or not isinstance(v, (int, np.integer)) or v < 1:
                raise NormgenError(f"layer {self.name!r}: run-time size {n} = {_short(v)}; sizes are positive integers")
        dims = [int(sizes[d]) if isinstance(d, str) else d for d in self.dims]
        return self.replace(format=self.fmt.letters, shape=dims)

    def normalized_letters(self) -> str:
        """The letters one statistic normalizes over (B aside), in format order."""
        reduced = semantics(self).reduced
        return "".join(ch for ch in self.fmt.letters if ch != "B" and ch in reduced)

    def normalized_shape(self) -> tuple[int, ...]:
        """The sizes of :meth:`normalized_letters` (format order): an element affine's shape."""
        sem = semantics(self)
        if not sem.element_affine:
            raise NormgenError(
                f"layer {self.name!r}: affine = 'element' is for layernorm and rmsnorm (whose statistics cover"
                f" whole normalized dimensions); a {self.kind} layer takes 'channel' or 'none'"
            )
        letters = self.fmt.non_batch_letters()
        dynamic = [d for ch, d in zip(letters, self.dims, strict=True) if ch in sem.reduced and isinstance(d, str)]
        if dynamic:
            raise NormgenError(
                f"layer {self.name!r}: affine = 'element' needs the normalized dimensions' sizes when the code is"
                f" generated (its parameters have their shape); {dynamic[0]!r} is a run-time size"
            )
        positions = [i for i, ch in enumerate(self.fmt.letters) if ch != "B" and ch in sem.reduced]
        if positions != list(range(positions[0], positions[-1] + 1)):
            raise NormgenError(
                f"layer {self.name!r}: affine = 'element' needs the normalized dimensions {self.normalized_letters()!r}"
                f" next to each other in format {self.fmt.letters!r} (as PyTorch's trailing normalized_shape is)"
            )
        return tuple(d for ch, d in zip(letters, self.dims, strict=True) if ch in sem.reduced)

    # ---- derived facts -------------------------------------------------------------------------
    @property
    def is_batchnorm(self) -> bool:
        return self.kind == "batchnorm"

    def learnable_arrays(self) -> dict[str, np.ndarray]:
        """The learnable arrays the layer has (scale, offset), flattened."""
        out = {}
        if self.has_scale:
            out["scale"] = self.scale_values
        if self.has_offset:
            out["offset"] = self.offset_values
        return out

    def parameter_arrays(self) -> dict[str, np.ndarray]:
        """Every array the layer has, learnable first, in a fixed order."""
        return self.learnable_arrays()

    @property
    def param_count(self) -> int:
        """Values in each of scale and offset (the channels, or the normalized elements)."""
        return int(np.prod(self.param_shape, dtype=np.int64)) if self.param_shape else 0

    @property
    def learnable_count(self) -> int:
        return len(self.learnable_arrays()) * self.param_count

    @property
    def state_count(self) -> int:
        return 0

    def _kind_fields(self) -> list[tuple[str, object]]:
        return []

    def describe(self) -> list[tuple[str, str]]:
        """The full description as (key, value) text pairs: the provenance header of every file."""
        items: list[tuple[str, object]] = [("kind", self.kind), ("name", self.name)]
        if self.matlab_format is not None:
            items.append(("matlab_format", self.matlab_format))
        items += [
            ("format", self.fmt.letters),
            ("shape", list(self.dims)),
            ("num_channels", self.channels),
            ("dtype", self.dtype),
            ("epsilon", repr(self.epsilon)),
        ]
        items += self._kind_fields()
        if self.dtype == "int8":
            items += [(f, repr(getattr(self, f))) for f in QUANT_FIELDS]
        if self.affine != "channel" or self.bias != self.default_bias:
            items += [("affine", self.affine), ("bias", str(self.bias).lower())]
        if self.fused:
            items += [("residual", str(self.residual).lower()), ("residual_out", str(self.residual_out).lower()),
                      ("activation", self.activation), ("modulation", self.modulation)]
        if self.functions is not None:
            items.append(("functions", ", ".join(self.functions)))
        items += [
            ("param_storage", self.param_storage),
            ("parallel", self.parallel),
            *([("statistics", self.statistics)] if self.statistics != "double" else []),
            ("scale_learn_rate_factor", repr(self.scale_learn_rate_factor)),
            ("offset_learn_rate_factor", repr(self.offset_learn_rate_factor)),
            ("scale_l2_factor", repr(self.scale_l2_factor)),
            ("offset_l2_factor", repr(self.offset_l2_factor)),
        ]
        for pname, arr in self.parameter_arrays().items():
            digest = hashlib.sha256(np.ascontiguousarray(arr, dtype="<f8").tobytes()).hexdigest()[:16]
            items.append((pname, f"{self.sources[pname]}, sha256 {digest}"))
        return [(k, str(v)) for k, v in items]

    def replace(self, **changes: Any) -> Layer:
        """A copy with some constructor fields changed (validated again)."""
        args = {f.name: getattr(self, f.name) for f in fields(self) if f.init}
        args.update(changes)
        if "format" in changes and "matlab_format" not in changes:
            args["matlab_format"] = None
            if args.get("shape") is self.shape and self.matlab_format is not None:
                args["shape"] = list(self.dims)
        if "matlab_format" in changes and "format" not in changes:
            args["format"] = None
        return type(self)(**args)


@_guard_arguments
@dataclass(frozen=True, kw_only=True, eq=False)
class BatchNorm(Layer):
    """Batch normalization: one statistic per channel over B, S, T, U.

    ``mean_decay``/``variance_decay`` weight the *new* batch value (MATLAB's MeanDecay and
    VarianceDecay, PyTorch's momentum). ``running_variance`` says whether the running variance
    is updated with the unbiased (n/(n-1), PyTorch, the default) or biased batch variance.
    """

    kind: ClassVar[str] = "batchnorm"

    trained_mean: Initializer = "zeros"
    trained_variance: Initializer = "ones"
    mean_decay: float = 0.1
    variance_decay: float = 0.1
    running_variance: str = "unbiased"

    trained_mean_values: np.ndarray = field(init=False, repr=False)
    trained_variance_values: np.ndarray = field(init=False, repr=False)

    def _resolve_kind(self) -> None:
        set_ = object.__setattr__
        for f in ("mean_decay", "variance_decay"):
            set_(self, f, _finite_number(getattr(self, f), f"layer {self.name!r}: {f}", lo=0.0, hi=1.0))
        _choice(self.running_variance, f"layer {self.name!r}: running_variance", RUNNING_VARIANCE)
        for pname, default in (("trained_mean", "zeros"), ("trained_variance", "ones")):
            arr, src = _resolve_param(getattr(self, pname), default, (self.channels,), pname, self.name)
            set_(self, f"{pname}_values", arr)
            self.sources[pname] = src
        neg = np.flatnonzero(self.trained_variance_values < 0)
        if neg.size:
            raise NormgenError(
                f"trained_variance of layer {self.name!r} has a negative value "
                f"{float(self.trained_variance_values[neg[0]])} at index {neg[0]}"
            )

    def parameter_arrays(self) -> dict[str, np.ndarray]:
        return {
            **self.learnable_arrays(),
            "trained_mean": self.trained_mean_values,
            "trained_variance": self.trained_variance_values,
        }

    @property
    def state_count(self) -> int:
        return 2 * self.channels

    def _kind_fields(self) -> list[tuple[str, object]]:
        return [
            ("mean_decay", repr(self.mean_decay)),
            ("variance_decay", repr(self.variance_decay)),
            ("running_variance", self.running_variance),
        ]


@_guard_arguments
@dataclass(frozen=True, kw_only=True, eq=False)
class GroupNorm(Layer):
    """Group normalization: one statistic per (batch, group) over S, T, U and the group's channels.

    ``num_groups`` is a positive integer dividing the channel count, ``"allchannels"`` (one group:
    layer norm over everything but B) or ``"channelwise"`` (one group per channel: instance norm).
    """

    kind: ClassVar[str] = "groupnorm"

    num_groups: int | str = 1
    groups: int = field(init=False, repr=False)

    def _resolve_kind(self) -> None:
        g = self.num_groups
        if isinstance(g, str) and g == "allchannels":
            groups = 1
        elif isinstance(g, str) and g == "channelwise":
            groups = self.channels
        elif isinstance(g, bool) or not isinstance(g, (int, np.integer)) or g < 1:
            raise NormgenError(
                f"layer {self.name!r}: num_groups must be a positive integer, 'allchannels' or 'channelwise', got {_short(g)}"
            )
        else:
            groups = int(g)
            if self.channels % groups:
                raise NormgenError(
                    f"layer {self.name!r}: num_groups {groups} does not divide the {self.channels} channels"
                    f" ({self.channels} / {groups} is not an integer)"
                )
        object.__setattr__(self, "groups", groups)

    def _kind_fields(self) -> list[tuple[str, object]]:
        return [("num_groups", self.num_groups), ("groups", self.groups)]


@_guard_arguments
@dataclass(frozen=True, kw_only=True, eq=False)
class LayerNorm(Layer):
    """Layer normalization with MATLAB's OperationDimension.

    ``"auto"`` is ``"spatial-channel"`` when the format has two or more S and no T, otherwise
    ``"channel-only"``.
    """

    kind: ClassVar[str] = "layernorm"

    operation_dimension: str = "auto"
    resolved_dimension: str = field(init=False, repr=False)

    def _resolve_kind(self) -> None:
        od = _choice(self.operation_dimension, f"layer {self.name!r}: operation_dimension", OPERATION_DIMENSIONS)
        if od == "auto":
            letters = self.fmt.letters
            od = "spatial-channel" if letters.count("S") >= 2 and "T" not in letters else "channel-only"
        object.__setattr__(self, "resolved_dimension", od)

    def _kind_fields(self) -> list[tuple[str, object]]:
        return [("operation_dimension", self.operation_dimension), ("resolved_dimension", self.resolved_dimension)]


@_guard_arguments
@dataclass(frozen=True, kw_only=True, eq=False)
class InstanceNorm(Layer):
    """Instance normalization: one statistic per (batch, channel) over S, T, U."""

    kind: ClassVar[str] = "instancenorm"


@_guard_arguments
@dataclass(frozen=True, kw_only=True, eq=False)
class RMSNorm(LayerNorm):
    """Root-mean-square normalization (LLaMA, T5; PyTorch ``nn.RMSNorm``, ONNX RMSNormalization):
    y = γ·x/√(mean(x²) + ε) over the same statistic domains as layer norm (``operation_dimension``,
    default ``"channel-only"``); no mean is subtracted. Scale only by default (``bias=False``)."""

    kind: ClassVar[str] = "rmsnorm"
    default_bias: ClassVar[bool] = False

    operation_dimension: str = "channel-only"


KINDS: dict[str, type[Layer]] = {cls.kind: cls for cls in (BatchNorm, GroupNorm, LayerNorm, InstanceNorm, RMSNorm)}
