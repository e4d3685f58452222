"""The ``normgen`` command: emit, check, show, bench."""

from __future__ import annotations

import argparse
import os
import sys
import tempfile
from pathlib import Path

from . import __version__
from .errors import NormgenError
from .reference import count
from .targets.render import TARGETS

SPEC_HELP = """\
spec files (TOML), one [[layer]] table per layer:

  [[layer]]
  name = "bn1"                 # a C identifier: files NAME.h/NAME.c, functions NAME_predict ...
  kind = "batchnorm"           # batchnorm | groupnorm | layernorm | instancenorm | rmsnorm
  format = "BCSS"              # row-major letters, outermost first (PyTorch NCHW = "BCSS")
  # matlab_format = "SSCB"     # ...or MATLAB's column-major letters (same layout as "BCSS")
  shape = [64, 56, 56]         # sizes of the non-B dimensions, in the order written
  dtype = "float32"            # float32 | float64 (cuda also float16 | bfloat16)
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
  params = "bn1.npz"           # arrays scale, offset, trained_mean, trained_variance
                               # (path relative to the spec; missing arrays: ones/zeros/zeros/ones)

  Also: num_channels ("auto" or a number matching the shape), scale_learn_rate_factor,
  offset_learn_rate_factor, scale_l2_factor, offset_l2_factor (MATLAB's factors, default 1).
  Letters: S spatial, C channel (exactly one), B batch (at most one), T time (at most one),
  U unspecified. The batch size is a run-time argument of every generated function.
"""


def _load(spec: str):
    from .description.spec import load_spec

    return load_spec(spec)


def _write_all(outdir: Path, files: dict[str, str]) -> list[str]:
    """Write every file (only those whose text changed); nothing is written unless all rendered."""
    outdir.mkdir(parents=True, exist_ok=True)
    written = []
    for fname, text in files.items():
        path = outdir / fname
        if path.is_file() and path.read_text(encoding="utf-8") == text:
            continue
        fd, tmp = tempfile.mkstemp(dir=outdir, prefix=f".{fname}.")
        with os.fdopen(fd, "w", encoding="utf-8", newline="\n") as fh:
            fh.write(text)
        os.replace(tmp, path)
        written.append(fname)
    return written


def cmd_emit(args: argparse.Namespace) -> int:
    from .targets.render import emit

    layers = _load(args.spec)
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


def cmd_check(args: argparse.Namespace) -> int:
    from .harness.check import check_layer
    from .targets.load import build

    layers = _load(args.spec)
    batches = tuple(int(b) for b in args.batch.split(","))
    if any(b < 1 for b in batches):
        raise NormgenError(f"--batch sizes must be positive, got {args.batch!r}")
    rows = []
    for layer in layers:
        compiled = build(layer, args.target)
        rows += check_layer(compiled, layer, batches, seed=args.seed, training=args.training)
    header = f"{'layer':16} {'function':24} {'dtype':9} {'batch':>5} {'max abs err':>12} {'max rel err':>12}  result"
    print(f"target {args.target}; reference: normgen.reference (float64)")
    print(header)
    print("-" * len(header))
    for r in rows:
        print(f"{r.layer:16} {r.function:24} {r.dtype:9} {r.batch:5d} {r.max_abs:12.3e} {r.max_rel:12.3e}  "
              f"{'pass' if r.ok else 'FAIL'}")
    failed = sum(not r.ok for r in rows)
    print(f"{len(rows) - failed} passed, {failed} failed")
    return 1 if failed else 0


def cmd_show(args: argparse.Namespace) -> int:
    from .lowering import lower

    for i, layer in enumerate(_load(args.spec)):
        plan = lower(layer, "c" if layer.dtype in ("float32", "float64") else "cuda")
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
        if layer.kind == "groupnorm":
            print(f"  groups       {layer.groups} of {layer.channels // layer.groups} channels (num_groups = {layer.num_groups!r})")
        if layer.kind in ("layernorm", "rmsnorm"):
            print(f"  operation    {layer.resolved_dimension} (operation_dimension = {layer.operation_dimension!r})")
        if layer.kind == "rmsnorm":
            print("  normalize    y = x / sqrt(mean(x^2) + epsilon): no mean subtracted")
        n1 = count(layer, 1)
        per = f"{n1} values" + (" x batch" if layer.kind == "batchnorm" and layer.fmt.has_batch else "")
        print(f"  statistics   one per {plan.statistic_per}, over {plan.statistic_over} ({per} each)")
        if layer.kind == "batchnorm":
            print("  predict      trained statistics, folded: y = x * a[c] + b[c]")
            print(f"  train        batch statistics; running = decay * batch + (1 - decay) * running "
                  f"(mean_decay {layer.mean_decay!r}, variance_decay {layer.variance_decay!r}, {layer.running_variance} variance)")
        c = layer.channels
        shape = " x ".join(map(str, layer.param_shape))
        learn = ", ".join(f"{k} {shape}" for k in layer.learnable_arrays()) or "none"
        print(f"  affine       {layer.affine}, bias {str(layer.bias).lower()}: {plan.param_per.split(',')[0]}"
              if layer.has_scale else f"  affine       {layer.affine}: y is not scaled or shifted")
        print(f"  learnable    {layer.learnable_count} ({learn})")
        if layer.state_count:
            print(f"  state        {layer.state_count} (trained_mean {c}, trained_variance {c})")
        else:
            print("  state        0")
        print(f"  total        {layer.learnable_count + layer.state_count} numbers")
        print(f"  parameters   {layer.param_storage}" + ("" if layer.param_storage == "embedded" else f" ({layer.name}_params struct)"))
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

    e = add("emit", "write NAME.h/NAME.c (or NAME.cuh/NAME.cu) for every layer of a spec")
    e.add_argument("--target", choices=TARGETS, default="c")
    e.add_argument("-o", "--output", default="out", help="output folder (default: out)")
    e.set_defaults(func=cmd_emit)

    c = add("check", "compile every layer, run it on random inputs, compare with the NumPy reference")
    c.add_argument("--target", choices=TARGETS, default="c")
    c.add_argument("--batch", default="1,2,5", help="comma-separated batch sizes (default 1,2,5)")
    c.add_argument("--seed", type=int, default=0)
    c.add_argument("--no-training", dest="training", action="store_false",
                   help="check predict and train_forward only, not the backward functions")
    c.set_defaults(func=cmd_check)

    s = add("show", "say what each layer computes: format, statistics, parameter counts")
    s.set_defaults(func=cmd_show)

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
    except KeyboardInterrupt:  # pragma: no cover
        return 130
    except BrokenPipeError:  # output piped into `head` and the like: stop quietly
        devnull = os.open(os.devnull, os.O_WRONLY)
        os.dup2(devnull, sys.stdout.fileno())
        return 1


if __name__ == "__main__":  # pragma: no cover
    sys.exit(main())
