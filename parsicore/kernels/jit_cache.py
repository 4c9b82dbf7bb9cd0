"""Where Numba's on-disk JIT cache lives.

Numba writes its cache beside the source by default, which fails in a read-only site-packages. Unless
the user already set ``NUMBA_CACHE_DIR``, parsicore points it at ``$PARSICORE_CACHE_DIR/numba``, else
``$XDG_CACHE_HOME/parsicore/numba``, else ``~/.cache/parsicore/numba``; if none is writable, a
per-user directory under the system temp dir. Must run before ``numba`` is first imported;
this module itself never imports Numba (the board settings read it too).
"""

from __future__ import annotations

import os
import tempfile
from collections.abc import Mapping
from pathlib import Path


def cache_dir_candidates(env: Mapping[str, str] | None = None) -> list[Path]:
    """Directories to try, in order of preference (``env`` defaults to os.environ)."""
    env = os.environ if env is None else env
    out = []
    if env.get("PARSICORE_CACHE_DIR"):
        out.append(Path(env["PARSICORE_CACHE_DIR"]) / "numba")
    xdg = env.get("XDG_CACHE_HOME")
    if xdg:
        out.append(Path(xdg) / "parsicore" / "numba")
    out.append(Path(env.get("HOME") or str(Path.home())) / ".cache" / "parsicore" / "numba")
    out.append(Path(tempfile.gettempdir()) / f"parsicore-{os.getuid() if hasattr(os, 'getuid') else 'user'}" / "numba")
    return out


def _writable(path: Path) -> bool:
    try:
        path.mkdir(parents=True, exist_ok=True)
        probe = path / ".write-probe"
        probe.write_bytes(b"")
        probe.unlink()
        return True
    except OSError:
        return False


def configure_cache_dir() -> str | None:
    """Set NUMBA_CACHE_DIR (unless already set) to the first writable candidate; return the directory."""
    if os.environ.get("NUMBA_CACHE_DIR"):
        return os.environ["NUMBA_CACHE_DIR"]
    for candidate in cache_dir_candidates():
        if _writable(candidate):
            os.environ["NUMBA_CACHE_DIR"] = str(candidate)
            return str(candidate)
    return None
