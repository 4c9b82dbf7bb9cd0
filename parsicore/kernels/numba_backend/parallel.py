"""Serial and parallel builds of one Numba kernel, and the choice between them at each call.

Every parallel kernel is compiled twice from the same Python source: with ``parallel=True`` (``prange``
splits the loop over Numba's thread pool) and without (``prange`` is a plain ``range``). A call takes the
parallel build only when all of these hold:

- the run may use more than one thread (``KernelContext.threads`` is not 1: a single-threaded run never
  wakes, or even starts, the pool);
- the call has enough work to pay for waking the pool (``work``, in elements touched, at least
  :data:`MIN_PARALLEL_WORK`; below that the hand-off costs more than it saves);
- no other Python thread is inside a parallel kernel right now. Numba's ``workqueue`` threading layer
  (the only one when neither TBB nor OpenMP is installed) aborts the process on concurrent parallel calls,
  and with the others concurrent callers would only oversubscribe the cores; so :data:`PARALLEL_GATE` is
  tried without waiting, and a caller that finds it taken runs the serial build.
"""

from __future__ import annotations

import threading
import types
from collections.abc import Callable
from typing import Any

import numba

from parsicore import threads
from parsicore.kernels.numba_backend import pool_pinning

#: Whether this process's OpenMP threads wait spinning between parallel regions (parsicore.threads.threads_spin;
#: read once, as libgomp reads the environment once, when the threading layer loads).
SPINNING = threads.threads_spin()

#: Below this many elements of work a kernel runs serially even when threads are allowed. Sleeping threads: 2^20
#: (tuned with numpy_backend.conv.PARALLEL_GEMM_MACS: 2^16 made small models slower with 2 threads than with 1;
#: on a Xeon VM 2^18 made MobileNetV2 1.17x slower with 2 threads than with 1, 2^20 1.06x, with
#: ResNet-18-gated50 still gaining, 0.88x). Spinning threads (x86-64 by default): 2^16; against 2^20 (python
#: scripts/ab_settings.py MODEL --threads 2 --a "parallel.MIN_PARALLEL_WORK=1048576" --b
#: "parallel.MIN_PARALLEL_WORK=65536", fourteenth session, Zen 4 VM): small CNN 0.943, VGG-style 0.917, ResNet-18
#: 0.958, ResNet-18-gated50 0.858, MobileNetV2 0.998, default model 0.998, MobileNetV2-gated50 1.045; 2^15 and
#: 2^17 against 2^16 within 0.96-1.10 either way. A parallel kernel also costs its reader: the half of its output
#: written on the other core is read by the next step on this one (scripts/profile_steps.py MODEL --serial-numba).
MIN_PARALLEL_WORK = 1 << 16 if SPINNING else 1 << 20

#: GEMMs of at least this many MACs run split over the pool: the row GEMM, the packed GEMM and, through
#: blas_split, OpenBLAS's. Sleeping threads (OMP_WAIT_POLICY=PASSIVE) cost ~15-100 us to wake, and only GEMMs
#: of 2^25 MACs paid for it (numpy_backend.conv.PARALLEL_GEMM_MACS). Spinning ones (parsicore.threads: the
#: default on x86-64) take a region in ~2 us, and from 2^20 MACs (~10-20 us alone) a GEMM gains from a second
#: thread; 2^22 made the small CNN 1.10x slower at 2 threads, others 0.98-1.02 (python scripts/ab_settings.py
#: MODEL --threads 2 --a "parallel.MIN_PARALLEL_MACS=1048576" --b "parallel.MIN_PARALLEL_MACS=4194304",
#: fourteenth session, Zen 4 VM).
MIN_PARALLEL_MACS = 1 << 20 if SPINNING else 1 << 25


def splits_gemm(threads: int | None, macs: int, forced: bool | None = None, min_macs: int | None = None) -> bool:
    """Whether a GEMM of ``macs`` MACs runs split over the pool: never with one thread; else ``forced`` when
    given, else from ``min_macs`` (None: :data:`MIN_PARALLEL_MACS`, read at the call)."""
    if threads == 1:
        return False
    if forced is not None:
        return forced
    return macs >= (MIN_PARALLEL_MACS if min_macs is None else min_macs)


def wants_parallel(threads: int | None, work: int) -> bool:
    """Whether a kernel pair called with ``threads`` and ``work`` asks for its parallel build (it still runs the
    serial one while another thread holds :data:`PARALLEL_GATE`)."""
    return threads != 1 and work >= MIN_PARALLEL_WORK


#: Whether the pool's workers are pinned off the caller's CPU before each parallel region (pool_pinning): only
#: when they spin, the one case where a woken worker placed on the caller's CPU waits out the caller's spin.
PIN_WORKERS = SPINNING and pool_pinning.available()

#: Held while a parallel build runs. Module-level on purpose: Numba's thread pool is one per process.
PARALLEL_GATE = threading.Lock()

_OPTIONS = {"cache": True, "nogil": True, "fastmath": False, "error_model": "numpy"}


class KernelPair:
    """The serial and parallel builds of one kernel; ``pair(threads, work, *args)`` picks one and calls it."""

    def __init__(self, py_func: Callable[..., Any]) -> None:
        # Numba's on-disk cache keys a function by its qualified name, not by its compile flags: the serial
        # build is a copy of the function under another name so the two never load each other's code.
        serial_func = types.FunctionType(py_func.__code__, py_func.__globals__, py_func.__name__ + "_serial",
                                         py_func.__defaults__, py_func.__closure__)
        serial_func.__qualname__ = py_func.__qualname__ + "_serial"
        serial_func.__doc__ = py_func.__doc__
        self.serial = numba.njit(**_OPTIONS)(serial_func)
        self.parallel = numba.njit(parallel=True, **_OPTIONS)(py_func)
        self.__doc__ = py_func.__doc__

    def __call__(self, threads: int | None, work: int, *args: Any) -> Any:
        if wants_parallel(threads, work) and PARALLEL_GATE.acquire(blocking=False):
            try:
                # Numba's thread count is per calling thread; set here, so the pool starts only when used.
                wanted = numba.config.NUMBA_NUM_THREADS if threads is None else min(threads,
                                                                                   numba.config.NUMBA_NUM_THREADS)
                if numba.get_num_threads() != wanted:
                    numba.set_num_threads(wanted)
                if PIN_WORKERS:
                    pool_pinning.worker_pins().ensure(wanted)
                return self.parallel(*args)
            finally:
                PARALLEL_GATE.release()
        return self.serial(*args)


def serial_and_parallel(py_func: Callable[..., Any]) -> KernelPair:
    """Decorator: compile ``py_func`` (which uses ``numba.prange`` for its one parallel loop) both ways."""
    return KernelPair(py_func)


def jit(py_func: Callable[..., Any]) -> Any:
    """Decorator for serial helpers and kernels: Numba's njit with parsicore's options (cached on disk)."""
    return numba.njit(**_OPTIONS)(py_func)


def jit_inline(py_func: Callable[..., Any]) -> Any:
    """Decorator for small loop helpers inlined into their callers at Numba's level. Needed when a caller
    passes the same array twice (in-place): out of line, LLVM's run-time alias check fails and the loop
    runs unvectorised (~4x slower); inlined, the caller's code shows the two are one array."""
    return numba.njit(inline="always", **_OPTIONS)(py_func)


#: Most chunks a kernel splits its channels into when every chunk allocates its own scratch planes (more
#: chunks than threads only balance the load between them).
SCRATCH_CHUNKS = 16


def chunk_count(tasks: int) -> int:
    """How many chunks a kernel with per-chunk scratch splits ``tasks`` channels into (at least 1)."""
    return max(1, min(SCRATCH_CHUNKS, tasks))


@jit_inline
def chunk_bounds(chunk, chunks, tasks):
    """The tasks [start, stop) of chunk ``chunk`` of ``chunks`` (as even as possible, in order)."""
    per_chunk = (tasks + chunks - 1) // chunks
    return chunk * per_chunk, min(tasks, (chunk + 1) * per_chunk)
