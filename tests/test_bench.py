"""`normgen bench` runs and reports (no timing assertions), the benchmark specs stay loadable,
and the OpenMP variant of the generated C compiles warning-free and computes what the
reference does, with the same bits on any number of threads."""

from __future__ import annotations

import importlib.util
import json
import platform
import subprocess
from pathlib import Path

import numpy as np
import pytest

from normgen import BatchNorm, GroupNorm, InstanceNorm, LayerNorm, build, load_spec, reference
from normgen.cli import main
from normgen.errors import NormgenError
from normgen.harness.bench import BACKWARD_ROLES, Progress, load_config, sidecar_path, torch_case, traffic
from normgen.harness.check import check_layer
from normgen.targets.c.build import STRICT_FLAGS, cc
from normgen.targets.render import emit

ROOT = Path(__file__).resolve().parent.parent
BENCH = ROOT / "benchmarks"

TINY = """
[[layer]]
name = "tbn"
kind = "batchnorm"
format = "BCSS"
shape = [6, 5, 4]

[[layer]]
name = "tgn"
kind = "groupnorm"
format = "BSSC"
shape = [4, 5, 6]
num_groups = 3

[[layer]]
name = "tln"
kind = "layernorm"
format = "BTC"
shape = [7, 40]
"""

RESULT_FIELDS = {
    "layer", "function", "kind", "format", "shape", "dtype", "batch", "parallel", "threads", "bytes",
    "time_s", "gbps", "copy_time_s", "copy_gbps", "fraction_of_copy", "torch_time_s", "torch_speedup",
    "torch_reuse_time_s", "torch_reuse_speedup", "torch_note", "ort_time_s", "ort_speedup", "ort_note",
    "time_vs_torch_s", "time_vs_torch_reuse_s", "time_vs_ort_s",
    "torch_compile_time_s", "torch_compile_speedup", "time_vs_torch_compile_s", "torch_compile_build_s",
    "torch_compile_note", "torch_compile_reuse_time_s", "torch_compile_reuse_speedup", "time_vs_torch_compile_reuse_s",
}


@pytest.fixture
def tiny_spec(tmp_path: Path) -> Path:
    spec = tmp_path / "tiny.toml"
    spec.write_text(TINY)
    return spec


def _bench(args: list[str], capsys) -> tuple[int, str]:
    rc = main(["bench", *args])
    return rc, capsys.readouterr().out


def test_bench_writes_json(tiny_spec, tmp_path, capsys):
    out = tmp_path / "bench.json"
    rc, text = _bench([str(tiny_spec), "--batch", "2", "--repeat", "2", "--warmup", "1", "--json", str(out)], capsys)
    assert rc == 0
    assert "tbn.predict" in text and "tgn.predict" in text and "tln.predict" in text
    report = json.loads(out.read_text())
    assert report["target"] == "c" and report["threads"] == 1 and report["flags"]
    assert "bytes" in report["bytes_counted"] and report["machine"]["cores"] >= 1
    if Path("/proc/cpuinfo").exists() and platform.machine() in ("x86_64", "AMD64"):
        # which CPU it ran on, where a virtual machine's model name does not say
        machine = report["machine"]
        assert machine["cpu_family"].isdigit() and machine["vectors"] in ("avx512f", "avx2", "avx", "sse2")
        header = next(line for line in text.splitlines() if line.startswith("normgen ") and " bench, " in line)
        assert f"(family {machine['cpu_family']} model {machine['cpu_model']}, {machine['vectors']})" in header
    results = report["results"]
    assert {(r["layer"], r["function"]) for r in results} >= {
        ("tbn", "predict"), ("tbn", "train_forward"), ("tgn", "predict"), ("tln", "predict")}
    for r in results:
        assert RESULT_FIELDS <= set(r)
        assert r["batch"] == 2 and r["time_s"] > 0 and r["copy_time_s"] > 0
        assert r["gbps"] == pytest.approx(r["bytes"] / r["time_s"] / 1e9)
        assert r["fraction_of_copy"] == pytest.approx(r["copy_time_s"] / r["time_s"])
        # each speed-up divides by normgen's time sampled in turn with the other side
        for side in ("torch", "torch_reuse", "torch_compile", "torch_compile_reuse", "ort"):
            if r[f"{side}_time_s"] is not None:
                assert r[f"time_vs_{side}_s"] > 0
                assert r[f"{side}_speedup"] == pytest.approx(r[f"{side}_time_s"] / r[f"time_vs_{side}_s"])
            else:
                assert r[f"{side}_speedup"] is None and r[f"time_vs_{side}_s"] is None
    bn = next(r for r in results if r["layer"] == "tbn" and r["function"] == "predict")
    assert bn["bytes"] == 2 * 2 * 6 * 5 * 4 * 4  # x read + y written, float32
    assert bn["shape"] == [2, 6, 5, 4]
    if _torch_compile_works():
        # every function PyTorch is timed on is also timed through torch.compile, compiled before timing
        for r in results:
            if r["function"] in BACKWARD_ROLES:  # autograd's backward is not compiled
                assert r["torch_compile_time_s"] is None and "gradient" in r["torch_compile_note"], r
                continue
            assert (r["torch_compile_time_s"] is None) == (r["torch_time_s"] is None), r
            assert (r["torch_compile_reuse_time_s"] is None) == (r["torch_time_s"] is None), r
            if r["torch_compile_time_s"] is not None:
                assert r["torch_compile_build_s"] > 0
        assert "x comp" in text


def _torch_compile_works() -> bool:
    """Whether torch.compile runs here (inductor needs a C++ compiler)."""
    if importlib.util.find_spec("torch") is None:
        return False
    import torch

    try:
        return bool(torch.compile(lambda t: t * 2.0 + 1.0, fullgraph=True)(torch.ones(3)).sum() == 9.0)
    except Exception:  # noqa: BLE001 - whatever dynamo/inductor raise where they cannot run
        return False


def test_bench_torch_compile_column_skipped_when_it_fails(tiny_spec, tmp_path, capsys, monkeypatch):
    """A torch.compile that fails (no C++ compiler, an unsupported Python) or computes something else
    leaves its column empty with a note; everything else is measured; --no-compile skips it."""
    torch = pytest.importorskip("torch", reason="the torch.compile column needs torch")

    def broken(fn, **kw):
        def call():
            raise RuntimeError("InductorError: no working C++ compiler found\nmore")
        return call

    monkeypatch.setattr(torch, "compile", broken)
    out = tmp_path / "b.json"
    rc, text = _bench([str(tiny_spec), "--batch", "1", "--repeat", "1", "--no-ort", "--layer", "tbn", "--json", str(out)],
                      capsys)
    assert rc == 0
    results = json.loads(out.read_text())["results"]
    compared = [r for r in results if r["torch_time_s"] is not None and r["function"] not in BACKWARD_ROLES]
    assert compared
    for r in compared:
        assert r["torch_compile_time_s"] is None and r["torch_compile_speedup"] is None
        assert r["torch_compile_note"] == "torch.compile failed: RuntimeError: InductorError: no working C++ compiler found"
    assert "torch.compile column skipped: torch.compile failed: RuntimeError" in text

    monkeypatch.setattr(torch, "compile", lambda fn, **kw: (lambda: fn() + 1.0))
    from normgen.harness.bench import torch_compile_case

    layer = LayerNorm(name="ln", format="BTC", shape=[3, 8])
    fn, note, build_s = torch_compile_case(layer, "predict", np.ones((2, 3, 8), dtype=np.float32))
    assert fn is None and build_s is None and "differs from eager" in note
    monkeypatch.undo()

    rc, _ = _bench([str(tiny_spec), "--batch", "1", "--repeat", "1", "--no-ort", "--no-compile", "--layer", "tln",
                    "--json", str(out)], capsys)
    assert rc == 0
    assert all(r["torch_compile_note"] == "skipped" and r["torch_compile_time_s"] is None
               for r in json.loads(out.read_text())["results"])


def test_bench_sidecar_batches_and_functions(tiny_spec, tmp_path, capsys):
    sidecar_path(tiny_spec).write_text(
        '[bench]\ndefault_batch = 3\n[bench.batch]\ntbn = 4\n[bench.functions]\ntbn = ["train_forward"]\n')
    out = tmp_path / "b.json"
    rc, _ = _bench([str(tiny_spec), "--repeat", "1", "--no-torch", "--no-ort", "--json", str(out)], capsys)
    assert rc == 0
    results = json.loads(out.read_text())["results"]
    got = {(r["layer"], r["function"]): r["batch"] for r in results}
    assert got[("tbn", "train_forward")] == 4 and ("tbn", "predict") not in got
    assert got[("tgn", "predict")] == 3
    assert all(r["torch_note"] == "skipped" and r["ort_note"] == "skipped" for r in results)
    # --batch overrides the sidecar; --layer and --function filter
    rc, text = _bench([str(tiny_spec), "--repeat", "1", "--no-torch", "--no-ort", "--batch", "1",
                       "--layer", "tln", "--function", "predict", "--json", str(out)], capsys)
    results = json.loads(out.read_text())["results"]
    assert [(r["layer"], r["function"], r["batch"]) for r in results] == [("tln", "predict", 1)]


def test_bench_errors(tiny_spec, capsys):
    sidecar_path(tiny_spec).write_text("[bench.batch]\nnope = 2\n")
    assert main(["bench", str(tiny_spec)]) == 2
    assert "nope" in capsys.readouterr().err
    sidecar_path(tiny_spec).write_text("[bench.batch]\ntbn = 0\n")
    assert main(["bench", str(tiny_spec)]) == 2
    assert "positive" in capsys.readouterr().err
    sidecar_path(tiny_spec).unlink()
    assert main(["bench", str(tiny_spec), "--layer", "missing"]) == 2
    assert "missing" in capsys.readouterr().err


def test_bench_cuda_without_gpu_says_why(tiny_spec, capsys):
    if importlib.util.find_spec("pycuda") is not None:
        pytest.skip("pycuda is installed: the CUDA bench may run here")
    assert main(["bench", str(tiny_spec), "--target", "cuda"]) == 2
    err = capsys.readouterr().err
    assert "pycuda" in err or "GPU" in err


def test_bench_plot(tiny_spec, tmp_path, capsys):
    png = tmp_path / "bench.png"
    args = [str(tiny_spec), "--batch", "1", "--repeat", "1", "--no-ort", "--plot", str(png)]
    if importlib.util.find_spec("matplotlib") is None:
        assert main(["bench", *args]) == 2
        assert "matplotlib" in capsys.readouterr().err
        return
    assert main(["bench", *args]) == 0
    assert png.read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"


def test_traffic_counts_tensor_bytes():
    bn = BatchNorm(name="b", format="BCSS", shape=[3, 4, 5])
    assert traffic(bn, "predict", 2) == 2 * (2 * 3 * 4 * 5) * 4
    assert traffic(bn, "train_forward", 2) == 2 * (2 * 3 * 4 * 5) * 4 + 4 * 3 * 4
    assert traffic(bn.replace(dtype="float64"), "predict", 1) == 2 * 60 * 8


@pytest.mark.parametrize("name", ["cpu", "cuda"])
def test_benchmark_specs_load(name):
    """benchmarks/*.toml are plain spec files, their sidecars name only their layers."""
    spec = BENCH / f"{name}.toml"
    layers = load_spec(spec)
    cfg = load_config(layers, str(spec), None, None)
    assert set(cfg.batch) == {layer.name for layer in layers}
    assert all(b >= 1 for b in cfg.batch.values())


def test_cpu_benchmark_layers_match_the_reference():
    """The benchmark workloads' generated C computes what the reference does (batch 1)."""
    for layer in load_spec(BENCH / "cpu.toml"):
        results = check_layer(build(layer), layer, batches=(1,), seed=3)
        assert all(r.ok for r in results), [r for r in results if not r.ok]


# ---- the OpenMP variant ------------------------------------------------------------------------

OMP_LAYERS = [
    BatchNorm(name="obn_nchw", format="BCSS", shape=[6, 9, 7], trained_mean=np.linspace(-1, 1, 6),
              trained_variance=np.linspace(0.5, 2, 6), scale=np.linspace(0.5, 1.5, 6)),
    BatchNorm(name="obn_nhwc", format="BSSC", shape=[9, 7, 6]),
    GroupNorm(name="ogn_nchw", format="BCSS", shape=[12, 8, 9], num_groups=4, offset=np.linspace(-1, 1, 12)),
    GroupNorm(name="ogn_nhwc", format="BSSC", shape=[8, 9, 12], num_groups=4),
    LayerNorm(name="oln", format="BTC", shape=[11, 70]),
    InstanceNorm(name="oin", format="BCT", shape=[5, 300]),
]


def _omp(layer):
    return layer.replace(parallel="openmp")


@pytest.mark.parametrize("layer", OMP_LAYERS, ids=lambda l: l.name)
@pytest.mark.parametrize("dtype", ["float32", "float64"])
def test_openmp_variant_compiles_warning_free(layer, dtype, tmp_path):
    layer = _omp(layer.replace(dtype=dtype))
    files = emit(layer)
    text = files[f"{layer.name}.c"]
    # parallel loops: "parallel for", or "for" inside a "parallel" region (per-thread streamers)
    assert "#pragma omp parallel" in text
    assert text.count("#pragma omp for") <= text.count("#pragma omp parallel\n")
    for name, text in files.items():
        (tmp_path / name).write_text(text)
    for extra in ([], ["-fopenmp"]):
        cmd = [cc(), *STRICT_FLAGS, "-O2", *extra, "-c", str(tmp_path / f"{layer.name}.c"), "-o", str(tmp_path / "o.o")]
        proc = subprocess.run(cmd, capture_output=True, text=True)
        assert proc.returncode == 0, proc.stderr


def _threads(n: int) -> None:
    from normgen.harness.bench import _set_omp_threads

    if not _set_omp_threads(n):
        pytest.skip("libgomp not found")


@pytest.mark.parametrize("layer", OMP_LAYERS, ids=lambda l: l.name)
def test_openmp_variant_matches_reference_on_any_thread_count(layer):
    layer = _omp(layer)
    compiled = build(layer)
    assert all(r.ok for r in check_layer(compiled, layer, batches=(1, 3), seed=1))
    x = (1e4 + np.random.default_rng(4).normal(0, 1e-2, reference.full_shape(layer, 3))).astype(np.float32)
    outs = []
    try:
        for n in (1, 2, 3):
            _threads(n)
            if layer.kind == "batchnorm":
                compiled.running_mean[:] = layer.trained_mean_values
                compiled.running_var[:] = layer.trained_variance_values
                outs.append((compiled.train_forward(x), compiled.running_mean.copy(), compiled.running_var.copy()))
            else:
                outs.append((compiled.predict(x),))
    finally:
        _threads(1)
    for got in outs[1:]:
        for a, b in zip(outs[0], got, strict=True):
            assert np.array_equal(a, b), "results differ between thread counts"
    want = reference.train_forward(layer, x)[0] if layer.kind == "batchnorm" else reference.predict(layer, x)
    assert np.abs(outs[0][0] - want).max() < 1e-4


def test_core_in_place_and_long_runs():
    """y may be x, for rows (blocked lanes with a short last block) and columns sweeps."""
    for layer in (LayerNorm(name="ip_rows", format="BTC", shape=[3, 8195]),
                  GroupNorm(name="ip_cols", format="BSSC", shape=[70, 3, 12], num_groups=3),
                  BatchNorm(name="ip_bn", format="BCSS", shape=[4, 7, 7])):
        compiled = build(layer)
        x = np.random.default_rng(5).normal(2.0, 3.0, reference.full_shape(layer, 2)).astype(np.float32)
        want = reference.predict(layer, x)
        got = compiled.predict(x, out=x)
        assert got is x
        np.testing.assert_allclose(x, want, rtol=2e-5, atol=2e-5)


def test_progress_never_counts_past_its_total(tiny_spec, capsys):
    """The progress bar (tqdm, the bench extra) ends at n/n, the PyTorch re-run phase included."""
    pytest.importorskip("tqdm")
    assert main(["bench", str(tiny_spec), "--repeat", "3", "--warmup", "1", "--no-ort", "--no-compile"]) == 0
    err = capsys.readouterr().err
    import re

    steps = re.findall(r"\| *(\d+)/(\d+) \[", err)
    assert steps, err
    for done, total in steps:
        assert 0 <= int(done) <= int(total), (done, total)
    assert ("tln.backward" in err) and ("freed memory reused" in err)


def test_progress_without_tqdm_draws_nothing(tiny_spec, capsys, monkeypatch):
    """tqdm is optional: without it the bench runs and writes no progress to stderr."""
    import sys

    monkeypatch.setitem(sys.modules, "tqdm", None)  # import tqdm raises ImportError
    progress = Progress(3)
    assert progress.bar is None
    progress.step("x")
    progress.advance()
    progress.extend(2)
    progress.close()
    assert progress.total == 5 and progress.done == 1
    rc, text = _bench([str(tiny_spec), "--layer", "tbn", "--function", "predict", "--repeat", "2", "--warmup", "1",
                       "--no-torch", "--no-ort"], capsys)
    assert rc == 0 and "tbn.predict" in text
    assert capsys.readouterr().err == ""


def test_bench_times_every_training_function(tiny_spec, tmp_path, capsys):
    """train_forward_save, backward, backward_saved and backward_frozen are timed, each beside its copy
    and (where torch is importable) autograd's backward; bytes as traffic() counts them."""
    out = tmp_path / "train.json"
    rc, text = _bench([str(tiny_spec), "--batch", "2", "--repeat", "2", "--warmup", "1", "--no-ort", "--no-compile",
                       "--function", "train_forward_save", "--function", "backward", "--function", "backward_saved",
                       "--function", "backward_frozen", "--json", str(out)], capsys)
    assert rc == 0
    got = {(r["layer"], r["function"]): r for r in json.loads(out.read_text())["results"]}
    assert set(got) == {(n, f) for n in ("tbn", "tgn", "tln") for f in ("train_forward_save", "backward", "backward_saved")} | {
        ("tbn", "backward_frozen")}
    for (name, role), r in got.items():
        layer = next(l for l in load_spec(tiny_spec) if l.name == name)
        assert r["bytes"] == traffic(layer, role, 2) and r["time_s"] > 0
        if importlib.util.find_spec("torch") is not None:
            assert r["torch_time_s"] is not None, r
            if role in BACKWARD_ROLES:
                assert "autograd" in r["torch_note"]


def test_traffic_of_the_training_functions():
    """Saved statistics are doubles, one mean and one 1/std per statistic."""
    bn = BatchNorm(name="b", format="BCSS", shape=[3, 4, 5])
    n = 2 * 3 * 4 * 5
    assert traffic(bn, "backward", 2) == 3 * n * 4 + 2 * 3 * 4
    assert traffic(bn, "backward_frozen", 2) == 3 * n * 4 + 2 * 3 * 4
    assert traffic(bn, "backward_saved", 2) == 3 * n * 4 + 2 * 3 * 4 + 2 * 3 * 8
    assert traffic(bn, "train_forward_save", 2) == 2 * n * 4 + 4 * 3 * 4 + 2 * 3 * 8
    gn = GroupNorm(name="g", format="BCSS", shape=[6, 4, 5], num_groups=3)
    assert traffic(gn, "train_forward_save", 2) == 2 * 240 * 4 + 2 * (2 * 3) * 8


@pytest.mark.parametrize("layer", [
    BatchNorm(name="ab", format="BSSC", shape=[3, 4, 8], trained_mean=np.linspace(-1, 1, 8),
              trained_variance=np.linspace(0.5, 2, 8), scale=np.linspace(0.5, 1.5, 8)),
    GroupNorm(name="ag", format="BCSS", shape=[8, 3, 4], num_groups=4, offset=np.linspace(-1, 1, 8)),
    LayerNorm(name="al", format="BTC", shape=[5, 16]),
], ids=lambda l: l.name)
@pytest.mark.parametrize("role", BACKWARD_ROLES)
def test_torch_autograd_column_is_the_reference_gradient(layer, role):
    """The PyTorch column of a gradient times autograd computing what the generated backward does."""
    pytest.importorskip("torch")
    if role == "backward_frozen" and layer.kind != "batchnorm":
        return
    x = np.random.default_rng(0).standard_normal(reference.full_shape(layer, 2)).astype(np.float32)
    fn, note = torch_case(layer, role, x)
    assert fn is not None and "autograd" in note
    dx, dscale, doffset = (t.detach().numpy() for t in fn())
    from_logical = (lambda a: np.moveaxis(a, 1, -1)) if layer.fmt.letters == "BSSC" else (lambda a: a)
    dy = from_logical(fn.dy.numpy())  # the dy autograd is given
    want = (reference.backward_frozen if role == "backward_frozen" else reference.backward)(layer, x, dy)
    assert np.abs(from_logical(dx) - want[0]).max() < 1e-4 * (1 + np.abs(want[0]).max())
    np.testing.assert_allclose(dscale, want[1], rtol=1e-4, atol=1e-4)
    np.testing.assert_allclose(doffset, want[2], rtol=1e-4, atol=1e-4)


def test_training_methods_write_into_preallocated_outputs():
    """train_forward_save, backward, backward_saved and backward_frozen take out= (the bench's
    timings are not timings of page faults): the arrays given are written and returned."""
    for layer in (BatchNorm(name="ob", format="BSSC", shape=[4, 3, 6]),
                  GroupNorm(name="og", format="BCSS", shape=[8, 5, 5], num_groups=2),
                  LayerNorm(name="ol", format="BTC", shape=[3, 16], bias=False)):
        c = build(layer)
        rng = np.random.default_rng(1)
        x = rng.standard_normal(reference.full_shape(layer, 2)).astype(np.float32)
        dy = rng.standard_normal(x.shape).astype(np.float32)
        y, mean, inv = c.train_forward_save(x)
        out = (np.empty_like(x), np.empty_like(mean), np.empty_like(inv))
        got = c.train_forward_save(x, out=out)
        assert all(g is o for g, o in zip(got, out, strict=True))
        assert np.array_equal(got[0], y) and np.array_equal(got[1], mean) and np.array_equal(got[2], inv)
        roles = ["backward", "backward_saved"] + (["backward_frozen"] if layer.kind == "batchnorm" else [])
        for role in roles:
            args = (x, dy, mean, inv) if role == "backward_saved" else (x, dy)
            want = getattr(c, role)(*args)
            out = tuple(None if w is None else np.empty_like(w) for w in want)
            got = getattr(c, role)(*args, out=out)
            for g, o, w in zip(got, out, want, strict=True):
                assert g is o and (w is None or np.array_equal(g, w))
            dx_only = getattr(c, role)(*args, out=np.empty_like(x))
            assert np.array_equal(dx_only[0], want[0])
        with pytest.raises(NormgenError, match="out= dx"):
            c.backward(x, dy, out=(np.empty(3, np.float32),))
        with pytest.raises(NormgenError, match="out= y"):
            c.train_forward_save(x, out=(x.astype(np.float64),))
        if layer.has_offset is False:
            with pytest.raises(NormgenError, match="pass None"):
                c.backward(x, dy, out=(None, None, np.empty(layer.channels, np.float32)))


def test_traffic_counts_fused_tensors():
    """residual read and h written (N each), mod_shift and mod_scale read (2 * batch * C)."""
    ln = LayerNorm(name="l", format="BTC", shape=[4, 8], residual=True, residual_out=True)
    assert traffic(ln, "predict", 2) == 4 * 64 * 4
    dit = LayerNorm(name="d", format="BTC", shape=[4, 8], modulation="adaln")
    assert traffic(dit, "predict", 2) == 2 * 64 * 4 + 2 * 2 * 8 * 4


@pytest.mark.parametrize("layer, to_logical", [
    (LayerNorm(name="l", format="BTC", shape=[5, 16], residual=True, residual_out=True), lambda a: a),
    (GroupNorm(name="g", format="BCSS", shape=[8, 3, 4], num_groups=4, activation="silu"), lambda a: a),
    (BatchNorm(name="b", format="BSSC", shape=[3, 4, 8], activation="relu"), lambda a: np.moveaxis(a, -1, 1)),
    (LayerNorm(name="d", format="BTC", shape=[6, 8], affine="none", modulation="adaln", activation="gelu_tanh"),
     lambda a: a),
])
def test_torch_composition_of_a_fused_layer_is_the_reference(layer, to_logical):
    """The PyTorch column of a fused row times what the layer computes: x + residual, the norm,
    DiT's modulate, the activation."""
    pytest.importorskip("torch")
    rng = np.random.default_rng(0)
    x = rng.standard_normal(reference.full_shape(layer, 2)).astype(np.float32)
    fused = {}
    if layer.residual:
        fused["residual"] = rng.standard_normal(x.shape).astype(np.float32)
    if layer.modulation != "none":
        fused["mod_shift"], fused["mod_scale"] = (rng.standard_normal(2 * layer.channels).astype(np.float32)
                                                  for _ in range(2))
    fn, note = torch_case(layer, "predict", x, fused=fused)
    assert fn is not None and "composed" in note
    want = to_logical(reference.predict(layer, x, **fused))
    assert np.abs(fn().numpy() - want).max() < 2e-5 * (1 + np.abs(want).max())
