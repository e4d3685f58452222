"""Importers: PyTorch modules (``normgen.from_torch``) and ONNX models (``normgen.from_onnx``,
``normgen import``, ``normgen check MODEL.onnx``), checked against the frameworks themselves.

The blocks of issue 16 are built with random weights (no downloads): a ResNet-style block (Conv,
BatchNorm2d, ReLU), a UNet-style block (GroupNorm(32, C), SiLU), a ViT-style block
(LayerNorm(768) over tokens), a ConvNeXt-style LayerNorm([C, H, W]) and a LLaMA-style RMSNorm.
Each goes module → from_torch → compiled C (and CUDA under nvcc where the CUDA target takes the
layer), equal to torch's output within check's tolerances; and is exported with both of torch's
exporters, folding on and off, imported with ``normgen import`` and checked with ``normgen check
MODEL.onnx`` against ONNX Runtime.
"""

from __future__ import annotations

import importlib.util
import io
import logging
import shutil
import warnings
from contextlib import redirect_stdout
from pathlib import Path

import numpy as np
import pytest

import normgen
from normgen import NormgenError
from normgen.cli import main
from normgen.harness.check import TOLERANCES

torch = pytest.importorskip("torch", reason="the PyTorch importer tests need torch (pip install 'normgen[torch]')")
nn = torch.nn

HAS_ONNX = importlib.util.find_spec("onnx") is not None
HAS_ORT = importlib.util.find_spec("onnxruntime") is not None
HAS_ONNXSCRIPT = importlib.util.find_spec("onnxscript") is not None
needs_onnx = pytest.mark.skipif(not (HAS_ONNX and HAS_ORT),
                                reason="the ONNX importer tests need onnx and onnxruntime (pip install 'normgen[onnx]')")
NVCC = shutil.which("nvcc") or (shutil.which("/usr/local/cuda/bin/nvcc"))


# ---- the blocks ------------------------------------------------------------------------------------
def randomize(model: nn.Module, seed: int) -> nn.Module:
    """Trained-looking parameters and running statistics, deterministic per seed."""
    g = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for name, p in model.named_parameters():
            base = 1.0 if name.endswith("weight") and p.ndim <= 3 and "conv" not in name.lower() else 0.0
            p.copy_(base + 0.3 * torch.randn(p.shape, generator=g))
        for name, b in model.named_buffers():
            if name.endswith("running_mean"):
                b.copy_(torch.randn(b.shape, generator=g))
            elif name.endswith("running_var"):
                b.copy_(0.3 + 2.0 * torch.rand(b.shape, generator=g))
    return model.eval()


class Block(nn.Module):
    """A named sequence, so that module paths read like a model's."""

    def __init__(self, **parts):
        super().__init__()
        for k, v in parts.items():
            self.add_module(k, v)

    def forward(self, x):
        for m in self.children():
            x = m(x)
        return x


def make_block(kind: str) -> tuple[nn.Module, tuple[int, ...], str]:
    """(model, input shape, path of its normalization module)."""
    if kind == "resnet":
        m = Block(conv=nn.Conv2d(3, 16, 3, padding=1, bias=False), bn=nn.BatchNorm2d(16), relu=nn.ReLU())
        return randomize(m, 1), (2, 3, 8, 8), "bn"
    if kind == "unet":
        m = Block(norm=nn.GroupNorm(32, 64), act=nn.SiLU())
        return randomize(m, 2), (2, 64, 4, 5), "norm"
    if kind == "vit":
        m = Block(norm=nn.LayerNorm(768), proj=nn.Linear(768, 16))
        return randomize(m, 3), (2, 5, 768), "norm"
    if kind == "convnext":
        m = Block(norm=nn.LayerNorm([16, 6, 6]))
        return randomize(m, 4), (2, 16, 6, 6), "norm"
    if kind == "llama":
        m = Block(norm=nn.RMSNorm(64))
        return randomize(m, 5), (2, 7, 64), "norm"
    raise AssertionError(kind)


BLOCKS = ("resnet", "unet", "vit", "convnext", "llama")


def example(shape, seed: int = 0) -> torch.Tensor:
    g = torch.Generator().manual_seed(seed)
    return 2.0 * torch.randn(shape, generator=g) + 0.5


def norm_io(model: nn.Module, path: str, x: torch.Tensor) -> tuple[np.ndarray, np.ndarray]:
    """The input and output of the normalization module ``path`` when the model runs on x."""
    seen = {}
    mod = model.get_submodule(path)
    hook = mod.register_forward_hook(lambda _m, a, o: seen.update(x=a[0].detach().clone(), y=o.detach().clone()))
    with torch.no_grad():
        model(x)
    hook.remove()
    return seen["x"].numpy(), seen["y"].numpy()


def assert_close(got, want, dtype="float32") -> float:
    """check's criterion, with the framework's output as the reference: |got − want| ≤ atol + rtol·|want|."""
    rtol, atol = TOLERANCES[dtype]
    got, want = np.asarray(got, np.float64), np.asarray(want, np.float64)
    err = np.abs(got - want)
    assert got.shape == want.shape
    assert np.all(err <= atol + rtol * np.abs(want)), f"max abs error {err.max():.3e}"
    return float(err.max())


def cuda_compiles(layer) -> str | None:
    """nvcc-compile the layer's CUDA (warnings as errors); the reason when the CUDA target refuses it."""
    try:
        normgen.emit(layer, "cuda")
    except NormgenError as exc:
        return str(exc)
    from normgen.targets.cuda.module import NVCC_FLAGS, STRICT_FLAGS, compile_cubin

    cubin, _ = compile_cubin(layer, "sm_80", flags=NVCC_FLAGS + STRICT_FLAGS)
    assert cubin.is_file()
    return None


# ---- 1. from_torch ---------------------------------------------------------------------------------
@pytest.mark.parametrize("kind", BLOCKS)
def test_block_from_torch_matches_torch(kind):
    model, shape, path = make_block(kind)
    x = example(shape)
    layers = normgen.from_torch(model, example_input=x)
    assert len(layers) == 1
    layer = layers[0]
    assert layer.name == path
    xin, want = norm_io(model, path, x)
    assert_close(normgen.build(layer).predict(xin), want)
    files = normgen.emit(layer, "c")
    assert set(files) == {f"{path}.h", f"{path}.c"}
    if NVCC is None:
        pytest.skip("nvcc is not installed: the CUDA source was not compiled")
    refused = cuda_compiles(layer)
    if refused is not None:
        pytest.skip(f"the CUDA target does not take this layer yet: {refused}")


def test_blocks_map_to_the_layers_the_readme_names():
    expect = {
        "resnet": ("batchnorm", "BCSS", (16, 8, 8), "channel"),
        "unet": ("groupnorm", "BCSS", (64, 4, 5), "channel"),
        "vit": ("layernorm", "BTC", (5, 768), "channel"),
        "convnext": ("layernorm", "BCSS", (16, 6, 6), "element"),
        "llama": ("rmsnorm", "BTC", (7, 64), "channel"),
    }
    for kind, (k, fmt, dims, affine) in expect.items():
        model, shape, _ = make_block(kind)
        layer = normgen.from_torch(model, example_input=example(shape))[0]
        assert (layer.kind, layer.fmt.letters, layer.dims, layer.affine) == (k, fmt, dims, affine), kind
    bn = normgen.from_torch(make_block("resnet")[0].bn, shape=[16, 8, 8])
    assert bn.mean_decay == bn.variance_decay == 0.1 and bn.running_variance == "unbiased"
    assert normgen.from_torch(make_block("unet")[0].norm, shape=[64, 4, 5]).groups == 32
    ln = normgen.from_torch(make_block("convnext")[0].norm)
    assert ln.resolved_dimension == "spatial-channel" and ln.param_shape == (16, 6, 6)


@pytest.mark.parametrize("module, shape, fmt", [
    (nn.BatchNorm1d(6), (4, 6), "BC"),
    (nn.BatchNorm1d(6), (3, 6, 9), "BCT"),
    (nn.BatchNorm3d(4, affine=False), (2, 4, 3, 2, 5), "BCSSS"),
    (nn.InstanceNorm1d(6), (2, 6, 9), "BCT"),
    (nn.InstanceNorm2d(6, affine=True), (2, 6, 4, 5), "BCSS"),
    (nn.InstanceNorm3d(3, affine=True), (2, 3, 2, 3, 4), "BCSSS"),
    (nn.GroupNorm(3, 6, affine=False), (2, 6, 7), "BCS"),
    (nn.GroupNorm(2, 6), (5, 6), "BC"),
    (nn.LayerNorm(8, elementwise_affine=False), (2, 3, 4, 8), "BSSC"),
    (nn.LayerNorm([4, 8], bias=False), (2, 3, 4, 8), "BTCS"),
    (nn.LayerNorm([3, 4, 8]), (2, 3, 4, 8), "BCSS"),
    (nn.RMSNorm([4, 8]), (2, 4, 8), "BCS"),
    (nn.RMSNorm(8, eps=None, elementwise_affine=False), (3, 8), "BC"),
], ids=lambda v: type(v).__name__ if isinstance(v, nn.Module) else str(v))
def test_every_module_matches_torch(module, shape, fmt):
    randomize(module, 7)
    x = example(shape, 1)
    layer = normgen.from_torch(module, shape=list(shape[1:]), name="m")
    assert layer.fmt.letters == fmt
    with torch.no_grad():
        want = module(x).numpy()
    # the mapping, through the reference (the compiled C equals the reference: test_c_numeric.py)
    assert_close(normgen.reference.predict(layer, x.numpy()), want)


def test_instance_norm_with_running_statistics_in_eval_is_batch_norm_predict():
    m = randomize(nn.InstanceNorm2d(6, affine=True, track_running_stats=True), 8)
    x = example((2, 6, 4, 5), 2)
    layer = normgen.from_torch(m, shape=[6, 4, 5], name="inorm")
    assert layer.kind == "batchnorm"  # torch normalizes with the running statistics here
    with torch.no_grad():
        want = m(x).numpy()
    assert_close(normgen.build(layer).predict(x.numpy()), want)
    # the obvious mapping is wrong (the error 2.68): instance statistics differ
    wrong = normgen.InstanceNorm(name="w", format="BCSS", shape=[6, 4, 5], scale=m.weight.detach().numpy(),
                                 offset=m.bias.detach().numpy())
    assert np.abs(normgen.reference.predict(wrong, x.numpy()) - want).max() > 0.1
    m.train()  # in training mode it uses the instance's own statistics
    assert normgen.from_torch(m, shape=[6, 4, 5]).kind == "instancenorm"


def test_channels_last_format():
    bn = randomize(nn.BatchNorm2d(8), 9)
    gn = randomize(nn.GroupNorm(4, 8), 10)
    x = example((2, 8, 5, 6), 3).to(memory_format=torch.channels_last)
    for m in (bn, gn):
        by_shape = normgen.from_torch(m, format="BSSC", shape=[5, 6, 8], name="cl")
        by_example = normgen.from_torch(m, format="BSSC", example_input=x, name="cl")
        assert by_shape.dims == by_example.dims == (5, 6, 8)
        with torch.no_grad():
            want = m(x).permute(0, 2, 3, 1).numpy()  # NHWC in memory: the array the C function reads
        assert_close(normgen.build(by_example).predict(x.permute(0, 2, 3, 1).contiguous().numpy()), want)


def test_parameters_with_grad_are_detached_and_momentum_is_kept():
    m = randomize(nn.BatchNorm2d(4, momentum=0.3, eps=1e-3), 11)
    assert m.weight.requires_grad
    layer = normgen.from_torch(m, shape=[4, 2, 2])
    assert layer.mean_decay == layer.variance_decay == pytest.approx(0.3) and layer.epsilon == 1e-3
    np.testing.assert_array_equal(layer.scale_values, m.weight.detach().double().numpy())
    np.testing.assert_array_equal(layer.trained_variance_values, m.running_var.double().numpy())
    # train_forward follows torch's training step (momentum on the new value, unbiased running variance)
    x = example((3, 4, 2, 2), 4)
    m.train()
    with torch.no_grad():
        want = m(x).numpy()
    built = normgen.build(layer)
    assert_close(built.train_forward(x.numpy()), want)
    assert_close(built.running_mean, m.running_mean.numpy())
    assert_close(built.running_var, m.running_var.numpy())


def test_a_model_gives_distinct_layer_names_in_module_order():
    model = nn.Sequential(
        nn.Conv2d(3, 8, 3), nn.BatchNorm2d(8),
        nn.Sequential(nn.Conv2d(8, 8, 1), nn.GroupNorm(2, 8)),
        Block(int=nn.BatchNorm2d(8)),  # a C keyword as a module name
    )
    randomize(model, 12)
    layers = normgen.from_torch(model, example_input=example((1, 3, 7, 7)))
    assert [layer.name for layer in layers] == ["sequential_1", "sequential_2_1", "sequential_3_int"]
    assert [layer.kind for layer in layers] == ["batchnorm", "groupnorm", "batchnorm"]
    assert all(layer.dims == (8, 5, 5) for layer in layers)
    named = normgen.from_torch(model, shape={"1": [8, 5, 5], "2.1": [8, 5, 5], "3.int": [8, 5, 5]}, name="net")
    assert [layer.name for layer in named] == ["net_1", "net_2_1", "net_3_int"]
    assert model.training is False  # the example run restored every mode


@pytest.mark.parametrize("make, kwargs, words", [
    (lambda: nn.BatchNorm2d(4, momentum=None), {"shape": [4, 2, 2]}, ["momentum=None", "cumulative", "module.momentum"]),
    (lambda: nn.BatchNorm2d(4, track_running_stats=False), {"shape": [4, 2, 2]}, ["track_running_stats=False", "train_forward"]),
    (lambda: nn.BatchNorm2d(4), {}, ["shape=[C, H, W]", "example_input"]),
    (lambda: nn.BatchNorm2d(4), {"shape": [5, 2, 2]}, ["C size", "4 channels"]),
    (lambda: nn.BatchNorm2d(4), {"shape": [4, 2]}, ["has 2 sizes", "3 besides the batch"]),
    (lambda: nn.LayerNorm([4, 8]), {"shape": [3, 8, 4]}, ["does not end with", "[4, 8]"]),
    (lambda: nn.LayerNorm([4, 8]), {"shape": [2, 3, 4, 8]}, ["merge them into the batch"]),
    (lambda: nn.LayerNorm(8), {"shape": [3, 8], "format": "BCT"}, ["'BCT'", "operation dimension"]),
    (lambda: nn.Sequential(nn.ReLU()), {}, ["no normalization module"]),
])
def test_from_torch_errors_are_clear(make, kwargs, words):
    with pytest.raises(NormgenError) as info:
        normgen.from_torch(make(), **kwargs)
    for w in words:
        assert w in str(info.value)


def test_instance_norm_momentum_none_in_eval_is_fine():
    m = randomize(nn.InstanceNorm2d(3, track_running_stats=True, momentum=None), 13)
    x = example((2, 3, 4, 4))
    with torch.no_grad():
        want = m(x).numpy()
    assert_close(normgen.reference.predict(normgen.from_torch(m, shape=[3, 4, 4]), x.numpy()), want)


# ---- 2, 3. ONNX ------------------------------------------------------------------------------------
EXPORTS = [(kind, exporter, fold) for kind in BLOCKS for exporter in ("torchscript", "dynamo") for fold in (True, False)]


def export(kind: str, exporter: str, fold: bool, path: Path) -> tuple[nn.Module, torch.Tensor]:
    """The block exported to ``path`` with one of torch's exporters, the batch dimension dynamic."""
    model, shape, _ = make_block(kind)
    x = example(shape)
    if exporter == "torchscript":
        if kind == "llama":
            pytest.skip("the TorchScript exporter cannot export aten::rms_norm at any opset (torch 2.13);"
                        " the dynamo exporter writes RMSNormalization-23")
        kw = dict(dynamo=False, input_names=["x"], output_names=["y"], dynamic_axes={"x": {0: "batch"}},
                  do_constant_folding=fold)
        if not fold:
            kw["training"] = torch.onnx.TrainingMode.PRESERVE
    else:
        if not HAS_ONNXSCRIPT:
            pytest.skip("the dynamo exporter needs onnxscript (pip install onnxscript)")
        kw = dict(dynamo=True, optimize=fold, dynamic_shapes=({0: torch.export.Dim("batch")},), verbose=False)
        if kind == "llama":
            kw["opset_version"] = 23  # RMSNormalization; below 23 it is written as Pow, ReduceMean, ...
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        logging.disable(logging.WARNING)
        try:
            with redirect_stdout(io.StringIO()):
                torch.onnx.export(model, (x,), str(path), **kw)
        finally:
            logging.disable(logging.NOTSET)
    return model, x


def run_cli(*argv) -> tuple[int, str]:
    out = io.StringIO()
    with redirect_stdout(out):
        rc = main([str(a) for a in argv])
    return rc, out.getvalue()


@needs_onnx
@pytest.mark.parametrize("kind, exporter, fold", EXPORTS, ids=[f"{k}-{e}-{'fold' if f else 'nofold'}" for k, e, f in EXPORTS])
def test_exported_block_imports_and_checks_against_onnxruntime(kind, exporter, fold, tmp_path, capsys):
    path = tmp_path / f"{kind}.onnx"
    model, x = export(kind, exporter, fold, path)
    outdir = tmp_path / "spec"
    if kind == "resnet" and fold:
        # BatchNorm folded into the Conv: a warning naming the way out, not a crash
        rc, _ = run_cli("import", path, "-o", outdir)
        err = capsys.readouterr().err
        assert rc == 2 and not outdir.exists()
        assert "normgen: warning:" in err and "do_constant_folding=False" in err and "TrainingMode.PRESERVE" in err
        with pytest.warns(UserWarning, match="folds BatchNorm"):
            assert normgen.from_onnx(path) == []
        return
    rc, out = run_cli("import", path, "-o", outdir)
    assert rc == 0, capsys.readouterr().err
    spec = outdir / f"{kind}.toml"
    assert f"wrote     {spec}" in out
    # the spec is what normgen emit / check / show take, and it holds the torch module's numbers
    (imported,) = normgen.load_spec(spec)
    (direct,) = normgen.from_torch(model, example_input=x)
    assert (imported.kind, imported.fmt.letters, imported.dims, imported.affine) == \
        (direct.kind, direct.fmt.letters, direct.dims, direct.affine)
    assert imported.epsilon == pytest.approx(direct.epsilon, rel=1e-6)
    for key, values in direct.parameter_arrays().items():
        np.testing.assert_allclose(imported.parameter_arrays()[key], values, rtol=1e-6, atol=0, err_msg=key)
    assert run_cli("show", spec)[0] == 0
    assert run_cli("emit", spec, "-o", tmp_path / "c")[0] == 0
    # the oracle: each layer's generated C on its node's input against ONNX Runtime's output
    rc, out = run_cli("check", path, "--batch", "1,3")
    assert rc == 0, out
    assert "reference: ONNX Runtime" in out and "2 passed, 0 failed" in out


@needs_onnx
def test_check_model_fails_when_the_generated_code_is_wrong(tmp_path, monkeypatch):
    path = tmp_path / "vit.onnx"
    export("vit", "torchscript", True, path)
    from normgen.importers import onnx_model

    real = onnx_model.LayerNorm

    def off_by_a_bit(**kw):  # a layer whose epsilon is not the model's
        return real(**{**kw, "epsilon": 0.5})

    monkeypatch.setattr(onnx_model, "LayerNorm", off_by_a_bit)
    rc, out = run_cli("check", path, "--batch", "2")
    assert rc == 1 and "FAIL" in out and "0 passed, 1 failed" in out


@needs_onnx
def test_symbolic_dimension_is_a_run_time_size_unless_pinned(tmp_path, capsys):
    model, shape, _ = make_block("vit")
    path = tmp_path / "seq.onnx"
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        torch.onnx.export(model, (example(shape),), str(path), dynamic_axes={"x": {0: "batch", 1: "seq"}},
                          dynamo=False, input_names=["x"])
    rc, _ = run_cli("import", path, "-o", tmp_path / "dyn")
    assert rc == 0
    layer = normgen.load_spec(tmp_path / "dyn" / "seq.toml")[0]
    assert layer.dims == ("seq", 768) and layer.sizes == ("seq",)
    compiled = normgen.build(layer)  # the same code at two lengths, against torch
    for n in (3, 11):
        x = example((2, n, 768))
        norm = next(m for m in model.modules() if isinstance(m, nn.LayerNorm))
        with torch.no_grad():
            want = norm(x).numpy()
        np.testing.assert_allclose(compiled.predict(x.numpy()), want, rtol=2e-5, atol=2e-5)
    rc, _ = run_cli("check", path, "--batch", "2")
    err = capsys.readouterr().err
    assert rc == 2 and "'seq'" in err and "--sizes seq=N" in err and "Traceback" not in err
    rc, _ = run_cli("import", path, "-o", tmp_path / "out", "--sizes", "seq=9")
    assert rc == 0
    assert normgen.load_spec(tmp_path / "out" / "seq.toml")[0].dims == (9, 768)
    assert normgen.from_onnx(path, sizes={"seq": 4})[0].dims == (4, 768)
    rc, out = run_cli("check", path, "--sizes", "seq=3", "--batch", "2")
    assert rc == 0 and "1 passed" in out
    rc, _ = run_cli("import", path, "--sizes", "length=3", "-o", tmp_path / "o2")
    assert rc == 2 and "'length'" in capsys.readouterr().err


@needs_onnx
def test_format_option_renames_the_letters(tmp_path, capsys):
    path = tmp_path / "resnet.onnx"
    export("resnet", "dynamo", False, path)
    rc, out = run_cli("import", path, "-o", tmp_path / "a", "--format", "BCUU")
    assert rc == 0
    assert normgen.load_spec(tmp_path / "a" / "resnet.toml")[0].fmt.letters == "BCUU"
    rc, _ = run_cli("import", path, "-o", tmp_path / "b", "--format", "BSSC")
    assert rc == 2 and "starts with BC" in capsys.readouterr().err
    rc, _ = run_cli("import", path, "-o", tmp_path / "b", "--format", "nosuch=BCSS")
    assert rc == 2 and "'nosuch'" in capsys.readouterr().err


def test_import_of_something_else_is_one_clear_error(tmp_path, capsys):
    pt = tmp_path / "weights.pt"
    pt.write_bytes(b"not a model")
    rc, _ = run_cli("import", pt, "-o", tmp_path / "out")
    assert rc == 2 and "from_torch" in capsys.readouterr().err
    if HAS_ONNX:
        bad = tmp_path / "broken.onnx"
        bad.write_bytes(b"\x00garbage")
        rc, _ = run_cli("import", bad, "-o", tmp_path / "out")
        err = capsys.readouterr().err
        assert rc == 2 and "not a readable ONNX model" in err and err.count("\n") == 1
        rc, _ = run_cli("import", tmp_path / "missing.onnx")
        assert rc == 2 and "does not exist" in capsys.readouterr().err
    assert not (tmp_path / "out").exists()
