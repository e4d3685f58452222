"""The ``functions`` filter: only some of a layer's functions generated (and what they need)."""

from __future__ import annotations

import shutil
import subprocess

import numpy as np
import pytest

from normgen import BatchNorm, GroupNorm, InstanceNorm, LayerNorm, NormgenError, RMSNorm, build, emit, reference
from normgen.cli import main
from normgen.lowering import lower
from normgen.targets.c.build import STRICT_FLAGS


def kinds():
    """One layer of every kind, plain, with run-time parameters and fused."""
    bc = dict(format="BCSS", shape=[4, 3, 5])
    seq = dict(format="BTC", shape=[3, 8])
    yield BatchNorm(name="bn", **bc, trained_mean=[0.5, -1, 2, 0], trained_variance=[1, 2, 0.5, 3])
    yield BatchNorm(name="bnr", **bc, param_storage="runtime", running_variance="biased")
    yield GroupNorm(name="gn", **bc, num_groups=2)
    yield LayerNorm(name="ln", **seq)
    yield InstanceNorm(name="inn", **bc)
    yield RMSNorm(name="rms", **seq, param_storage="runtime")
    yield LayerNorm(name="lnf", **seq, residual=True, residual_out=True, activation="gelu", modulation="adaln")
    yield BatchNorm(name="bnf", **bc, residual=True, activation="silu")
    yield GroupNorm(name="gnf", **bc, num_groups=2, residual=True, param_storage="runtime")


LAYERS = {layer.name: layer for layer in kinds()}


@pytest.mark.parametrize("layer", LAYERS.values(), ids=lambda l: l.name)
def test_roles_are_what_the_lowering_generates(layer):
    assert lower(layer).roles == layer.roles


@pytest.mark.parametrize("layer", LAYERS.values(), ids=lambda l: l.name)
def test_only_the_kept_functions_are_declared_and_defined(layer):
    for role in layer.roles:
        kept = layer.replace(functions=[role])
        plan = lower(kept)
        assert list(plan.roles) == [role]
        files = emit(kept)
        header, source = files[f"{layer.name}.h"], files[f"{layer.name}.c"]
        for other in layer.roles:
            name = f"{layer.name}_{'sync_stats' if other == 'sync' else other}("
            assert (name in header) == (other == role), (role, other)
            assert (f"int {name}" in source) == (other == role), (role, other)
        assert ("_stats;" in header) == (role in ("stats_reset", "accumulate", "finalize", "sync"))
        assert ("---- Training" in header) == (role not in ("predict", "train_forward"))
        if layer.kind == "batchnorm" and layer.param_storage == "embedded":
            assert (f"{layer.name}_fold_a[" in source) == (role == "predict")


def test_the_default_is_every_function_and_unchanged():
    layer = LAYERS["bnr"]
    full = layer.replace(functions=list(layer.roles))
    assert full.functions == layer.roles
    assert layer.functions is None and "functions" not in dict(layer.describe())
    assert _without_functions_line(emit(full)) == emit(layer)


def _without_functions_line(files: dict[str, str]) -> dict[str, str]:
    """The files less their description's functions line."""
    return {k: "".join(line for line in v.splitlines(keepends=True) if not line.startswith(" *   functions"))
            for k, v in files.items()}


def test_order_and_repeats_do_not_matter():
    layer = LAYERS["bn"]
    assert layer.replace(functions=["backward", "predict", "predict"]).functions == ("predict", "backward")
    assert layer.replace(functions="backward, predict").functions == ("predict", "backward")


@pytest.mark.parametrize("layer, functions, message", [
    (LAYERS["gn"], ["predict", "train_forward"], "this groupnorm layer has no train_forward function"),
    (LAYERS["bn"], ["predcit"], "'predcit' is no function role (did you mean 'predict'?)"),
    (LAYERS["bn"], ["update"], "this batchnorm layer has no update function (it updates run-time parameters"),
    (LAYERS["lnf"], ["backward"], "this layernorm layer has no backward function (an activation or modulation"
                                  " needs the saved statistics: backward_saved); it has predict, train_forward_save,"
                                  " backward_saved"),
    (LAYERS["bn"], [], "functions is empty"),
    (LAYERS["bn"], 3, "must be a list of function roles"),
])
def test_a_bad_function_is_named(layer, functions, message):
    with pytest.raises(NormgenError) as err:
        layer.replace(functions=functions)
    assert message in str(err.value)
    assert f"layer {layer.name!r}: functions" in str(err.value)


def test_other_targets_refuse_a_filter():
    with pytest.raises(NormgenError, match="functions .* is for the c and mex targets, not cuda"):
        emit(LAYERS["bn"].replace(functions=["predict"]), "cuda")


@pytest.mark.skipif(shutil.which("gcc") is None, reason="gcc is not installed")
def test_every_single_function_compiles_warning_free(tmp_path):
    """Each function alone (what it needs and nothing else: an unused static function or array
    is a -Wall error), and every function but one."""
    for layer in LAYERS.values():
        roles = layer.roles
        for keep in [*((r,) for r in roles), *(tuple(r for r in roles if r != x) for x in roles[:4])]:
            files = emit(layer.replace(functions=list(keep)))
            for fname, text in files.items():
                (tmp_path / fname).write_text(text)
            proc = subprocess.run(["gcc", *STRICT_FLAGS, "-O0", "-c", str(tmp_path / f"{layer.name}.c"), "-o",
                                   str(tmp_path / "x.o")], capture_output=True, text=True)
            assert proc.returncode == 0, (layer.name, keep, proc.stderr)


@pytest.mark.parametrize("name", ["bn", "gn", "ln", "inn", "rms"])
def test_predict_only_layer_loads_and_matches_the_reference(name):
    layer = LAYERS[name].replace(functions=["predict"])
    compiled = build(layer)
    x = np.random.default_rng(3).standard_normal(reference.full_shape(layer, 3)).astype(np.float32)
    np.testing.assert_allclose(compiled.predict(x), reference.predict(layer, x), rtol=2e-5, atol=2e-5)


def test_train_forward_alone_loads_and_updates_the_running_statistics():
    layer = LAYERS["bn"].replace(functions=["train_forward"])
    compiled = build(layer)
    x = np.random.default_rng(4).standard_normal(reference.full_shape(layer, 3)).astype(np.float32)
    y, mean, var = reference.train_forward(layer, x, layer.trained_mean_values, layer.trained_variance_values)
    np.testing.assert_allclose(compiled.train_forward(x), y, rtol=2e-5, atol=2e-5)
    np.testing.assert_allclose(compiled.running_mean, mean, rtol=2e-5, atol=2e-5)
    np.testing.assert_allclose(compiled.running_var, var, rtol=2e-5, atol=2e-5)


def spec(tmp_path, extra=""):
    path = tmp_path / "spec.toml"
    path.write_text('[[layer]]\nname = "bn"\nkind = "batchnorm"\nformat = "BCSS"\nshape = [4, 3, 5]\n' + extra)
    return path


def test_spec_key_and_command_line(tmp_path, capsys):
    out = tmp_path / "out"
    assert main(["emit", str(spec(tmp_path, 'functions = ["predict", "accumulate"]\n')), "-o", str(out)]) == 0
    header = (out / "bn.h").read_text()
    assert "bn_predict(" in header and "bn_accumulate(" in header and "bn_backward(" not in header
    assert main(["emit", str(spec(tmp_path)), "-o", str(out), "--functions", "predict,train_forward"]) == 0
    header = (out / "bn.h").read_text()
    assert "bn_predict(" in header and "bn_train_forward(" in header and "bn_accumulate(" not in header
    assert " *   functions                predict, train_forward\n" in header


@pytest.mark.parametrize("argv, message", [
    (["--functions", "predict,backwards"], "'backwards' is no function role (did you mean 'backward'?)"),
    (["--functions", "predict", "--target", "cuda"], "not cuda"),
])
def test_command_line_errors_are_one_line(tmp_path, capsys, argv, message):
    out = tmp_path / "out"
    assert main(["emit", str(spec(tmp_path)), "-o", str(out), *argv]) == 2
    err = capsys.readouterr().err
    assert err.startswith("normgen: error: ") and err.count("\n") == 1 and message in err
    assert not out.exists()


def test_check_runs_the_kept_functions(tmp_path, capsys):
    assert main(["check", str(spec(tmp_path, 'functions = ["predict", "backward"]\n')), "--batch", "2"]) == 0
    out = capsys.readouterr().out
    assert "predict" in out and "backward:dx" in out
    assert "train_forward" not in out and "backward_frozen" not in out
