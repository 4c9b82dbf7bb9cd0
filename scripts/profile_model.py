"""Where one model's call spends its time: the functions cProfile sees, and every GEMM timed in the model
beside the same GEMM alone.

The model is loaded with ``parsicore.load(MODEL, backend="numba", threads=1)``. It is called on a standard
normal input, a few times untimed and then ``--calls`` times under cProfile. Then it is called again with
``ConvKernel._matmul`` wrapped, to record each GEMM shape's median time inside the model. Each shape is then
timed alone with ``np.matmul`` on random operands whose caches stay warm. A GEMM much slower in the model
than alone is held back by memory, not by arithmetic::

    python scripts/profile_model.py MODEL.h5 [--calls 20] [--top 18]

(models from scripts/bench_models.py, e.g. ``python -c "import bench_models as b;
b.DENSE['resnet18']().save('resnet18.h5')"`` from scripts/).
"""

from __future__ import annotations

import argparse
import collections
import cProfile
import pstats
import sys
import time
from pathlib import Path

import numpy as np

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

import parsicore  # noqa: E402
from parsicore.kernels.numpy_backend import conv as numpy_conv  # noqa: E402


def _median_ms(fn, repeats: int) -> float:
    times = []
    for _ in range(repeats):
        t0 = time.perf_counter()
        fn()
        times.append(time.perf_counter() - t0)
    return float(np.median(times)) * 1e3


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("model", type=Path)
    parser.add_argument("--calls", type=int, default=20, help="profiled calls (default 20)")
    parser.add_argument("--top", type=int, default=18, help="functions listed by own time (default 18)")
    args = parser.parse_args()

    model = parsicore.load(args.model, backend="numba", threads=1)
    x = np.random.default_rng(0).standard_normal((1, *model.inputs[0].shape[1:]), dtype=np.float32)
    for _ in range(5):
        model(x)
    print(f"{args.model}: {_median_ms(lambda: model(x), args.calls):.2f} ms per call (median of {args.calls})")

    profile = cProfile.Profile()
    profile.enable()
    for _ in range(args.calls):
        model(x)
    profile.disable()
    pstats.Stats(profile).sort_stats("tottime").print_stats(args.top)

    recorded: dict[tuple[tuple[int, ...], tuple[int, ...]], list[float]] = collections.defaultdict(list)
    original = numpy_conv.ConvKernel._matmul

    def timed(self, a, b, out, split=None):  # type: ignore[no-untyped-def]
        t0 = time.perf_counter()
        original(self, a, b, out, split)
        recorded[(a.shape, b.shape)].append(time.perf_counter() - t0)

    numpy_conv.ConvKernel._matmul = timed  # type: ignore[method-assign]
    try:
        for _ in range(args.calls):
            model(x)
    finally:
        numpy_conv.ConvKernel._matmul = original  # type: ignore[method-assign]

    rng = np.random.default_rng(1)
    rows = []
    for (a_shape, b_shape), times in recorded.items():
        inside = float(np.median(times)) * 1e3
        per_call = inside * len(times) / args.calls
        flops = 2 * int(np.prod(a_shape)) * b_shape[-1]
        a = rng.random(a_shape, dtype=np.float32)
        b = rng.random(b_shape, dtype=np.float32)
        out = np.empty((*a_shape[:-1], b_shape[-1]), dtype=np.float32)
        np.matmul(a, b, out=out)
        alone = _median_ms(lambda a=a, b=b, out=out: np.matmul(a, b, out=out), 20)
        rows.append((per_call, a_shape, b_shape, flops / inside / 1e6, flops / alone / 1e6))
    rows.sort(key=lambda r: -r[0])
    print(f"GEMMs: {sum(r[0] for r in rows):.2f} ms per call in all (1 thread)")
    print(f"{'ms/call':>8}  {'A':>16} x {'B':<16}  {'GFLOP/s in model':>16}  {'alone':>6}")
    for per_call, a_shape, b_shape, inside_gf, alone_gf in rows:
        print(f"{per_call:8.2f}  {str(a_shape):>16} x {str(b_shape):<16}  {inside_gf:16.0f}  {alone_gf:6.0f}")


if __name__ == "__main__":
    main()
