"""The mex target under GNU Octave: every kind built with ``mkoctfile --mex``, called from one
Octave session on column-major arrays in ``matlab_format``, compared with normgen.reference.

The arrays travel as raw bytes: x in ``format`` order (row-major) is the same bytes as MATLAB's
column-major array in ``matlab_format``, so Octave reads them with fread and reshape, calls every
function of the gateway in the order the gateway lists them (each output that another function
takes — running statistics, saved statistics, the accumulator, the parameters, the gradients —
feeds that function), and writes every output back the same way. Skipped without octave and
mkoctfile (``apt-get install octave liboctave-dev``).
"""

from __future__ import annotations

import contextlib
import os
import shutil
import subprocess
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

import numpy as np
import pytest

try:
    import fcntl
except ImportError:  # not POSIX: each xdist worker runs its own session
    fcntl = None

from normgen import BatchNorm, GroupNorm, InstanceNorm, LayerNorm, RMSNorm, emit, reference
from normgen.harness.check import TOLERANCES
from normgen.lowering import lower
from normgen.targets.mex import mex_plan

OCTAVE = shutil.which("octave")
MKOCTFILE = shutil.which("mkoctfile")
pytestmark = pytest.mark.skipif(
    OCTAVE is None or MKOCTFILE is None,
    reason="GNU Octave and mkoctfile are not installed (apt-get install octave liboctave-dev)",
)

BATCH = 3
#: Values the Octave session passes to update.
LEARN = {"learn_rate": 0.1, "l2": 0.01, "momentum": 0.9}


def _params(c: int, seed: int) -> dict:
    rng = np.random.default_rng(seed)
    return {"scale": rng.normal(1.0, 0.3, c), "offset": rng.normal(0.0, 0.5, c)}


def _layers() -> list:
    out = []
    for dtype in ("float32", "float64"):
        d = dtype[-2:]
        img = {"matlab_format": "SSCB", "shape": [5, 4, 6], "dtype": dtype, **_params(6, len(out))}
        rng = np.random.default_rng(7)
        out += [
            BatchNorm(name=f"bn_{d}", **img, trained_mean=rng.normal(0, 1, 6), trained_variance=rng.uniform(0.5, 2, 6),
                      running_variance="unbiased"),
            GroupNorm(name=f"gn_{d}", **img, num_groups=3),
            GroupNorm(name=f"gna_{d}", **img, num_groups="allchannels"),
            GroupNorm(name=f"gnc_{d}", **img, num_groups="channelwise"),
            LayerNorm(name=f"ln_{d}", **img),
            InstanceNorm(name=f"in_{d}", **img),
            # run-time tokens, taken from x's second dimension
            RMSNorm(name=f"rms_{d}", matlab_format="CTB", shape=[8, "tokens"], dtype=dtype,
                    scale=np.linspace(0.5, 1.5, 8)),
        ]
    rng = np.random.default_rng(11)
    out += [
        # per-element scale and offset, MATLAB-shaped [5 4 6]
        LayerNorm(name="lne_32", matlab_format="SSCB", shape=[5, 4, 6], operation_dimension="spatial-channel",
                  affine="element", scale=rng.normal(1, 0.3, (6, 4, 5)), offset=rng.normal(0, 0.3, (6, 4, 5))),
        # no B: batch 1, x is [5 4 6]
        InstanceNorm(name="inb_64", matlab_format="SSC", shape=[5, 4, 6], dtype="float64", **_params(6, 5)),
        # run-time parameters: params_init, the params struct, update
        LayerNorm(name="lnr_64", matlab_format="CB", shape=[7], dtype="float64", param_storage="runtime",
                  **_params(7, 3)),
        BatchNorm(name="bnr_32", matlab_format="CB", shape=[5], param_storage="runtime", running_variance="biased",
                  **_params(5, 4)),
    ]
    return out


LAYERS = _layers()
BY_NAME = {layer.name: layer for layer in LAYERS}
#: The outputs a later function takes as an input of the same name.
CARRIED = ("running_mean", "running_var", "saved_mean", "saved_invstd", "acc", "params", "dscale", "doffset",
           "velocity_scale", "velocity_offset")


def _build(layer, folder: Path) -> str:
    for fname, text in emit(layer, "mex").items():
        (folder / fname).write_text(text)
    proc = subprocess.run([MKOCTFILE, "--mex", f"{layer.name}_mex.c", f"{layer.name}.c"], cwd=folder,
                          capture_output=True, text=True)
    return "" if proc.returncode == 0 else f"{layer.name}: {proc.stdout}{proc.stderr}"


def _write(folder: Path, name: str, a: np.ndarray) -> None:
    (folder / f"{name}.bin").write_bytes(np.ascontiguousarray(a).tobytes())


def _m_size(shape) -> str:
    dims = list(shape)[::-1] + [1] * (2 - len(shape))
    return "[" + " ".join(str(d) for d in dims) + "]"


def _batch(layer) -> int:
    return BATCH if layer.fmt.has_batch else 1


def _inputs(layer, rng) -> tuple[dict[str, np.ndarray], dict]:
    """The arrays Octave starts from, in format order, and the run-time sizes of x."""
    sizes = {n: 5 for n in layer.sizes}
    shape = reference.full_shape(layer, _batch(layer), sizes)
    dt = np.dtype(layer.dtype)
    c = layer.channels
    ns = {
        "x": (rng.standard_normal(shape) * 2 + 0.5).astype(dt),
        "dy": rng.standard_normal(shape).astype(dt),
        "running_mean": rng.normal(0, 1, c).astype(dt),
        "running_var": rng.uniform(0.5, 2, c).astype(dt),
    }
    if layer.param_count:
        ns["velocity_scale"] = rng.normal(0, 0.1, layer.param_count).astype(dt)
        ns["velocity_offset"] = rng.normal(0, 0.1, layer.param_count).astype(dt)
    return ns, sizes


def _script(folder: Path, rng) -> tuple[str, dict]:
    """The Octave session: read the inputs, call every function, write every output."""
    lines = ["1;", "more off;", "warning('off', 'all');",
             "function a = ng_read(f, cls, dims)", "  fid = fopen(f, 'r'); a = fread(fid, Inf, [cls '=>' cls]);",
             "  fclose(fid); a = reshape(a, dims);", "end",
             "function ng_write(f, a)",
             "  if isstruct(a)", "    for n = fieldnames(a)'", "      ng_write([f '.' n{1}], a.(n{1}));", "    end",
             "    return", "  end",
             "  fid = fopen([f '.bin'], 'w'); fwrite(fid, a, class(a)); fclose(fid);",
             "  fid = fopen([f '.size'], 'w'); fprintf(fid, '%s %s', class(a), num2str(size(a))); fclose(fid);",
             "end"]
    state = {}
    for layer in LAYERS:
        ns, sizes = _inputs(layer, rng)
        state[layer.name] = (ns, sizes)
        cls = "single" if layer.dtype == "float32" else "double"
        mp = mex_plan(lower(layer, "c"))
        lines.append(f"% {layer.name}")
        for key, a in ns.items():
            _write(folder, f"{layer.name}__in__{key}", a)
            # the running statistics as MATLAB's trained layers keep them for images: 1-by-1-by-C
            dims = "[1 1 numel(ans)]" if key == "running_mean" else _m_size(a.shape if key in ("x", "dy") else (a.size,))
            read = f"ng_read('{layer.name}__in__{key}.bin', '{cls}', {_m_size(a.shape if key in ('x', 'dy') else (a.size,))})"
            lines.append(f"ans = {read}; {key} = reshape(ans, {dims});")
        for key, value in LEARN.items():
            lines.append(f"{key} = {value};")
        for f in mp.functions:
            outs = [f"o_{n}" for n in f.outputs]
            lines.append(f"[{', '.join(outs)}] = {mp.name}('{f.role}'{''.join(', ' + i for i in f.inputs)});")
            for n in f.outputs:
                lines.append(f"ng_write('{layer.name}__{f.role}__{n}', o_{n});")
                if n in CARRIED:
                    lines.append(f"{n} = o_{n};")
        lines.append(f"clear {' '.join(['ans', *ns, *CARRIED])};")
    return "\n".join(lines) + "\n", state


def _read(folder: Path, name: str) -> tuple[np.ndarray, str, list[int]]:
    cls, *size = (folder / f"{name}.size").read_text().split()
    dt = {"single": np.float32, "double": np.float64, "uint8": np.uint8}[cls]
    return np.frombuffer((folder / f"{name}.bin").read_bytes(), dtype=dt), cls, [int(s) for s in size]


ERROR_CASES = [
    # (layer, Octave statement, identifier, words the message must have)
    ("bn_32", "bn_32_mex('predict', double(x))", "class", ["x", "single", "double", "[5 4 6 3]"]),
    ("bn_32", "bn_32_mex('predict', x(1:4, :, :, :))", "size", ["x", "[5 4 6 batch]", "[4 4 6 3]", "SSCB"]),
    ("bn_32", "bn_32_mex('predict', x, x)", "nargin", ["takes 1 input", "got 2", "y = bn_32_mex('predict', x)"]),
    ("bn_32", "bn_32_mex('predict')", "nargin", ["takes 1 input", "got 0"]),
    ("bn_32", "[a, b] = bn_32_mex('predict', x)", "nargout", ["returns 1 output", "got 2"]),
    ("bn_32", "bn_32_mex('predikt', x)", "function", ["predikt", "predict", "train_forward", "finalize"]),
    ("bn_32", "bn_32_mex(1, x)", "function", ["first argument must name a function", "double"]),
    ("bn_32", "bn_32_mex()", "function", ["first argument", "nothing"]),
    ("bn_32", "bn_32_mex('train_forward', x, zeros(5, 1, 'single'), ones(6, 1, 'single'))", "size",
     ["running_mean", "[6 1]", "[5 1] single"]),
    ("bn_32", "bn_32_mex('train_forward', x, zeros(6, 1), ones(6, 1, 'single'))", "class",
     ["running_mean", "single", "double"]),
    ("bn_32", "bn_32_mex('backward', x, x(:, :, :, 1:2))", "size", ["dy", "[5 4 6 3]", "[5 4 6 2]"]),
    ("bn_32", "bn_32_mex('backward_saved', x, x, zeros(5, 1), ones(6, 1))", "size", ["saved_mean", "[6 1]", "[5 1]"]),
    ("bn_32", "bn_32_mex('accumulate', zeros(3, 1, 'uint8'), x)", "size", ["acc", "uint8", "[3 1]"]),
    ("bn_32", "bn_32_mex('predict', complex(x, x))", "class", ["complex single"]),
    ("rms_64", "rms_64_mex('predict', x(:, :, 1) + 0)", "nothing", []),
    ("rms_64", "rms_64_mex('predict', single(x))", "class", ["double", "single"]),
    ("rms_64", "rms_64_mex('predict', x(1:7, :, :))", "size", ["[8 tokens batch]", "[7 5 3]"]),
    ("lnr_64", "lnr_64_mex('predict', struct('scale', ones(7, 1)), x)", "field", ["offset"]),
    ("lnr_64", "lnr_64_mex('predict', 1, x)", "class", ["struct", "scale, offset"]),
    ("lnr_64", "lnr_64_mex('update', lnr_64_mex('params_init'), ones(7, 1), ones(7, 1), ones(7, 1), ones(7, 1),"
               " [0.1 0.2], 0, 0)", "size", ["learn_rate", "scalar", "[1 2]"]),
    # a C return code: the unbiased running variance of one value per channel
    ("bnc_64", "bnc_64_mex('train_forward', x(:, 1), zeros(4, 1), ones(4, 1))", "return",
     ["bnc_64_train_forward returned 3", "BNC_64_ERR_COUNT"]),
]
ERROR_LAYERS = {"bnc_64": BatchNorm(name="bnc_64", matlab_format="CB", shape=[4], dtype="float64")}


def _error_script(folder: Path, rng) -> str:
    lines = ["fid = fopen('errors.txt', 'w');"]
    for k, (name, stmt, _, _) in enumerate(ERROR_CASES):
        layer = BY_NAME.get(name) or ERROR_LAYERS[name]
        sizes = {n: 5 for n in layer.sizes}
        x = rng.standard_normal(reference.full_shape(layer, BATCH, sizes)).astype(layer.dtype)
        _write(folder, f"err{k}", x)
        cls = "single" if layer.dtype == "float32" else "double"
        lines += [f"x = ng_read('err{k}.bin', '{cls}', {_m_size(x.shape)});",
                  f"try, {stmt}; fprintf(fid, '{k}\\tnothing\\t\\n');",
                  f"catch err, fprintf(fid, '{k}\\t%s\\t%s\\n', err.identifier, strrep(err.message, sprintf('\\n'), ' '));",
                  "end"]
    return "\n".join(lines + ["fclose(fid);"]) + "\n"


@contextlib.contextmanager
def _exclusive(path: Path):
    """Hold a lock on ``path`` (pytest-xdist's workers share the session: the first builds it)."""
    with open(path, "w") as fh:
        if fcntl is not None:
            fcntl.flock(fh, fcntl.LOCK_EX)
        yield


@pytest.fixture(scope="module")
def session(tmp_path_factory):
    """Build every gateway and run the one Octave session, once for all xdist workers."""
    base = tmp_path_factory.getbasetemp()
    if os.environ.get("PYTEST_XDIST_WORKER") and fcntl is not None:
        base = base.parent
    folder = base / "matlab_mex"
    with _exclusive(base / "matlab_mex.lock"):
        folder.mkdir(exist_ok=True)
        rng = np.random.default_rng(2024)
        script, state = _script(folder, rng)  # the same inputs (and files) in every worker
        script += _error_script(folder, rng)
        if not (folder / "done").exists():
            with ThreadPoolExecutor(max(1, min(8, os.cpu_count() or 1))) as pool:
                failures = [f for f in pool.map(lambda layer: _build(layer, folder),
                                                LAYERS + list(ERROR_LAYERS.values())) if f]
            assert not failures, "\n".join(failures)
            (folder / "run_all.m").write_text(script)
            proc = subprocess.run([OCTAVE, "--no-gui", "--norc", "--quiet", "--no-window-system", "run_all.m"],
                                  cwd=folder, capture_output=True, text=True, timeout=300)
            assert proc.returncode == 0 and "error:" not in proc.stdout, proc.stdout + proc.stderr
            (folder / "done").write_text("")
    return folder, state


def _close(got, want, dtype, what, sums=False):
    rtol, atol = TOLERANCES[dtype]
    got = np.asarray(got, dtype=np.float64).reshape(-1)
    want = np.asarray(want, dtype=np.float64).reshape(-1)
    assert got.shape == want.shape, f"{what}: {got.shape} values, want {want.shape}"
    scale = max(1.0, float(np.abs(want).max())) if sums else 1.0
    err = np.abs(got - want)
    assert np.all(err <= atol * scale + rtol * np.abs(want)), f"{what}: max abs err {err.max():.3e}"
    return float(err.max())


def _expected(layer, role: str, ns: dict) -> dict[str, tuple[np.ndarray, bool]]:
    """What each output of one call must be: {name: (values, is a sum over many elements)}, and
    the carried values updated as the Octave session updates them."""
    x, dy = ns["x"], ns["dy"]
    grads = lambda g: {k: (v, True) for k, v in zip(("dx", "dscale", "doffset"), g, strict=True)  # noqa: E731
                       if k == "dx" or k in {f"d{p}" for p in layer.learnable_arrays()}}
    if role == "params_init":
        return {f"params.{k}": (v, False) for k, v in layer.parameter_arrays().items()}
    if role == "predict":
        return {"y": (reference.predict(layer, x), False)}
    if role in ("train_forward", "train_forward_save"):
        out = {}
        if layer.kind == "batchnorm":
            y, rm, rv = reference.train_forward(layer, x, ns["running_mean"], ns["running_var"])
            ns["running_mean"], ns["running_var"] = rm, rv
            out = {"y": (y, False), "running_mean": (rm, False), "running_var": (rv, False)}
        else:
            out = {"y": (reference.predict(layer, x), False)}
        if role == "train_forward_save":
            sm, si = reference.saved_statistics(layer, x)
            out |= {"saved_mean": (sm, False), "saved_invstd": (si, False)}
        return out
    if role in ("backward", "backward_saved", "backward_frozen"):
        g = (reference.backward_frozen if role == "backward_frozen" else reference.backward)(layer, x, dy)
        ns["dscale"], ns["doffset"] = g[1], g[2]
        return grads(g)
    if role == "stats_reset":
        ns["population"] = reference.population_empty(layer)
        return {"acc": (np.zeros(1 + 2 * layer.channels), False)}
    if role == "accumulate":
        ns["population"] = reference.population_accumulate(layer, ns["population"], x)
        n, m, m2 = ns["population"]
        return {"acc": (np.concatenate([[n], m, m2]), True)}
    if role == "finalize":
        m, v = reference.population_finalize(layer, ns["population"])
        return {"trained_mean": (m, False), "trained_variance": (v, False)}
    if role == "update":
        s, o, vs, vo = reference.sgdm_update(layer, layer.scale_values, layer.offset_values, ns["dscale"],
                                             ns["doffset"], ns["velocity_scale"], ns["velocity_offset"], **LEARN)
        return {"params.scale": (s, False), "params.offset": (o, False), "velocity_scale": (vs, False),
                "velocity_offset": (vo, False)}
    raise AssertionError(f"no expectation for {role}")


@pytest.mark.parametrize("name", [layer.name for layer in LAYERS])
def test_every_function_against_the_reference(session, name):
    folder, state = session
    layer = BY_NAME[name]
    ns, sizes = state[name]
    ns = {k: np.asarray(v, dtype=np.float64) for k, v in ns.items()}
    mp = mex_plan(lower(layer, "c"))
    x_size = [int(d) for d in _m_size(reference.full_shape(layer, _batch(layer), sizes))[1:-1].split()]
    checked = []
    for f in mp.functions:
        for out, (want, sums) in _expected(layer, f.role, ns).items():
            got, cls, size = _read(folder, f"{name}__{f.role}__{out}")
            if out == "acc":
                assert cls == "uint8" and got.size % 8 == 0, f"{f.role}: acc is {cls} of {got.size} bytes"
                got = got.view(np.float64)
                _close(got, want, "float64", f"{name} {f.role} acc", sums=True)
                continue
            dtype = "float64" if out.startswith("saved_") else layer.dtype
            assert cls == ("single" if dtype == "float32" else "double"), f"{f.role}: {out} is {cls}"
            if out in ("y", "dx"):
                assert size == x_size, f"{f.role}: {out} has size {size}, x {x_size}"
            if out in ("dscale", "params.scale") and layer.affine == "element":
                assert size == list(layer.param_shape[::-1]), f"{f.role}: {out} has size {size}"
            if out == "running_mean":
                assert size == [1, 1, layer.channels], "the running mean keeps the shape it was given"
            _close(got, want, dtype, f"{name} {f.role} {out}", sums)
            checked.append(f"{f.role}:{out}")
    assert any(c.startswith("predict:") for c in checked)
    if layer.kind == "batchnorm" and layer.param_storage == "embedded":
        assert {"train_forward:running_var", "backward_frozen:dx", "finalize:trained_variance"} <= set(checked)
    if layer.param_storage == "runtime":
        assert "update:params.scale" in checked


@pytest.mark.parametrize("k", range(len(ERROR_CASES)))
def test_error_identifiers(session, k):
    folder, _ = session
    name, stmt, what, words = ERROR_CASES[k]
    rows = {int(r.split("\t")[0]): r.split("\t")[1:] for r in (folder / "errors.txt").read_text().splitlines()}
    ident, message = rows[k]
    if what == "nothing":
        assert ident == "nothing", f"{stmt}: {ident} {message}"
        return
    assert ident == f"normgen:{name}:{what}", f"{stmt}: {ident}: {message}"
    for w in words:
        assert w in message, f"{stmt}: {w!r} not in {message!r}"


def test_gateways_compile_warning_free(session):
    """Every gateway compiles with -std=c99 -Wall -Wextra -pedantic -Werror against Octave's mex.h
    (its headers as system headers: their own warnings are not the gateway's)."""
    folder, _ = session
    cc = shutil.which("gcc") or shutil.which("cc")
    if cc is None:
        pytest.skip("no C compiler")
    inc = subprocess.run([MKOCTFILE, "-p", "INCFLAGS"], capture_output=True, text=True, check=True).stdout.split()
    system = [f"-isystem{flag[2:]}" for flag in inc if flag.startswith("-I")]
    for layer in LAYERS:
        proc = subprocess.run([cc, "-std=c99", "-Wall", "-Wextra", "-pedantic", "-Werror", *system, "-c",
                               f"{layer.name}_mex.c", "-o", os.devnull], cwd=folder, capture_output=True, text=True)
        assert proc.returncode == 0, f"{layer.name}_mex.c:\n{proc.stderr}"
