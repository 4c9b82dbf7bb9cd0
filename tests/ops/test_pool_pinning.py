"""Numba's pool workers pinned off the caller's CPU (parsicore.kernels.numba_backend.pool_pinning): the CPU plan, the
workers found by their kernel thread ids, the pins a parallel kernel leaves, and a refused pin that leaves the run
unpinned and correct."""

from __future__ import annotations

import os
import threading

import numpy as np
import pytest

from tests.strategies import seeded_array

pool_pinning = pytest.importorskip("parsicore.kernels.numba_backend.pool_pinning")
blas_split = pytest.importorskip("parsicore.kernels.numba_backend.blas_split")


@pytest.mark.parametrize("caller, allowed, workers, wanted", [
    (0, [0, 1], 1, [1]),
    (1, [0, 1], 1, [0]),
    (2, [3, 0, 2, 1], 3, [0, 1, 3]),
    (5, [0, 1], 1, [0]),  # the caller runs outside the mask it reported: every allowed CPU is free
    (0, [0, 1], 2, None),  # fewer free CPUs than workers: nothing pinned
    (0, [0], 1, None),
    (0, [0, 1, 2, 3], 0, []),
])
def test_plan_gives_each_worker_a_cpu_other_than_the_callers(caller: int, allowed: list[int], workers: int,
                                                             wanted: list[int] | None) -> None:
    assert pool_pinning.plan(caller, allowed, workers) == wanted


def _pinnable() -> None:
    if not pool_pinning.available():
        pytest.skip("no gettid / sched_getcpu here")
    if len(os.sched_getaffinity(0)) < 2:
        pytest.skip("one CPU: nothing to pin")


def test_worker_ids_are_this_processes_other_threads() -> None:
    _pinnable()
    pins = pool_pinning.WorkerPins()
    ids = pins.worker_ids(2)
    tasks = {int(t) for t in os.listdir("/proc/self/task")}
    assert ids and set(ids) <= tasks
    assert threading.get_native_id() not in ids


def test_ensure_pins_every_worker_off_the_callers_cpu() -> None:
    _pinnable()
    pins = pool_pinning.WorkerPins()
    assert pins.ensure(2)
    caller_cpu, threads = pins._state  # the CPU the pins were made for
    assert threads == 2
    for tid in pins.worker_ids(2):
        cpus = os.sched_getaffinity(tid)
        assert len(cpus) == 1 and caller_cpu not in cpus
    # Again from the same CPU: nothing to do, still pinned.
    assert pins.ensure(2)


def test_a_refused_pin_leaves_the_run_unpinned_and_correct(monkeypatch: pytest.MonkeyPatch) -> None:
    _pinnable()

    def refuse(tid: int, cpus: object) -> None:
        raise PermissionError("sandbox")

    pins = pool_pinning.WorkerPins()
    monkeypatch.setattr(os, "sched_setaffinity", refuse)
    assert not pins.ensure(2)
    assert not pins.ensure(2)  # stays off: no syscall per region after a failure
    monkeypatch.setattr(pool_pinning, "worker_pins", lambda: pins)
    a, b = seeded_array(1, (64, 48)), seeded_array(2, (48, 40))
    out = np.empty((64, 40), np.float32)
    assert blas_split.split_matmul(a, b, out, 2, True)
    np.testing.assert_allclose(out, a.astype(np.float64) @ b, rtol=1e-4, atol=1e-4)
