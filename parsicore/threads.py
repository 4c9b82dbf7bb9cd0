"""One thread setting for everything a run computes with: the GEMMs (OpenBLAS) and Numba's kernels.

``parsicore.load(threads=N)`` makes every call of the model run with N compute threads (None: the
default, :func:`default_threads`). Before a call the runtime calls :func:`apply`, which

- pins OpenBLAS (found in the process through ctypes, the way threadpoolctl does it, without depending
  on it) to ONE thread: parsicore splits its large GEMMs itself (:func:`run_chunks`): the calling thread
  and N-1 helper threads take chunks (row blocks, Winograd slices) from a shared counter. OpenBLAS's own
  threads split a GEMM statically and spin-wait on each other; on a busy machine one descheduled thread
  stalls the whole call: measured on 2 loaded cores, a 256^3 sgemm took 0.4 ms on one OpenBLAS thread
  and 32 ms on two. With chunks taken on demand a late helper costs at most one chunk, and a helper that
  never wakes costs nothing (the caller does all chunks).

N also reaches the kernels through the plan's KernelContext: Numba kernels run their parallel build (on
min(N, NUMBA_NUM_THREADS) threads, set when they do) only where the work pays for waking the pool, so a
run whose kernels all stay serial never starts Numba's pool (see
``parsicore.kernels.numba_backend.parallel``). Numba's kernels and the GEMMs alternate, never overlap, so
both use all N threads.

Waiting threads: libgomp (Numba's ``omp`` threading layer) lets a thread that finished its part of a parallel
region spin ``GOMP_SPINCOUNT`` times before it sleeps; unset, 300000 spins (~15 ms on a Zen 4 VM), which stole
the core the next GEMM's helper thread needed (small parallel kernels ran 70-1000x slower on a busy machine).
Asleep (``OMP_WAIT_POLICY=PASSIVE``), a thread takes ~15-100 us to wake on the VMs measured here, as long as a
14x14 layer, so only kernels and GEMMs of 2^25 MACs could pay for a second thread. :func:`prepare_environment`
sets, unless the user chose a policy (``OMP_WAIT_POLICY`` or ``GOMP_SPINCOUNT``): on x86-64 a bounded spin,
``GOMP_SPINCOUNT`` = :data:`SPIN_COUNT` (~1.5 ms on the fourteenth session's Zen 4 VM; the next region of the
same call finds the thread awake, ~2 us), elsewhere ``PASSIVE`` (no board has measured a spin yet:
``python scripts/bench_thread_wakeup.py`` and ``scripts/ab_checkouts.py --env-b`` do). With spinning threads
the numba backend splits GEMMs from 2^20 MACs (:func:`threads_spin`, ``parallel.MIN_PARALLEL_MACS``), runs every
GEMM split in Numba's pool (``blas_split``: no helper thread competes with a spinning one) and keeps the pool's
workers off the caller's CPU (``pool_pinning``: else a worker woken after an idle spell waited out the caller's
spin, 1.5 ms). It must run before Numba's threading layer loads libgomp (the numba backend calls it before it
imports Numba).

No OpenBLAS found (NumPy built on MKL/Accelerate, an exotic OpenBLAS): :func:`apply` changes nothing,
:func:`blas_info` says so, and that BLAS may add threads of its own to each chunk; ``threadpoolctl`` can
limit it from outside.
"""

from __future__ import annotations

import ctypes
import functools
import itertools
import os
import platform
import queue
import sys
import threading
from collections.abc import Callable, Iterable, Mapping, MutableMapping
from dataclasses import dataclass
from pathlib import Path

#: libgomp spins of a thread between parallel regions on x86-64 (``GOMP_SPINCOUNT``). On the 2-vCPU Zen 4 VM of the
#: fourteenth session (process CPU time after one region, then a sleep; one-off): 3000 ~0.15 ms, 10000 ~0.5 ms,
#: 30000 ~1.5 ms. The small CNN at 2 threads, 10 x 100 calls alone (one-off): 3000 and 10000 alternated between
#: 0.41 and 0.65 ms a call (a gap between two regions of a call outlasted the spin), 30000 held 0.40-0.42. The
#: first region after idle per spin count: python scripts/bench_thread_wakeup.py.
SPIN_COUNT = 30000
#: Machines (platform.machine(), lower case) whose threads spin by default: where it was measured.
SPINNING_MACHINES = frozenset({"x86_64", "amd64"})
#: Variables by which a user chooses the wait policy of OpenMP threads (libgomp).
WAIT_POLICY_VARIABLES = ("OMP_WAIT_POLICY", "GOMP_SPINCOUNT")

#: OpenBLAS symbol spellings (prefix, suffix): plain, the ``64_`` suffix of ILP64 builds, and NumPy's bundled
#: scipy-openblas (``scipy_`` prefix, ``64_`` suffix).
SYMBOL_FORMS = (("", ""), ("", "64_"), ("scipy_", "64_"), ("scipy_", ""))
#: dlopen mode that binds to a library already loaded and never loads another copy.
NOLOAD_MODE = getattr(os, "RTLD_NOLOAD", 0) | getattr(os, "RTLD_LAZY", 0) or ctypes.DEFAULT_MODE


def environment_defaults(machine: str | None = None) -> dict[str, str]:
    """The wait policy of OpenMP threads on ``machine`` (platform.machine(); None: this one): a bounded spin on
    :data:`SPINNING_MACHINES`, sleeping threads elsewhere (see the module docstring)."""
    machine = (platform.machine() if machine is None else machine).lower()
    if machine in SPINNING_MACHINES:
        return {"GOMP_SPINCOUNT": str(SPIN_COUNT)}
    return {"OMP_WAIT_POLICY": "PASSIVE"}


def prepare_environment(environ: MutableMapping[str, str] | None = None, machine: str | None = None) -> dict[str, str]:
    """Set :func:`environment_defaults` unless the user chose a wait policy (a variable of
    :data:`WAIT_POLICY_VARIABLES` set); returns what was set."""
    target = os.environ if environ is None else environ
    if any(var in target for var in WAIT_POLICY_VARIABLES):
        return {}
    added = environment_defaults(machine)
    target.update(added)
    return added


_SPIN_SUFFIXES = {"k": 10**3, "m": 10**6, "g": 10**9, "t": 10**12}


def threads_spin(environ: Mapping[str, str] | None = None) -> bool:
    """Whether libgomp's threads wait spinning between parallel regions under ``environ`` (None: this process's),
    as libgomp reads it: ``GOMP_SPINCOUNT`` when set (a count, optionally with a k/M/G/T suffix, or "infinite"),
    else ``OMP_WAIT_POLICY`` (passive: no spin; active or unset: spin). A value libgomp would reject counts as
    unset."""
    env = os.environ if environ is None else environ
    count = env.get("GOMP_SPINCOUNT", "").strip().lower()
    if count == "infinite" or count == "infinity":
        return True
    if count:
        number, scale = (count[:-1], _SPIN_SUFFIXES[count[-1]]) if count[-1] in _SPIN_SUFFIXES else (count, 1)
        if number.isdigit():
            return int(number) * scale > 0
    return env.get("OMP_WAIT_POLICY", "").strip().lower() != "passive"


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
        if "openblas" not in line.lower():
            continue
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
    try:
        lib = ctypes.CDLL(path, mode=NOLOAD_MODE)  # bind to the copy NumPy loaded, never load another
    except OSError:
        return None
    for prefix, suffix in SYMBOL_FORMS:
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


def default_threads(environ: MutableMapping[str, str] | None = None) -> int:
    """Compute threads when a model is loaded without ``threads``: $PARSICORE_THREADS, else
    $NUMBA_NUM_THREADS (the CLI's board settings export it), else every CPU this process may use."""
    env = os.environ if environ is None else environ
    for var in ("PARSICORE_THREADS", "NUMBA_NUM_THREADS"):
        value = env.get(var, "")
        if value.isdigit() and int(value) >= 1:
            return int(value)
    try:
        return max(1, len(os.sched_getaffinity(0)))
    except (AttributeError, OSError):
        return max(1, os.cpu_count() or 1)


def apply(threads: int) -> None:
    """Prepare this thread's next run with ``threads`` compute threads: OpenBLAS single-threaded (parsicore
    splits GEMMs itself, see the module docstring). Numba's thread count is set by the numba kernels
    themselves when they take their parallel build (parsicore.kernels.numba_backend.parallel): a run whose
    kernels all stay serial never starts Numba's pool."""
    lib = openblas()
    if lib is not None and lib.get_num_threads() != 1:
        # Only on change: resizing OpenBLAS's pool while another thread is inside a BLAS call is its one
        # unsafe moment.
        lib.set_num_threads(1)


class _Job:
    """``count`` chunks of work, ``task(i)`` for chunk i, taken on demand by whichever thread asks next."""

    def __init__(self, task: Callable[[int], None], count: int) -> None:
        self.task = task
        self.count = count
        self._next = itertools.count()  # next() is atomic under the GIL
        self._lock = threading.Lock()
        self._unfinished = count
        self._done = threading.Event()
        self.error: BaseException | None = None

    def work(self) -> None:
        """Run chunks until none are left."""
        while True:
            i = next(self._next)
            if i >= self.count:
                return
            try:
                self.task(i)
            except BaseException as e:  # re-raised in the caller
                self.error = e
            with self._lock:
                self._unfinished -= 1
                if self._unfinished == 0:
                    self._done.set()

    def wait(self) -> None:
        self._done.wait()


class HelperThreads:
    """Daemon threads that help the calling thread through a job's chunks (see :func:`run_chunks`). Idle
    helpers block on a queue (no spinning); they start on first use and live as long as the process."""

    def __init__(self) -> None:
        self._queue: queue.SimpleQueue[_Job] = queue.SimpleQueue()
        self._lock = threading.Lock()
        self._started = 0

    def _ensure(self, helpers: int) -> None:
        if self._started >= helpers:
            return
        with self._lock:
            while self._started < helpers:
                threading.Thread(target=self._serve, name=f"parsicore-helper-{self._started}", daemon=True).start()
                self._started += 1

    def _serve(self) -> None:
        while True:
            self._queue.get().work()

    def run(self, task: Callable[[int], None], count: int, helpers: int) -> None:
        """task(0..count-1), on the calling thread and up to ``helpers`` helper threads; returns when all are
        done (re-raising a chunk's exception)."""
        job = _Job(task, count)
        self._ensure(helpers)
        for _ in range(min(helpers, count - 1)):
            self._queue.put(job)
        job.work()
        job.wait()
        if job.error is not None:
            raise job.error


@functools.cache
def helper_threads() -> HelperThreads:
    """The process's helper threads (one set per process, like OpenBLAS's or Numba's pools)."""
    return HelperThreads()


def run_chunks(task: Callable[[int], None], count: int, threads: int | None) -> None:
    """task(0..count-1) on ``threads`` threads in all (the caller plus threads-1 helpers; None: the default);
    serially when one thread or one chunk. Chunks release the GIL (BLAS calls) to run in parallel."""
    threads = default_threads() if threads is None else threads
    if threads <= 1 or count <= 1:
        for i in range(count):
            task(i)
        return
    helper_threads().run(task, count, threads - 1)
