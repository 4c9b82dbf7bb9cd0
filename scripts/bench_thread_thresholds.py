"""Sweep the two thresholds that decide when a run with 2 threads splits work over them.

``MIN_PARALLEL_WORK`` (Numba kernels: elements of work below which the serial build runs) and
``PARALLEL_GEMM_MACS`` (GEMMs below this many MACs are not split over parsicore's helper threads). For each
model, a 1-thread and a 2-thread instance are called in turn (interleaved, so machine load hits both alike)
and the ratio of the 2-thread median to the 1-thread median is printed per setting: below 1.0 the threads
pay, above 1.0 they cost. Run on a quiet machine::

    python scripts/bench_thread_thresholds.py MODEL.h5 [MODEL.h5 ...]

(models from scripts/bench_models.py, e.g. ``python -c "import bench_models as b;
b.DENSE['resnet18']().save('resnet18.h5')"`` from scripts/, and weights/fashion_gated.h5).
"""

from __future__ import annotations

import argparse
import sys
import time
from pathlib import Path

import numpy as np

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

import parsicore  # noqa: E402
from parsicore.kernels.numba_backend import parallel  # noqa: E402
from parsicore.kernels.numpy_backend import conv as numpy_conv  # noqa: E402

SETTINGS = [(1 << 16, 1 << 21), (1 << 18, 1 << 23), (1 << 19, 1 << 24), (1 << 20, 1 << 25), (1 << 21, 1 << 25),
            (1 << 22, 1 << 26), (1 << 62, 1 << 62)]


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("models", nargs="+", type=Path)
    ap.add_argument("--calls", type=int, default=0, help="timed calls per setting (0: 200 for small models, 15 else)")
    args = ap.parse_args()
    print(f"setting = (MIN_PARALLEL_WORK, PARALLEL_GEMM_MACS); now ({parallel.MIN_PARALLEL_WORK}, "
          f"{numpy_conv.PARALLEL_GEMM_MACS}); 2^62 = never split")
    for path in args.models:
        one = parsicore.load(path, backend="numba", threads=1)
        two = parsicore.load(path, backend="numba", threads=2)
        x = np.random.default_rng(0).random((1, *one.inputs[0].shape[1:]), dtype=np.float32)
        calls = args.calls or (200 if one.plan.dense_macs < 100_000_000 else 15)
        cells = []
        for work, macs in SETTINGS:
            parallel.MIN_PARALLEL_WORK, numpy_conv.PARALLEL_GEMM_MACS = work, macs
            for _ in range(3):
                one(x)
                two(x)
            t1, t2 = [], []
            for _ in range(calls):
                t = time.perf_counter()
                one(x)
                t1.append(time.perf_counter() - t)
                t = time.perf_counter()
                two(x)
                t2.append(time.perf_counter() - t)
            cells.append(f"2^{work.bit_length() - 1},2^{macs.bit_length() - 1}: {np.median(t2) / np.median(t1):.2f}")
        print(f"{path.name}: 1 thread {np.median(t1) * 1e3:.2f} ms | 2 threads / 1 thread: " + " | ".join(cells),
              flush=True)


if __name__ == "__main__":
    main()
