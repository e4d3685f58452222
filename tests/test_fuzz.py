"""The front door under fuzzing: hypothesis draws spec tables, TOML texts and .npz contents, valid
and broken, and ``normgen emit`` / ``show`` / ``check`` must either succeed (and then the C
compiles) or exit 2 with one ``normgen: error:`` line, no traceback, nothing written.

Every example runs under an address-space limit (RLIMIT_AS, a few GiB above what the process
already maps), so a size that is not checked before it is allocated fails fast as a MemoryError
(which the CLI reports as "out of memory": a failure here) instead of swapping. Deterministic in
CI; ``NORMGEN_FUZZ_EXAMPLES=2000`` runs more examples from a random seed.
"""

from __future__ import annotations

import contextlib
import io
import json
import math
import os
import resource
import shutil
import subprocess
import tempfile
import zipfile
from pathlib import Path

import numpy as np
import pytest
from hypothesis import HealthCheck, event, given, settings
from hypothesis import strategies as st
from hypothesis.control import currently_in_test_context

from normgen.cli import main

EXAMPLES = int(os.environ.get("NORMGEN_FUZZ_EXAMPLES", "0"))
SETTINGS = settings(
    deadline=None,
    derandomize=not EXAMPLES,
    database=None,
    suppress_health_check=[HealthCheck.too_slow, HealthCheck.data_too_large, HealthCheck.filter_too_much],
)


def examples(n: int) -> settings:
    return settings(SETTINGS, max_examples=EXAMPLES or n)


@contextlib.contextmanager
def memory_guard(extra: int = 3 << 30):
    """Limit the address space to what is mapped now plus ``extra`` bytes (restored after)."""
    used = 0
    with open("/proc/self/status", encoding="ascii") as fh:
        for line in fh:
            if line.startswith("VmSize:"):
                used = int(line.split()[1]) * 1024
    soft, hard = resource.getrlimit(resource.RLIMIT_AS)
    limit = used + extra
    if hard != resource.RLIM_INFINITY:
        limit = min(limit, hard)
    resource.setrlimit(resource.RLIMIT_AS, (limit, hard))
    try:
        yield
    finally:
        resource.setrlimit(resource.RLIMIT_AS, (soft, hard))


# ---- TOML ----------------------------------------------------------------------------------------


def toml_value(v) -> str:
    if isinstance(v, bool):
        return "true" if v else "false"
    if isinstance(v, int):
        return str(v)
    if isinstance(v, float):
        return "nan" if math.isnan(v) else ("inf" if v == math.inf else "-inf" if v == -math.inf else repr(v))
    if isinstance(v, str):
        return json.dumps(v)
    if isinstance(v, list):
        return "[" + ", ".join(toml_value(x) for x in v) + "]"
    if isinstance(v, dict):
        return "{" + ", ".join(f"{json.dumps(k)} = {toml_value(x)}" for k, x in v.items()) + "}"
    raise TypeError(v)


def toml_text(tables: list[dict]) -> str:
    out = []
    for t in tables:
        out.append("[[layer]]")
        out += [f"{json.dumps(k)} = {toml_value(v)}" for k, v in t.items()]
        out.append("")
    return "\n".join(out)


# ---- strategies ------------------------------------------------------------------------------------

KINDS = ["batchnorm", "groupnorm", "layernorm", "instancenorm", "rmsnorm"]
FORMATS = ["BC", "BCSS", "BSSC", "BTC", "TBC", "BCT", "CSS", "BCU", "BCSSS"]
KEYS = ["name", "kind", "format", "matlab_format", "shape", "num_channels", "dtype", "epsilon", "num_groups",
        "operation_dimension", "affine", "bias", "mean_decay", "variance_decay", "running_variance",
        "param_storage", "parallel", "scale_learn_rate_factor", "offset_l2_factor", "params", "input_scale",
        "input_zero_point", "output_scale", "output_zero_point", "arithmetic"]

HUGE = st.sampled_from([0, -1, 2**24 + 1, 2**31 - 1, 2**31, 3_000_000_000, 4_000_000_000, 2**62, 2**63 - 1])
JUNK = st.recursive(
    st.none().map(lambda _: "") | st.booleans() | st.integers(-(2**63), 2**63 - 1) | HUGE
    | st.floats(allow_nan=True, allow_infinity=True)
    | st.text(st.characters(codec="utf-8", exclude_categories=["Cs"]), max_size=12)
    | st.sampled_from(["SCBTU", "BXSS", "CC", "auto", "channel", "element", "none", "float16", "int8", "é", "x" * 400]),
    lambda inner: st.lists(inner, max_size=4) | st.dictionaries(st.text(max_size=5), inner, max_size=3),
    max_leaves=8,
)
SIZE = st.integers(1, 9) | st.sampled_from(["h", "w", "tokens", "x", "n_a", "for"]) | HUGE
NAME = st.from_regex(r"[A-Za-z_][A-Za-z0-9_]{0,12}", fullmatch=True) | st.sampled_from(
    ["double", "1st", "a-b", "", "n" * 31, "n" * 32, "n" * 300, "__x", "_X", "é"])


@st.composite
def tables(draw, valid_bias: float = 0.7) -> dict:
    """A [[layer]] table: mostly plausible values, with junk mixed in by chance."""
    fmt = draw(st.sampled_from(FORMATS))
    n = len(fmt.replace("B", ""))
    shape = draw(st.lists(SIZE, min_size=n, max_size=n) if draw(st.booleans()) else
                 st.lists(st.integers(1, 9), min_size=n, max_size=n))
    if draw(st.integers(0, 4)) == 0:
        shape = draw(st.lists(SIZE, max_size=6))
    t: dict = {"name": draw(NAME), "kind": draw(st.sampled_from(KINDS)), "format": fmt, "shape": shape}
    if draw(st.booleans()):
        t["matlab_format"] = t.pop("format")[::-1]
        t["shape"] = t["shape"][::-1]
    plausible = {
        "num_channels": st.sampled_from(["auto", 3, 4, 6]) | HUGE,
        "dtype": st.sampled_from(["float32", "float64", "float16", "int8"]),
        "epsilon": st.floats(allow_nan=True, allow_infinity=True) | st.just(1e-5),
        "num_groups": st.sampled_from([1, 2, 3, "allchannels", "channelwise", 0]) | HUGE,
        "operation_dimension": st.sampled_from(["auto", "channel-only", "spatial-channel", "batch-excluded", "rows"]),
        "affine": st.sampled_from(["channel", "element", "none", "elementwise", True]),
        "bias": st.booleans() | st.just("yes"),
        "mean_decay": st.floats(-1, 2),
        "variance_decay": st.floats(0, 1),
        "running_variance": st.sampled_from(["unbiased", "biased", "sample"]),
        "param_storage": st.sampled_from(["embedded", "runtime"]),
        "parallel": st.sampled_from(["none", "openmp"]),
        "scale_learn_rate_factor": st.floats(allow_nan=True),
        "offset_l2_factor": st.integers(-2, 2),
        "input_scale": st.floats(allow_nan=True, allow_infinity=True) | st.just(0.05),
        "output_zero_point": st.integers(-200, 200),
        "arithmetic": st.sampled_from(["float", "integer", "fixed"]),
    }
    for key in draw(st.lists(st.sampled_from(sorted(plausible)), max_size=4, unique=True)):
        t[key] = draw(plausible[key]) if draw(st.floats(0, 1)) < valid_bias else draw(JUNK)
    if draw(st.integers(0, 5)) == 0:  # a key nobody knows, or one of another framework
        t[draw(st.sampled_from(["eps", "momentum", "epsilonn", "weight", "foo", ""]) | st.text(max_size=8))] = draw(JUNK)
    if draw(st.integers(0, 5)) == 0:  # a required key missing, or junk where a value belongs
        key = draw(st.sampled_from(["name", "kind", "shape", "format"]))
        if draw(st.booleans()):
            t.pop(key, None)
        else:
            t[key] = draw(JUNK)
    return t


KIND_KEYS = {
    "batchnorm": {"mean_decay": st.floats(0, 1), "variance_decay": st.floats(0, 1),
                  "running_variance": st.sampled_from(["unbiased", "biased"])},
    "groupnorm": {"num_groups": st.sampled_from([1, 2, "allchannels", "channelwise"])},
    "layernorm": {"operation_dimension": st.sampled_from(["auto", "channel-only", "spatial-channel", "batch-excluded"])},
    "instancenorm": {},
    "rmsnorm": {"operation_dimension": st.sampled_from(["channel-only", "spatial-channel", "batch-excluded"])},
}


@st.composite
def clean_tables(draw) -> dict:
    """A [[layer]] table that is meant to be valid (an element affine whose dimensions are apart,
    or a run-time size where one is not allowed, may still make it an error)."""
    kind = draw(st.sampled_from(KINDS))
    fmt = draw(st.sampled_from(FORMATS))
    shape: list = []
    for ch in fmt.replace("B", ""):
        if ch == "C":
            shape.append(draw(st.sampled_from([2, 4, 6])))
        elif draw(st.integers(0, 4)) == 0:
            shape.append(draw(st.sampled_from(["h", "w", "tokens"])))
        elif draw(st.integers(0, 5)) == 0:  # valid, and too large for memory
            shape.append(draw(st.integers(2**28, 2**31 - 1)))
        else:
            shape.append(draw(st.integers(1, 7)))
    t: dict = {"name": draw(st.from_regex(r"[a-z][a-z0-9_]{3,10}", fullmatch=True)),
               "kind": kind, "format": fmt, "shape": shape}
    optional = {
        "dtype": st.sampled_from(["float32", "float64"]),
        "epsilon": st.floats(1e-8, 1.0),
        "affine": st.sampled_from(["channel", "element", "none"]),
        "bias": st.booleans(),
        "param_storage": st.sampled_from(["embedded", "runtime"]),
        "parallel": st.sampled_from(["none", "openmp"]),
        "num_channels": st.just("auto"),
        **KIND_KEYS[kind],
    }
    for key in draw(st.lists(st.sampled_from(sorted(optional)), max_size=4, unique=True)):
        t[key] = draw(optional[key])
    if draw(st.integers(0, 3)) == 0:  # int8 (README "int8")
        t.update(dtype="int8", input_scale=draw(st.floats(1e-3, 10.0)), output_scale=draw(st.floats(1e-3, 10.0)),
                 input_zero_point=draw(st.integers(-128, 127)), output_zero_point=draw(st.integers(-128, 127)),
                 arithmetic=draw(st.sampled_from(["float", "integer"])))
    return t


ARRAY = st.one_of(
    st.integers(0, 40).map(lambda n: np.linspace(0.5, 2.0, n)),
    st.integers(1, 12).map(lambda n: np.full(n, np.nan)),
    st.integers(1, 12).map(lambda n: np.r_[np.ones(n - 1), np.inf]),
    st.integers(1, 12).map(lambda n: -np.ones(n)),
    st.integers(1, 12).map(lambda n: np.array(["1.0"] * n)),
    st.integers(1, 12).map(lambda n: np.array([1.0, "a", None] * n, dtype=object)),
    st.integers(1, 12).map(lambda n: np.ones(n, dtype=complex)),
    st.integers(1, 12).map(lambda n: np.ones(n, dtype=np.int8)),
    st.integers(1, 12).map(lambda n: np.ones(n, dtype=bool)),
    st.tuples(st.integers(1, 4), st.integers(1, 4)).map(np.ones),
    st.just(np.float64(3.0)),
)
PARAM_NAMES = st.sampled_from(["scale", "offset", "trained_mean", "trained_variance", "gamma", "weight"])


@st.composite
def npz_files(draw) -> bytes:
    """An .npz archive of random arrays, or a zip / bytes that is no .npz."""
    what = draw(st.integers(0, 9))
    if what == 0:
        return draw(st.binary(max_size=64))
    buf = io.BytesIO()
    if what == 1:  # a zip that is not an .npz
        with zipfile.ZipFile(buf, "w") as z:
            z.writestr(draw(st.sampled_from(["scale.npy", "scale.txt", "x/data.pkl"])), draw(st.binary(max_size=40)))
        return buf.getvalue()
    if what == 2:  # an .npy header promising more than the file holds
        header = io.BytesIO()
        shape = (draw(st.sampled_from([4, 10**6, 10**10, 2**62])),)
        np.lib.format.write_array_header_1_0(header, {"descr": "<f8", "fortran_order": False, "shape": shape})
        with zipfile.ZipFile(buf, "w") as z:
            z.writestr("scale.npy", header.getvalue() + b"\0" * 16)
        return buf.getvalue()
    arrays = draw(st.dictionaries(PARAM_NAMES, ARRAY, max_size=4))
    np.savez(buf, **arrays)
    return buf.getvalue()


# ---- running the CLI ---------------------------------------------------------------------------


def run_cli(command: str, spec: Path, *extra: str) -> tuple[int, str, Path]:
    out = spec.parent / "out"
    argv = [command, str(spec), *extra] + (["-o", str(out)] if command == "emit" else [])
    err, stdout = io.StringIO(), io.StringIO()
    with contextlib.redirect_stderr(err), contextlib.redirect_stdout(stdout), memory_guard():
        try:
            rc = main(argv)
        except SystemExit as exc:  # argparse
            rc = exc.code
    text = err.getvalue()
    if currently_in_test_context():
        event(f"{command}: exit {rc}")
    assert rc in (0, 2), (rc, text)
    assert "Traceback" not in text, text
    assert "out of memory" not in text, f"a size reached an allocation unchecked: {text}"
    if rc == 2:
        assert text.startswith("normgen: error: ") and text.count("\n") == 1, text
        assert not out.exists(), "nothing is written on bad input"
    return rc, text, out


#: Emitted C compiled so far in this process (each compile takes about a second).
COMPILED: list[str] = []
COMPILE_AT_MOST = 6


def compiles(out: Path) -> None:
    """Syntax-check every emitted .c as the tests build it (warnings as errors); the first few of a
    run compile fully."""
    gcc = shutil.which("gcc")
    if gcc is None:
        return
    for c in sorted(out.glob("*.c")):
        mode = ["-c", "-o", os.devnull] if len(COMPILED) < COMPILE_AT_MOST else ["-fsyntax-only"]
        proc = subprocess.run([gcc, "-std=c99", "-Wall", "-Wextra", "-pedantic", "-Werror", "-O2", "-fopenmp",
                               *mode, str(c)], capture_output=True, text=True, cwd=out)
        assert proc.returncode == 0, proc.stderr[-3000:]
        COMPILED.append(c.name)


def fuzz_once(text: str, npz: bytes | None, commands=("emit", "show")) -> None:
    with tempfile.TemporaryDirectory() as tmp:
        spec = Path(tmp) / "spec.toml"
        spec.write_text(text, encoding="utf-8", errors="surrogatepass")
        if npz is not None:
            (Path(tmp) / "p.npz").write_bytes(npz)
        for command in commands:
            rc, _, out = run_cli(*command.split(" ")[:1], spec, *command.split(" ")[1:])
            if rc == 0 and command == "emit":
                compiles(out)
            shutil.rmtree(out, ignore_errors=True)


# ---- the tests -----------------------------------------------------------------------------------


@examples(160)
@given(st.lists(tables() | clean_tables(), min_size=1, max_size=2))
def test_random_spec_tables(layers):
    big = any(isinstance(v, int) and v >= 2**28 for t in layers if isinstance(t.get("shape"), list) for v in t["shape"])
    # check of a layer too large for memory must be refused before it compiles anything
    fuzz_once(toml_text(layers), None, ("emit", "show", "emit --target=cuda") + (("check",) if big else ()))


@examples(80)
@given(tables(valid_bias=0.9) | clean_tables(), npz_files(), st.data())
def test_random_parameter_files(table, npz, data):
    table["params"] = "p.npz"
    if data.draw(st.booleans()):  # arrays of the layer's own channel count, with bad values by chance
        c = next((s for s in table.get("shape", []) if isinstance(s, int) and 1 < s < 10), 4)
        arrays = data.draw(st.dictionaries(PARAM_NAMES, st.sampled_from([
            np.linspace(0.5, 2.0, c), np.r_[np.ones(c - 1), np.nan], np.r_[np.ones(c - 1), -np.inf], -np.ones(c),
            np.ones((1, c)), np.ones(c, dtype=np.float32)]), max_size=4))
        buf = io.BytesIO()
        np.savez(buf, **arrays)
        npz = buf.getvalue()
    fuzz_once(toml_text([table]), npz)


VALID = toml_text([{"name": "bn1", "kind": "batchnorm", "format": "BCSS", "shape": [4, 3, 3], "epsilon": 1e-5},
                   {"name": "ln", "kind": "layernorm", "format": "BTC", "shape": ["tokens", 8]}])


@examples(60)
@given(st.lists(st.tuples(st.integers(0, len(VALID)), st.integers(0, 3),
                          st.text(st.characters(codec="utf-8", exclude_categories=["Cs"]), max_size=4)),
                min_size=1, max_size=4))
def test_mutated_toml_texts(edits):
    """A valid spec with characters deleted, replaced and inserted: broken TOML, keys and values."""
    text = VALID
    for at, cut, new in edits:
        text = text[:at] + new + text[at + cut:]
    fuzz_once(text, None)


SMALL = st.fixed_dictionaries({
    "name": st.sampled_from(["fz_a", "fz_b"]),
    "kind": st.sampled_from(KINDS),
    "format": st.sampled_from(["BC", "BCSS", "BSSC", "BTC"]),
    "dtype": st.sampled_from(["float32", "float64"]),
}).flatmap(lambda t: st.lists(st.integers(1, 5), min_size=len(t["format"]) - 1,
                              max_size=len(t["format"]) - 1).map(lambda s: {**t, "shape": [2 * s[0], *s[1:]]}))


@pytest.mark.skipif(shutil.which("gcc") is None, reason="gcc not found")
@examples(6)
@given(SMALL)
def test_small_valid_layers_check(table):
    """check compiles and runs a few small valid layers: they pass, or exit 2 with one error line."""
    with tempfile.TemporaryDirectory() as tmp:
        spec = Path(tmp) / "spec.toml"
        spec.write_text(toml_text([table]))
        rc, text, _ = run_cli("check", spec, "--batch", "1,3")
        assert rc == 0, text


# ---- the generated functions' run-time guards under AddressSanitizer and UBSan -------------------

#: Layers whose every function with a batch argument is called with bad arguments: (spec table,
#: the batch that overflows size_t with sizes 1 or None, the run-time sizes that overflow with it).
GUARDED = [
    ({"name": "gd_bn", "kind": "batchnorm", "format": "BCSS", "shape": [4, 3, 3]}, None, None),
    ({"name": "gd_ln", "kind": "layernorm", "format": "BTC", "shape": ["tokens", 4096], "param_storage": "runtime"},
     None, 2**31 - 1),
    ({"name": "gd_gn", "kind": "groupnorm", "format": "BCSS", "shape": [4, 2**19, 2**19], "num_groups": 2},
     2**31 - 1, None),
    ({"name": "gd_rms", "kind": "rmsnorm", "format": "BCSS", "shape": [8, "h", "w"], "dtype": "float64"},
     None, 2**31 - 1),
]

GUARD_DRIVER = r"""
#include <stdint.h>
#include <stdio.h>
#include <string.h>
#include "{name}.h"
#define WORDS (1 << 15)
static double buf[{nptr}][WORDS];
static int fails;
#define EXPECT(call, want) do {{ int rc_ = (call); if (rc_ != (want)) {{ \
    printf("line %d: %s returned %d, want %d\n", __LINE__, #call, rc_, (want)); ++fails; }} }} while (0)
int main(void)
{{
    memset(buf, 0x5a, sizeof buf);
{calls}
    for (int i = 0; i < {nptr}; ++i)
        for (size_t k = 0; k < sizeof buf[i]; ++k)
            if (((const unsigned char *)buf[i])[k] != 0x5a) {{ printf("buffer %d byte %zu written\n", i, k); return 3; }}
    return fails ? 2 : 0;
}}
"""


def guard_calls(header: str, name: str, big_batch: int | None, big_size: int | None) -> tuple[str, int, int]:
    """C statements calling every function that takes a batch with each bad argument in turn."""
    import re

    upper = name.upper()
    lines, nptr, count = [], 0, 0
    for fn, arglist in re.findall(rf"^int ({name}_\w+)\((.*)\);$", header, re.M):
        args = [a.strip() for a in arglist.split(",")]
        names = [a.split()[-1].lstrip("*") for a in args]
        if "batch" not in names:
            continue
        pointers = [i for i, a in enumerate(args) if "*" in a]
        sizes = [i for i, a in enumerate(args) if a.startswith("int32_t") and names[i] != "batch"]
        nptr = max(nptr, len(pointers))

        def call(null=None, batch="1", size_values=None, fn=fn, names=names, pointers=pointers):
            out = []
            for i, n in enumerate(names):
                if i in pointers:
                    out.append("NULL" if i == null else f"(void *)buf[{pointers.index(i)}]")
                elif n == "batch":
                    out.append(batch)
                else:
                    out.append((size_values or {}).get(i, "1"))
            return f"{fn}({', '.join(out)})"

        cases = [(call(null=i), f"{upper}_ERR_NULL") for i in pointers]
        # batch norm's data-parallel functions on a shard (NAME_sync_*) take batch 0: an empty shard
        bad = ("-1", "INT32_MIN") if fn.startswith(f"{name}_sync_") else ("0", "-1", "INT32_MIN")
        cases += [(call(batch=b), f"{upper}_ERR_BATCH") for b in bad]
        if big_batch:
            cases.append((call(batch=str(big_batch)), f"{upper}_ERR_BATCH"))
        for i in sizes:
            cases += [(call(size_values={i: v}), f"{upper}_ERR_SIZE") for v in ("0", "-3", "INT32_MIN")]
        if big_size and sizes:
            cases.append((call(batch="INT32_MAX", size_values={i: str(big_size) for i in sizes}), f"{upper}_ERR_SIZE"))
        lines += [f"    EXPECT({c}, {want});" for c, want in cases]
        count += len(cases)
    return "\n".join(lines), nptr, count


@pytest.mark.skipif(shutil.which("gcc") is None, reason="gcc not found")
@pytest.mark.parametrize("case", GUARDED, ids=lambda c: c[0]["name"])
def test_runtime_guards_under_sanitizers(case, tmp_path):
    """NULL pointers, batch < 1, a batch or run-time sizes whose element count overflows size_t,
    run-time sizes < 1: each function returns its code before reading or writing anything (the
    buffers are smaller than any valid call's, and keep their bytes), under ASan and UBSan."""
    table, big_batch, big_size = case
    spec = tmp_path / "spec.toml"
    spec.write_text(toml_text([table]))
    rc, text, out = run_cli("emit", spec)
    assert rc == 0, text
    name = table["name"]
    calls, nptr, count = guard_calls((out / f"{name}.h").read_text(), name, big_batch, big_size)
    assert count >= 10
    (out / "driver.c").write_text(GUARD_DRIVER.format(name=name, nptr=nptr, calls=calls))
    flags = ["-std=c99", "-Wall", "-Wextra", "-pedantic", "-Werror", "-Wno-overflow", "-O1", "-g",
             "-fsanitize=address,undefined", "-fno-sanitize-recover=all", "-fno-omit-frame-pointer"]
    build = subprocess.run(["gcc", *flags, "-o", "driver", "driver.c", f"{name}.c", "-lm"], cwd=out,
                           capture_output=True, text=True)
    assert build.returncode == 0, build.stderr[-3000:]
    proc = subprocess.run(["./driver"], cwd=out, capture_output=True, text=True,
                          env={"ASAN_OPTIONS": "detect_leaks=0", "UBSAN_OPTIONS": "print_stacktrace=1"})
    assert proc.returncode == 0, proc.stdout + proc.stderr


@pytest.mark.skipif(shutil.which("gcc") is None, reason="gcc not found")
def test_rmsnorm_backward_over_one_element(tmp_path):
    spec = tmp_path / "spec.toml"
    spec.write_text(toml_text([{"name": "fz_a", "kind": "rmsnorm", "format": "BTC", "shape": [2, 1]}]))
    rc, text, _ = run_cli("check", spec, "--batch", "1")
    assert rc == 0, text


PY_VALUES = JUNK | ARRAY | st.sampled_from([None, np.float32(1.0), np.int64(4), (4,), [4, "h"], object(), print])
PY_KEYS = st.sampled_from([*KEYS, "scale", "offset", "trained_mean", "trained_variance", "eps", "momentum", "weight",
                           "running_mean", "running_var", "num_features", "normalized_shape", "elementwise_affine",
                           "epsilom", "axis"])


@examples(150)
@given(st.sampled_from(KINDS), st.dictionaries(PY_KEYS, PY_VALUES, max_size=5), st.booleans())
def test_python_arguments(kind, kwargs, base):
    """Any keyword arguments: a layer, or a NormgenError; never another exception."""
    from normgen import NormgenError
    from normgen.description.layers import KINDS as CLASSES

    args = {"name": "py", "format": "BC", "shape": [4]} if base else {}
    args.update(kwargs)
    args.pop("kind", None)
    args.pop("params", None)
    with memory_guard():
        try:
            CLASSES[kind](**args)
        except NormgenError as exc:
            assert "\n" not in str(exc) and len(str(exc)) < 2000, str(exc)
