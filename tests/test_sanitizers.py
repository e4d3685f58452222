"""Generated C under AddressSanitizer and UBSan: a standalone driver per layer reads x from a
file, runs every entry point out of place and in place, and writes the results back (the
training backward too: recomputed and from saved statistics, with dx = x and dx = dy)."""

from __future__ import annotations

import shutil
import subprocess

import numpy as np
import pytest

from helpers import bn_stats, params
from normgen import BatchNorm, GroupNorm, InstanceNorm, LayerNorm, reference
from normgen.harness.check import compare
from normgen.targets.render import emit

pytestmark = pytest.mark.skipif(shutil.which("gcc") is None, reason="gcc not found")

LAYERS = [
    BatchNorm(name="san_bn", format="BSSC", shape=[5, 3, 8], **params(8, 1), **bn_stats(8, 1)),
    BatchNorm(name="san_bn_rows", format="BCSS", shape=[4, 10, 10], dtype="float64", **params(4, 2)),
    GroupNorm(name="san_gn", format="BCSS", shape=[12, 7, 9], num_groups=4, **params(12, 3)),
    GroupNorm(name="san_gn_nhwc", format="BSSC", shape=[7, 9, 12], num_groups=3, **params(12, 3)),
    GroupNorm(name="san_gn_tiles", format="BSSC", shape=[40, 40, 36], num_groups=4, **params(36, 3)),  # column tiles 32 + 4
    # rows of whole 64-byte lines: streamed from y's first line on, per-channel values rotated
    GroupNorm(name="san_gn_lines", format="BSSC", shape=[5, 6, 32], num_groups=4, **params(32, 6)),
    BatchNorm(name="san_bn_lines", format="BSSC", shape=[4, 3, 16], dtype="float64", **params(16, 7), **bn_stats(16, 7)),
    LayerNorm(name="san_ln", format="BTC", shape=[6, 2041], param_storage="runtime", **params(2041, 4)),
    InstanceNorm(name="san_in", format="TBC", shape=[11, 5], dtype="float64", **params(5, 5)),
]

DRIVER = r"""
#include <stdio.h>
#include <string.h>
#include "{name}.h"
#define N ({batch} * {per})
static {T} x[N], y[N], z[N], shifted[N + 16];
int main(void)
{{
    FILE *f = fopen("x.bin", "rb");
    if (!f || fread(x, sizeof x[0], N, f) != N) return 10;
    fclose(f);
    {params_decl}
    if ({name}_predict({params_arg}x, y, {batch}) != 0) return 11;
    memcpy(z, x, sizeof x);
    if ({name}_predict({params_arg}z, z, {batch}) != 0) return 12;  /* in place */
    if (memcmp(y, z, sizeof y) != 0) return 13;
    for (int o = 1; o < 16; o += 2) {{  /* y at other offsets from a 64-byte line */
        if ({name}_predict({params_arg}x, shifted + o, {batch}) != 0) return 15;
        if (memcmp(y, shifted + o, sizeof y) != 0) return 16;
    }}
    f = fopen("y.bin", "wb");
    fwrite(y, sizeof y[0], N, f);
    {train}
    fclose(f);
    {backward}
    return 0;
}}
"""

TRAIN = r"""
    {T} rm[{C}], rv[{C}];
    for (int c = 0; c < {C}; ++c) {{ rm[c] = 0; rv[c] = 1; }}
    if ({name}_train_forward({params_arg}x, y, {batch}, rm, rv) != 0) return 14;
    fwrite(y, sizeof y[0], N, f);
    fwrite(rm, sizeof rm[0], {C}, f);
    fwrite(rv, sizeof rv[0], {C}, f);
"""

BACKWARD = r"""
    static {T} dy[N], dx[N], dx2[N];
    static double sm[N], si[N];
    {T} ds[{C}], dof[{C}], ds2[{C}], dof2[{C}], rm2[{C}], rv2[{C}];
    for (int i = 0; i < N; ++i) dy[i] = ({T})((i * 37 % 101) / 50.0 - 1.0);
    for (int c = 0; c < {C}; ++c) {{ rm2[c] = 0; rv2[c] = 1; }}
    (void)rm2; (void)rv2;
    if ({name}_backward({params_arg}x, dy, dx, ds, dof, {batch}) != 0) return 20;
    memcpy(z, x, sizeof x);  /* dx = x */
    if ({name}_backward({params_arg}z, dy, z, ds2, dof2, {batch}) != 0) return 21;
    if (memcmp(z, dx, sizeof dx) || memcmp(ds, ds2, sizeof ds) || memcmp(dof, dof2, sizeof dof)) return 22;
    memcpy(z, dy, sizeof dy);  /* dx = dy */
    if ({name}_backward({params_arg}x, z, z, ds2, dof2, {batch}) != 0) return 23;
    if (memcmp(z, dx, sizeof dx) || memcmp(ds, ds2, sizeof ds) || memcmp(dof, dof2, sizeof dof)) return 24;
    if ({name}_train_forward_save({params_arg}x, y, {batch}, {running}sm, si) != 0) return 25;
    if ({name}_backward_saved({params_arg}x, dy, sm, si, dx2, ds2, dof2, {batch}) != 0) return 26;
    memcpy(z, dy, sizeof dy);
    if ({name}_backward_saved({params_arg}x, z, sm, si, z, ds, dof, {batch}) != 0) return 27;
    if (memcmp(z, dx2, sizeof dx2) || memcmp(ds, ds2, sizeof ds) || memcmp(dof, dof2, sizeof dof)) return 28;
    f = fopen("g.bin", "wb");
    fwrite(dx, sizeof dx[0], N, f);
    fwrite(dx2, sizeof dx2[0], N, f);
    fwrite(ds, sizeof ds[0], {C}, f);
    fwrite(dof, sizeof dof[0], {C}, f);
    fclose(f);
"""


@pytest.mark.parametrize("stream", [False, True], ids=["cached", "streamed"])
@pytest.mark.parametrize("layer", LAYERS, ids=lambda l: l.name)
def test_asan_ubsan(layer, stream, tmp_path):
    """Streamed: NAME_STREAM_BYTES=0, every call writes y with streaming stores."""
    for fname, text in emit(layer, "c").items():
        (tmp_path / fname).write_text(text)
    batch = 3
    T = "float" if layer.dtype == "float32" else "double"
    runtime = layer.param_storage == "runtime"
    fields = dict(name=layer.name, batch=batch, per=int(np.prod(layer.dims)), T=T, C=layer.channels,
                  params_decl=f"{layer.name}_params p; if ({layer.name}_params_init(&p)) return 9;" if runtime else "",
                  params_arg="&p, " if runtime else "")
    fields["train"] = TRAIN.format(**fields) if layer.kind == "batchnorm" else ""
    fields["running"] = "rm2, rv2, " if layer.kind == "batchnorm" else ""
    fields["backward"] = BACKWARD.format(**fields)
    (tmp_path / "driver.c").write_text(DRIVER.format(**fields))
    flags = ["-std=c99", "-Wall", "-Wextra", "-pedantic", "-Werror", "-O1", "-g",
             "-fsanitize=address,undefined", "-fno-sanitize-recover=all", "-fno-omit-frame-pointer",
             *([f"-D{layer.name.upper()}_STREAM_BYTES=0"] if stream else [])]
    subprocess.run(["gcc", *flags, "-o", "driver", "driver.c", f"{layer.name}.c", "-lm"],
                   cwd=tmp_path, check=True, capture_output=True, text=True)
    dt = np.dtype(np.float32 if T == "float" else np.float64)
    x = np.random.default_rng(0).normal(1.0, 2.0, reference.full_shape(layer, batch))
    x.reshape(-1)[np.arange(x.size) % 97 < 8] = 1e3  # outliers: some chunks' first shift is far off, and is redone
    x = x.astype(dt)
    x.tofile(tmp_path / "x.bin")
    proc = subprocess.run(["./driver"], cwd=tmp_path, capture_output=True, text=True,
                          env={"ASAN_OPTIONS": "detect_leaks=0", "UBSAN_OPTIONS": "print_stacktrace=1"})
    assert proc.returncode == 0, proc.stderr
    out = np.fromfile(tmp_path / "y.bin", dtype=dt)
    n = x.size
    assert compare(layer.name, "predict", layer.dtype, batch, out[:n].reshape(x.shape), reference.predict(layer, x)).ok
    if layer.kind == "batchnorm":
        y, rm, rv = reference.train_forward(layer, x, np.zeros(layer.channels), np.ones(layer.channels))
        c = layer.channels
        assert compare(layer.name, "train", layer.dtype, batch, out[n:2 * n].reshape(x.shape), y).ok
        assert compare(layer.name, "rm", layer.dtype, batch, out[2 * n:2 * n + c], rm).ok
        assert compare(layer.name, "rv", layer.dtype, batch, out[2 * n + c:], rv).ok
    g = np.fromfile(tmp_path / "g.bin", dtype=dt)
    dy = ((np.arange(n) * 37 % 101) / 50.0 - 1.0).astype(dt).reshape(x.shape)
    want = reference.backward(layer, x, dy)
    c = layer.channels
    for name, got, w in (("dx", g[:n], want[0]), ("dx saved", g[n:2 * n], want[0]), ("dscale", g[2 * n:2 * n + c], want[1]),
                         ("doffset", g[2 * n + c:], want[2])):  # fmt: skip
        assert compare(layer.name, name, layer.dtype, batch, got.reshape(w.shape), w).ok, name
