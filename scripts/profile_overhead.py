"""How much of one model call is kernels and how much is Python: every Numba dispatch and ``np.matmul`` of one
call is recorded per step, then the model's call and the replay of those leaf calls alone are timed in turn::

    python scripts/profile_overhead.py MODEL.h5 [CALLS]     # CALLS timed calls, default 300

Prints the model's median latency, the sum of the steps' kernel times (each step's kernel wrapped in a timer),
the leaf replay's median, and per step its kernel time beside its leaves' time. Model minus steps is the
runtime loop's Python; steps minus leaves is the Python inside the kernels' wrappers. 1 thread, numba backend.
"""

from __future__ import annotations

import argparse
import collections
import sys
import time
from pathlib import Path

import numpy as np
from numba.core.registry import CPUDispatcher

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

import parsicore  # noqa: E402
from parsicore.errors import ParsicoreError  # noqa: E402


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("model", help="a parsicore model file (.h5)")
    ap.add_argument("calls", nargs="?", type=int, default=300, help="timed calls (default 300)")
    args = ap.parse_args()
    path = args.model
    calls_timed = args.calls
    if calls_timed < 1:
        ap.error("calls must be at least 1")
    try:
        model = parsicore.load(path, backend="numba", threads=1)
    except ParsicoreError as e:
        ap.exit(2, f"profile_overhead.py: error: {e}\n")
    x = np.random.default_rng(0).standard_normal((1, *model.inputs[0].shape[1:]), dtype=np.float32)
    for _ in range(10):
        model(x)
    original_call, original_matmul = CPUDispatcher.__call__, np.matmul
    current: list[str | None] = [None]
    depth = [0]
    leaves: dict[str | None, list] = collections.defaultdict(list)

    def record_call(self, *a, **k):  # type: ignore[no-untyped-def]
        if depth[0] == 0:
            leaves[current[0]].append((self, a, k))
        depth[0] += 1
        try:
            return original_call(self, *a, **k)
        finally:
            depth[0] -= 1

    def record_matmul(*a, **k):  # type: ignore[no-untyped-def]
        if depth[0] == 0:
            leaves[current[0]].append((original_matmul, a, k))
        return original_matmul(*a, **k)

    step_times: dict[str, list[float]] = collections.defaultdict(list)

    def timed(name, kernel):  # type: ignore[no-untyped-def]
        def run(*a, **k):  # type: ignore[no-untyped-def]
            current[0] = name
            t0 = time.perf_counter()
            result = kernel(*a, **k)
            step_times[name].append(time.perf_counter() - t0)
            current[0] = None
            return result
        return run

    steps = model._plan.steps
    for step in steps:
        object.__setattr__(step, "kernel", timed(step.name, step.kernel))
    CPUDispatcher.__call__, np.matmul = record_call, record_matmul
    try:
        model(x)
    finally:
        CPUDispatcher.__call__, np.matmul = original_call, original_matmul
    step_times.clear()
    replay_times: dict[str | None, list[float]] = collections.defaultdict(list)
    totals, replays = [], []
    for _ in range(calls_timed):
        t0 = time.perf_counter()
        model(x)
        totals.append(time.perf_counter() - t0)
        t1 = time.perf_counter()
        for name, recorded in leaves.items():
            t2 = time.perf_counter()
            for fn, a, k in recorded:
                fn(*a, **k)
            replay_times[name].append(time.perf_counter() - t2)
        replays.append(time.perf_counter() - t1)

    def ms(values: list[float]) -> float:
        return float(np.median(values)) * 1e3 if values else 0.0

    print(f"{path}: model {ms(totals):.3f} ms, steps' kernels {sum(ms(v) for v in step_times.values()):.3f} ms, "
          f"leaf replay {ms(replays):.3f} ms (median of {calls_timed})")
    for step in steps:
        print(f"{step.name:16s} {step.op_type:18s} step {ms(step_times[step.name]) * 1e3:7.1f} us   "
              f"leaves {ms(replay_times[step.name]) * 1e3:7.1f} us ({len(leaves.get(step.name, []))} calls)")


if __name__ == "__main__":
    main()
