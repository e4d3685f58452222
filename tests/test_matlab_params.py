"""MAT-files as parameter files (normgen/importers/matlab.py), and the mex target's role table.

Files are written by scipy.io.savemat (v5), by h5py laid out as MATLAB writes v7.3 (a 512-byte
MATLAB header before the HDF5 data, a MATLAB_class attribute on every variable, arrays stored
with their dimensions reversed), and, where GNU Octave is installed, by Octave itself.
"""

from __future__ import annotations

import shutil
import subprocess
from pathlib import Path

import numpy as np
import pytest

import normgen
from normgen import BatchNorm, GroupNorm, LayerNorm, NormgenError, RMSNorm
from normgen.cli import main
from normgen.lowering import lower
from normgen.lowering.plan import Function
from normgen.targets.mex.gateway import _function, mex_plan

sio = pytest.importorskip("scipy.io", reason="scipy (the matlab extra) is not installed")

OCTAVE = shutil.which("octave")
C = 5
RNG = np.random.default_rng(5)
ARRAYS = {"trained_mean": RNG.normal(0, 1, C), "trained_variance": RNG.uniform(0.5, 2, C),
          "scale": RNG.normal(1, 0.3, C), "offset": RNG.normal(0, 0.3, C)}
MATLAB = {"trained_mean": "TrainedMean", "trained_variance": "TrainedVariance", "scale": "Scale", "offset": "Offset"}


def bn(**kw):
    return BatchNorm(name="bn", matlab_format="SSCB", shape=[4, 3, C], **kw)


def write_v73(path: Path, variables: dict) -> None:
    """A MAT-file v7.3 as MATLAB lays it out: HDF5 behind a 512-byte header; each variable a
    dataset (or, for a struct, a group of datasets) with a MATLAB_class attribute, its
    column-major data stored with the dimensions reversed."""
    h5py = pytest.importorskip("h5py", reason="h5py (the matlab extra) is not installed")

    def dataset(group, name, a):
        a = np.asarray(a)
        a = a.reshape(a.shape + (1,) * (2 - a.ndim))
        ds = group.create_dataset(name, data=a.T)
        ds.attrs["MATLAB_class"] = np.bytes_({np.float32: "single", np.float64: "double"}[a.dtype.type])

    with h5py.File(path, "w", userblock_size=512) as f:
        for name, value in variables.items():
            if isinstance(value, dict):
                group = f.create_group(name)
                group.attrs["MATLAB_class"] = np.bytes_("struct")
                for k, a in value.items():
                    dataset(group, k, a)
            else:
                dataset(f, name, value)
    text = b"MATLAB 7.3 MAT-file, Platform: GLNXA64, Created on: Mon Dec  7 00:00:00 2026 HDF5 schema 1.00 ."
    header = text.ljust(116, b" ") + bytes(8) + b"\x00\x02" + b"IM"
    with open(path, "r+b") as fh:
        fh.write(header.ljust(512, b"\x00"))


def write(path: Path, variables: dict, version: str) -> None:
    if version == "v7.3":
        write_v73(path, variables)
    else:
        sio.savemat(str(path), variables, format="5", oned_as="column")


VERSIONS = ["v5", "v7.3"]


@pytest.mark.parametrize("version", VERSIONS)
@pytest.mark.parametrize("dtype", [np.float32, np.float64])
@pytest.mark.parametrize("shape", [(1, 1, C), (C, 1), (1, C), (1, 1, 1, C)])
def test_matlab_names_every_shape(tmp_path, version, dtype, shape):
    path = tmp_path / "bn.mat"
    write(path, {MATLAB[k]: v.astype(dtype).reshape(shape) for k, v in ARRAYS.items()}, version)
    got = normgen.load_params(path, bn())
    assert set(got) == set(ARRAYS)
    for k, v in ARRAYS.items():
        np.testing.assert_array_equal(got[k], v.astype(dtype).astype(np.float64))
    layer = bn().replace(**got)
    np.testing.assert_array_equal(layer.trained_variance_values, ARRAYS["trained_variance"].astype(dtype))


@pytest.mark.parametrize("version", VERSIONS)
def test_struct_and_normgen_names(tmp_path, version):
    path = tmp_path / "s.mat"
    # save('s.mat', 's'): one struct variable holding normgen's names
    write(path, {"s": {k: v.reshape(1, 1, C) for k, v in ARRAYS.items()}}, version)
    got = normgen.load_params(path, bn())
    for k, v in ARRAYS.items():
        np.testing.assert_array_equal(got[k], v)


@pytest.mark.parametrize("version", VERSIONS)
def test_element_affine_in_matlab_order(tmp_path, version):
    layer = LayerNorm(name="lne", matlab_format="SSCB", shape=[5, 4, 3], operation_dimension="spatial-channel",
                      affine="element")
    assert layer.param_shape == (3, 4, 5)
    scale = RNG.normal(1, 0.3, layer.param_shape)  # format order (C, S, S)
    offset = RNG.normal(0, 0.3, layer.param_shape)
    path = tmp_path / "lne.mat"
    # MATLAB holds them 5x4x3: the same values, its dimensions the reverse of format's
    write(path, {"Scale": scale.T, "Offset": offset.T.astype(np.float32)}, version)
    got = normgen.load_params(path, layer)
    np.testing.assert_array_equal(got["scale"], scale)
    np.testing.assert_array_equal(got["offset"], offset.astype(np.float32))
    x = RNG.standard_normal((2, 3, 4, 5))
    ref = normgen.reference.predict(layer.replace(**got), x)
    mean = x.mean(axis=(1, 2, 3), keepdims=True)
    var = x.var(axis=(1, 2, 3), keepdims=True)
    np.testing.assert_allclose(ref, (x - mean) / np.sqrt(var + 1e-5) * scale + offset.astype(np.float32), rtol=1e-12)


def test_rmsnorm_scale_only(tmp_path):
    path = tmp_path / "rms.mat"
    write(path, {"Scale": np.arange(1.0, 9.0)}, "v5")
    layer = RMSNorm(name="rms", matlab_format="CTB", shape=[8, "tokens"])
    np.testing.assert_array_equal(normgen.load_params(path, layer)["scale"], np.arange(1.0, 9.0))


def _err(path: Path, layer) -> str:
    with pytest.raises(NormgenError) as exc:
        normgen.load_params(path, layer)
    return str(exc.value)


@pytest.mark.parametrize("version", VERSIONS)
def test_missing_extra_and_misshapen(tmp_path, version):
    path = tmp_path / "bad.mat"
    full = {MATLAB[k]: v.reshape(1, 1, C) for k, v in ARRAYS.items()}
    write(path, {k: v for k, v in full.items() if k != "Offset"}, version)
    msg = _err(path, bn())
    assert "no variable 'Offset' (or 'offset')" in msg and "1x1x5" not in msg and "5x1" in msg
    write(path, {**full, "Momentum": np.ones((1, 1))}, version)
    msg = _err(path, bn())
    assert "'Momentum'" in msg and "1x1" in msg and "TrainedMean" in msg
    write(path, {**full, "Scale": np.ones((1, 1, C + 1))}, version)
    msg = _err(path, bn())
    assert "'Scale' is 1x1x6 (6 values)" in msg and "needs 5 values, one per channel: 1x...x1x5, 5x1 or 1x5" in msg
    write(path, {**full, "Scale": np.ones((C, 2))}, version)
    assert "'Scale' is 5x2 (10 values)" in _err(path, bn())
    write(path, {**full, "scale": np.ones(C)}, version)
    assert "both 'Scale' and 'scale'" in _err(path, bn())
    write(path, full, version)
    msg = _err(path, bn(bias=False))
    assert "'Offset'" in msg and "bias = false" in msg


def test_values_that_are_no_parameters(tmp_path):
    path = tmp_path / "bad.mat"
    full = {MATLAB[k]: v.reshape(1, 1, C) for k, v in ARRAYS.items()}
    sio.savemat(str(path), {**full, "Scale": full["Scale"] * 1j})
    assert "'Scale' is complex" in _err(path, bn())
    sio.savemat(str(path), {**full, "Scale": np.arange(C, dtype=np.int32)})
    assert "'Scale' holds int32 values" in _err(path, bn())
    sio.savemat(str(path), {**full, "Scale": "ones"})
    assert "'Scale' holds text" in _err(path, bn())
    sio.savemat(str(path), {"s": {"Scale": full["Scale"]}, "Offset": full["Offset"]})
    assert "struct 's' beside other variables" in _err(path, bn())
    path.write_bytes(b"not a MAT-file at all" * 10)
    assert "not a readable MAT-file" in _err(path, bn())
    assert "does not exist" in _err(tmp_path / "none.mat", bn())


def test_hdf5_without_matlab_header(tmp_path):
    h5py = pytest.importorskip("h5py")
    path = tmp_path / "octave.mat"
    with h5py.File(path, "w") as f:
        f.create_dataset("Scale", data=np.ones(C))
    msg = _err(path, bn())
    assert "HDF5 file without MATLAB's header" in msg and "save -v7" in msg


def _spec(tmp_path: Path, params: str, extra: str = "") -> Path:
    spec = tmp_path / "m.toml"
    spec.write_text(f'[[layer]]\nname = "bn"\nkind = "batchnorm"\nmatlab_format = "SSCB"\nshape = [4, 3, {C}]\n'
                    f'params = "{params}"\n{extra}')
    return spec


def test_spec_params_mat(tmp_path, capsys):
    write(tmp_path / "bn.mat", {"bn": {MATLAB[k]: v.reshape(1, 1, C) for k, v in ARRAYS.items()}}, "v5")
    (layer,) = normgen.load_spec(_spec(tmp_path, "bn.mat"))
    np.testing.assert_array_equal(layer.trained_mean_values, ARRAYS["trained_mean"])
    assert layer.sources["trained_mean"] == "array"
    assert main(["emit", str(_spec(tmp_path, "bn.mat")), "--target", "mex", "-o", str(tmp_path / "out")]) == 0
    assert sorted(p.name for p in (tmp_path / "out").iterdir()) == ["bn.c", "bn.h", "bn_mex.c", "bn_mex.m"]
    # a misshapen variable: one line, exit 2, no traceback
    write(tmp_path / "bad.mat", {"bn": {MATLAB[k]: np.ones((1, 1, 4)) for k in ARRAYS}}, "v5")
    capsys.readouterr()
    assert main(["emit", str(_spec(tmp_path, "bad.mat")), "-o", str(tmp_path / "out2")]) == 2
    err = capsys.readouterr().err
    assert err.startswith("normgen: error: m.toml: layer 1 ('bn'): params file") and err.count("\n") == 1
    assert "'bn.TrainedMean' is 1x1x4 (4 values)" in err and "needs 5 values, one per channel: 1x...x1x5" in err
    assert not (tmp_path / "out2").exists()
    # a value the layer refuses (a negative variance) names the file
    write(tmp_path / "neg.mat", {MATLAB[k]: -np.ones(C) for k in ARRAYS}, "v5")
    with pytest.raises(NormgenError, match="params file 'neg.mat'.*negative"):
        normgen.load_spec(_spec(tmp_path, "neg.mat"))


@pytest.mark.skipif(OCTAVE is None, reason="GNU Octave is not installed")
def test_files_octave_writes(tmp_path):
    """Octave's save -v7 (variables, -struct, a struct) is read; its save -hdf5 is refused, naming -v7."""
    lines = [f"s.{MATLAB[k]} = reshape([{' '.join(repr(float(e)) for e in v)}], 1, 1, {C});"
             for k, v in ARRAYS.items()]
    lines += ["s.Scale = single(s.Scale);", "save('-v7', 'vars.mat', '-struct', 's');", "save('-v7', 'st.mat', 's');",
              "save('-hdf5', 'h5.mat', '-struct', 's');"]
    (tmp_path / "w.m").write_text("\n".join(lines) + "\n")
    subprocess.run([OCTAVE, "--no-gui", "--norc", "--quiet", "--no-window-system", "w.m"], cwd=tmp_path, check=True,
                   capture_output=True, timeout=120)
    for name in ("vars.mat", "st.mat"):
        got = normgen.load_params(tmp_path / name, bn())
        for k, v in ARRAYS.items():
            want = v.astype(np.float32) if k == "scale" else v
            np.testing.assert_array_equal(got[k], want)
    assert "save -v7" in _err(tmp_path / "h5.mat", bn())


# ---- the mex target's role table ----------------------------------------------------------------


def test_roles_of_fused_arguments():
    """A fused form's extra arguments take their roles from the table: residual x-shaped in, h
    x-shaped out, mod_shift and mod_scale [batch, C] (C-by-batch in MATLAB)."""
    plan = lower(GroupNorm(name="gn", matlab_format="SSCB", shape=[4, 4, 6], num_groups=3, residual=True,
                           residual_out=True, modulation="adaln"), "c")
    fn = next(f for f in plan.public_functions if f.role == "predict")
    mf = _function(plan, fn)
    assert mf.inputs == ["x", "residual", "mod_shift", "mod_scale"] and mf.outputs == ["y", "h"]
    roles = {a.name: (a.shape, a.direction) for a in mf.args}
    assert roles == {"x": ("x", "in"), "residual": ("x", "in"), "mod_shift": ("rows", "in"),
                     "mod_scale": ("rows", "in"), "y": ("x", "out"), "h": ("x", "out")}
    assert mf.args[0].first and not mf.args[1].first
    assert "{6, (mwSize)shape.batch}" in {a.want for a in mf.args}
    assert mf.call == "a_x, a_residual, a_mod_shift, a_mod_scale, a_y, a_h, shape.batch"
    assert mf.usage == "[y, h] = gn_mex('predict', x, residual, mod_shift, mod_scale)"


def test_unknown_argument_is_an_error():
    plan = lower(GroupNorm(name="gn", matlab_format="SSCB", shape=[4, 4, 6]), "c")
    fn = Function("predict2", "gn_predict2", ["const float *x", "const float *gate", "float *y", "int32_t batch"],
                  ["x", "gate", "y"], "", [])
    with pytest.raises(NormgenError, match="does not know argument 'gate' of gn_predict2.*ROLES"):
        _function(plan, fn)
    fn = Function("predict3", "gn_predict3", ["const double *x", "float *y", "int32_t batch"], ["x", "y"], "", [])
    with pytest.raises(NormgenError, match="argument 'x' of gn_predict3 as float"):
        _function(plan, fn)


def test_name_must_begin_with_a_letter():
    with pytest.raises(NormgenError, match="begins with a letter.*'_bn'"):
        normgen.emit(BatchNorm(name="_bn", format="BC", shape=[3]), "mex")


def test_gateway_covers_every_function_and_is_deterministic():
    layer = BatchNorm(name="bnr", format="BTC", shape=["tokens", 6], param_storage="runtime")
    plan = lower(layer, "c")
    mp = mex_plan(plan)
    roles = [f.role for f in mp.functions]
    assert roles == ["params_init"] + [f.role for f in plan.functions + plan.train.functions]
    assert mp.layout == ["6", "-1", "0"] and mp.layout_text == "[6 tokens batch]"
    files = normgen.emit(layer, "mex")
    assert files == normgen.emit(layer, "mex")
    assert files["bnr.c"] == normgen.emit(layer, "c")["bnr.c"]
    for name in ("bnr_mex.c", "bnr_mex.m"):
        assert "Generated by normgen" in files[name].splitlines()[2 if name.endswith(".c") else 1]
        assert "shape                    ['tokens', 6]" in files[name]
    assert files["bnr_mex.m"].startswith("%BNR_MEX  MEX gateway")
