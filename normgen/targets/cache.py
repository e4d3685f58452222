"""The compile cache every target shares: modules keyed by a hash of the generated source, the
flags and the compiler's version (like pycuda's compiler cache)."""

from __future__ import annotations

import hashlib
import os
from pathlib import Path


def cache_dir() -> Path:
    """$NORMGEN_CACHE, or $XDG_CACHE_HOME/normgen (~/.cache/normgen); created when missing."""
    root = os.environ.get("NORMGEN_CACHE") or os.path.join(
        os.environ.get("XDG_CACHE_HOME", os.path.expanduser("~/.cache")), "normgen"
    )
    path = Path(root)
    path.mkdir(parents=True, exist_ok=True)
    return path


def key(parts: list[str]) -> str:
    """A short hex digest of the parts (NUL-separated)."""
    h = hashlib.sha256()
    for p in parts:
        h.update(p.encode())
        h.update(b"\0")
    return h.hexdigest()[:16]
