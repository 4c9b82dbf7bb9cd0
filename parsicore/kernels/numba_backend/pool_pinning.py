"""Numba's OpenMP worker threads kept off the CPU of the thread that starts a parallel region, while they spin.

Why: with a spin count (``GOMP_SPINCOUNT``, :mod:`parsicore.threads`) a worker that finished a region spins, then
sleeps. When the next region wakes it, Linux places the woken thread on the CPU of the thread that woke it (the
caller, which then spins in the region's end barrier on that CPU until its own count runs out). On the 2-vCPU VM
of the fourteenth session the first region after an idle spell longer than the spin took as long as the spin:
1.45-1.53 ms at GOMP_SPINCOUNT=30000 against 57-108 us with the worker pinned to the other CPU
(``python scripts/bench_thread_wakeup.py``). OpenMP's own binding (``OMP_PROC_BIND``) would pin the caller too,
and every thread the caller starts afterwards inherits its mask (an application's threads, another engine's
pool), so only the workers are pinned here, to the allowed CPUs other than the caller's current one, and again
whenever the caller has moved to another CPU (one ``sched_getcpu`` call per parallel region, ~0.2 us).

The workers' kernel thread ids come from a parallel region in which each thread calls ``gettid`` (through its
address, like :mod:`parsicore.kernels.numba_backend.blas_split`'s BLAS calls). No ``gettid`` or
``sched_getcpu`` in the C library, a layer other than ``omp``, fewer free CPUs than workers, or a failed
``sched_setaffinity``: nothing is pinned and the run goes on as before.
"""

from __future__ import annotations

import ctypes
import functools
import os
import threading
from typing import Any

import numba
import numpy as np
from llvmlite import ir
from numba.core import types
from numba.extending import intrinsic


@intrinsic
def _call_int_function(typingctx, address):  # type: ignore[no-untyped-def]
    """The C function ``int f(void)`` at ``address`` (an int64), called; its result as int64."""

    def codegen(context, builder, signature, args):  # type: ignore[no-untyped-def]
        fnty = ir.FunctionType(ir.IntType(32), [])
        fn = builder.inttoptr(args[0], fnty.as_pointer())
        return builder.sext(builder.call(fn, []), ir.IntType(64))

    return types.int64(types.int64), codegen


@numba.njit(parallel=True, cache=True, nogil=True)
def _thread_ids_kernel(gettid_address, out):
    """out[t] = the kernel thread id of the pool's thread t (numba.get_thread_id()), for every thread that takes
    an iteration; out int64 (threads,), other entries untouched. Many iterations per thread, so each takes some."""
    for _ in numba.prange(out.shape[0] * 64):
        out[numba.get_thread_id()] = _call_int_function(gettid_address)


@functools.cache
def _libc() -> tuple[int, Any] | None:
    """(address of gettid, sched_getcpu) from the C library, or None where either is missing."""
    try:
        libc = ctypes.CDLL(None)
    except OSError:
        return None
    gettid = getattr(libc, "gettid", None)
    getcpu = getattr(libc, "sched_getcpu", None)
    if gettid is None or getcpu is None or not hasattr(os, "sched_setaffinity"):
        return None
    getcpu.argtypes, getcpu.restype = [], ctypes.c_int
    address = ctypes.cast(gettid, ctypes.c_void_p).value
    return (int(address), getcpu) if address else None


def available() -> bool:
    """Whether workers can be pinned here (Linux C library with gettid and sched_getcpu)."""
    return _libc() is not None


def plan(caller_cpu: int, allowed: list[int], workers: int) -> list[int] | None:
    """The CPU of each of ``workers`` workers: the ``allowed`` CPUs other than ``caller_cpu``, in order; None when
    there are fewer of those than workers (then nothing is pinned)."""
    free = [cpu for cpu in sorted(allowed) if cpu != caller_cpu]
    return free[:workers] if len(free) >= workers else None


class WorkerPins:
    """Where this process's pool workers are pinned. :meth:`ensure` is called with parallel.PARALLEL_GATE held (one
    parallel caller at a time), so its state needs no lock of its own."""

    def __init__(self) -> None:
        self._ids: dict[int, tuple[int, ...]] = {}  # thread count -> the workers' kernel thread ids
        self._state: tuple[int, int] | None = None  # (caller's CPU, thread count) the pins were made for
        self._failed = False

    def worker_ids(self, threads: int) -> tuple[int, ...]:
        """Kernel thread ids of the pool's workers 1..threads-1 (the pool's thread count already set to
        ``threads``); workers that took no iteration are left out."""
        found = self._ids.get(threads)
        if found is None:
            libc = _libc()
            assert libc is not None
            out = np.full(threads, -1, dtype=np.int64)
            _thread_ids_kernel(libc[0], out)
            caller = threading.get_native_id()
            found = tuple(int(t) for t in out[1:] if t > 0 and t != caller)
            self._ids[threads] = found
        return found

    def ensure(self, threads: int) -> bool:
        """Pin the workers of a ``threads``-thread region to CPUs other than the caller's; True when they are."""
        if self._failed or threads < 2:
            return False
        libc = _libc()
        if libc is None:
            self._failed = True
            return False
        cpu = libc[1]()
        if self._state == (cpu, threads):
            return True
        workers = self.worker_ids(threads)
        if numba.threading_layer() != "omp":  # known once the pool has run (worker_ids ran it)
            self._failed = True
            return False
        allowed = os.sched_getaffinity(0)
        cpus = plan(cpu, list(allowed), len(workers))
        try:
            if cpus is None:
                for tid in workers:
                    os.sched_setaffinity(tid, allowed)
                self._state = None
                return False
            for tid, target in zip(workers, cpus):
                os.sched_setaffinity(tid, {target})
        except OSError:
            self._failed = True  # e.g. a worker gone, or a sandbox that forbids it: run unpinned from now on
            return False
        self._state = (cpu, threads)
        return True


@functools.cache
def worker_pins() -> WorkerPins:
    """The process's pins (one pool per process, like Numba's)."""
    return WorkerPins()
