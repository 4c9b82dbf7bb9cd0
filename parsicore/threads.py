"""One thread setting for the two thread pools a run uses: OpenBLAS (NumPy's GEMMs) and Numba's.

``parsicore.load(threads=N)`` makes every call of the model run with N compute threads: before a call the
runtime calls :func:`apply`, which sets OpenBLAS's thread count (found in the process through ctypes, the
way threadpoolctl does it, without depending on it) and Numba's (only when Numba is already imported: the
numpy backend never imports it). Both pools may use all N threads because a run alternates between
them, never overlapping: a GEMM runs, then Numba's kernels (im2col, epilogues, depthwise, pooling). Numba
kernels run in parallel only where the work pays for waking the pool (each kernel decides, see
``parsicore.kernels.numba_backend.parallel``).

Spinning threads: by default libgomp (Numba's ``omp`` threading layer) busy-waits ~0.2 s after each
parallel region, stealing the core the next GEMM needs; on a busy machine small parallel kernels ran
70-1000x slower. :func:`prepare_environment` sets ``OMP_WAIT_POLICY=PASSIVE`` unless the user chose a
policy; it must run before Numba's threading layer loads libgomp (the numba backend calls it before it
imports Numba; the CLI's board settings run earlier still).

No BLAS found (NumPy built on MKL/Accelerate, an exotic OpenBLAS): :func:`apply` sets Numba only, and
:func:`blas_info` says so; ``threadpoolctl`` then limits the BLAS from outside.
"""

from __future__ import annotations

import ctypes
import functools
import os
import sys
from collections.abc import Callable, Iterable, MutableMapping
from dataclasses import dataclass
from pathlib import Path

#: Environment defaults that must be in place before the thread pools start (user values win).
ENVIRONMENT_DEFAULTS = {"OMP_WAIT_POLICY": "PASSIVE"}

#: OpenBLAS symbol spellings: plain, the ``64_`` suffix of ILP64 builds, and NumPy's bundled
#: scipy-openblas (``scipy_`` prefix, ``64_`` suffix).
_SYMBOL_FORMS = (("", ""), ("", "64_"), ("scipy_", "64_"), ("scipy_", ""))


def prepare_environment(environ: MutableMapping[str, str] | None = None) -> dict[str, str]:
    """Set :data:`ENVIRONMENT_DEFAULTS` where the user has not; returns what was set."""
    target = os.environ if environ is None else environ
    added = {}
    for var, value in ENVIRONMENT_DEFAULTS.items():
        if var not in target:
            target[var] = value
            added[var] = value
    return added


@dataclass(frozen=True)
class BlasLibrary:
    """The OpenBLAS library loaded in this process and its thread-count entry points."""

    path: str
    set_num_threads: Callable[[int], None]
    get_num_threads: Callable[[], int]
    corename: str | None


def _loaded_libraries() -> list[str]:
    """Shared libraries mapped into this process whose name mentions OpenBLAS (Linux: /proc/self/maps)."""
    try:
        with open("/proc/self/maps", encoding="utf-8", errors="replace") as f:
            lines = f.read().splitlines()
    except OSError:
        return []
    found: list[str] = []
    for line in lines:
        path = line.split(maxsplit=5)[-1] if line.count(" ") >= 5 else ""
        if "openblas" in Path(path).name.lower() and path not in found:
            found.append(path)
    return found


def _numpy_bundled_libraries() -> list[str]:
    """OpenBLAS files shipped inside NumPy's wheel (numpy.libs / numpy/.dylibs) or named by its build config."""
    np_module = sys.modules.get("numpy")
    if np_module is None or not getattr(np_module, "__file__", None):
        return []
    root = Path(np_module.__file__).resolve().parent
    dirs = [root.parent / "numpy.libs", root / ".dylibs"]
    try:
        blas = np_module.__config__.CONFIG["Build Dependencies"]["blas"]  # type: ignore[attr-defined]
        dirs.append(Path(blas["lib directory"]))
    except (AttributeError, KeyError, TypeError):
        pass
    out = []
    for d in dirs:
        if d.is_dir():
            out.extend(str(p) for p in sorted(d.iterdir()) if "openblas" in p.name.lower())
    return out


def _bind(path: str) -> BlasLibrary | None:
    """The thread entry points of the library at ``path`` if it is already loaded and exports them."""
    mode = getattr(os, "RTLD_NOLOAD", 0) | getattr(os, "RTLD_LAZY", 0) or ctypes.DEFAULT_MODE
    try:
        lib = ctypes.CDLL(path, mode=mode)  # RTLD_NOLOAD: bind to the copy NumPy loaded, never load another
    except OSError:
        return None
    for prefix, suffix in _SYMBOL_FORMS:
        setter = getattr(lib, f"{prefix}openblas_set_num_threads{suffix}", None)
        getter = getattr(lib, f"{prefix}openblas_get_num_threads{suffix}", None)
        if setter is None or getter is None:
            continue
        setter.argtypes, setter.restype = [ctypes.c_int], None
        getter.argtypes, getter.restype = [], ctypes.c_int
        corename = None
        core_fn = getattr(lib, f"{prefix}openblas_get_corename{suffix}", None)
        if core_fn is not None:
            core_fn.argtypes, core_fn.restype = [], ctypes.c_char_p
            raw = core_fn()
            corename = raw.decode("ascii", "replace") if raw else None
        return BlasLibrary(path, setter, getter, corename)
    return None


def _first_bound(paths: Iterable[str]) -> BlasLibrary | None:
    for path in paths:
        found = _bind(path)
        if found is not None:
            return found
    return None


@functools.cache
def openblas() -> BlasLibrary | None:
    """NumPy's OpenBLAS (imports NumPy), or None when NumPy uses another BLAS. Cached: a process loads its
    BLAS once."""
    import numpy  # noqa: F401  (loads the BLAS whose symbols we look up)

    return _first_bound(_loaded_libraries()) or _first_bound(_numpy_bundled_libraries())


def blas_threads() -> int | None:
    """OpenBLAS's current thread count (None when it was not found)."""
    lib = openblas()
    return None if lib is None else int(lib.get_num_threads())


def blas_info() -> str:
    """One line for messages: the BLAS found, its kernel set and thread count."""
    lib = openblas()
    if lib is None:
        return "OpenBLAS not found in this process (BLAS threads are not controlled)"
    core = f", kernels {lib.corename}" if lib.corename else ""
    return f"OpenBLAS {Path(lib.path).name}{core}, {lib.get_num_threads()} thread(s)"


def numba_thread_limit() -> int | None:
    """Numba's pool size (NUMBA_NUM_THREADS) when Numba is imported, else None."""
    numba = sys.modules.get("numba")
    if numba is None:
        return None
    return int(numba.config.NUMBA_NUM_THREADS)


def apply(threads: int) -> None:
    """Make this thread's next kernels use ``threads`` compute threads: OpenBLAS (process-wide) and Numba
    (per calling thread, only when Numba is imported and threads > 1: a single-threaded run never starts
    Numba's pool, its kernels run their serial variants)."""
    lib = openblas()
    if lib is not None and lib.get_num_threads() != threads:
        # Only on change: resizing OpenBLAS's pool while another thread is inside a BLAS call is its one
        # unsafe moment, and models called concurrently normally share one setting.
        lib.set_num_threads(threads)
    limit = numba_thread_limit()
    if limit is not None and threads > 1:
        import numba

        wanted = min(threads, limit)
        if numba.get_num_threads() != wanted:
            numba.set_num_threads(wanted)
