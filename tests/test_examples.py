"""The examples run: every spec passes `normgen check`, the C app builds and agrees with the
reference, and generated/ is exactly what `normgen emit` writes for the examples."""

from __future__ import annotations

import filecmp
import os
import re
import subprocess
from pathlib import Path

import numpy as np
import pytest

from normgen import load_spec, reference
from normgen.cli import main
from normgen.targets.render import emit

ROOT = Path(__file__).resolve().parent.parent
SPECS = sorted((ROOT / "examples").glob("*/*.toml"))
REGENERATE = os.environ.get("NORMGEN_REGENERATE") == "1"


@pytest.mark.parametrize("spec", SPECS, ids=lambda p: p.stem)
def test_examples_pass_check(spec, capsys):
    assert main(["check", str(spec), "--batch", "1,3"]) == 0
    out = capsys.readouterr().out
    assert " 0 failed" in out and "FAIL" not in out


def _targets():
    return ["c"] + (["cuda"] if (ROOT / "templates" / "cuda" / "layer.cu.j2").is_file() else [])


@pytest.mark.parametrize("spec", SPECS, ids=lambda p: p.stem)
@pytest.mark.parametrize("target", _targets())
def test_generated_folder_is_up_to_date(spec, target, tmp_path):
    """generated/TARGET/EXAMPLE holds `normgen emit` output; regenerate with
    NORMGEN_REGENERATE=1 python -m pytest tests/test_examples.py"""
    folder = ROOT / "generated" / target / spec.parent.name
    if target == "cuda" and any(layer.functions is not None for layer in load_spec(spec)):
        pytest.skip("a spec naming its functions (examples/firmware) is for the C target: CUDA generates every function")
    if REGENERATE:
        assert main(["emit", str(spec), "--target", target, "-o", str(folder)]) == 0
    assert main(["emit", str(spec), "--target", target, "-o", str(tmp_path)]) == 0
    names = sorted(p.name for p in tmp_path.iterdir())
    assert names == sorted(p.name for p in folder.iterdir())
    match, mismatch, errors = filecmp.cmpfiles(tmp_path, folder, names, shallow=False)
    assert not mismatch and not errors, f"{folder} is stale: {mismatch or errors}"


def test_emit_is_byte_identical_across_runs():
    layer = load_spec(ROOT / "examples" / "cnn_block" / "cnn_block.toml")[1]
    assert emit(layer) == emit(load_spec(ROOT / "examples" / "cnn_block" / "cnn_block.toml")[1])


def _app_input(n: int) -> np.ndarray:
    i = np.arange(n, dtype=np.float64)
    return 2.0 * np.sin(0.37 * i) + 0.25 * np.cos(0.011 * i)


def test_c_app_builds_and_agrees_with_reference(tmp_path):
    gen = ROOT / "generated" / "c" / "cnn_block"
    exe = tmp_path / "app"
    cmd = ["gcc", "-std=c99", "-Wall", "-Wextra", "-pedantic", "-Werror", "-O2", f"-I{gen}", "-o", str(exe),
           str(ROOT / "examples" / "c_app" / "main.c"), *map(str, sorted(gen.glob("*.c"))), "-lm"]
    subprocess.run(cmd, check=True, capture_output=True, text=True)
    out = subprocess.run([str(exe)], check=True, capture_output=True, text=True).stdout
    rows = {m[0]: m for m in re.findall(r"^(\w+) rc=(\d+) mean=(\S+) std=(\S+) y0=(\S+) y1=(\S+)$", out, re.M)}
    stem, gn, head = load_spec(ROOT / "examples" / "cnn_block" / "cnn_block.toml")
    batch = 2

    def expect(name, y, tol):  # the app prints 6 decimals
        _, rc, mean, std, y0, y1 = rows[name]
        assert rc == "0"
        flat = y.reshape(-1)
        np.testing.assert_allclose([float(mean), float(std), float(y0), float(y1)],
                                   [flat.mean(), flat.std(), flat[0], flat[1]], rtol=tol, atol=1e-6)

    x = _app_input(batch * int(np.prod(stem.dims))).astype(np.float32).reshape(reference.full_shape(stem, batch))
    expect("stem_bn_predict", reference.predict(stem, x), 1e-5)
    y, rm, rv = reference.train_forward(stem, x, np.zeros(32), np.ones(32))
    expect("stem_bn_train_forward", y, 1e-5)
    m = re.search(r"running_mean\[0\]=(\S+) running_var\[0\]=(\S+)", out)
    np.testing.assert_allclose([float(m[1]), float(m[2])], [rm[0], rv[0]], rtol=1e-5, atol=1e-6)
    xg = _app_input(batch * int(np.prod(gn.dims))).astype(np.float32).reshape(reference.full_shape(gn, batch))
    expect("block_gn_predict", reference.predict(gn, xg), 1e-5)
    xh = _app_input(batch * int(np.prod(head.dims))).reshape(reference.full_shape(head, batch))
    expect("head_bn_predict", reference.predict(head, xh), 1e-6)
    assert "errors null=1 batch=2" in out
