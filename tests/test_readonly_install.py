"""parsicore installed in a read-only location: ``parsicore run`` works, its Numba cache goes to a writable
per-user directory (kernels/jit_cache.py), and nothing is ever written into the installation.

The package is laid out as ``pip install`` leaves it (weights/ and boards/ inside the package) and made
read-only. Root ignores permission bits, so the test also compares the installation's file list before and
after: that part holds for any user.
"""

from __future__ import annotations

import os
import shutil
import stat
import subprocess
import sys
from pathlib import Path

import pytest

REPO = Path(__file__).resolve().parent.parent


def _install_copy(root: Path) -> Path:
    site = root / "site"
    pkg = site / "parsicore"
    shutil.copytree(REPO / "parsicore", pkg, ignore=shutil.ignore_patterns("__pycache__", "*.pyc"))
    shutil.copytree(REPO / "weights", pkg / "weights")
    shutil.copytree(REPO / "boards", pkg / "boards")
    return site


def _make_read_only(tree: Path) -> None:
    for path in [tree, *tree.rglob("*")]:
        mode = path.stat().st_mode
        path.chmod(mode & ~(stat.S_IWUSR | stat.S_IWGRP | stat.S_IWOTH))


def _make_writable(tree: Path) -> None:
    for path in [tree, *tree.rglob("*")]:
        path.chmod(path.stat().st_mode | stat.S_IWUSR)


def _files(tree: Path) -> set[str]:
    return {str(p.relative_to(tree)) for p in tree.rglob("*")}


@pytest.mark.slow
def test_run_from_a_read_only_install(tmp_path: Path) -> None:
    pytest.importorskip("numba")
    site = _install_copy(tmp_path)
    home = tmp_path / "home"
    home.mkdir()
    before = _files(site)
    _make_read_only(site)
    env = {k: v for k, v in os.environ.items() if not k.startswith(("PARSICORE_", "NUMBA_", "XDG_"))}
    env.update(PYTHONPATH=str(site), HOME=str(home), PYTHONDONTWRITEBYTECODE="1")
    sample = sorted((site / "parsicore" / "weights" / "samples").glob("*.png"))[0]
    try:
        for _ in range(2):  # the second run loads what the first one cached
            # --backend numba: one image alone would take the numpy backend, which needs no cache.
            done = subprocess.run([sys.executable, "-m", "parsicore", "run", str(sample), "--backend", "numba"],
                                  capture_output=True, text=True, env=env, cwd=tmp_path, timeout=600)
            assert done.returncode == 0, done.stderr
            assert "latency" in done.stdout
        assert _files(site) == before, "nothing may be written into the installation"
        cache = home / ".cache" / "parsicore" / "numba"
        assert any(cache.rglob("*.nbi")), "the JIT cache should be in the user's cache directory"
    finally:
        _make_writable(site)
