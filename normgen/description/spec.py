"""TOML spec files: one ``[[layer]]`` table per layer.

Keys (all but ``name``, ``kind``, a format and ``shape`` optional)::

    name, kind, format | matlab_format, shape, num_channels, dtype, epsilon,
    num_groups (groupnorm), operation_dimension (layernorm, rmsnorm),
    mean_decay, variance_decay, running_variance (batchnorm),
    affine ("channel" | "element" | "none"), bias (true | false),
    scale_learn_rate_factor, offset_learn_rate_factor, scale_l2_factor, offset_l2_factor,
    param_storage, parallel, statistics ("double" | "float"), params,
    functions (the functions to generate, by role: ["predict", ...]; default every one),
    input_scale, input_zero_point, output_scale, output_zero_point (dtype "int8" only:
    real = scale * (q - zero_point); the scales required, the zero points default 0),
    arithmetic (dtype "int8": "float", the default, or "integer": no float at run time)

``params`` is a .npz path relative to the spec file with arrays ``scale``, ``offset`` and, for
batch norm, ``trained_mean`` and ``trained_variance``; arrays it lacks take the initializers
(scale ones, offset zeros, trained mean zeros, trained variance ones). With ``affine =
"element"`` scale and offset have the normalized dimensions' shape; with ``bias = false`` (or
``affine = "none"``) the file must not have the arrays the layer lacks. A ``.mat`` path is a
MATLAB MAT-file, read by the reader :mod:`normgen.importers.matlab` adds to ``PARAM_READERS``
(it must hold every array the layer has).
"""

from __future__ import annotations

import difflib
import math
import sys
import zipfile
from collections.abc import Callable
from pathlib import Path

import numpy as np

from ..errors import NormgenError
from .layers import FOREIGN_NAMES, KINDS, MAX_NAME, MAX_PARAMS, Layer

if sys.version_info >= (3, 11):
    import tomllib
else:  # pragma: no cover
    import tomli as tomllib

COMMON_KEYS = (
    "name", "kind", "format", "matlab_format", "shape", "num_channels", "dtype", "epsilon",
    "scale_learn_rate_factor", "offset_learn_rate_factor", "scale_l2_factor", "offset_l2_factor",
    "param_storage", "parallel", "statistics", "params", "affine", "bias",
    "residual", "residual_out", "activation", "modulation", "functions",
    "input_scale", "input_zero_point", "output_scale", "output_zero_point", "arithmetic",
)
KIND_KEYS = {
    "batchnorm": ("mean_decay", "variance_decay", "running_variance"),
    "groupnorm": ("num_groups",),
    "layernorm": ("operation_dimension",),
    "instancenorm": (),
    "rmsnorm": ("operation_dimension",),
}
ALL_KEYS = set(COMMON_KEYS).union(*KIND_KEYS.values())
#: Readers of parameter files other than .npz, by suffix: (path, layer, where) → the layer's
#: arrays, shaped as its constructor takes them. The importers add theirs (normgen.importers.matlab:
#: ".mat"); the description does not import them.
PARAM_READERS: dict[str, Callable[[Path, Layer, str], dict[str, np.ndarray]]] = {}
PARAM_ARRAYS = {
    "batchnorm": ("scale", "offset", "trained_mean", "trained_variance"),
    "groupnorm": ("scale", "offset"),
    "layernorm": ("scale", "offset"),
    "instancenorm": ("scale", "offset"),
    "rmsnorm": ("scale", "offset"),
}


def _check_npz_headers(path: Path, where: str) -> None:
    """Read each array's .npy header, and refuse what is no parameter array (too many values for
    any layer, not numbers), before NumPy allocates it."""
    if not zipfile.is_zipfile(path):
        return  # np.load says what it is not
    try:
        with zipfile.ZipFile(path) as zf:
            for info in zf.infolist():
                key = info.filename[:-4] if info.filename.endswith(".npy") else info.filename
                with zf.open(info) as fh:
                    version = np.lib.format.read_magic(fh)
                    read = np.lib.format.read_array_header_1_0 if version == (1, 0) else np.lib.format.read_array_header_2_0
                    shape, _, dtype = read(fh)
                count = math.prod(shape)
                if dtype.kind not in "iuf":
                    raise NormgenError(f"{where}: params file {str(path)!r}: array {key!r} holds {dtype} values, not"
                                       " numbers (integers or floats)")
                if count > MAX_PARAMS:
                    raise NormgenError(f"{where}: params file {str(path)!r}: array {key!r} has shape {shape}"
                                       f" ({count} values); a parameter array has at most {MAX_PARAMS}")
    except NormgenError:
        raise
    except Exception as exc:  # a damaged archive or member: whatever zipfile and NumPy raise
        raise NormgenError(f"{where}: params file {str(path)!r} is not a readable .npz file ({exc})") from None


def _load_params(path: Path, kind: str, where: str) -> dict[str, np.ndarray]:
    if not path.is_file():
        raise NormgenError(f"{where}: params file {str(path)!r} does not exist")
    if path.suffix.lower() in (".pt", ".pth") or (zipfile.is_zipfile(path) and any(
            n.endswith("data.pkl") for n in zipfile.ZipFile(path).namelist())):
        raise NormgenError(f"{where}: params file {str(path)!r} is a PyTorch checkpoint, not a NumPy .npz: build the"
                           " layer with normgen.from_torch(module) (after module.load_state_dict(torch.load(...))),"
                           " or export the model to ONNX and run normgen import")
    _check_npz_headers(path, where)
    try:
        with np.load(path, allow_pickle=False) as data:
            arrays = {k: np.array(data[k]) for k in data.files}
    except (OSError, ValueError, zipfile.BadZipFile, EOFError) as exc:
        # np.load's guess about a file that is no zip archive (a pickle) only confuses here
        why = exc if zipfile.is_zipfile(path) else "not a NumPy .npz archive"
        raise NormgenError(f"{where}: params file {str(path)!r} is not a readable .npz file ({why})") from None
    allowed = PARAM_ARRAYS[kind]
    for name in arrays:
        if name not in allowed:
            raise NormgenError(
                f"{where}: params file {str(path)!r} has array {name!r}; a {kind} layer takes {', '.join(allowed)}"
            )
    return arrays


def layer_from_table(table: dict, base: Path, where: str) -> Layer:
    """One ``[[layer]]`` table → a validated layer (``base``: the spec's folder, for ``params``)."""
    if not isinstance(table, dict):
        raise NormgenError(f"{where}: each [[layer]] must be a table, got {table!r}")
    unknown = sorted(set(table) - ALL_KEYS)
    if unknown:
        key = unknown[0]
        if key in FOREIGN_NAMES:
            hint = f"normgen's is {FOREIGN_NAMES[key].format(v=table[key])}"
        else:
            close = difflib.get_close_matches(str(key), sorted(ALL_KEYS), n=1)
            hint = f"did you mean {close[0]!r}?" if close else f"allowed keys are {', '.join(sorted(ALL_KEYS))}"
        raise NormgenError(f"{where}: unknown key {key!r}; {hint}")
    for required in ("name", "kind", "shape"):
        if required not in table:
            raise NormgenError(f"{where}: missing key {required!r}")
    kind = table["kind"]
    if not isinstance(kind, str) or kind not in KINDS:
        raise NormgenError(f"{where}: unknown kind {kind!r}; kinds are {', '.join(KINDS)}")
    name = table["name"]
    if isinstance(name, str):
        where = f"{where} ({name if len(name) <= MAX_NAME else name[:MAX_NAME] + '...'!r})"
    for key in table:
        for other, keys in KIND_KEYS.items():
            if key in keys and key not in KIND_KEYS[kind] and other != kind:
                raise NormgenError(f"{where}: key {key!r} is for {other} layers, not {kind}")
    args = {k: v for k, v in table.items() if k not in ("kind", "params")}
    reader = None
    if "params" in table:
        if not isinstance(table["params"], str):
            raise NormgenError(f"{where}: params must be a path to a .npz or .mat file, got {table['params']!r}")
        path = base / table["params"]
        reader = PARAM_READERS.get(path.suffix.lower())
        if reader is None:
            args.update(_load_params(path, kind, where))
    try:
        layer = KINDS[kind](**args)
    except NormgenError as exc:
        raise NormgenError(f"{where}: {exc}") from None
    if reader is None:
        return layer
    # a reader that checks shapes against the layer: the layer first, its arrays after
    arrays = reader(path, layer, where)
    try:
        return layer.replace(**arrays)
    except NormgenError as exc:
        raise NormgenError(f"{where}: params file {table['params']!r}: {exc}") from None


def load_params(path: str | Path, layer: Layer) -> dict[str, np.ndarray]:
    """The arrays of a parameter file for ``layer``, keyed and shaped as its constructor takes them:
    ``layer.replace(**normgen.load_params("bn.mat", layer))``. A ``.mat`` file (MATLAB, read by
    :mod:`normgen.importers.matlab`) must hold every array the layer has; a ``.npz`` file any of them."""
    path = Path(path)
    reader = PARAM_READERS.get(path.suffix.lower())
    where = f"layer {layer.name!r}"
    if reader is not None:
        return reader(path, layer, where)
    return _load_params(path, layer.kind, where)


def load_spec(path: str | Path) -> list[Layer]:
    """Read a TOML spec file into its validated layers."""
    path = Path(path)
    if not path.is_file():
        raise NormgenError(f"spec file {str(path)!r} does not exist")
    try:
        data = tomllib.loads(path.read_text(encoding="utf-8"))
    except (tomllib.TOMLDecodeError, UnicodeDecodeError) as exc:
        raise NormgenError(f"spec file {str(path)!r} is not valid TOML: {exc}") from None
    extra = sorted(set(data) - {"layer"})
    if extra:
        raise NormgenError(f"spec file {str(path)!r}: unknown top-level key {extra[0]!r}; use [[layer]] tables")
    tables = data.get("layer")
    if not isinstance(tables, list) or not tables:
        raise NormgenError(f"spec file {str(path)!r} has no [[layer]] tables")
    layers = [layer_from_table(t, path.parent, f"{path.name}: layer {i + 1}") for i, t in enumerate(tables)]
    seen: dict[str, int] = {}
    for i, layer in enumerate(layers):
        if layer.name in seen:
            raise NormgenError(
                f"{path.name}: layers {seen[layer.name] + 1} and {i + 1} are both named {layer.name!r}"
            )
        twin = next((n for n in seen if n.lower() == layer.name.lower()), None)
        if twin is not None:
            # NAME.h of one would overwrite the other's on a case-insensitive file system (macOS,
            # Windows), and both headers would define the same NAME_OK, ... macros
            raise NormgenError(
                f"{path.name}: layers {seen[twin] + 1} and {i + 1} are named {twin!r} and {layer.name!r}, which"
                " differ only in case: their files and macros (NAME.h, NAME_OK) would collide; rename one"
            )
        seen[layer.name] = i
    return layers
