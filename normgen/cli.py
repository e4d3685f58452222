"""The ``normgen`` command: emit, check, show, bench, import, fold."""

from __future__ import annotations

import argparse
import os
import sys
import tempfile
from pathlib import Path

from . import __version__
from .description.layers import MAX_SIZE
from .errors import NormgenError
from .importers.writer import umask
from .targets.render import BUILT, TARGETS

SPEC_HELP = """\
spec files (TOML), one [[layer]] table per layer:

  [[layer]]
  name = "bn1"                 # a C identifier: files NAME.h/NAME.c, functions NAME_predict ...
  kind = "batchnorm"           # batchnorm | groupnorm | layernorm | instancenorm | rmsnorm
  format = "BCSS"              # row-major letters, outermost first (PyTorch NCHW = "BCSS")
  # matlab_format = "SSCB"     # ...or MATLAB's column-major letters (same layout as "BCSS")
  shape = [64, 56, 56]         # sizes of the non-B dimensions, in the order written
  dtype = "float32"            # float32 | float64 (cuda also float16 | bfloat16; c also int8)
  # input_scale = 0.05         # int8: real = scale * (q - zero_point), per tensor (scales required)
  # input_zero_point = 0       # int8: integers in [-128, 127], default 0
  # output_scale = 0.03
  # output_zero_point = 0
  # arithmetic = "float"       # int8: float (normalize step in float) | integer (no float at run time)
  epsilon = 1e-5
  num_groups = 32              # groupnorm: integer dividing C, "allchannels" or "channelwise"
  operation_dimension = "auto" # layernorm, rmsnorm: auto | channel-only | spatial-channel | batch-excluded
                               # (rmsnorm's default: channel-only)
  affine = "channel"           # channel | element (layernorm, rmsnorm: the normalized dims' shape) | none
  bias = true                  # false: no offset (rmsnorm's default)
  mean_decay = 0.1             # batchnorm: weight of the new batch value (MATLAB MeanDecay)
  variance_decay = 0.1         # batchnorm: MATLAB VarianceDecay
  running_variance = "unbiased"  # batchnorm: unbiased (PyTorch) | biased
  param_storage = "embedded"   # embedded (static const arrays) | runtime (a params struct)
  parallel = "none"            # none | openmp (C target)
  statistics = "double"       # float: float32 statistics in float, no double (README "Firmware")
  residual = false             # true: normalize h = x + residual (README "Fused forms")
  residual_out = false         # true: also write h
  activation = "none"          # none | relu | silu | gelu | gelu_tanh, applied to the output
  modulation = "none"          # adaln: y = z * (1 + mod_scale[b, c]) + mod_shift[b, c]
  params = "bn1.npz"           # arrays scale, offset, trained_mean, trained_variance
                               # (path relative to the spec; missing arrays: ones/zeros/zeros/ones)
                               # or "bn1.mat": a MATLAB MAT-file with every array the layer has
                               # (TrainedMean, TrainedVariance, Scale, Offset; or in a struct)

  Also: num_channels ("auto" or a number matching the shape), scale_learn_rate_factor,
  offset_learn_rate_factor, scale_l2_factor, offset_l2_factor (MATLAB's factors, default 1),
  functions (the functions to generate: ["predict"], ["predict", "train_forward"], ...;
  default every one).
  Letters: S spatial, C channel (exactly one), B batch (at most one), T time (at most one),
  U unspecified. The batch size is a run-time argument of every generated function.
"""


def _load(spec: str):
    from .description.spec import load_spec

    return load_spec(spec)


def write_atomic(path: Path, data: bytes) -> None:
    """Write ``path`` through a temporary file in its folder and os.replace, with the mode a plain
    open() would give it (0666 less the umask; mkstemp's own is 0600)."""
    fd, tmp = tempfile.mkstemp(dir=path.parent, prefix=f".{path.name}.")
    try:
        with os.fdopen(fd, "wb") as fh:
            os.fchmod(fh.fileno(), 0o666 & ~umask())
            fh.write(data)
        os.replace(tmp, path)
    except BaseException:
        try:
            os.unlink(tmp)
        except OSError:
            pass
        raise


def _write_all(outdir: Path, files: dict[str, str]) -> list[str]:
    """Write every file (only those whose text changed); nothing is written unless all rendered."""
    written = []
    try:
        outdir.mkdir(parents=True, exist_ok=True)
        for fname, text in files.items():
            path = outdir / fname
            if path.is_file() and path.read_text(encoding="utf-8") == text:
                continue
            write_atomic(path, text.encode("utf-8"))
            written.append(fname)
    except OSError as exc:
        raise NormgenError(f"cannot write {exc.filename or str(outdir)!r}: {exc.strerror or exc}") from None
    return written


def cmd_emit(args: argparse.Namespace) -> int:
    from .targets.render import emit

    layers = _load(args.spec)
    if args.functions is not None:
        layers = [layer.replace(functions=args.functions) for layer in layers]
    files: dict[str, str] = {}
    for layer in layers:
        files.update(emit(layer, args.target))
    outdir = Path(args.output)
    if outdir.exists() and not outdir.is_dir():
        raise NormgenError(f"output {str(outdir)!r} exists and is not a directory")
    written = _write_all(outdir, files)
    for fname in files:
        state = "wrote" if fname in written else "unchanged"
        print(f"{state:9} {outdir / fname}")
    return 0


def _print_table(rows, header_line: str) -> int:
    header = f"{'layer':16} {'function':24} {'dtype':9} {'batch':>5} {'max abs err':>12} {'max rel err':>12}  result"
    print(header_line)
    print(header)
    print("-" * len(header))
    for r in rows:
        print(f"{r.layer:16} {r.function:24} {r.dtype:9} {r.batch:5d} {r.max_abs:12.3e} {r.max_rel:12.3e}  "
              f"{'pass' if r.ok else 'FAIL'}")
    failed = sum(not r.ok for r in rows)
    quantized = [r for r in rows if r.one_step is not None]
    if quantized:
        total, off = sum(r.count for r in quantized), sum(r.one_step for r in quantized)
        print(f"int8 rows: errors in quantization steps (pass: at most 1); {total - off} of {total} outputs exact,"
              f" {off} one step off")
    print(f"{len(rows) - failed} passed, {failed} failed")
    return 1 if failed else 0


def _batches(text: str) -> tuple[int, ...]:
    try:
        batches = tuple(int(b) for b in text.split(","))
    except ValueError:
        raise NormgenError(f"--batch must be comma-separated integers, got {text!r}") from None
    if any(b < 1 for b in batches):
        raise NormgenError(f"--batch sizes must be positive, got {text!r}")
    if any(b > MAX_SIZE for b in batches):
        raise NormgenError(f"--batch sizes are at most {MAX_SIZE} (the generated functions' int32_t), got {text!r}")
    return batches


def _size_sets(items: list[str] | None) -> list[dict[str, int]]:
    """``--sizes tokens=7,50 --sizes h=4,9`` → [{tokens: 7, h: 4}, {tokens: 50, h: 9}]: the run-time
    sizes a spec's layers are checked at, one set per position (a single value serves every set).
    ``--sizes seq=128,n=4`` (several names in one) reads as ``--sizes seq=128 --sizes n=4``."""
    lists: dict[str, list[int]] = {}
    for item in items or ():
        key = None
        for part in item.split(","):
            name, sep, value = part.partition("=")
            if sep:
                key = name.strip()
                lists[key] = []
            try:
                number = int(value if sep else part)
            except ValueError:
                number = 0
            if not key or not 1 <= number <= MAX_SIZE:
                raise NormgenError(f"--sizes {item!r} is not NAME=N[,N...] with integers N from 1 to {MAX_SIZE}")
            lists[key].append(number)
    if not lists:
        return []
    n = max(len(v) for v in lists.values())
    bad = [k for k, v in lists.items() if len(v) not in (1, n)]
    if bad:
        raise NormgenError(f"--sizes {bad[0]}: give it 1 or {n} values, as many as the longest list")
    return [{k: v[i] if len(v) > 1 else v[0] for k, v in lists.items()} for i in range(n)]


def _sizes(args: argparse.Namespace) -> dict[str, int]:
    """--sizes for an ONNX model: one value for each symbolic dimension it pins."""
    sets = _size_sets(getattr(args, "sizes", None))
    if len(sets) > 1:
        raise NormgenError("--sizes: an ONNX model's symbolic dimensions take one value each (NAME=N)")
    return sets[0] if sets else {}


def _is_onnx(path: str) -> bool:
    return path.lower().endswith(".onnx")


def cmd_check(args: argparse.Namespace) -> int:
    batches = _batches(args.batch)
    if _is_onnx(args.spec):
        from .importers.onnx_check import check_onnx

        rows, notes = check_onnx(args.spec, target=args.target, batches=batches, seed=args.seed, sizes=_sizes(args))
        for note in notes:
            print(f"note: {note}")
        return _print_table(rows, f"target {args.target}; reference: ONNX Runtime, each node on its own input"
                                  " (the intermediate tensor of the model run on random inputs)")
    from .harness.check import COPIES, check_layer, default_sizes, ensure_memory
    from .targets.load import build

    layers = _load(args.spec)
    size_sets = _size_sets(args.sizes)
    runs = []
    for layer in layers:
        if size_sets and layer.sizes:
            missing = [n for n in layer.sizes if n not in size_sets[0]]
            if missing:
                raise NormgenError(f"--sizes gives no value for run-time size {missing[0]!r} of layer {layer.name!r}")
        sets = [{n: s[n] for n in layer.sizes} for s in size_sets] if size_sets and layer.sizes else None
        runs.append((layer, batches, sets or default_sizes(layer)))
    ensure_memory(runs, COPIES[args.training], "check")
    rows = []
    for layer, _, sets in runs:
        compiled = build(layer, args.target)
        rows += check_layer(compiled, layer, batches, seed=args.seed, training=args.training, sizes=sets)
    return _print_table(rows, f"target {args.target}; reference: normgen.reference (float64)")


def cmd_import(args: argparse.Namespace) -> int:
    from .importers.common import parse_assignments
    from .importers.writer import spec_files, write_files

    model = Path(args.model)
    fmt: str | dict | None = None
    if args.format:
        plain = [f for f in args.format if "=" not in f]
        if plain and len(args.format) > 1:
            raise NormgenError("--format: give one FMT for every layer, or NAME=FMT for each layer to change")
        fmt = plain[0] if plain else parse_assignments(args.format, "--format")
    suffix = model.suffix.lower()
    if suffix in (".keras", ".h5", ".hdf5"):
        from .importers.keras_file import read_keras

        if fmt is not None or args.sizes:
            raise NormgenError("--format and --sizes are for ONNX models; a Keras file records its layers' axes and shapes")
        layers, keras_names, notes = read_keras(model)
        if not layers:
            raise NormgenError(f"{model.name}: no BatchNormalization, LayerNormalization, GroupNormalization or"
                               " RMSNormalization layer to import; nothing written")
        comments = [f"Keras layer {n!r}" for n in keras_names]
        files = spec_files(layers, model.stem, model.name, comments)
    elif _is_onnx(str(model)):
        from .importers.onnx_model import read_onnx

        found = read_onnx(model, format=fmt, sizes=_sizes(args))
        for text in found.warnings:
            print(f"normgen: warning: {text}", file=sys.stderr)
        if not found.layers:
            raise NormgenError(f"{model.name}: no normalization node to import; nothing written")
        layers, notes = [f.layer for f in found.layers], found.notes
        comments = [f"{f.op} node {f.node!r}: {f.input!r} -> {f.output!r}"
                    + (f"; {f.function}" if f.function != "predict" else "") for f in found.layers]
        files = spec_files(layers, found.name, model.name, comments)
    else:
        raise NormgenError(f"{str(model)!r}: normgen import reads ONNX (.onnx) and Keras (.keras, .h5) models; for"
                           " PyTorch modules (and .pt/.pth files) use normgen.from_torch in Python")
    outdir = Path(args.output)
    written = write_files(outdir, files)
    for note in notes:
        print(f"note: {note}")
    for fname in files:
        state = "wrote" if fname in written else "unchanged"
        print(f"{state:9} {outdir / fname}")
    return 0


def cmd_show(args: argparse.Namespace) -> int:
    from .lowering import lower
    from .lowering.int8 import lower_int8, minus

    for i, layer in enumerate(_load(args.spec)):
        quant = lower_int8(layer) if layer.dtype == "int8" else None
        plan = quant.base if quant else lower(layer, "c" if layer.dtype in ("float32", "float64") else "cuda")
        letters = layer.fmt.letters
        sizes = []
        it = iter(layer.dims)
        for ch in letters:
            sizes.append("batch" if ch == "B" else str(next(it)))
        if i:
            print()
        print(f"layer {layer.name}: {layer.kind}")
        print(f"  format       {letters} (row-major, outermost first; MATLAB {letters[::-1]!r}); shape {' x '.join(sizes)}")
        print(f"  dtype        {layer.dtype}; epsilon {layer.epsilon!r}")
        if quant:
            print(f"  quantized    x: real = {layer.input_scale!r} * ({minus(layer.input_zero_point)}),"
                  f" y: real = {layer.output_scale!r} * ({minus(layer.output_zero_point)}); int8, predict only")
            print(f"  int8 math    {quant.arithmetic}")
        if layer.kind == "groupnorm":
            print(f"  groups       {layer.groups} of {layer.channels // layer.groups} channels (num_groups = {layer.num_groups!r})")
        if layer.kind in ("layernorm", "rmsnorm"):
            print(f"  operation    {layer.resolved_dimension} (operation_dimension = {layer.operation_dimension!r})")
        if layer.kind == "rmsnorm":
            print("  normalize    y = x / sqrt(mean(x^2) + epsilon): no mean subtracted")
        if layer.sizes:
            per = f"{plan.per_acc_total.expr('batch', str)} values"
        else:
            n1 = plan.per_acc_total.value(1)  # from the plan: reference.count would allocate a sample
            per = f"{n1} values" + (" x batch" if layer.kind == "batchnorm" and layer.fmt.has_batch else "")
        print(f"  statistics   one per {plan.statistic_per}, over {plan.statistic_over} ({per} each)")
        if layer.kind == "batchnorm" and quant:
            print("  predict      trained statistics and both scales, folded: y = q((x - zp) * a[c] + b[c])")
        elif layer.kind == "batchnorm":
            print("  predict      trained statistics, folded: y = x * a[c] + b[c]")
            print(f"  train        batch statistics; running = decay * batch + (1 - decay) * running "
                  f"(mean_decay {layer.mean_decay!r}, variance_decay {layer.variance_decay!r}, {layer.running_variance} variance)")
        c = layer.channels
        shape = " x ".join(map(str, layer.param_shape))
        learn = ", ".join(f"{k} {shape}" for k in layer.learnable_arrays()) or "none"
        print(f"  affine       {layer.affine}, bias {str(layer.bias).lower()}: {plan.param_per.rsplit(', summed', 1)[0]}"
              if layer.has_scale else f"  affine       {layer.affine}: y is not scaled or shifted")
        if layer.fused:
            parts = (["h = x + residual" + (", written" if layer.residual_out else "")] if layer.residual else [])
            parts += ["y = z * (1 + mod_scale[b, c]) + mod_shift[b, c]"] if layer.modulation != "none" else []
            parts += [f"{layer.activation}(y)"] if layer.activation != "none" else []
            print(f"  fused        {'; '.join(parts)}")
        print(f"  learnable    {layer.learnable_count} ({learn})")
        if layer.state_count:
            print(f"  state        {layer.state_count} (trained_mean {c}, trained_variance {c})")
        else:
            print("  state        0")
        print(f"  total        {layer.learnable_count + layer.state_count} numbers")
        print(f"  parameters   {layer.param_storage}" + ("" if layer.param_storage == "embedded" else f" ({layer.name}_params struct)"))
    return 0


def cmd_fold(args: argparse.Namespace) -> int:
    from .description.fold import fold, read_weights, weights_npz

    layers = _load(args.spec)
    names = [layer.name for layer in layers]
    if args.layer is not None:
        if args.layer not in names:
            raise NormgenError(f"--layer {args.layer!r}: the spec has layers {', '.join(names)}")
        layer = layers[names.index(args.layer)]
    elif len(layers) == 1:
        layer = layers[0]
    else:
        raise NormgenError(f"the spec has {len(layers)} layers ({', '.join(names)}): name the batch norm with --layer")
    weight, bias = read_weights(args.weights)
    folded_weight, folded_bias = fold(layer, weight, bias, axis=args.axis)
    out = Path(args.output)
    if out.is_dir():
        raise NormgenError(f"output {str(out)!r} is a directory; give the .npz file to write")
    try:
        write_atomic(out, weights_npz(folded_weight, folded_bias))
    except OSError as exc:
        raise NormgenError(f"cannot write {str(out)!r}: {exc.strerror or exc}") from None
    print(f"wrote     {out} (weight {folded_weight.shape} {folded_weight.dtype}, bias {folded_bias.shape};"
          f" batch norm {layer.name!r} folded along axis {args.axis})")
    return 0


def cmd_bench(args: argparse.Namespace) -> int:
    from .harness import bench

    return bench.run(args)


def parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(
        prog="normgen",
        description="Generate standalone C and CUDA source for normalization layers (batch, group, layer, instance norm).",
        epilog=SPEC_HELP,
        formatter_class=argparse.RawDescriptionHelpFormatter,
    )
    p.add_argument("--version", action="version", version=f"normgen {__version__}")
    sub = p.add_subparsers(dest="command", required=True, metavar="COMMAND")

    def add(name: str, help_: str) -> argparse.ArgumentParser:
        sp = sub.add_parser(name, help=help_, description=help_, epilog=SPEC_HELP,
                            formatter_class=argparse.RawDescriptionHelpFormatter)
        sp.add_argument("spec", help="the TOML spec file")
        return sp

    e = add("emit", "write NAME.h/NAME.c (or NAME.cuh/NAME.cu; --target mex: NAME.h/NAME.c and the MEX gateway"
                    " NAME_mex.c with its help NAME_mex.m) for every layer of a spec")
    e.add_argument("--target", choices=TARGETS, default="c")
    e.add_argument("-o", "--output", default="out", help="output folder (default: out)")
    e.add_argument("--functions", default=None, metavar="ROLE[,ROLE...]",
                   help="generate only these functions of every layer (and what they need), e.g. predict or"
                        " predict,train_forward; overrides the spec's functions (default: every one)")
    e.set_defaults(func=cmd_emit)

    c = add("check", "compile every layer, run it on random inputs, compare with the NumPy reference"
                     " (MODEL.onnx: with ONNX Runtime's output of each node)")
    c.add_argument("--target", choices=BUILT, default="c")
    c.add_argument("--batch", default="1,2,5", help="comma-separated batch sizes (default 1,2,5)")
    c.add_argument("--seed", type=int, default=0)
    c.add_argument("--no-training", dest="training", action="store_false",
                   help="check predict and train_forward only, not the backward functions")
    c.add_argument("--sizes", action="append", metavar="NAME=N[,N...]",
                   help="a spec's run-time sizes to check at (default 1, 7 and 50), or, for MODEL.onnx, the size of"
                        " a symbolic dimension of the graph inputs (repeatable)")
    c.set_defaults(func=cmd_check)

    i = sub.add_parser(
        "import", help="write a spec and one .npz per layer from a trained ONNX or Keras model",
        description="Read the normalization layers of an ONNX model (BatchNormalization, InstanceNormalization,"
                    " LayerNormalization, GroupNormalization, RMSNormalization and torch's group-norm pattern) or a"
                    " Keras model (.keras, .h5: BatchNormalization, LayerNormalization, GroupNormalization,"
                    " RMSNormalization; read with h5py, no TensorFlow) into DIR/MODEL.toml and DIR/LAYER.npz, which"
                    " emit, check and show take as they are.",
        epilog=SPEC_HELP, formatter_class=argparse.RawDescriptionHelpFormatter)
    i.add_argument("model", help="the model: .onnx, .keras or .h5")
    i.add_argument("-o", "--output", default="out", help="output folder (default: out)")
    i.add_argument("--format", action="append", metavar="FMT|NAME=FMT",
                   help="row-major letters of the layers' inputs as they are laid out (default: ONNX's (N, C, ...)"
                        " as BC and S per further dimension, BCT for rank 3; layer norms: the normalized dimensions"
                        " last); NAME=FMT for one layer (repeatable)")
    i.add_argument("--sizes", action="append", metavar="NAME=N",
                   help="the size of a symbolic dimension other than the batch (repeatable, or NAME=N,NAME=N)")
    i.set_defaults(func=cmd_import)

    s = add("show", "say what each layer computes: format, statistics, parameter counts")
    s.set_defaults(func=cmd_show)

    f = add("fold", "fold a batch norm's trained statistics into the weight and bias of the layer before it")
    f.add_argument("--weights", required=True, metavar="W.npz",
                   help="the conv/linear layer's arrays: 'weight' and optionally 'bias' (one value per output channel)")
    f.add_argument("-o", "--output", required=True, metavar="OUT.npz", help="where to write the folded weight and bias")
    f.add_argument("--layer", default=None, metavar="NAME", help="the batch norm of the spec (needed when it has several layers)")
    f.add_argument("--axis", type=int, default=0, metavar="K",
                   help="the weight's output-channel axis: 0 PyTorch Conv/Linear, MATLAB fullyConnectedLayer (default);"
                        " 1 PyTorch ConvTranspose; -1 Keras kernels, MATLAB convolution2dLayer")
    f.set_defaults(func=cmd_fold)

    b = add("bench", "time the generated functions against memcpy/device copy bandwidth and PyTorch")
    try:
        from .harness import bench as _bench

        _bench.add_arguments(b)
    except ImportError:  # pragma: no cover
        pass
    b.set_defaults(func=cmd_bench)
    return p


def main(argv: list[str] | None = None) -> int:
    args = parser().parse_args(argv)
    try:
        return args.func(args)
    except NormgenError as exc:
        print(f"normgen: error: {exc}", file=sys.stderr)
        return 2
    except MemoryError:  # a safety net: sizes are checked before anything large is allocated
        print("normgen: error: out of memory (the layer, batch or sizes need more than this machine has)",
              file=sys.stderr)
        return 2
    except KeyboardInterrupt:  # pragma: no cover
        return 130
    except BrokenPipeError:  # output piped into `head` and the like: stop quietly
        devnull = os.open(os.devnull, os.O_WRONLY)
        os.dup2(devnull, sys.stdout.fileno())
        return 1


if __name__ == "__main__":  # pragma: no cover
    sys.exit(main())
