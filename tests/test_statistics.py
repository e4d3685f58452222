"""statistics = "double" | "float": the description checks it, specs and the CLI take it, and a
float-statistics layer's generated files say so (README "Statistics in float"). The numerics of
float statistics are in test_c_numeric.py and test_training.py, their firmware builds in
test_firmware.py, their warnings in test_warnings.py."""

from __future__ import annotations

import pytest

from normgen import BatchNorm, LayerNorm, NormgenError, emit
from normgen.cli import main
from normgen.lowering import lower


def test_bad_values_are_errors_naming_them():
    with pytest.raises(NormgenError, match="statistics.*'half'"):
        LayerNorm(name="s_bad", format="BTC", shape=[4, 8], statistics="half")
    with pytest.raises(NormgenError, match="statistics = 'float' needs dtype float32, not 'float64'"):
        LayerNorm(name="s_f64", format="BTC", shape=[4, 8], dtype="float64", statistics="float")


def test_the_spec_key_and_the_cli(tmp_path, capsys):
    spec = tmp_path / "s.toml"
    spec.write_text('[[layer]]\nname = "s_ln"\nkind = "layernorm"\nformat = "BTC"\nshape = [4, 8]\nstatistics = "float"\n')
    assert main(["emit", str(spec), "-o", str(tmp_path / "out")]) == 0
    source = (tmp_path / "out" / "s_ln.c").read_text()
    assert " *   statistics               float\n" in source  # the provenance header
    assert "double" not in source
    spec.write_text('[[layer]]\nname = "s_ln"\nkind = "layernorm"\nformat = "BTC"\nshape = [4, 8]\nstatistics = "single"\n')
    assert main(["emit", str(spec), "-o", str(tmp_path / "bad")]) == 2
    assert "'single'" in capsys.readouterr().err
    assert not (tmp_path / "bad").exists()


def test_float_statistics_leave_out_the_double_sync_functions():
    double = BatchNorm(name="s_bn", format="BCSS", shape=[4, 2, 2])
    single = double.replace(statistics="float")
    assert "sync" in double.roles and "sync" not in single.roles
    assert lower(double).train.sync is not None and lower(single).train.sync is None
    assert lower(single).acc_type == "float" and lower(double).acc_type == "double"
    with pytest.raises(NormgenError, match="sync"):
        single.replace(functions=["predict", "sync"])
    # the CUDA target's float32 statistics are float already: the layer emits there too
    assert "s_bn.cu" in emit(single, target="cuda")
