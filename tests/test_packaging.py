"""A plain (non-editable) install ships the templates and works from any directory."""

from __future__ import annotations

import shutil
import subprocess
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parent.parent


def test_installed_package_runs_from_elsewhere(tmp_path):
    exe = shutil.which("normgen")
    if exe is None:
        pytest.skip("normgen is not installed (pip install .)")
    spec = ROOT / "examples" / "sequence" / "sequence.toml"
    proc = subprocess.run([exe, "emit", str(spec), "-o", str(tmp_path / "out")], cwd=tmp_path,
                          capture_output=True, text=True)
    assert proc.returncode == 0, proc.stderr
    assert (tmp_path / "out" / "encoder_ln.c").read_text() == (ROOT / "generated" / "c" / "sequence" / "encoder_ln.c").read_text()
    where = subprocess.run([sys.executable, "-c", "import normgen.targets.render as r; print(r.template_dir())"],
                           cwd=tmp_path, capture_output=True, text=True, check=True).stdout.strip()
    if Path(where).parent != ROOT:  # an installed copy, not this checkout (or an editable install of it)
        assert Path(where).name == "templates" and Path(where).parent.name == "normgen"
        assert (Path(where) / "c" / "layer.c.j2").is_file() and (Path(where) / "common" / "macros.j2").is_file()
