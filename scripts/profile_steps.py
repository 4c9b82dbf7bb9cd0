"""Per-step kernel times of two runs called in turn (A B, B A, ...), step by step: where one model differs from
another, or a 2-thread run with Numba's parallel builds from the same run with them off::

    python scripts/profile_steps.py DENSE.h5 GATED.h5 [--threads 1] [--calls 40]   # e.g. a gated variant
    python scripts/profile_steps.py MODEL.h5 --serial-numba [--threads 2]           # parallel vs serial kernels
    python scripts/profile_steps.py MODEL.h5 --a-set winograd.MIN_TILES_F4=1073741824  # A loaded with a setting
    python scripts/profile_steps.py MODEL.h5 --b-threads 2                           # 1 thread vs 2, per step
    python scripts/profile_steps.py MODEL.h5 --threads 2 --b-work 65536              # a lower parallel threshold

Every step's kernel is wrapped in a timer (numba backend); steps are matched by name. Prints per step the two
medians (us), the steps with the largest differences first, the sums, and the sums by the last part of the
step name (``block3.dw`` -> ``dw``), which groups a network's repeated layers.
"""

from __future__ import annotations

import argparse
import collections
import contextlib
import sys
import time
from pathlib import Path

import numpy as np

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

from ab_settings import apply, parse_settings  # noqa: E402  (scripts/, this script's directory)

import parsicore  # noqa: E402
from parsicore.kernels.numba_backend import parallel  # noqa: E402


@contextlib.contextmanager
def settings(assignments: list[str]):  # type: ignore[no-untyped-def]
    """Integer module constants set while a model loads (the choices they make are fixed at load), e.g.
    ``winograd.MIN_TILES_F4=1073741824`` (names as in scripts/ab_settings.py)."""
    parsed = parse_settings(" ".join(assignments))
    saved = [(module, attr, getattr(module, attr)) for module, attr, _ in parsed]
    try:
        apply(parsed)
        yield
    finally:
        apply(saved)


def timed(path: Path, threads: int) -> tuple[parsicore.Model, dict[str, list[float]]]:
    """The model with every step's kernel wrapped in a timer; the times by step name."""
    model = parsicore.load(path, backend="numba", threads=threads)
    times: dict[str, list[float]] = collections.defaultdict(list)
    for step in model.plan.steps:
        def wrapped(ins, outs, _kernel=step.kernel, _name=step.name, **gating):
            t = time.perf_counter()
            _kernel(ins, outs, **gating)
            times[_name].append(time.perf_counter() - t)
        object.__setattr__(step, "kernel", wrapped)
    return model, times


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("a", type=Path)
    ap.add_argument("b", type=Path, nargs="?", help="second model (default: A again, see --serial-numba)")
    ap.add_argument("--serial-numba", action="store_true", help="B runs with Numba's parallel builds off")
    ap.add_argument("--b-work", type=int, default=None, metavar="N",
                    help="B runs with parallel.MIN_PARALLEL_WORK = N (read at each call)")
    ap.add_argument("--a-set", action="append", default=[], metavar="MODULE.NAME=INT",
                    help="load A with this module constant (repeatable); B is A's model without it by default")
    ap.add_argument("--threads", type=int, default=None, help="default 1, or 2 with --serial-numba")
    ap.add_argument("--b-threads", type=int, default=None, help="B's thread count (default: --threads)")
    ap.add_argument("--calls", type=int, default=40)
    ap.add_argument("--top", type=int, default=15)
    args = ap.parse_args()
    if args.b is None and not args.serial_numba and not args.a_set and args.b_threads is None and args.b_work is None:
        ap.error("give a second model, --serial-numba, --a-set, --b-threads or --b-work")
    if args.serial_numba and args.b_work is not None:
        ap.error("--serial-numba is --b-work 2**62: give one of them")
    threads = args.threads or (2 if args.serial_numba else 1)
    with settings(args.a_set):
        a, ta = timed(args.a, threads)
    b_threads = args.b_threads or threads
    b, tb = timed(args.b or args.a, b_threads)
    x = np.random.default_rng(0).random((1, *a.inputs[0].shape[1:]), dtype=np.float32)
    default_work = parallel.MIN_PARALLEL_WORK

    b_work = 1 << 62 if args.serial_numba else args.b_work

    def call_b() -> None:
        if b_work is not None:
            parallel.MIN_PARALLEL_WORK = b_work
        try:
            b(x)
        finally:
            parallel.MIN_PARALLEL_WORK = default_work

    for i in range(args.calls + 5):
        if i == 5:  # warm-up over
            for t in (*ta.values(), *tb.values()):
                t.clear()
        for call in ((lambda: a(x)), call_b)[:: 1 if i % 2 else -1]:  # A B, B A, ...: neither always goes first
            call()
    ma = {k: float(np.median(v)) * 1e6 for k, v in ta.items()}
    mb = {k: float(np.median(v)) * 1e6 for k, v in tb.items()}
    ops = {s.name: (s.op_type, tuple(s.out_shapes[0])) for s in (*a.plan.steps, *b.plan.steps)}
    label_b = "serial numba" if args.serial_numba else (args.b or args.a).name + (
        f" (parallel.MIN_PARALLEL_WORK={b_work})" if b_work is not None else "")
    label_a = args.a.name + "".join(f" ({item})" for item in args.a_set)
    if b_threads != threads:
        label_a, label_b = f"{label_a} at {threads} thread(s)", f"{label_b} at {b_threads}"
        print(f"A = {label_a}, B = {label_b}, median of {args.calls} calls (us)")
    else:
        print(f"A = {label_a}, B = {label_b}, {threads} thread(s), median of {args.calls} calls (us)")
    names = list(dict.fromkeys([*ma, *mb]))
    for name in sorted(names, key=lambda n: -abs(mb.get(n, 0.0) - ma.get(n, 0.0)))[: args.top]:
        op, shape = ops[name]
        print(f"  {name:28s} {op:18s} {str(shape):18s} A {ma.get(name, 0.0):8.1f}  B {mb.get(name, 0.0):8.1f}")
    groups: collections.Counter[tuple[str, str]] = collections.Counter()
    for name in names:
        kind = name.split(".")[-1]
        groups[kind, "a"] += ma.get(name, 0.0)
        groups[kind, "b"] += mb.get(name, 0.0)
    print("by kind:")
    for kind in sorted({k for k, _ in groups}):
        ga, gb = groups[kind, "a"], groups[kind, "b"]
        print(f"  {kind:16s} A {ga:9.0f}  B {gb:9.0f}  B/A {gb / ga:.2f}" if ga else
              f"  {kind:16s} A {ga:9.0f}  B {gb:9.0f}")
    print(f"sum of steps: A {sum(ma.values()) / 1e3:.2f} ms, B {sum(mb.values()) / 1e3:.2f} ms")


if __name__ == "__main__":
    main()
