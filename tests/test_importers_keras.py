"""The Keras importer: a channels-last model saved as ``.keras`` and as a legacy ``.h5`` goes
through ``normgen import`` (read with h5py, no TensorFlow) and each layer's generated C matches
Keras's own output of that layer (``model.predict`` of a model exposing every layer's output).

The test models are written by Keras 3 on its torch backend; without keras, h5py or torch the
tests skip.
"""

from __future__ import annotations

import io
import os
from contextlib import redirect_stdout

import numpy as np
import pytest

import normgen
from normgen import NormgenError
from normgen.cli import main

pytest.importorskip("h5py", reason="reading Keras files needs h5py (pip install 'normgen[keras]')")
pytest.importorskip("torch", reason="the test models are written by Keras on its torch backend")
os.environ.setdefault("KERAS_BACKEND", "torch")
try:
    import keras
except Exception as exc:  # keras missing, or a backend that cannot load
    pytest.skip(f"the test models need Keras 3 on the torch backend: {exc}", allow_module_level=True)

from normgen.harness.check import TOLERANCES  # noqa: E402


@pytest.fixture(scope="module")
def saved(tmp_path_factory):
    """A Keras model with every normalization layer the importer reads, random weights, saved as
    .keras and .h5; and each layer's input and output on a random batch."""
    rng = np.random.default_rng(0)
    inp = keras.Input((6, 5, 8))
    x = keras.layers.Conv2D(8, 3, padding="same", name="conv")(inp)
    norms = []
    for layer in (keras.layers.BatchNormalization(name="bn", momentum=0.9),
                  keras.layers.GroupNormalization(groups=4, name="gn"),
                  keras.layers.LayerNormalization(name="ln"),
                  keras.layers.LayerNormalization(axis=[1, 2, 3], center=False, name="ln_chw")):
        x = layer(x)
        norms.append(layer)
    x = keras.layers.Dense(12, name="dense")(x)
    for layer in (keras.layers.RMSNormalization(epsilon=1e-5, name="rms"),
                  keras.layers.BatchNormalization(scale=False, name="bn_noscale")):
        x = layer(x)
        norms.append(layer)
    model = keras.Model(inp, x)
    for layer in model.layers:
        for w in layer.weights:
            value = rng.uniform(0.5, 2.0, w.shape) if "variance" in w.path else rng.normal(0.5, 0.5, w.shape)
            w.assign(value.astype("float32"))
    root = tmp_path_factory.mktemp("keras")
    model.save(root / "net.keras")
    with _quiet():  # Keras logs that .h5 is a legacy format
        model.save(root / "net.h5")
    probe = keras.Model(inp, [t for layer in norms for t in (layer.input, layer.output)])
    xin = (2.0 * rng.standard_normal((3, 6, 5, 8)) + 0.5).astype("float32")
    values = [np.asarray(v) for v in probe.predict(xin, verbose=0)]
    io_pairs = {layer.name: (values[2 * i], values[2 * i + 1]) for i, layer in enumerate(norms)}
    return root, io_pairs


class _quiet:
    def __enter__(self):
        import logging

        logging.disable(logging.WARNING)

    def __exit__(self, *exc):
        import logging

        logging.disable(logging.NOTSET)


EXPECT = {
    "bn": ("batchnorm", "BSSC", (6, 5, 8), "channel", True),
    "gn": ("groupnorm", "BSSC", (6, 5, 8), "channel", True),
    "ln": ("layernorm", "BSSC", (6, 5, 8), "channel", True),
    "ln_chw": ("layernorm", "BCSS", (6, 5, 8), "element", False),
    "rms": ("rmsnorm", "BSSC", (6, 5, 12), "channel", False),
    "bn_noscale": ("batchnorm", "BSSC", (6, 5, 12), "channel", True),
}


def close(got, want) -> float:
    rtol, atol = TOLERANCES["float32"]
    err = np.abs(np.asarray(got, np.float64) - want)
    assert np.all(err <= atol + rtol * np.abs(want)), f"max abs error {err.max():.3e}"
    return float(err.max())


def test_keras_file_imports_and_matches_keras(saved, tmp_path):
    root, io_pairs = saved
    out = io.StringIO()
    with redirect_stdout(out):
        assert main(["import", str(root / "net.keras"), "-o", str(tmp_path)]) == 0
    assert "skipped (not normalization): Conv2D ×1, Dense ×1" in out.getvalue()
    layers = normgen.load_spec(tmp_path / "net.toml")
    assert [layer.name for layer in layers] == list(EXPECT)
    for layer in layers:
        assert (layer.kind, layer.fmt.letters, layer.dims, layer.affine, layer.bias) == EXPECT[layer.name]
        x, want = io_pairs[layer.name]
        close(normgen.build(layer).predict(x), want)  # the generated C against Keras
    bn = layers[0]
    assert bn.epsilon == 1e-3 and bn.mean_decay == pytest.approx(0.1) and bn.running_variance == "biased"


def test_legacy_h5_gives_the_same_layers(saved):
    root, io_pairs = saved
    from_h5 = normgen.from_keras(root / "net.h5")
    from_keras = normgen.from_keras(root / "net.keras")
    for a, b in zip(from_h5, from_keras, strict=True):
        assert a.describe() == b.describe()
        x, want = io_pairs[a.name]
        close(normgen.reference.predict(a, x), want)


def test_rms_scaling_is_an_error(tmp_path):
    inp = keras.Input((4, 6))
    model = keras.Model(inp, keras.layers.LayerNormalization(rms_scaling=True, name="lnr")(inp))
    model.save(tmp_path / "r.keras")
    with pytest.raises(NormgenError, match="rms_scaling"):
        normgen.from_keras(tmp_path / "r.keras")
