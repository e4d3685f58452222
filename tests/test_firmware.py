"""Firmware: predict-only layers of every kind cross-compiled for Cortex-M0, M4F and M7 with
strict warnings, their stack measured (-fstack-usage), and run bare-metal under QEMU (semihosting),
their outputs compared with normgen.reference.

Needs the GNU Arm Embedded toolchain with newlib (Debian: gcc-arm-none-eabi,
libnewlib-arm-none-eabi) and, for the runs, qemu-system-arm; without them these tests skip.
"""

from __future__ import annotations

import os
import shutil
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest

from helpers import bn_stats, params
from normgen import BatchNorm, GroupNorm, InstanceNorm, LayerNorm, RMSNorm, emit, load_spec, reference
from normgen.harness.check import compare, compare_int8, int8_inputs, random_input
from normgen.lowering import lower
from normgen.targets.c.build import FIRMWARE_WARNINGS, STRICT_FLAGS

GCC = shutil.which("arm-none-eabi-gcc")
QEMU = shutil.which("qemu-system-arm")
HERE = Path(__file__).resolve().parent.parent / "examples" / "firmware"

#: Each core: its compiler flags and the QEMU board that runs its code (an385 is a Cortex-M3,
#: which runs the M0's ARMv6-M code).
CPUS = {
    "m0": (["-mcpu=cortex-m0", "-mthumb"], "mps2-an385"),
    "m4f": (["-mcpu=cortex-m4", "-mfpu=fpv4-sp-d16", "-mfloat-abi=hard"], "mps2-an386"),
    "m7": (["-mcpu=cortex-m7", "-mfpu=fpv5-d16", "-mfloat-abi=hard"], "mps2-an500"),
}
#: The stack of a predict function (bytes, -fstack-usage on the M4F) that firmware budgets for.
PREDICT_STACK = 512
BATCH = 3


def _newlib() -> bool:
    if GCC is None:
        return False
    out = subprocess.run([GCC, "-print-file-name=rdimon.specs"], capture_output=True, text=True).stdout.strip()
    return Path(out).is_file()


pytestmark = pytest.mark.skipif(not _newlib(), reason="no arm-none-eabi-gcc with newlib (gcc-arm-none-eabi,"
                                " libnewlib-arm-none-eabi)")


def layers():
    """One predict-only float32 layer of every kind, with random parameters."""
    bc = dict(format="BCSS", shape=[8, 4, 4], functions=["predict"])
    seq = dict(format="BTC", shape=[6, 16], functions=["predict"])
    yield BatchNorm(name="fw_bn", **bc, **params(8, 1), **bn_stats(8, 1))
    yield GroupNorm(name="fw_gn", **bc, num_groups=2, **params(8, 2))
    yield LayerNorm(name="fw_ln", **seq, **params(16, 3))
    yield InstanceNorm(name="fw_in", **bc, **params(8, 4))
    yield RMSNorm(name="fw_rms", **seq, scale=params(16, 5)["scale"])


#: Every kind with its statistics in double (the default), then in float (statistics = "float").
LAYERS = list(layers())
LAYERS += [la.replace(name=f"{la.name}_f", statistics="float") for la in LAYERS]
#: A fused layer (residual, adaLN modulation, GELU), compiled but not run, in double and in float.
FUSED = LayerNorm(name="fw_lnf", format="BTC", shape=[6, 16], residual=True, activation="gelu",
                  modulation="adaln", functions=["predict"])
FUSED_F = FUSED.replace(name="fw_lnf_f", statistics="float")
#: The training functions' stack (bytes, M4F) that firmware budgets for.
TRAINING_STACK = 1024
NM = shutil.which("arm-none-eabi-nm")


#: int8 layers of every kind (README "int8"): statistics in integers, the normalize step in float.
QUANT = dict(dtype="int8", input_scale=0.05, input_zero_point=-3, output_scale=0.03, output_zero_point=5)
INT8_LAYERS = [
    BatchNorm(name="q8_bn", format="BCSS", shape=[8, 4, 4], **QUANT, **params(8, 1), **bn_stats(8, 1)),
    GroupNorm(name="q8_gn", format="BSSC", shape=[4, 4, 8], num_groups=2, **QUANT, **params(8, 2)),
    LayerNorm(name="q8_ln", format="BTC", shape=[6, 16], **QUANT, **params(16, 3)),
    InstanceNorm(name="q8_in", format="BCSS", shape=[8, 4, 4], **QUANT, **params(8, 4)),
    RMSNorm(name="q8_rms", format="BTC", shape=[6, 16], **QUANT, scale=params(16, 5)["scale"]),
]
#: The same with arithmetic = "integer": no float at run time.
INT8_LAYERS += [layer.replace(name=f"{layer.name}_i", arithmetic="integer") for layer in INT8_LAYERS]


def cross_compile(layer, cpu: str, out: Path, warnings: tuple[str, ...] = ()) -> dict[str, tuple[int, str]]:
    """NAME.c compiled with -Os, the strict flags and ``warnings`` (errors too); each function's stack:
    {name: (bytes, qualifier)}."""
    for fname, text in emit(layer).items():
        (out / fname).write_text(text)
    obj = out / f"{layer.name}_{cpu}.o"
    cmd = [GCC, *CPUS[cpu][0], "-Os", *STRICT_FLAGS, *warnings, "-fstack-usage", "-c", str(out / f"{layer.name}.c"), "-o", str(obj)]
    proc = subprocess.run(cmd, capture_output=True, text=True)
    assert proc.returncode == 0, proc.stderr
    stacks = {}
    for line in obj.with_suffix(".su").read_text().splitlines():
        where, size, qualifier = line.split("\t")
        stacks[where.rsplit(":", 1)[-1]] = (int(size), qualifier)
    return stacks


@pytest.mark.parametrize("cpu", sorted(CPUS))
def test_predict_cross_compiles_free_of_firmware_warnings_with_a_small_stack(cpu, tmp_path):
    for layer in [*LAYERS, FUSED, FUSED_F]:
        stacks = cross_compile(layer, cpu, tmp_path, tuple(FIRMWARE_WARNINGS))
        size, qualifier = stacks[f"{layer.name}_predict"]
        assert qualifier == "static", (layer.name, qualifier)  # no VLA, no alloca: a bound known at build time
        assert size <= PREDICT_STACK, (layer.name, cpu, size)


def test_every_function_has_a_stack_known_at_build_time(tmp_path):
    """Every function of a layer (M4F): no VLA or alloca. The issue's 1 KiB goal for the training
    functions is not met yet (README "Firmware" has the figures), so only the bound is checked."""
    for layer in (LAYERS[0].replace(functions=None), LAYERS[2].replace(functions=None)):
        stacks = cross_compile(layer, "m4f", tmp_path)
        plan = lower(layer, "c")
        sync = plan.train.sync.functions if plan.train.sync is not None else []
        assert len(stacks) == len(plan.public_functions) + len(sync)
        for name, (_, qualifier) in stacks.items():
            assert qualifier == "static", (name, qualifier)


def _soft_double(obj: Path) -> list[str]:
    """The double-precision routines an object calls (libgcc's __aeabi_d*, libm's double functions)."""
    out = subprocess.run([NM, "-u", str(obj)], capture_output=True, text=True, check=True).stdout.split()
    return [s for s in out if s.startswith("__aeabi_d") or s.startswith("__aeabi_f2d")
            or s in ("sqrt", "exp", "erf", "tanh", "fabs", "copysign")]


FLOAT_TRAINING = [la.replace(functions=None) for la in LAYERS if la.statistics == "float"] + [
    FUSED_F.replace(functions=None)]


@pytest.mark.skipif(NM is None, reason="no arm-none-eabi-nm")
@pytest.mark.parametrize("cpu", ["m0", "m4f"])
def test_float_statistics_call_no_double_routine(cpu, tmp_path):
    """statistics = "float": every function of every kind, built with the firmware warnings, calls no
    soft-double routine (on the M4F everything is single-precision FPU code, on the M0 soft float);
    the same layers with double statistics do (the check sees them)."""
    for layer in FLOAT_TRAINING:
        cross_compile(layer, cpu, tmp_path, tuple(FIRMWARE_WARNINGS))
        assert _soft_double(tmp_path / f"{layer.name}_{cpu}.o") == [], layer.name
    double = LAYERS[2].replace(name="fw_ln_d", functions=None)
    cross_compile(double, cpu, tmp_path)
    assert "__aeabi_dadd" in _soft_double(tmp_path / f"fw_ln_d_{cpu}.o")


#: Functions whose stack is still above TRAINING_STACK on the M4F (README "Firmware" has the figures):
#: batch norm on [8, 4, 4] takes the columns strategy, which keeps a partial sum per column of a row
#: (C x S x S values here) on the stack.
OVER_BUDGET = {"fw_bn_f": ("train_forward", "train_forward_save", "backward", "backward_saved", "accumulate")}


def test_float_statistics_training_stacks(tmp_path):
    """The training functions of float-statistics layers (M4F, -Os): at most 1 KiB of stack, except
    the ones listed in OVER_BUDGET, which must still be over it (so the list is kept true)."""
    for layer in FLOAT_TRAINING:
        stacks = cross_compile(layer, "m4f", tmp_path, tuple(FIRMWARE_WARNINGS))
        for name, (size, qualifier) in stacks.items():
            role = name.removeprefix(f"{layer.name}_")
            assert qualifier == "static", (name, qualifier)
            over = role in OVER_BUDGET.get(layer.name, ())
            assert (size > TRAINING_STACK) == over, (name, size)


def _bits(a: np.ndarray) -> str:
    words = np.ascontiguousarray(a, dtype=np.float32).view(np.uint32).reshape(-1)
    return ",\n".join(", ".join(f"0x{w:08x}u" for w in words[i:i + 6]) for i in range(0, len(words), 6))


def _main(inputs: dict[str, np.ndarray]) -> str:
    """main.c: each layer's predict on its input (as float bits), y printed as bits."""
    lines = ["#include <stdint.h>", "#include <stdio.h>", "#include <string.h>"]
    lines += [f'#include "{layer.name}.h"' for layer in LAYERS]
    for layer in LAYERS:
        n = inputs[layer.name].size
        lines += [f"static const uint32_t {layer.name}_x[{n}] = {{", _bits(inputs[layer.name]), "};",
                  f"static float {layer.name}_buf[{n}];"]
    lines += ["", "static void print_bits(const float *y, int n)", "{", "    for (int i = 0; i < n; ++i) {",
              "        uint32_t b;", "        memcpy(&b, &y[i], sizeof b);", '        printf("%08lx\\n", (unsigned long)b);',
              "    }", "}", "", "int main(void)", "{"]
    for layer in LAYERS:
        n, p = inputs[layer.name].size, layer.name
        lines += [f"    memcpy({p}_buf, {p}_x, sizeof {p}_buf);",
                  f'    printf("{p} %d\\n", {p}_predict({p}_buf, {p}_buf, {BATCH}));',
                  f"    print_bits({p}_buf, {n});"]
    return "\n".join([*lines, "    return 0;", "}", ""])


def _link_and_run(cpu: str, work: Path, layers) -> list[str]:
    """work/main.c linked with the layers' objects, the start-up and the linker script of
    examples/firmware, run on the core's QEMU board: the lines it printed."""
    flags, board = CPUS[cpu]
    elf = work / "test.elf"
    cmd = [GCC, *flags, "-Os", "-std=c99", "-Wall", "-Wextra", "-Werror", "-nostartfiles", "--specs=rdimon.specs",
           "-T", str(HERE / "link.ld"), str(HERE / "start.c"), str(work / "main.c"),
           *(str(work / f"{layer.name}_{cpu}.o") for layer in layers), "-lm", "-o", str(elf)]
    proc = subprocess.run(cmd, capture_output=True, text=True)
    assert proc.returncode == 0, proc.stderr
    run = subprocess.run([QEMU, "-M", board, "-nographic", "-monitor", "none", "-serial", "none",
                          "-semihosting-config", "enable=on,target=native", "-kernel", str(elf)],
                         capture_output=True, text=True, timeout=60)
    assert run.returncode == 0, (run.returncode, run.stdout[-2000:], run.stderr[-2000:])
    return run.stdout.splitlines()


@pytest.mark.skipif(QEMU is None, reason="qemu-system-arm is not installed")
@pytest.mark.parametrize("cpu", sorted(CPUS))
def test_runs_under_qemu_and_matches_the_reference(cpu, tmp_path):
    """Every kind's predict, in place, bare-metal on the board of the core, through semihosting."""
    rng = np.random.default_rng(11)
    inputs = {layer.name: random_input(layer, BATCH, rng).astype(np.float32) for layer in LAYERS}
    for layer in LAYERS:
        cross_compile(layer, cpu, tmp_path)
    (tmp_path / "main.c").write_text(_main(inputs))
    out = iter(_link_and_run(cpu, tmp_path, LAYERS))
    for layer in LAYERS:
        assert next(out) == f"{layer.name} 0"
        x = inputs[layer.name]
        got = np.array([int(next(out), 16) for _ in range(x.size)], dtype=np.uint32).view(np.float32)
        result = compare(layer.name, "predict", layer.dtype, BATCH, got.reshape(x.shape), reference.predict(layer, x))
        assert result.ok, result
    assert next(out, None) is None


@pytest.mark.parametrize("cpu", sorted(CPUS))
def test_int8_cross_compiles_free_of_firmware_warnings_with_a_small_stack(cpu, tmp_path):
    for layer in INT8_LAYERS:
        stacks = cross_compile(layer, cpu, tmp_path, tuple(FIRMWARE_WARNINGS))
        size, qualifier = stacks[f"{layer.name}_predict"]
        assert qualifier == "static" and size <= PREDICT_STACK, (layer.name, cpu, size, qualifier)


def test_int8_integer_arithmetic_links_no_float_routine(tmp_path):
    """arithmetic = "integer" on the M0 (no FPU): no soft-float routine of libgcc, no libm."""
    nm = shutil.which("arm-none-eabi-nm")
    if nm is None:
        pytest.skip("no arm-none-eabi-nm")
    for layer in INT8_LAYERS:
        cross_compile(layer, "m0", tmp_path)
        undefined = subprocess.run([nm, "-u", str(tmp_path / f"{layer.name}_m0.o")], capture_output=True,
                                   text=True).stdout.split()
        floats = [u for u in undefined if u.startswith(("__aeabi_f", "__aeabi_d", "__aeabi_l2f", "__aeabi_i2f"))
                  or "sqrt" in u]
        assert bool(floats) == (layer.arithmetic == "float"), (layer.name, undefined)


def _int8_main(runs: list[tuple[str, str, np.ndarray]]) -> str:
    """main.c: each (buffer, layer, x) run: the layer's predict on x, in place, y printed as integers."""
    lines = ["#include <stdint.h>", "#include <stdio.h>", "#include <string.h>"]
    lines += [f'#include "{name}.h"' for name in dict.fromkeys(name for _, name, _ in runs)]
    for buf, _, x in runs:
        values = x.reshape(-1)
        lines += [f"static const int8_t {buf}_x[{values.size}] = {{",
                  ",\n".join(", ".join(str(int(v)) for v in values[i:i + 16]) for i in range(0, values.size, 16)),
                  "};", f"static int8_t {buf}[{values.size}];"]
    lines += ["", "int main(void)", "{"]
    for buf, name, x in runs:
        lines += [f"    memcpy({buf}, {buf}_x, sizeof {buf});",
                  f'    printf("{buf} %d\\n", {name}_predict({buf}, {buf}, {BATCH}));',
                  f"    for (int i = 0; i < {x.size}; ++i) {{",
                  f'        printf("%d\\n", (int){buf}[i]);',
                  "    }"]
    return "\n".join([*lines, "    return 0;", "}", ""])


@pytest.mark.skipif(QEMU is None, reason="qemu-system-arm is not installed")
@pytest.mark.parametrize("cpu", sorted(CPUS))
def test_int8_runs_under_qemu_and_matches_the_reference(cpu, tmp_path):
    """Every kind's int8 predict bare-metal (the M0 without an FPU), in place, on full-range and
    all-equal inputs: exact or one step off."""
    rng = np.random.default_rng(12)
    runs = []
    for layer in INT8_LAYERS:
        drawn = int8_inputs(layer, BATCH, rng)
        runs += [(f"{layer.name}_full", layer, drawn[""]), (f"{layer.name}_equal", layer, drawn[":equal"])]
        cross_compile(layer, cpu, tmp_path)
    (tmp_path / "main.c").write_text(_int8_main([(buf, layer.name, x) for buf, layer, x in runs]))
    out = iter(_link_and_run(cpu, tmp_path, INT8_LAYERS))
    for buf, layer, x in runs:
        assert next(out) == f"{buf} 0"
        got = np.array([int(next(out)) for _ in range(x.size)], dtype=np.int8).reshape(x.shape)
        result = compare_int8(buf, "predict", BATCH, got, reference.predict(layer, x))
        assert result.ok and result.one_step <= 2, result
    assert next(out, None) is None


@pytest.mark.skipif(QEMU is None or shutil.which("make") is None, reason="qemu-system-arm or make is not installed")
def test_firmware_example_builds_and_runs(tmp_path):
    """examples/firmware: `make run` generates the layer, builds it with the firmware warnings for the
    M4F and runs it under QEMU; its output matches the reference."""
    work = tmp_path / "firmware"
    shutil.copytree(HERE, work)
    root = HERE.parent.parent
    env = {**os.environ, "PYTHONPATH": os.pathsep.join([str(root), os.environ.get("PYTHONPATH", "")])}
    run = subprocess.run(["make", "-s", "run", f"NORMGEN={sys.executable} -m normgen"], cwd=work, env=env,
                         capture_output=True, text=True, timeout=300)
    assert run.returncode == 0, (run.stdout[-2000:], run.stderr[-2000:])
    (layer,) = load_spec(work / "layer.toml")
    lines = run.stdout.splitlines()
    start = lines.index("fw_norm_predict 0")
    got = np.array([int(v, 16) for v in lines[start + 1:]], dtype=np.uint32).view(np.float32)
    x = (((np.arange(got.size) * 37) % 101).astype(np.float32) / np.float32(8) - np.float32(6))
    x = x.reshape(reference.full_shape(layer, 2))
    result = compare(layer.name, "predict", layer.dtype, 2, got.reshape(x.shape), reference.predict(layer, x))
    assert result.ok, result
