"""Imported layers → a spec file and one .npz per layer, as ``normgen emit/check/show`` read them.

The files are rendered before any is written, are byte-identical for the same layers (the .npz
archives carry a fixed time stamp), and a file is rewritten only when its bytes change.
"""

from __future__ import annotations

import io
import json
import os
import tempfile
import zipfile
from collections.abc import Sequence
from pathlib import Path

import numpy as np

from .. import __version__
from ..description.layers import QUANT_FIELDS, Layer
from ..errors import NormgenError


def _toml_value(value) -> str:
    if isinstance(value, bool):
        return "true" if value else "false"
    if isinstance(value, (int, np.integer)):
        return str(int(value))
    if isinstance(value, float):
        return repr(value)
    if isinstance(value, str):
        return json.dumps(value)
    if isinstance(value, (list, tuple)):
        return "[" + ", ".join(_toml_value(v) for v in value) + "]"
    raise TypeError(f"no TOML spelling for {value!r}")


def table(layer: Layer, params: str | None) -> dict[str, object]:
    """The spec keys that describe ``layer`` (its defaults spelled out)."""
    keys: dict[str, object] = {
        "name": layer.name, "kind": layer.kind, "format": layer.fmt.letters, "shape": list(layer.dims),
        "dtype": layer.dtype, "epsilon": float(layer.epsilon),
    }
    if layer.kind == "groupnorm":
        keys["num_groups"] = layer.groups
    if layer.kind in ("layernorm", "rmsnorm"):
        keys["operation_dimension"] = layer.resolved_dimension
    keys["affine"] = layer.affine
    keys["bias"] = layer.bias
    if layer.dtype == "int8":
        keys.update((f, getattr(layer, f)) for f in QUANT_FIELDS)
    if layer.kind == "batchnorm":
        keys.update(mean_decay=layer.mean_decay, variance_decay=layer.variance_decay,
                    running_variance=layer.running_variance)
    if params is not None:
        keys["params"] = params
    return keys


def arrays(layer: Layer) -> dict[str, np.ndarray]:
    """The layer's parameter arrays shaped as a spec's .npz holds them (scale and offset in
    ``param_shape``, trained statistics one per channel)."""
    out = {}
    for key, values in layer.parameter_arrays().items():
        shape = layer.param_shape if key in ("scale", "offset") else (layer.channels,)
        out[key] = np.ascontiguousarray(values, dtype=np.float64).reshape(shape)
    return out


def npz_bytes(named: dict[str, np.ndarray]) -> bytes:
    """An .npz archive (what np.savez writes) with a fixed time stamp: the same arrays, the same bytes."""
    buf = io.BytesIO()
    with zipfile.ZipFile(buf, "w", compression=zipfile.ZIP_STORED) as zf:
        for key, arr in named.items():
            member = io.BytesIO()
            np.lib.format.write_array(member, np.asarray(arr), allow_pickle=False)
            zf.writestr(zipfile.ZipInfo(f"{key}.npy", date_time=(1980, 1, 1, 0, 0, 0)), member.getvalue())
    return buf.getvalue()


def spec_files(layers: Sequence[Layer], model: str, source: str, comments: Sequence[str] | None = None
               ) -> dict[str, bytes]:
    """{file name: bytes}: ``<model>.toml`` with one ``[[layer]]`` per layer and ``<layer>.npz``
    for each layer that has parameters. ``comments`` (one per layer) say where each came from."""
    if not layers:
        raise NormgenError(f"{source}: no normalization layer to write")
    lines = [f"# Imported by normgen {__version__} from {source}.",
             "# normgen emit / check / show take this file as it is; the .npz files beside it hold the parameters.", ""]
    files: dict[str, bytes] = {}
    for i, layer in enumerate(layers):
        named = arrays(layer)
        params = f"{layer.name}.npz" if named else None
        if params:
            files[params] = npz_bytes(named)
        if comments and comments[i]:
            lines.append(f"# {comments[i]}")
        lines.append("[[layer]]")
        lines += [f"{k} = {_toml_value(v)}" for k, v in table(layer, params).items()]
        lines.append("")
    files[f"{model}.toml"] = "\n".join(lines).encode("utf-8")
    return files


def umask() -> int:
    """The process's umask, read without changing it where Linux says it (/proc/self/status)."""
    try:
        with open("/proc/self/status", encoding="ascii") as fh:
            for line in fh:
                if line.startswith("Umask:"):
                    return int(line.split()[1], 8)
    except (OSError, ValueError):
        pass
    mask = os.umask(0o022)
    os.umask(mask)
    return mask


def write_files(outdir: Path, files: dict[str, bytes]) -> list[str]:
    """Write the files whose bytes changed (each atomically); returns the names written."""
    if outdir.exists() and not outdir.is_dir():
        raise NormgenError(f"output {str(outdir)!r} exists and is not a directory")
    outdir.mkdir(parents=True, exist_ok=True)
    written = []
    for fname, data in files.items():
        path = outdir / fname
        if path.is_file() and path.read_bytes() == data:
            continue
        fd, tmp = tempfile.mkstemp(dir=outdir, prefix=f".{fname}.")
        with os.fdopen(fd, "wb") as fh:
            os.fchmod(fh.fileno(), 0o666 & ~umask())  # what open() gives, not mkstemp's 0600
            fh.write(data)
        os.replace(tmp, path)
        written.append(fname)
    return written
