"""Keras models → normgen layers: ``normgen.from_keras`` and ``normgen import MODEL.keras|.h5``.

Read without TensorFlow or Keras: a ``.keras`` file is a zip archive whose ``config.json`` holds
the model and whose ``model.weights.h5`` holds the weights (read with h5py), under
``layers/<snake_case class name>[_n]/vars/<i>`` in the order the layers were built; a legacy
``.h5`` file holds the model in its ``model_config`` attribute and the weights by name under
``model_weights/<layer>``. Layers read (README "From your framework"):

* ``BatchNormalization``: batchnorm; Keras's momentum m weighs the *old* value, so mean_decay =
  variance_decay = 1 − m, biased running variance; ``center``/``scale`` → bias/affine;
* ``LayerNormalization``: layernorm over its axes (the trailing ones), γ and β per element of
  them (per channel for the last axis alone); ``RMSNormalization``: rmsnorm the same way
  (LayerNormalization's deprecated ``rms_scaling = True`` divides by the variance without
  subtracting the mean, which no normgen layer does: an error);
* ``GroupNormalization``: groupnorm.

Keras is channels-last: the channel axis (``axis = -1``) is the last letter (``"BSSC"``).
"""

from __future__ import annotations

import io
import json
import re
import zipfile
from pathlib import Path
from typing import Any

import numpy as np

from ..description.layers import BatchNorm, GroupNorm, Layer, LayerNorm, RMSNorm
from ..errors import NormgenError
from .common import c_identifier, distinct, trailing_layout

KERAS_NORMS = ("BatchNormalization", "LayerNormalization", "GroupNormalization", "RMSNormalization")


def _h5py():
    try:
        import h5py
    except ImportError:  # pragma: no cover - the [keras] extra
        raise NormgenError("reading Keras models needs h5py: pip install 'normgen[keras]'") from None
    return h5py


def _snake(name: str) -> str:
    """Keras's ``naming.to_snake_case``: how a .keras file names a layer's weights."""
    name = re.sub(r"\W+", "", name)
    name = re.sub("(.)([A-Z][a-z]+)", r"\1_\2", name)
    return re.sub("([a-z])([A-Z])", r"\1_\2", name).lower()


def _input_shape(layer: dict) -> list | None:
    build = layer.get("build_config") or {}
    if isinstance(build.get("input_shape"), list):
        return build["input_shape"]
    cfg = layer.get("config", {})
    for key in ("batch_shape", "batch_input_shape"):
        if isinstance(cfg.get(key), list):
            return cfg[key]
    for node in layer.get("inbound_nodes") or []:
        if isinstance(node, dict):
            args = node.get("args") or []
            if args and isinstance(args[0], dict) and isinstance(args[0].get("config", {}).get("shape"), list):
                return args[0]["config"]["shape"]
    return None


class _Weights:
    """A layer's weight arrays by role (gamma, beta, moving_mean, moving_variance)."""

    def __init__(self, h5, legacy: bool):
        self.h5 = h5
        self.legacy = legacy

    def get(self, key: str, layer: dict, roles: list[str], where: str) -> dict[str, np.ndarray]:
        if self.legacy:
            group = self.h5["model_weights"].get(layer["config"]["name"]) if "model_weights" in self.h5 else None
            if group is None:
                raise NormgenError(f"{where}: the file has no weights for it")
            found: dict[str, np.ndarray] = {}
            for wname in group.attrs.get("weight_names", []):
                wname = wname.decode() if isinstance(wname, bytes) else str(wname)
                role = wname.split("/")[-1].split(":")[0]
                found[role] = np.array(group[wname])
            missing = [r for r in roles if r not in found]
            if missing:
                raise NormgenError(f"{where}: the file has no {missing[0]!r} weight for it")
            return {r: found[r] for r in roles}
        group = self.h5.get(f"layers/{key}/vars")
        if group is None or len(group) != len(roles):
            have = 0 if group is None else len(group)
            raise NormgenError(f"{where}: the weights file has {have} arrays under layers/{key}/vars, the layer has"
                               f" {len(roles)} ({', '.join(roles)})")
        return {r: np.array(group[str(i)]) for i, r in enumerate(roles)}


def _read_file(path: Path) -> tuple[dict, Any]:
    h5py = _h5py()
    if path.suffix.lower() == ".keras":
        try:
            with zipfile.ZipFile(path) as zf:
                config = json.loads(zf.read("config.json"))
                weights = zf.read("model.weights.h5")
        except (zipfile.BadZipFile, KeyError, json.JSONDecodeError) as exc:
            raise NormgenError(f"{str(path)!r} is not a readable .keras file ({exc})") from None
        return config, _Weights(h5py.File(io.BytesIO(weights), "r"), legacy=False)
    try:
        h5 = h5py.File(path, "r")
    except OSError as exc:
        raise NormgenError(f"{str(path)!r} is not a readable HDF5 file ({exc})") from None
    text = h5.attrs.get("model_config")
    if text is None:
        raise NormgenError(f"{str(path)!r} has no model_config: save the whole model (model.save), not only its weights")
    return json.loads(text.decode() if isinstance(text, bytes) else text), _Weights(h5, legacy=True)


def _letters(rank: int, axis: int) -> str:
    """B first, C at ``axis``, T for one other dimension, S for more."""
    others = rank - 2
    fill = "T" if others == 1 else "S"
    return "".join("B" if i == 0 else "C" if i == axis else fill for i in range(rank))


def _layer(cls_name: str, cfg: dict, shape: list, weights: dict[str, np.ndarray], name: str, where: str) -> Layer:
    rank = len(shape)
    for i, d in enumerate(shape[1:], 1):
        if not isinstance(d, int):
            raise NormgenError(f"{where}: dimension {i} of its input has no fixed size ({d}); normgen fixes every size"
                               " but the batch at generation: give the model a fixed input shape (keras.Input(shape=...))")
    sizes = [int(d) for d in shape[1:]]
    dtype = next((str(w.dtype) for w in weights.values()), "float32")
    dtype = dtype if dtype in ("float32", "float64", "float16") else "float32"
    eps = cfg.get("epsilon", 1e-3)
    eps = float(1e-7 if eps is None else eps)  # None: Keras's backend epsilon
    affine: dict[str, Any] = {}
    if "scale" in weights:  # RMSNormalization's
        weights = {"gamma": weights["scale"]}
    if "gamma" in weights or "beta" in weights:
        affine = {"scale": weights.get("gamma")} if "gamma" in weights else {}
        affine |= {"offset": weights["beta"]} if "beta" in weights else {"bias": False}
    else:
        affine = {"affine": "none"}
    if cls_name in ("BatchNormalization", "GroupNormalization"):
        axis = cfg.get("axis", -1)
        axis = axis[0] if isinstance(axis, list) and len(axis) == 1 else axis
        if not isinstance(axis, int) or not -rank <= axis < rank or axis % rank == 0:
            raise NormgenError(f"{where}: axis {axis!r} is not one channel axis of its rank-{rank} input")
        fmt = _letters(rank, axis % rank)
        if cls_name == "BatchNormalization":
            if cfg.get("renorm"):
                raise NormgenError(f"{where}: renorm = True (batch renormalization) is not supported")
            decay = float(1.0 - cfg.get("momentum", 0.99))
            decay = float(f"{decay:.12g}")
            return BatchNorm(name=name, format=fmt, shape=sizes, dtype=dtype, epsilon=eps,
                             trained_mean=weights["moving_mean"], trained_variance=weights["moving_variance"],
                             mean_decay=decay, variance_decay=decay, running_variance="biased", **affine)
        return GroupNorm(name=name, format=fmt, shape=sizes, dtype=dtype, epsilon=eps,
                         num_groups=int(cfg.get("groups", 32)), **affine)
    axes = cfg.get("axis", -1)
    axes = sorted(a % rank for a in (axes if isinstance(axes, list) else [axes]))
    k = len(axes)
    if axes != list(range(rank - k, rank)) or 0 in axes:
        raise NormgenError(f"{where}: axis {cfg.get('axis')!r}: normgen's layer norm takes the trailing axes of its"
                           f" input (here {list(range(rank - k, rank))})")
    fmt, od = trailing_layout(sizes, k, None, where)
    if affine.get("affine") != "none":
        affine["affine"] = "channel" if k == 1 else "element"
        for key in ("scale", "offset"):
            if key in affine:
                affine[key] = np.asarray(affine[key]).reshape(-1) if k == 1 else np.asarray(affine[key])
    if cls_name == "RMSNormalization":
        return RMSNorm(name=name, format=fmt, shape=sizes, dtype=dtype, epsilon=eps, operation_dimension=od, **affine)
    return LayerNorm(name=name, format=fmt, shape=sizes, dtype=dtype, epsilon=eps, operation_dimension=od, **affine)


def _roles(cls_name: str, cfg: dict, where: str) -> list[str]:
    if cfg.get("rms_scaling"):
        raise NormgenError(f"{where}: rms_scaling = True (deprecated in Keras) scales by 1/sqrt(variance + epsilon)"
                           " without subtracting the mean, which no normgen layer computes; use"
                           " keras.layers.RMSNormalization (an rmsnorm)")
    scale, center = cfg.get("scale", True), cfg.get("center", True)
    if cls_name == "RMSNormalization":
        return ["scale"]
    roles = (["gamma"] if scale else []) + (["beta"] if center else [])
    return roles + (["moving_mean", "moving_variance"] if cls_name == "BatchNormalization" else [])


def read_keras(path) -> tuple[list[Layer], list[str], list[str]]:
    """(layers, keras layer names, notes) of a .keras or legacy .h5 model."""
    path = Path(path)
    if not path.is_file():
        raise NormgenError(f"Keras model {str(path)!r} does not exist")
    config, weights = _read_file(path)
    layers_cfg = config.get("config", {}).get("layers") if isinstance(config.get("config"), dict) else None
    if not isinstance(layers_cfg, list):
        raise NormgenError(f"{path.name}: its model config has no list of layers (a Sequential or Functional model)")
    used: dict[str, int] = {}
    found: list[tuple[str, dict, str]] = []
    notes = []
    skipped: dict[str, int] = {}
    for layer in layers_cfg:
        cls_name = layer.get("class_name", "")
        key = _snake(cls_name)
        if key in used:
            used[key] += 1
            key = f"{key}_{used[key]}"
        else:
            used[key] = 0
        if cls_name in KERAS_NORMS:
            found.append((cls_name, layer, key))
        elif cls_name != "InputLayer":
            skipped[cls_name] = skipped.get(cls_name, 0) + 1
    if skipped:
        notes.append("skipped (not normalization): " + ", ".join(f"{c} ×{n}" for c, n in sorted(skipped.items())))
    names = distinct(c_identifier(layer["config"].get("name", key), "layer") for _, layer, key in found)
    out = []
    for (cls_name, layer, key), name in zip(found, names, strict=True):
        cfg = layer.get("config", {})
        where = f"{path.name}: {cls_name} {cfg.get('name', key)!r}"
        shape = _input_shape(layer)
        if shape is None:
            raise NormgenError(f"{where}: the file does not record its input shape; save the model with Keras 3"
                               " (model.save('model.keras')) after building it")
        out.append(_layer(cls_name, cfg, shape, weights.get(key, layer, _roles(cls_name, cfg, where), where), name, where))
    return out, [layer["config"].get("name", key) for _, layer, key in found], notes


def from_keras(path) -> list[Layer]:
    """The normalization layers of a Keras model file (``.keras``, or a legacy ``.h5``), in model
    order, read without TensorFlow or Keras."""
    return read_keras(path)[0]
