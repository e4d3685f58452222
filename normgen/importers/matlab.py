"""Trained parameters from MATLAB MAT-files: ``params = "bn.mat"`` in a spec, ``normgen.load_params``.

A MAT-file holds a layer's arrays under MATLAB's property names (``TrainedMean``,
``TrainedVariance``, ``Scale``, ``Offset``) or normgen's (``trained_mean``, ``trained_variance``,
``scale``, ``offset``), as variables of their own (``save('bn.mat', '-struct', 's')``) or as the
fields of one struct variable (``save('bn.mat', 's')``). Files up to v7 are read with
scipy.io; v7.3 files are HDF5 (a 512-byte MATLAB header, then HDF5) and are read with h5py, where
MATLAB's column-major arrays appear with their dimensions reversed and each variable carries a
``MATLAB_class`` attribute. Both packages are the ``matlab`` extra (``pip install 'normgen[matlab]'``).

Shapes are MATLAB's: a per-channel array may be 1×…×1×C (MATLAB's image layers keep 1×1×C),
C×1 or 1×C: every dimension but C is 1. With ``affine = "element"``, scale and offset have the
normalized dimensions in MATLAB's order (``matlab_format``'s, the reverse of ``format``'s), with
dimensions of 1 anywhere. Values are single or double. Every array the layer has must be there,
and nothing else.
"""

from __future__ import annotations

import math
from pathlib import Path

import numpy as np

from ..description.layers import MAX_PARAMS, Layer
from ..description.spec import PARAM_READERS
from ..errors import NormgenError

#: MATLAB's property name → normgen's.
MATLAB_NAMES = {"TrainedMean": "trained_mean", "TrainedVariance": "trained_variance", "Scale": "scale",
                "Offset": "offset"}
NORMGEN_NAMES = {v: k for k, v in MATLAB_NAMES.items()}
#: The first bytes of an HDF5 file (at 0, or after a user block such as MATLAB's 512 bytes).
HDF5_SIGNATURE = b"\x89HDF\r\n\x1a\n"


def _size(shape) -> str:
    """A shape as MATLAB writes a size: 1x1x4."""
    dims = list(shape) + [1] * (2 - len(shape))
    return "x".join(str(d) for d in dims)


def _scipy_io():
    try:
        import scipy.io
    except ImportError:
        raise NormgenError("reading MAT-files (v7 and earlier) needs scipy: pip install 'normgen[matlab]'") from None
    return scipy.io


def _h5py():
    try:
        import h5py
    except ImportError:
        raise NormgenError("reading MAT-files v7.3 (HDF5) needs h5py: pip install 'normgen[matlab]'") from None
    return h5py


def _numbers(value, var: str, where: str) -> np.ndarray:
    """A MATLAB numeric array as NumPy holds it, in MATLAB's dimension order."""
    if isinstance(value, np.ndarray) and value.dtype.kind in "fc" and value.dtype.names is None:
        if value.dtype.kind == "c":
            raise NormgenError(f"{where}: variable {var!r} is complex; parameters are real single or double")
        return value
    what = type(value).__name__
    if isinstance(value, np.ndarray):
        kind = value.dtype.kind
        what = ("a struct" if value.dtype.names else "text" if kind in "US" else "a cell array" if kind == "O"
                else f"{value.dtype} values")
    elif hasattr(value, "tocsc"):
        what = "a sparse matrix"
    raise NormgenError(f"{where}: variable {var!r} holds {what}; parameters are single or double arrays")


def _read_v5(path: Path, where: str) -> dict[str, object]:
    sio = _scipy_io()
    try:
        listed = sio.whosmat(str(path))
    except Exception as exc:  # scipy's own errors for a damaged or foreign file
        raise NormgenError(f"{where}: params file {str(path)!r} is not a readable MAT-file ({exc})") from None
    for name, shape, cls in listed:
        count = math.prod(shape)
        if cls not in ("struct", "object") and count > MAX_PARAMS:
            raise NormgenError(f"{where}: params file {str(path)!r}: variable {name!r} is {_size(shape)} {cls}"
                               f" ({count} values); a parameter array has at most {MAX_PARAMS}")
        if cls in ("object", "opaque"):
            raise NormgenError(
                f"{where}: params file {str(path)!r}: variable {name!r} is a MATLAB object, which only MATLAB reads;"
                " save its properties instead: s.TrainedMean = layer.TrainedMean; ... save('bn.mat', '-struct', 's')")
    try:
        data = sio.loadmat(str(path), squeeze_me=False, struct_as_record=True, mat_dtype=False)
    except Exception as exc:
        raise NormgenError(f"{where}: params file {str(path)!r} is not a readable MAT-file ({exc})") from None
    out: dict[str, object] = {}
    for name, value in data.items():
        if name.startswith("__"):
            continue  # __header__, __version__, __globals__
        if isinstance(value, np.ndarray) and value.dtype.names:
            if value.size != 1:
                raise NormgenError(f"{where}: params file {str(path)!r}: variable {name!r} is a {_size(value.shape)}"
                                   " struct array; a struct of parameters is 1x1")
            out[name] = {f: value.flat[0][f] for f in value.dtype.names}
        else:
            out[name] = value
    return out


def _h5_array(ds, var: str, where: str):
    cls = ds.attrs.get("MATLAB_class", b"")
    cls = cls.decode() if isinstance(cls, bytes) else str(cls)
    if ds.attrs.get("MATLAB_empty", 0):
        return np.zeros((0, 0))
    if cls not in ("single", "double"):
        raise NormgenError(f"{where}: variable {var!r} is MATLAB class {cls or 'unknown'!r}; parameters are single"
                           " or double arrays")
    if ds.dtype.names is not None:
        raise NormgenError(f"{where}: variable {var!r} is complex; parameters are real single or double")
    count = math.prod(ds.shape)
    if count > MAX_PARAMS:
        raise NormgenError(f"{where}: variable {var!r} is {_size(ds.shape[::-1])} {cls} ({count} values); a"
                           f" parameter array has at most {MAX_PARAMS}")
    # HDF5 keeps MATLAB's column-major array with its dimensions reversed: transposed back, it
    # has MATLAB's shape (and Fortran order)
    return np.asarray(ds[()]).T


def _read_v73(path: Path, where: str) -> dict[str, object]:
    h5py = _h5py()
    out: dict[str, object] = {}
    try:
        with h5py.File(path, "r") as f:
            for name, item in f.items():
                if name.startswith("#"):
                    continue  # #refs#, #subsystem#: what cells and objects point into
                cls = item.attrs.get("MATLAB_class", b"")
                cls = cls.decode() if isinstance(cls, bytes) else str(cls)
                if isinstance(item, h5py.Group):
                    if cls != "struct":
                        raise NormgenError(f"{where}: params file {str(path)!r}: variable {name!r} is MATLAB class"
                                           f" {cls or 'unknown'!r}; save its properties as arrays or a struct")
                    fields = {}
                    for field, ds in item.items():
                        if not isinstance(ds, h5py.Dataset):
                            raise NormgenError(f"{where}: params file {str(path)!r}: field {name}.{field} is not an"
                                               " array; parameters are single or double arrays")
                        fields[field] = _h5_array(ds, f"{name}.{field}", where)
                    out[name] = fields
                elif ds_is_reference(item):
                    raise NormgenError(f"{where}: params file {str(path)!r}: variable {name!r} is a MATLAB"
                                       f" {cls or 'cell or object'}; parameters are single or double arrays")
                else:
                    out[name] = _h5_array(item, name, where)
    except NormgenError:
        raise
    except Exception as exc:  # h5py's errors for a damaged file
        raise NormgenError(f"{where}: params file {str(path)!r} is not a readable MAT-file v7.3 ({exc})") from None
    return out


def ds_is_reference(ds) -> bool:
    """A v7.3 cell array or object: a dataset of HDF5 object references."""
    return ds.dtype.kind == "O"


def _variables(path: Path, where: str) -> dict[str, object]:
    """The MAT-file's variables (a struct as a dict of its fields), arrays in MATLAB's shape."""
    if not path.is_file():
        raise NormgenError(f"{where}: params file {str(path)!r} does not exist")
    with open(path, "rb") as fh:
        head = fh.read(520)
    if head.startswith(HDF5_SIGNATURE):
        raise NormgenError(
            f"{where}: params file {str(path)!r} is an HDF5 file without MATLAB's header (GNU Octave's save -hdf5"
            " writes these, in a layout of its own): save it with save -v7 (Octave has no -v7.3)")
    if head[512:520] == HDF5_SIGNATURE:
        if not head.startswith(b"MATLAB 7.3 MAT-file"):
            raise NormgenError(f"{where}: params file {str(path)!r} is HDF5 behind a header that is not MATLAB 7.3's")
        return _read_v73(path, where)
    return _read_v5(path, where)


def _needed(layer: Layer) -> dict[str, tuple[tuple[int, ...], str]]:
    """normgen name → (the shape MATLAB gives it, in MATLAB's order; what it is)."""
    per_channel = ((layer.channels,), f"{layer.channels} values, one per channel")
    need = {}
    if layer.has_scale:
        need["scale"] = per_channel
    if layer.has_offset:
        need["offset"] = per_channel
    if layer.affine == "element":
        shape = tuple(layer.param_shape[::-1])
        what = (f"{math.prod(shape)} values, one per element of the normalized dimensions"
                f" {layer.normalized_letters()[::-1]!r} in MATLAB's order")
        need = {k: (shape, what) for k in need}
    if layer.kind == "batchnorm":
        need["trained_mean"] = per_channel
        need["trained_variance"] = per_channel
    return need


def _without_ones(shape) -> tuple[int, ...]:
    return tuple(d for d in shape if d != 1)


def read_mat(path: str | Path, layer: Layer, where: str = "") -> dict[str, np.ndarray]:
    """The layer's arrays from a MAT-file, shaped as the layer's constructor takes them (keyed by
    normgen's names): per channel (C,), per element ``layer.param_shape``."""
    path = Path(path)
    where = where or f"layer {layer.name!r}"
    variables = _variables(path, where)
    if len(variables) == 1 and isinstance(next(iter(variables.values())), dict):
        struct, fields = next(iter(variables.items()))
        variables = {f"{struct}.{k}": v for k, v in fields.items()}
    elif any(isinstance(v, dict) for v in variables.values()):
        name = next(k for k, v in variables.items() if isinstance(v, dict))
        raise NormgenError(f"{where}: params file {str(path)!r} has struct {name!r} beside other variables; save"
                           " either one struct of the parameters or the parameters themselves")
    need = _needed(layer)
    found: dict[str, tuple[str, np.ndarray]] = {}
    for var, value in variables.items():
        base = var.rsplit(".", 1)[-1]
        key = MATLAB_NAMES.get(base, base)
        if key not in need:
            allowed = ", ".join(f"{NORMGEN_NAMES[k]} (or {k})" for k in need)
            arr = value if isinstance(value, np.ndarray) else None
            shown = f" ({_size(arr.shape)} {arr.dtype})" if arr is not None else ""
            why = ""
            if key in NORMGEN_NAMES:
                why = (" (the layer has affine = 'none')" if key in ("scale", "offset") and not layer.has_scale else
                       " (the layer has bias = false)" if key == "offset" else f" (a {layer.kind} layer has none)")
            raise NormgenError(f"{where}: params file {str(path)!r} has variable {var!r}{shown}{why}; layer"
                               f" {layer.name!r} takes {allowed}")
        if key in found:
            raise NormgenError(f"{where}: params file {str(path)!r} has both {found[key][0]!r} and {var!r}, the same"
                               " array; keep one")
        found[key] = (var, _numbers(value, var, f"{where}: params file {str(path)!r}"))
    missing = [k for k in need if k not in found]
    if missing:
        k = missing[0]
        shape, what = need[k]
        need_text = (f"{what} (1x...x1x{shape[0]}, {shape[0]}x1 or 1x{shape[0]})" if len(shape) == 1
                     else f"{_size(shape)}, {what}")
        raise NormgenError(f"{where}: params file {str(path)!r} has no variable {NORMGEN_NAMES[k]!r} (or {k!r});"
                           f" layer {layer.name!r} needs it: {need_text}")
    out: dict[str, np.ndarray] = {}
    for key, (var, arr) in found.items():
        shape, what = need[key]
        if arr.size != math.prod(shape) or _without_ones(arr.shape) != _without_ones(shape):
            need_text = (f"{what}: 1x...x1x{shape[0]}, {shape[0]}x1 or 1x{shape[0]}" if len(shape) == 1
                         else f"{_size(shape)} (dimensions of 1 may be added or left out), {what}")
            raise NormgenError(f"{where}: params file {str(path)!r}: variable {var!r} is {_size(arr.shape)}"
                               f" ({arr.size} values); layer {layer.name!r} needs {need_text}")
        # MATLAB's column-major order is normgen's row-major order of the reversed dimensions
        values = np.asarray(arr, dtype=np.float64).reshape(-1, order="F")
        out[key] = values.reshape(layer.param_shape) if key in ("scale", "offset") else values
    return out


PARAM_READERS[".mat"] = read_mat
