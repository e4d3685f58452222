"""The command line: emit/check/show, and bad input → one clear message, exit 2, nothing written."""

from __future__ import annotations

import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest

from normgen.cli import main

GOOD = """
[[layer]]
name = "bn1"
kind = "batchnorm"
format = "BCSS"
shape = [4, 3, 3]
"""


def write(tmp_path: Path, text: str, name: str = "spec.toml") -> Path:
    path = tmp_path / name
    path.write_text(text)
    return path


def layer_spec(**keys) -> str:
    base = {"name": '"l1"', "kind": '"groupnorm"', "format": '"BCSS"', "shape": "[12, 4, 4]"}
    base.update(keys)
    return "[[layer]]\n" + "".join(f"{k} = {v}\n" for k, v in base.items() if v is not None)


BAD = {
    "groups": (layer_spec(num_groups=5), ["num_groups 5", "12 channels"]),
    "letter": (layer_spec(format='"BXSS"'), ["'BXSS'", "'X'"]),
    "no_c": (layer_spec(format='"BSSS"'), ["exactly one C", "has 0"]),
    "two_c": (layer_spec(format='"BCCS"'), ["exactly one C", "has 2"]),
    "two_b": (layer_spec(format='"BBCS"', shape="[12, 4]"), ["'BBCS'", "2 B"]),
    "two_t": (layer_spec(format='"TTCB"', shape="[3, 3, 12]"), ["'TTCB'", "2 T"]),
    "shape_len": (layer_spec(shape="[12, 4]"), ["shape [12, 4]", "3 non-B"]),
    "shape_zero": (layer_spec(shape="[12, 0, 4]"), ["size 0"]),
    "channels": (layer_spec(num_channels=10), ["num_channels 10", "is 12"]),
    "name_ident": (layer_spec(name='"my-layer"'), ["'my-layer'", "C identifier"]),
    "name_digit": (layer_spec(name='"1st"'), ["'1st'", "C identifier"]),
    "name_keyword": (layer_spec(name='"double"'), ["'double'", "keyword"]),
    "eps_zero": (layer_spec(epsilon="0.0"), ["epsilon", "0.0"]),
    "eps_neg": (layer_spec(epsilon="-1e-5"), ["epsilon", "-1e-05"]),
    "eps_inf": (layer_spec(epsilon="inf"), ["epsilon", "inf"]),
    "eps_nan": (layer_spec(epsilon="nan"), ["epsilon", "nan"]),
    "decay": (layer_spec(kind='"batchnorm"', mean_decay="1.5"), ["mean_decay", "1.5", "[0, 1]"]),
    "decay_neg": (layer_spec(kind='"batchnorm"', variance_decay="-0.1"), ["variance_decay", "-0.1"]),
    "kind": (layer_spec(kind='"rmsnormx"'), ["unknown kind 'rmsnormx'"]),
    "affine": (layer_spec(affine='"elementwise"'), ["affine", "'elementwise'", "'channel'"]),
    "affine_gn": (layer_spec(affine='"element"'), ["'element'", "groupnorm", "'channel' or 'none'"]),
    "element_apart": (layer_spec(kind='"layernorm"', format='"BSTC"', shape="[4, 3, 12]", affine='"element"',
                                 operation_dimension='"spatial-channel"'), ["'SC'", "next to each other", "'BSTC'"]),
    "bias_type": (layer_spec(bias='"yes"'), ["bias", "true or false", "'yes'"]),
    "bias_without_affine": (layer_spec(affine='"none"', bias="true"), ["bias = true", "'none'"]),
    "runtime_without_params": (layer_spec(affine='"none"', param_storage='"runtime"'), ["'runtime'", "none"]),
    "size_channel": (layer_spec(shape='["c", 4, 4]'), ["channel dimension C", "'c'", "run-time size"]),
    "size_keyword": (layer_spec(shape='[12, "for", 4]'), ["'for'", "keyword"]),
    "size_argument": (layer_spec(shape='[12, "x", 4]'), ["'x'", "clashes"]),
    "size_twice": (layer_spec(shape='[12, "h", "h"]'), ["'h'", "names two dimensions"]),
    "size_element": (layer_spec(kind='"layernorm"', operation_dimension='"spatial-channel"', affine='"element"',
                                shape='[12, "h", "w"]'), ["'element'", "'h'", "run-time size"]),
    "dtype": (layer_spec(dtype='"int8"'), ["dtype 'int8'"]),
    "key": (layer_spec(momentum="0.9"), ["unknown key 'momentum'"]),
    "kind_key": (layer_spec(mean_decay="0.1"), ["'mean_decay'", "batchnorm"]),
    "running_variance": (layer_spec(kind='"batchnorm"', running_variance='"sample"'), ["'sample'"]),
    "op_dim": (layer_spec(kind='"layernorm"', operation_dimension='"rows"'), ["'rows'"]),
    "toml": ("[[layer]\nname = ", ["not valid TOML"]),
    "empty": ("", ["no [[layer]] tables"]),
    "top_key": (GOOD + "\n[extra]\nx = 1\n", ["unknown top-level key 'extra'"]),
    "duplicate": (GOOD + GOOD, ["both named 'bn1'"]),
    "params_missing": (layer_spec(params='"nope.npz"'), ["'", "nope.npz", "does not exist"]),
    "params_type": (layer_spec(params="3"), ["params must be a path"]),
}


def run_bad(tmp_path, capsys, text, command="emit", files=None):
    for name, arrays in (files or {}).items():
        np.savez(tmp_path / name, **arrays)
    spec = write(tmp_path, text)
    out = tmp_path / "out"
    rc = main([command, str(spec), "-o", str(out)] if command == "emit" else [command, str(spec)])
    err = capsys.readouterr().err
    assert rc == 2
    assert not out.exists(), "nothing is written on bad input"
    assert err.startswith("normgen: error: ") and "Traceback" not in err and err.count("\n") == 1
    return err


@pytest.mark.parametrize("case", sorted(BAD))
@pytest.mark.parametrize("command", ["emit", "show"])
def test_bad_spec_is_one_clear_message(case, command, tmp_path, capsys):
    text, needles = BAD[case]
    err = run_bad(tmp_path, capsys, text, command)
    for needle in needles:
        assert needle in err, (needle, err)


BAD_PARAMS = {
    "length": ({"scale": np.ones(5)}, ["scale", "5 values", "needs 12"]),
    "nan": ({"offset": np.r_[np.zeros(11), np.nan]}, ["offset", "nan", "index 11"]),
    "inf": ({"scale": np.r_[np.inf, np.ones(11)]}, ["scale", "inf", "index 0"]),
    "negative_var": ({"trained_variance": np.r_[np.ones(3), -0.5, np.ones(8)]}, ["trained_variance", "-0.5", "index 3"]),
    "unknown_array": ({"gamma": np.ones(12)}, ["'gamma'"]),
}

#: Parameter files that do not fit the layer's affine: (spec keys, arrays, needles).
BAD_AFFINE_PARAMS = {
    "element_shape": (dict(kind='"layernorm"', operation_dimension='"spatial-channel"', affine='"element"'),
                      {"scale": np.ones(12)}, ["scale", "(12,)", "(12, 4, 4)", "normalized dimensions"]),
    "element_flat": (dict(kind='"layernorm"', operation_dimension='"spatial-channel"', affine='"element"'),
                     {"offset": np.ones(192)}, ["offset", "(192,)", "(12, 4, 4)"]),
    "offset_without_bias": (dict(kind='"rmsnorm"'), {"scale": np.ones(12), "offset": np.zeros(12)},
                            ["bias = false", "offset"]),
    "scale_without_affine": (dict(kind='"instancenorm"', affine='"none"'), {"scale": np.ones(12)},
                             ["affine = 'none'", "scale"]),
}


@pytest.mark.parametrize("case", sorted(BAD_AFFINE_PARAMS))
def test_params_that_do_not_fit_the_affine(case, tmp_path, capsys):
    keys, arrays, needles = BAD_AFFINE_PARAMS[case]
    err = run_bad(tmp_path, capsys, layer_spec(params='"p.npz"', **keys), files={"p.npz": arrays})
    for needle in needles:
        assert needle in err, (needle, err)


@pytest.mark.parametrize("case", sorted(BAD_PARAMS))
def test_bad_params_file(case, tmp_path, capsys):
    arrays, needles = BAD_PARAMS[case]
    text = layer_spec(kind='"batchnorm"', params='"p.npz"')
    err = run_bad(tmp_path, capsys, text, files={"p.npz": arrays})
    for needle in needles:
        assert needle in err, (needle, err)
    assert "np.float" not in err, err  # the value as a user writes it, not NumPy's repr


def test_a_torch_checkpoint_as_params_points_to_from_torch(tmp_path, capsys):
    import zipfile

    with zipfile.ZipFile(tmp_path / "bn.npz", "w") as z:  # what torch.save writes, under another suffix
        z.writestr("bn/data.pkl", b"\x80\x02}q\x00.")
    err = run_bad(tmp_path, capsys, layer_spec(params='"bn.npz"'))
    assert "PyTorch checkpoint" in err and "from_torch" in err and "data.pkl" not in err
    (tmp_path / "w.pt").write_bytes(b"\x80\x02}q\x00.")
    err = run_bad(tmp_path, capsys, layer_spec(params='"w.pt"'))
    assert "PyTorch checkpoint" in err


def test_malformed_params_file(tmp_path, capsys):
    (tmp_path / "p.npz").write_bytes(b"not a zip file")
    err = run_bad(tmp_path, capsys, layer_spec(params='"p.npz"'))
    assert "p.npz" in err and "not a readable .npz" in err and "not a NumPy .npz archive" in err
    assert "pickle" not in err, err


def test_output_into_a_closed_pipe_is_quiet(tmp_path):
    spec = tmp_path / "s.toml"
    spec.write_text("".join(layer_spec(name=f'"l{i}"') for i in range(40)))
    proc = subprocess.run(
        f"{sys.executable} -m normgen show {spec} | head -1", shell=True, capture_output=True, text=True
    )
    assert proc.stdout.startswith("layer l0") and "Traceback" not in proc.stderr, proc.stderr


def test_missing_spec_file(tmp_path, capsys):
    assert main(["emit", str(tmp_path / "absent.toml"), "-o", str(tmp_path / "out")]) == 2
    assert "absent.toml" in capsys.readouterr().err and not (tmp_path / "out").exists()


def test_emit_writes_and_is_idempotent(tmp_path, capsys):
    spec = write(tmp_path, GOOD + layer_spec())
    out = tmp_path / "out"
    assert main(["emit", str(spec), "-o", str(out)]) == 0
    assert sorted(p.name for p in out.iterdir()) == ["bn1.c", "bn1.h", "l1.c", "l1.h"]
    first = {p.name: p.read_bytes() for p in out.iterdir()}
    capsys.readouterr()
    assert main(["emit", str(spec), "-o", str(out)]) == 0
    assert capsys.readouterr().out.count("unchanged") == 4
    assert first == {p.name: p.read_bytes() for p in out.iterdir()}


def test_show_reports_counts_and_grouping(tmp_path, capsys):
    spec = write(tmp_path, GOOD + layer_spec(num_groups=3) + layer_spec(
        name='"ln"', kind='"layernorm"', format='"BTC"', shape="[5, 8]"))
    assert main(["show", str(spec)]) == 0
    out = capsys.readouterr().out
    assert "learnable    8 (scale 4, offset 4)" in out and "state        8 (trained_mean 4, trained_variance 4)" in out
    assert "groups       3 of 4 channels" in out
    assert "operation    channel-only" in out


def test_check_reports_a_table(tmp_path, capsys):
    spec = write(tmp_path, GOOD)
    assert main(["check", str(spec), "--batch", "2"]) == 0
    out = capsys.readouterr().out
    assert "bn1" in out and "train_forward" in out and "running_var" in out
    assert "backward:dscale" in out and "backward_frozen:dx" in out and "10 passed, 0 failed" in out
    assert main(["check", str(spec), "--batch", "2", "--no-training"]) == 0
    out = capsys.readouterr().out
    assert "backward" not in out and "4 passed, 0 failed" in out


def test_check_fails_on_a_wrong_gradient(tmp_path, capsys, monkeypatch):
    """check compares every output: a compiled backward that is off in one dscale value fails."""
    from normgen.targets.c.training import CTraining

    real = CTraining.backward

    def off_by_a_little(self, x, dy):
        dx, dscale, doffset = real(self, x, dy)
        dscale = dscale.copy()
        dscale[-1] += 1e-3
        return dx, dscale, doffset

    monkeypatch.setattr(CTraining, "backward", off_by_a_little)
    spec = write(tmp_path, GOOD)
    assert main(["check", str(spec), "--batch", "2"]) == 1
    out = capsys.readouterr().out
    fails = [line for line in out.splitlines() if line.endswith("FAIL")]
    assert len(fails) == 1 and "backward:dscale" in fails[0] and "9 passed, 1 failed" in out


def test_console_script_exit_code_and_help():
    proc = subprocess.run([sys.executable, "-m", "normgen", "emit", "/nonexistent/spec.toml"], capture_output=True, text=True)
    assert proc.returncode == 2 and "Traceback" not in proc.stderr and "/nonexistent/spec.toml" in proc.stderr
    helptext = subprocess.run([sys.executable, "-m", "normgen", "--help"], capture_output=True, text=True).stdout
    assert "[[layer]]" in helptext and "matlab_format" in helptext and "num_groups" in helptext


# ---- limits (README "Limits"): checked before anything is allocated --------------------------------

LIMITS = {
    "channels_3e9": (layer_spec(kind='"batchnorm"', format='"BC"', shape="[3000000000]"),
                     ["3000000000", "2147483647", "int32_t"]),
    "channels_4e9": (layer_spec(shape="[4000000000, 4, 4]"), ["4000000000", "at most 2147483647"]),
    "channels_1e9": (layer_spec(kind='"batchnorm"', format='"BC"', shape="[1000000000]"),
                     ["1000000000 channels", "at most 16777216"]),
    "elements_2_63": (layer_spec(format='"BCSSS"', shape="[64, 3000000, 3000000, 3000000]"),
                      ["1728000000000000000000 elements per sample", "at most 1152921504606846976"]),
    "element_affine": (layer_spec(kind='"layernorm"', operation_dimension='"spatial-channel"', affine='"element"',
                                  shape="[64, 2048, 2048]"), ["268435456 values", "at most 16777216"]),
    "name_300": (layer_spec(name='"' + "n" * 300 + '"'), ["300 characters", "at most 31"]),
    "name_5000": (layer_spec(name='"' + "n" * 5000 + '"'), ["5000 characters", "at most 31"]),
    "size_name": (layer_spec(shape='[12, "' + "h" * 40 + '", 4]'), ["40 characters", "at most 31"]),
}


@pytest.mark.parametrize("case", sorted(LIMITS))
@pytest.mark.parametrize("command", ["emit", "show", "check"])
def test_limits_are_errors_before_any_allocation(case, command, tmp_path, capsys):
    import tracemalloc

    text, needles = LIMITS[case]
    tracemalloc.start()
    try:
        err = run_bad(tmp_path, capsys, text, command)
        peak = tracemalloc.get_traced_memory()[1]
    finally:
        tracemalloc.stop()
    for needle in needles:
        assert needle in err, (needle, err)
    assert len(err) < 400, err
    assert peak < 20 * 2**20, f"{peak} bytes allocated before the error"


def test_the_longest_name_is_emitted(tmp_path, capsys):
    spec = write(tmp_path, layer_spec(name='"' + "a" * 31 + '"'))
    assert main(["emit", str(spec), "-o", str(tmp_path / "out")]) == 0
    assert (tmp_path / "out" / ("a" * 31 + ".c")).is_file()


def test_check_and_bench_refuse_what_does_not_fit_in_memory(tmp_path, capsys):
    spec = write(tmp_path, layer_spec(kind='"batchnorm"', shape="[1024, 1024, 1024]"))
    err = run_bad(tmp_path, capsys, spec.read_text(), "check")
    assert "needs about 480.0 GiB" in err and "batch 5" in err and "available" in err, err
    assert main(["bench", str(spec), "--batch", "3"]) == 2
    err = capsys.readouterr().err
    assert "bench of layer 'l1' at batch 3 needs about 288.0 GiB" in err and err.count("\n") == 1, err
    # run-time sizes: check's largest run, at --sizes
    spec = write(tmp_path, layer_spec(kind='"rmsnorm"', format='"BTC"', shape='["tokens", 4096]'))
    assert main(["check", str(spec), "--sizes", "tokens=7,100000000"]) == 2
    err = capsys.readouterr().err
    assert "tokens = 100000000" in err and "needs about" in err, err


def test_check_refuses_a_batch_beyond_int32(tmp_path, capsys):
    spec = write(tmp_path, GOOD)
    assert main(["check", str(spec), "--batch", "2147483648"]) == 2
    assert "at most 2147483647" in capsys.readouterr().err


def test_memory_estimate_sees_an_address_space_limit():
    """Under RLIMIT_AS (the fuzz test's guard) what is available is at most what the limit leaves."""
    code = ("import resource; from normgen.harness.check import available_memory;"
            "resource.setrlimit(resource.RLIMIT_AS, (4 << 30, resource.getrlimit(resource.RLIMIT_AS)[1]));"
            "print(available_memory())")
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True).stdout
    assert 0 < int(out) < 4 << 30


@pytest.mark.parametrize("mask", [0o022, 0o077, 0o002])
def test_emitted_files_have_the_umask_mode(tmp_path, capsys, mask):
    import os
    import stat

    from normgen.importers.writer import write_files

    spec = write(tmp_path, GOOD)
    old = os.umask(mask)
    try:
        assert main(["emit", str(spec), "-o", str(tmp_path / "out")]) == 0
        write_files(tmp_path / "imp", {"a.toml": b"x"})
    finally:
        os.umask(old)
    for path in [*(tmp_path / "out").iterdir(), tmp_path / "imp" / "a.toml"]:
        assert stat.S_IMODE(path.stat().st_mode) == 0o666 & ~mask, path
    assert not [p for p in (tmp_path / "out").iterdir() if p.name.startswith(".")], "no temporary file left"


def test_an_unwritable_output_is_one_error(tmp_path, capsys):
    spec = write(tmp_path, GOOD)
    (tmp_path / "file").write_text("")
    assert main(["emit", str(spec), "-o", str(tmp_path / "file" / "sub")]) == 2
    err = capsys.readouterr().err
    assert err.startswith("normgen: error: cannot write") and err.count("\n") == 1, err


# ---- the Python API: bad arguments name the value and normgen's spelling ------------------------

API = {
    "eps": (dict(eps=1e-3), ["eps=0.001", "epsilon=0.001"]),
    "momentum": (dict(momentum=0.1), ["momentum=0.1", "mean_decay=0.1", "variance_decay=0.1", "1 - momentum"]),
    "weight": (dict(weight=np.ones(4)), ["weight=", "scale="]),
    "running_mean": (dict(running_mean=np.zeros(4)), ["running_mean", "trained_mean="]),
    "running_var": (dict(running_var=np.ones(4)), ["running_var", "trained_variance="]),
    "num_features": (dict(num_features=4), ["num_features=4", "shape=", "num_channels=4"]),
    "normalized_shape": (dict(normalized_shape=[4]), ["normalized_shape", "shape=", "affine='element'"]),
    "elementwise_affine": (dict(elementwise_affine=False), ["elementwise_affine", "affine='none'"]),
    "affine_true": (dict(affine=True), ["affine=True", "'channel'", "'element'"]),
    "affine_false": (dict(affine=False), ["affine=False", "affine='none'"]),
    "bias_array": (dict(bias=np.zeros(4)), ["bias", "true or false", "offset="]),
    "typo": (dict(epsilom=1e-3), ["epsilom=0.001", "did you mean epsilon="]),
    "other_kind": (dict(num_groups=2), ["'num_groups' is an argument of GroupNorm, not BatchNorm"]),
    "scale_shape": (dict(scale=np.ones((2, 2))), ["shape (2, 2)", "needs 4 values, shape (4,)", "one per channel"]),
}


@pytest.mark.parametrize("case", sorted(API))
def test_python_arguments_name_normgen_spelling(case):
    from normgen import BatchNorm, NormgenError

    kw, needles = API[case]
    with pytest.raises(NormgenError) as exc:
        BatchNorm(**{"name": "bn", "format": "BC", "shape": [4], **kw})
    for needle in needles:
        assert needle in str(exc.value), (needle, str(exc.value))


def test_python_positional_and_missing_arguments():
    from normgen import LayerNorm, NormgenError

    with pytest.raises(NormgenError, match="keyword arguments only"):
        LayerNorm("ln")
    with pytest.raises(NormgenError, match="needs shape="):
        LayerNorm(name="ln", format="BC")


def test_unknown_spec_keys_suggest(tmp_path, capsys):
    err = run_bad(tmp_path, capsys, layer_spec(epsilonn="1e-3"))
    assert "unknown key 'epsilonn'; did you mean 'epsilon'?" in err, err
    err = run_bad(tmp_path, capsys, layer_spec(eps="1e-3"))
    assert "unknown key 'eps'" in err and "epsilon=0.001" in err, err


BAD_NPZ = {
    "object": ({"scale": np.array([1, "a", None, 2], dtype=object)}, ["'scale'", "object", "not numbers"]),
    "strings": ({"scale": np.array(["1.0"] * 12)}, ["'scale'", "<U3", "not numbers"]),
    "complex": ({"scale": np.ones(12, complex)}, ["'scale'", "complex128"]),
    "shape": ({"scale": np.ones((3, 4))}, ["shape (3, 4)", "needs 12 values, shape (12,)"]),
}


@pytest.mark.parametrize("case", sorted(BAD_NPZ))
def test_npz_contents(case, tmp_path, capsys):
    arrays, needles = BAD_NPZ[case]
    err = run_bad(tmp_path, capsys, layer_spec(kind='"batchnorm"', params='"p.npz"'), files={"p.npz": arrays})
    for needle in needles:
        assert needle in err, (needle, err)


def test_npz_header_with_a_huge_shape_is_refused_unread(tmp_path, capsys):
    import io
    import zipfile

    header = io.BytesIO()
    np.lib.format.write_array_header_1_0(header, {"descr": "<f8", "fortran_order": False, "shape": (10**12,)})
    with zipfile.ZipFile(tmp_path / "p.npz", "w") as z:
        z.writestr("scale.npy", header.getvalue() + b"\0" * 64)
    err = run_bad(tmp_path, capsys, layer_spec(params='"p.npz"'))
    assert "(1000000000000,)" in err and "at most 16777216" in err, err


def test_show_of_a_layer_larger_than_memory(tmp_path, capsys):
    """A valid layer whose sample is 2^60 elements: show counts from the plan, allocating nothing
    (the fuzz test's counterexample: it made a uint8 array of one sample)."""
    spec = write(tmp_path, layer_spec(kind='"batchnorm"', shape="[4, 536870912, 536870912]")
                 + layer_spec(name='"l2"', kind='"layernorm"', shape='[2, 2147483647, "w"]',
                              operation_dimension='"spatial-channel"'))
    assert main(["show", str(spec)]) == 0
    out = capsys.readouterr().out
    assert "(288230376151711744 values x batch each)" in out and "(w * 4294967294 values each)" in out, out


@pytest.mark.parametrize("kind", ["[]", "{a = 1}", "3"])
def test_a_kind_that_is_no_string(kind, tmp_path, capsys):
    """The fuzz test's counterexample: kind = [] was a TypeError (unhashable) traceback."""
    err = run_bad(tmp_path, capsys, layer_spec(kind=kind))
    assert "unknown kind" in err, err


def test_names_whose_files_or_macros_collide(tmp_path, capsys):
    """The fuzz test's finds: a layer named r defines R_OK, which <unistd.h> defines; layers bn and BN
    write bn.h and BN.h, one file on a case-insensitive file system."""
    err = run_bad(tmp_path, capsys, layer_spec(name='"r"'))
    assert "R_OK" in err and "unistd.h" in err, err
    assert main(["show", str(tmp_path / "spec.toml")]) == 0  # describing it is fine
    err = run_bad(tmp_path, capsys, layer_spec(name='"bn"') + layer_spec(name='"BN"'))
    assert "'bn' and 'BN'" in err and "differ only in case" in err, err


@pytest.mark.parametrize("kw", [dict(mean_decay=np.linspace(0.5, 2.0, 8)), dict(num_channels=np.array([])),
                                dict(affine=np.ones(3)), dict(format=np.ones(100)), dict(shape=np.ones((30, 30)))])
def test_python_arrays_where_values_belong(kw):
    """The fuzz test's finds: an array where a value belongs was a ValueError (its truth value is
    ambiguous) or a message spread over several lines by NumPy's repr."""
    from normgen import BatchNorm, NormgenError

    with pytest.raises(NormgenError) as exc:
        BatchNorm(**{"name": "bn", "format": "BC", "shape": [4], **kw})
    assert "\n" not in str(exc.value) and len(str(exc.value)) < 400, str(exc.value)
